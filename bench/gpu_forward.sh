#!/usr/bin/env bash
# One device call for the forward: GPU correctness tests of the selection/window kernels (bf16 vs fp32
# reference, paper spec at 8k + a 128k sampled-rows run), optionally a config sweep at T = 32k (SWEEP=1; its
# best configs feed the benchmark), then bench_forward.py. Results go to $OUT (default bench/results).
set -u
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export NSA_DSL_CACHE_DIR=${NSA_DSL_CACHE_DIR:-/tmp/nsa_dsl_cache}
timeout "${T_TEST:-100}" python -m pytest -q -m gpu tests/codegen/test_slc_fwd.py tests/codegen/test_win_fwd.py \
  -k "${TEST_K:-8192 or 128k}" -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/forward_gpu_tests.txt"
CFG=()
if [ "${SWEEP:-0}" = 1 ]; then
  timeout "${T_SWEEP:-150}" python bench/sweep_slcwin.py --T 32768 --fast --best "$OUT/forward_configs.json" \
    --out "$OUT" 2>&1 | grep -v "^{" | tail -25
  CFG=(--config-file "$OUT/forward_configs.json")
fi
timeout "${T_BENCH:-420}" python bench/bench_forward.py "${CFG[@]}" --out "$OUT" "$@" 2>&1 | tail -60
