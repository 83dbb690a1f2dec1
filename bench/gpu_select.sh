#!/bin/bash
# One device call for session 9's forward changes: the GPU tests of compression + top-n (SELECT "sort" / "topk",
# paper and fla_compat) and of cmp_fwd (TMA loads now the sm90 default); the scoring sweep on both specs
# (slc_topk SELECT / BLOCK_S / BLOCK_M points, cmp_fwd TMA against pointer loads) and the window forward with
# TMA against pointer loads, each against the default in the same process.
# Usage on the device: OUT=/some/dir [TEST_LIMIT=200] [BENCH_LIMIT=200] bash bench/gpu_select.sh
set -u
OUT=${OUT:-/tmp/nsa_select_out}
source "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"
$PY -c "import triton, triton.language as tl; print('triton', triton.__version__, 'topk', hasattr(tl, 'topk'),
'bitonic_merge', hasattr(tl, 'bitonic_merge'))" > "$OUT/triton_topk.txt" 2>&1
run_gpu_tests "${TEST_LIMIT:-200}" "tests/codegen/test_topk.py tests/codegen/test_cmp_fwd.py" \
  tests/codegen/test_topk.py test_gpu_paper_spec_128k_sampled_rows
timeout "${BENCH_LIMIT:-200}" $PY bench/bench_cmp_topk.py --specs fla_compat nsa_paper --T 16384 65536 \
  --kernels cmp_fwd slc_topk > "$OUT/cmp_topk_log.txt" 2>&1
echo "cmp_topk rc=$?" >> "$OUT/cmp_topk_log.txt"
for T in 8192 65536; do
  timeout 100 $PY bench/sweep_slcwin.py --T $T --specs nsa_paper,small_group --out "$OUT" --name "win_tma_T$T" \
    --window '[{"LOADS": "pointers"}, {"LOADS": "tma"}, {"LOADS": "tma", "num_stages": 3}]' > "$OUT/win_T$T.txt" 2>&1
  echo "win rc=$?" >> "$OUT/win_T$T.txt"
done
echo "=== triton"; cat "$OUT/triton_topk.txt"
echo "=== tests"; grep -E "passed|failed|FAILED|rc=" "$OUT/pytest_gpu.txt" | tail -8
echo "=== compression + top-n"; grep -E "^\{'spec'|^\||rc=|ERR" "$OUT/cmp_topk_log.txt" \
  | sed -E "s/'compile_s': [0-9.]+//" | cut -c1-230
echo "=== window"; grep -E "^\||rc=" "$OUT"/win_T*.txt
