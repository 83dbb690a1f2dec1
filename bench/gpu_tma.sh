#!/bin/bash
# One device call for the TMA options built in session 8 without device time (cmp_fwd / win_fwd LOADS,
# bwd_cmp / bwd_win LOADS, bwd_slc DQ_LOADS): their GPU tests first (bf16 against the reference; the backward
# ones bitwise against the pointer loads), then the timings, each against the current default in the same
# process: the scoring sweep (cmp_fwd TMA points), the eighth backward sweep, and nsa-tune on win_fwd.
# Usage on the device: OUT=/some/dir [TEST_LIMIT=200] [BENCH_LIMIT=150] bash bench/gpu_tma.sh
set -u
OUT=${OUT:-/tmp/nsa_tma_out}
source "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"
run_gpu_tests "${TEST_LIMIT:-200}" "tests/codegen/test_cmp_fwd.py tests/codegen/test_win_fwd.py tests/codegen/test_backward.py" \
  tests/codegen/test_backward.py test_gpu_dense_branches_tma_equals_pointer_loads
timeout "${BENCH_LIMIT:-150}" $PY bench/bench_cmp_topk.py --T 65536 > "$OUT/cmp_topk_log.txt" 2>&1
echo "cmp_topk rc=$?" >> "$OUT/cmp_topk_log.txt"
timeout "${BENCH_LIMIT:-150}" $PY bench/bench_backward.py --variants nsa_paper --e2e --T 65536 16384 --out "$OUT" \
  > "$OUT/variants_log.txt" 2>&1
echo "variants rc=$?" >> "$OUT/variants_log.txt"
NSA_DSL_CACHE_DIR=/tmp/nsa_tune_cache timeout "${BENCH_LIMIT:-150}" $PY -m nsa_dsl.tuning.cli nsa_paper --kernels win_fwd \
  --seq-lens 64k --trials 12 > "$OUT/tune_win_log.txt" 2>&1
echo "tune rc=$?" >> "$OUT/tune_win_log.txt"
echo "=== tests"; tail -8 "$OUT/pytest_gpu.txt"
echo "=== cmp_fwd (TMA points)"; grep "cmp_fwd" "$OUT/cmp_topk_log.txt" | tail -12
echo "=== backward variants"; grep -v '^{"T"' "$OUT/variants_log.txt" | tail -30
echo "=== win_fwd tuning"; tail -12 "$OUT/tune_win_log.txt"
