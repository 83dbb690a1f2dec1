#!/bin/bash
# One device call for the end-to-end numbers after a default or record change: the GPU tests of the window,
# forward op, layer and backward, then the full forward (bench_forward.py: paper vs cuDNN, fla_compat vs
# fla-core) and forward + backward (bench_backward.py), every baseline in the same process.
# Usage on the device: OUT=/some/dir [T="16384 65536"] [TESTS="..." (empty: none)] [TEST_LIMIT=220] [FWD_LIMIT=200] [BWD_LIMIT=240] bash bench/gpu_e2e.sh
set -u
OUT=${OUT:-/tmp/nsa_e2e_out}
source "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"
TS=${T:-16384 65536}
TESTS=${TESTS-tests/codegen/test_win_fwd.py tests/codegen/test_forward_op.py tests/test_layer.py tests/codegen/test_backward.py}
if [ -n "$TESTS" ]; then
  run_gpu_tests "${TEST_LIMIT:-220}" "$TESTS" tests/codegen/test_backward.py test_gpu_bf16_paper_vs_fp32_reference
else
  echo "gpu tests skipped (TESTS empty)" > "$OUT/pytest_gpu.txt"
fi
# shellcheck disable=SC2086  # TS is a list
timeout "${FWD_LIMIT:-200}" $PY bench/bench_forward.py --no-schedules --no-flex --T $TS --out "$OUT" --name forward_e2e \
  > "$OUT/forward_log.txt" 2>&1
echo "forward rc=$?" >> "$OUT/forward_log.txt"
# shellcheck disable=SC2086
timeout "${BWD_LIMIT:-240}" $PY bench/bench_backward.py --T $TS --sdpa-backends cudnn flash --out "$OUT" \
  > "$OUT/backward_log.txt" 2>&1
echo "backward rc=$?" >> "$OUT/backward_log.txt"
echo "=== tests"; grep -E "passed|failed|FAILED|rc=" "$OUT/pytest_gpu.txt" | tail -8
echo "=== forward"; grep -E "^\||rc=" "$OUT/forward_log.txt" | tail -24
echo "=== backward"; grep -E "^\||rc=" "$OUT/backward_log.txt" | tail -40
