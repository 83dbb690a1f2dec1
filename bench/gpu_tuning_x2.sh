#!/usr/bin/env bash
# One call on a 2-GPU host: (1) the `nsa-tune --workers` wall-time gain — the same job list (SPEC, KERNELS at
# SEQ_LENS, --trials TRIALS; default: paper spec, forward kernels, 8k and 32k, 12 trials) run with each worker
# count of WORKERS (default "1 2"), each from an empty tuning cache, empty study journals and an empty Triton
# cache, so that no run reuses another's compiles; (2) unless GRID=0, the exhaustive slc_topk grid at 8k and
# the 25%-budget Optuna/random searches on it (bench_tuning.py phases A/B). Logs under $OUT; a short table
# (workers, exit status, wall seconds, nsa-tune's own total, jobs tuned, trials evaluated, geometric-mean
# speedup of the tuned configs, GPUs that ran tuning processes, wall-time gain over the 1-worker row) comes last,
# then each row's "search time by phase" line. A WORKERS entry W:C runs W workers with --compile-jobs C each
# (e.g. "1 1:16 2": one worker, one worker with 16 compile processes, two workers with the automatic 8 each).
# Keep the sum of the timeouts under the device's per-call limit (600 s): with the grid part, lower T_TUNE or
# run it with GRID=0.
#   GRID=0 bash bench/gpu_tuning_x2.sh                   # the workers comparison only
#   SPEC=tiny EXTRA=--fake GRID=0 bash bench/gpu_tuning_x2.sh   # a dry run of the script without a GPU
set -u
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
SPEC=${SPEC:-nsa_paper}
SEQ_LENS=${SEQ_LENS:-8k,32k}
KERNELS=${KERNELS:-fwd}
TRIALS=${TRIALS:-12}
WORKERS=${WORKERS:-1 2}
EXTRA=${EXTRA:-}
TABLE="$OUT/tuning_workers.txt"
: > "$TABLE"
: > "$OUT/tuning_phases.txt"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=index,name,uuid,driver_version --format=csv,noheader | tee "$OUT/tuning_x2_cards.txt"
fi
# Warm the OS file cache for the Python packages, so that the first timed run does not pay for cold imports.
python -c "import torch, triton, optuna, rich, nsa_dsl.tuning.search" 2> /dev/null
for ROW in $WORKERS; do
  W=${ROW%%:*}
  CJ=
  [ "$W" != "$ROW" ] && CJ="--compile-jobs ${ROW#*:}"
  TAG=${ROW/:/c}
  export NSA_DSL_CACHE_DIR=/tmp/tune_w$TAG TRITON_CACHE_DIR=/tmp/triton_w$TAG
  rm -rf "$NSA_DSL_CACHE_DIR" "$TRITON_CACHE_DIR"
  # Which GPUs run tuning processes (sampled every 2 s): evidence that each worker has its own GPU.
  APPS="$OUT/tuning_workers${TAG}_gpu_apps.txt"
  : > "$APPS"
  if command -v nvidia-smi > /dev/null; then
    (while :; do nvidia-smi --query-compute-apps=gpu_uuid,pid --format=csv,noheader >> "$APPS" 2> /dev/null
      sleep 2; done) &
    SAMPLER=$!
  else
    SAMPLER=
  fi
  t0=$(date +%s.%N)
  # shellcheck disable=SC2086 # EXTRA and CJ are lists of words
  timeout "${T_TUNE:-240}" nsa-tune "$SPEC" --seq-lens "$SEQ_LENS" --kernels "$KERNELS" --trials "$TRIALS" \
    --workers "$W" $CJ $EXTRA > "$OUT/tuning_workers$TAG.log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  [ -n "$SAMPLER" ] && kill "$SAMPLER" 2> /dev/null && wait "$SAMPLER" 2> /dev/null
  gpus=$(python3 - "$OUT/tuning_x2_cards.txt" "$APPS" << 'EOF'
import sys
try:
    idx = {l.split(",")[2].strip(): l.split(",")[0].strip() for l in open(sys.argv[1]) if l.count(",") >= 3}
except OSError:
    idx = {}
used = {l.split(",")[0].strip() for l in open(sys.argv[2]) if "," in l}
print(",".join(sorted(idx.get(u, "?") for u in used)) or "-")
EOF
  )
  total=$(grep -o "total [0-9.]* s" "$OUT/tuning_workers$TAG.log" | tail -1 | awk '{print $2}')
  # jobs tuned, trials evaluated over them (the same budget in every row), geometric-mean speedup
  read -r tuned trials gm < <(python3 - "$OUT/tuning_workers$TAG.log" << 'EOF'
import re, sys
text = open(sys.argv[1], encoding="utf-8", errors="replace").read()
rows = [[c.strip() for c in l.split("│")] for l in text.splitlines() if re.search(r"│ tuned +│", l)]
gm = re.findall(r"geometric-mean speedup over defaults: ([0-9.]+)x", text)
print(len(rows), sum(int(r[6]) for r in rows if r[6].isdigit()), gm[-1] if gm else "-")
EOF
  )
  wall=$(python3 -c "print(round($t1-$t0,1))")
  echo "$ROW $rc $wall ${total:--} ${tuned:-0} ${trials:-0} ${gm:--} ${gpus:--}" >> "$TABLE"
  echo "$ROW: $(grep "search time by phase" "$OUT/tuning_workers$TAG.log" | tail -1)" >> "$OUT/tuning_phases.txt"
  echo "== workers $ROW: rc=$rc wall_s=$wall"
  tail -25 "$OUT/tuning_workers$TAG.log"
done
unset TRITON_CACHE_DIR
export NSA_DSL_CACHE_DIR=/tmp/tune_grid
if [ "${GRID:-1}" = 1 ]; then
  timeout "${T_GRID:-240}" python bench/bench_tuning.py --spec nsa_paper --kernels "" --grid-kernel slc_topk \
    --grid-T 8192 --grid-jobs 14 --deadline-s "${T_GRID_DL:-220}" --out "$OUT" 2>&1 | grep -v "^TRIAL" | tail -20
fi
echo "nsa-tune $SPEC --seq-lens $SEQ_LENS --kernels $KERNELS --trials $TRIALS, empty caches per row:"
python3 - "$TABLE" << 'EOF'
import sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
print(f"{'workers':>7} {'rc':>3} {'wall s':>8} {'nsa-tune s':>10} {'jobs tuned':>10} {'trials':>6} "
      f"{'gm speedup':>10} {'GPUs used':>9} {'gain':>6}")
one = [r for r in rows if r[0] == "1"] or rows[:1]
base = float(one[0][2]) if one else None  # the gain is over the 1-worker run (else the first row)
for w, rc, wall, total, tuned, trials, gm, gpus in rows:
    gain = f"{base / float(wall):.2f}x" if base and float(wall) > 0 else "-"
    print(f"{w:>7} {rc:>3} {wall:>8} {total:>10} {tuned:>10} {trials:>6} {gm:>10} {gpus:>9} {gain:>6}")
EOF
cat "$OUT/tuning_phases.txt"
