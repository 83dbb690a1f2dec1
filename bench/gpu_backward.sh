#!/bin/bash
# One batched device call for the backward (issue 4): GPU-marked tests and parallel warm-up compiles first,
# then the benchmark alone on the card (so the tests' load never overlaps a timing).
# Usage on the device: OUT=/some/dir bash bench/gpu_backward.sh
set -u
OUT=${OUT:-/tmp/nsa_bwd_out}
mkdir -p "$OUT"
export NSA_DSL_CACHE_DIR=/tmp/nsa_dsl_cache
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader > "$OUT/warm.txt" 2>&1
( timeout 150 python -m pytest -q -m gpu tests/codegen/test_backward.py > "$OUT/pytest_gpu.txt" 2>&1;
  echo "pytest rc=$?" >> "$OUT/pytest_gpu.txt" ) &
for s in nsa_paper fla_compat; do
  for i in 0 1 2; do
    ( timeout 120 python bench/bench_backward.py --warm "$s" "$i" > "/tmp/warm_${s}_$i.txt" 2>&1;
      echo "warm $s $i rc=$?" >> "/tmp/warm_${s}_$i.txt" ) &
  done
done
wait
for f in /tmp/warm_*.txt; do tail -5 "$f" >> "$OUT/warm.txt"; done
timeout 170 python bench/bench_backward.py --sweep --sdpa-all-max 8192 --out "$OUT" > "$OUT/bench_log.txt" 2>&1
echo "bench rc=$?" >> "$OUT/bench_log.txt"
echo "=== pytest"; tail -25 "$OUT/pytest_gpu.txt"
echo "=== warm"; grep -v "^$" "$OUT/warm.txt" | tail -20
echo "=== bench"; tail -45 "$OUT/bench_log.txt"
