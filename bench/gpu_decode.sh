#!/bin/bash
# One device call for the decode (issue 5, second pass): the GPU-marked decode tests and one warm-up compile
# process per comparison shape in parallel first, then the old-vs-new timing alone on the card
# (bench_decode.py --compare: legacy vs new decode options, variants and splits, dense SDPA, same process).
# Usage on the device: OUT=/some/dir [TEST_LIMIT=180] [WARM_LIMIT=150] [BENCH_LIMIT=190] [TMAX=131072] \
#   [DEC_ARGS="--variants a,b --shapes spec:B:T,... --splits C,S,T;..."] bash bench/gpu_decode.sh
# (DEC_ARGS: bench_decode.py's filters, given to the warm-up processes and the timing alike)
set -u
OUT=${OUT:-/tmp/nsa_decode_out}
source "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"
run_gpu_tests "${TEST_LIMIT:-180}" tests/codegen/test_decode.py tests/codegen/test_decode.py \
  test_gpu_bf16_decode_8k_matches_reference test_gpu_cuda_graph_replay_equals_eager \
  test_gpu_pdl_equals_no_pdl_eager_and_graph test_gpu_batch_chunks_on_streams_equal_one_chain_eager_and_graph &
# "I:P/N" warm-up jobs: every N-th variant of shape I from the P-th, one process each
# shellcheck disable=SC2086  # DEC_ARGS holds several options
JOBS=$($PY bench/bench_decode.py --warm-jobs ${DEC_ARGS:-})
for j in $JOBS; do
  i=${j%%:*}; part=${j#*:}; tag="${i}_${part%%/*}"
  # shellcheck disable=SC2086
  ( timeout "${WARM_LIMIT:-150}" $PY bench/bench_decode.py --warm "$i" --part "$part" ${DEC_ARGS:-} > "/tmp/warm_dec_$tag.txt" 2>&1;
    echo "warm $j rc=$?" >> "/tmp/warm_dec_$tag.txt" ) &
done
wait
for f in /tmp/warm_dec_*.txt; do cat "$f" >> "$OUT/warm.txt"; done
# shellcheck disable=SC2086
timeout "${BENCH_LIMIT:-190}" $PY bench/bench_decode.py --compare --tmax "${TMAX:-131072}" --out "$OUT" \
  ${DEC_ARGS:-} > "$OUT/bench_log.txt" 2>&1
echo "bench rc=$?" >> "$OUT/bench_log.txt"
echo "=== tests"; tail -15 "$OUT/pytest_gpu.txt"
echo "=== warm"; grep -c "s$" "$OUT/warm.txt"; grep -i "fail\|rc=" "$OUT/warm.txt" | tail -12
echo "=== bench"; grep -v "^        kernel" "$OUT/bench_log.txt" | tail -70
echo "=== kernels"; grep "^        kernel" "$OUT/bench_log.txt" | head -24
echo "=== table"; cat "$OUT/decode_compare.md" 2>/dev/null
