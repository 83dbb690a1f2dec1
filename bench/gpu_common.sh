# Shared set-up of the device scripts bench/gpu_backward.sh and bench/gpu_decode.sh (sourced, after OUT is set):
# the output folder, one kernel cache for the whole call, the card's line in $OUT/warm.txt, and run_gpu_tests.
mkdir -p "$OUT"
export NSA_DSL_CACHE_DIR=/tmp/nsa_dsl_cache
PY=python3
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader > "$OUT/warm.txt" 2>&1

# run_gpu_tests LIMIT TESTS FILE NAME...: the GPU-marked tests under TESTS through pytest or, where the image has
# no pytest, the test functions NAME... of FILE called directly; at most LIMIT seconds; the output goes to
# $OUT/pytest_gpu.txt and ends with "gpu tests rc=N".
run_gpu_tests() {
  local limit=$1 tests=$2
  shift 2
  if $PY -c "import pytest" 2>/dev/null; then
    # shellcheck disable=SC2086  # TESTS may name several paths
    timeout "$limit" $PY -m pytest -q -m gpu $tests
  else
    timeout "$limit" $PY - "$@" <<'PYEOF'
import importlib
import pathlib
import sys

path = pathlib.Path(sys.argv[1])
sys.path[:0] = [str(path.parent), "tests"]
t = importlib.import_module(path.stem)
for name in sys.argv[2:]:
    try:
        getattr(t, name)()
        print("PASSED", name)
    except Exception as e:
        print("FAILED", name, repr(e)[:2000])
PYEOF
  fi > "$OUT/pytest_gpu.txt" 2>&1
  echo "gpu tests rc=$?" >> "$OUT/pytest_gpu.txt"
}
