#!/bin/bash
# One device call that re-tunes the shipped records a default change made stale (tests/tuning/
# test_shipped_configs.py names them) and tunes fla_compat's forward kernels, then exports every record to
# $OUT/records.json (merged into nsa_dsl/tuning/configs by hand: one file per spec).
# Usage on the device: OUT=/some/dir [TRIALS=12] [TUNE_LIMIT=170] bash bench/gpu_retune.sh
set -u
OUT=${OUT:-/tmp/nsa_retune_out}
source "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"
tune() {  # tune SPEC KERNELS SEQ_LENS
  timeout "${TUNE_LIMIT:-170}" $PY -m nsa_dsl.tuning.cli "$1" --kernels "$2" --seq-lens "$3" --trials "${TRIALS:-12}" \
    > "$OUT/tune_$1.txt" 2>&1
  echo "tune $1 rc=$?" >> "$OUT/tune_$1.txt"
}
tune nsa_paper cmp_fwd,slc_topk 8k,32k
tune small_group cmp_fwd,slc_topk,cmp_topk,win_fwd 8k,32k
tune fla_compat cmp_fwd,slc_topk,slc_fwd 16k,64k
$PY -m nsa_dsl.tuning.cli export "$OUT/records.json" > "$OUT/export.txt" 2>&1
for s in nsa_paper small_group fla_compat; do echo "=== $s"; grep -vE "━|^$" "$OUT/tune_$s.txt" | tail -14; done
cat "$OUT/export.txt"
