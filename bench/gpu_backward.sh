#!/bin/bash
# One batched device call for the backward (issue 4): GPU-marked tests and parallel warm-up compiles first,
# then the benchmark alone on the card (so the tests' load never overlaps a timing).
# Usage on the device: OUT=/some/dir [GPU_TESTS="tests/codegen"] [BENCH_LIMIT=140] [SWEEP=1] [BENCH_T="8192 16384 32768 65536"] \
#   bash bench/gpu_backward.sh
# Second pass (per-kernel variants, old = candidate 0): OUT=... MODE=variants [E2E=1] [E2E_COMPAT=0] [BENCH_T="8192 32768"] \
#   [WARM_LIMIT=130] [TEST_LIMIT=150] [BENCH_LIMIT=110] bash bench/gpu_backward.sh
# (run 1 needed more than 140 s for the whole matrix: use BENCH_LIMIT=300 SWEEP=0, or split BENCH_T)
set -u
OUT=${OUT:-/tmp/nsa_bwd_out}
source "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"
BWD_TESTS=(tests/codegen/test_backward.py test_gpu_bf16_paper_vs_fp32_reference test_gpu_deterministic_bitwise
           test_gpu_training_tracks_reference)
if [ "${MODE:-bench}" = "variants" ]; then
  # second pass: GPU tests and one compile process per variant candidate in parallel, then the per-kernel
  # old-vs-new timings (and, with E2E=1, fwd+bwd with the old, best-per-part and default configs)
  run_gpu_tests "${TEST_LIMIT:-150}" "${GPU_TESTS:-tests/codegen/test_backward.py}" "${BWD_TESTS[@]}" &
  NV=$($PY -c "import sys; sys.path.insert(0, 'bench'); import bench_backward as b; print(len(b.variant_candidates()))")
  for i in $(seq 0 $((NV - 1))); do
    ( timeout "${WARM_LIMIT:-130}" $PY bench/bench_backward.py --warm-variant nsa_paper "$i" > "/tmp/warmv_$i.txt" 2>&1;
      echo "warm variant $i rc=$?" >> "/tmp/warmv_$i.txt" ) &
  done
  if [ "${E2E_COMPAT:-0}" = "1" ]; then
    for i in 0 1; do
      ( timeout "${WARM_LIMIT:-130}" $PY bench/bench_backward.py --warm-variant fla_compat "$i" > "/tmp/warmv_c$i.txt" 2>&1;
        echo "warm fla_compat $i rc=$?" >> "/tmp/warmv_c$i.txt" ) &
    done
  fi
  wait
  for f in /tmp/warmv_*.txt; do tail -2 "$f" >> "$OUT/warm.txt"; done
  E2E_ARG=$([ "${E2E:-1}" = "1" ] && echo --e2e)
  [ "${E2E_COMPAT:-0}" = "1" ] && E2E_ARG="$E2E_ARG --e2e-compat"
  timeout "${BENCH_LIMIT:-110}" $PY bench/bench_backward.py --variants nsa_paper $E2E_ARG \
    --T ${BENCH_T:-8192 32768} --out "$OUT" > "$OUT/variants_log.txt" 2>&1
  echo "variants rc=$?" >> "$OUT/variants_log.txt"
  echo "=== tests"; tail -8 "$OUT/pytest_gpu.txt"
  echo "=== warm"; grep -v "^$" "$OUT/warm.txt" | tail -12
  echo "=== variants"; grep -v '^{"T"' "$OUT/variants_log.txt" | tail -40
  exit 0
fi
run_gpu_tests 110 "${GPU_TESTS:-tests/codegen/test_backward.py}" "${BWD_TESTS[@]}" &
for s in nsa_paper fla_compat; do
  for i in 0 1 2; do
    ( timeout 110 $PY bench/bench_backward.py --warm "$s" "$i" > "/tmp/warm_${s}_$i.txt" 2>&1;
      echo "warm $s $i rc=$?" >> "/tmp/warm_${s}_$i.txt" ) &
  done
done
wait
for f in /tmp/warm_*.txt; do tail -3 "$f" >> "$OUT/warm.txt"; done
SWEEP_ARG=$([ "${SWEEP:-1}" = "1" ] && echo --sweep)
timeout "${BENCH_LIMIT:-140}" $PY bench/bench_backward.py $SWEEP_ARG --T ${BENCH_T:-8192 16384 32768 65536} \
  --sdpa-all-max 8192 --out "$OUT" > "$OUT/bench_log.txt" 2>&1
echo "bench rc=$?" >> "$OUT/bench_log.txt"
echo "=== tests"; tail -25 "$OUT/pytest_gpu.txt"
echo "=== warm"; grep -v "^$" "$OUT/warm.txt" | tail -20
echo "=== bench"; tail -45 "$OUT/bench_log.txt"
