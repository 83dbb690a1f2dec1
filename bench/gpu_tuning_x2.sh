#!/usr/bin/env bash
# One call on a 2-GPU host: (1) the `nsa-tune --workers` wall-time gain — the same tuning job (paper spec,
# forward kernels, 8k and 32k, --trials N) with 1 worker and with 2, each from an empty tuning cache and an
# empty Triton cache so that neither reuses the other's compiles; (2) the exhaustive slc_topk grid at 8k and
# the 25%-budget Optuna/random searches on it (bench_tuning.py phases A/B). Logs under $OUT.
set -u
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
TRIALS=${TRIALS:-12}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/tuning_x2_cards.txt"
for W in 1 2; do
  export NSA_DSL_CACHE_DIR=/tmp/tune_w$W TRITON_CACHE_DIR=/tmp/triton_w$W
  rm -rf "$NSA_DSL_CACHE_DIR" "$TRITON_CACHE_DIR"
  t0=$(date +%s.%N)
  timeout "${T_TUNE:-200}" nsa-tune nsa_paper --seq-lens 8k,32k --kernels fwd --trials "$TRIALS" --workers $W \
    > "$OUT/tuning_workers$W.log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  echo "WORKERS $W rc=$rc wall_s=$(python3 -c "print(round($t1-$t0,1))")" | tee -a "$OUT/tuning_workers.txt"
  tail -20 "$OUT/tuning_workers$W.log"
done
unset TRITON_CACHE_DIR
export NSA_DSL_CACHE_DIR=/tmp/tune_grid
[ "${GRID:-1}" = 1 ] && timeout "${T_GRID:-240}" python bench/bench_tuning.py --spec nsa_paper --kernels "" --grid-kernel slc_topk \
  --grid-T 8192 --grid-jobs 14 --deadline-s "${T_GRID_DL:-220}" --out "$OUT" 2>&1 | grep -v "^TRIAL" | tail -20
cat "$OUT/tuning_workers.txt"
