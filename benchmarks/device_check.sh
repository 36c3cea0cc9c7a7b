#!/usr/bin/env bash
# One-call GPU check (issue 5): install, test suite natively on CUDA, calibration + priority (docs/performance.md, "Priority cells")
# cells, all logs and results in OUTDIR, a short table printed last. Fits in 8 minutes on an H100:
#   install ~30 s | tests <= TEST_TIMEOUT (180 s) | benchmarks stop measuring at BENCH_DEADLINE (200 s, results kept),
#   hard limit BENCH_TIMEOUT (240 s).
#
#   benchmarks/device_check.sh OUTDIR            # on the GPU machine, from the repository root
#   benchmarks/device_check.sh OUTDIR --dry-run  # same steps on CPU at toy sizes; pip only simulates installs
#
# Carried wheels (benchmarks/wheels/*.whl: open-flamingo, einops-exts, pytest-xdist + execnet) are installed
# --no-deps, and only for distributions that are missing: the GPU machine has no internet, and an installed
# package is never replaced.
set -u -o pipefail

OUT=${1:?usage: benchmarks/device_check.sh OUTDIR [--dry-run]}
DRY=0
[[ "${2:-}" == "--dry-run" ]] && DRY=1
cd "$(dirname "$0")/.." || exit 1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
if [[ $DRY == 1 && -x .venv/bin/python && -z "${PYTHON:-}" ]]; then PY=.venv/bin/python; fi
TEST_TIMEOUT=${TEST_TIMEOUT:-180}
BENCH_DEADLINE=${BENCH_DEADLINE:-200}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-240}
T0=$SECONDS
step() { echo "== [$((SECONDS - T0))s] $*"; }

PIP_DRY=()
[[ $DRY == 1 ]] && PIP_DRY=(--dry-run)

step "install (log: $OUT/install.log)"
{
  "$PY" -m pip install "${PIP_DRY[@]}" --no-deps --no-build-isolation -e . 2>&1
  for whl in benchmarks/wheels/*.whl; do
    [[ -e "$whl" ]] || continue
    dist=$(basename "$whl" | cut -d- -f1)
    if "$PY" -m pip show "$dist" >/dev/null 2>&1; then
      echo "carried wheel $whl: $dist already installed, kept"
    else
      "$PY" -m pip install "${PIP_DRY[@]}" --no-deps "$whl" 2>&1
    fi
  done
} > "$OUT/install.log" 2>&1
echo "   install exit status $? ($(tail -n 1 "$OUT/install.log"))"

step "environment (log: $OUT/env.txt)"
{
  "$PY" - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", torch.cuda.get_device_name(), f"{p.total_memory / 2**30:.1f} GiB", p.multi_processor_count, "SMs",
          "cudnn", torch.backends.cudnn.version())
import importlib.util
# open_flamingo's package __init__ imports open_clip (not needed here): only check that it is installed
print("open_flamingo", "installed" if importlib.util.find_spec("open_flamingo") else "MISSING")
for m in ("triton", "transformers", "flash_attn", "einops", "einops_exts", "pytest", "xdist"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"))
    except Exception as exc:
        print(m, "MISSING", type(exc).__name__)
EOF
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step "tests (log: $OUT/pytest.log, limit ${TEST_TIMEOUT}s)"
if [[ $DRY == 1 ]]; then
  # CPU: the kernels run under the Triton interpreter; a short slice proves the wiring, not the numerics
  TEST_ARGS=(tests -x -q -p no:cacheprovider -k "api or masks" )
else
  TEST_ARGS=(tests -x -q -p no:cacheprovider -rs)
  "$PY" -c "import xdist" 2>/dev/null && TEST_ARGS+=(-n 4)
fi
timeout "$TEST_TIMEOUT" "$PY" -m pytest "${TEST_ARGS[@]}" > "$OUT/pytest.log" 2>&1
TEST_RC=$?
echo "   pytest exit status $TEST_RC: $(tail -n 1 "$OUT/pytest.log")"

step "calibration + priority cells (log: $OUT/bench.log, deadline ${BENCH_DEADLINE}s)"
BENCH_ARGS=(-m benchmarks --priority --out "$OUT" --deadline "$BENCH_DEADLINE" --plot)
[[ $DRY == 1 ]] && BENCH_ARGS+=(--dry-run)
timeout "$BENCH_TIMEOUT" "$PY" "${BENCH_ARGS[@]}" > "$OUT/bench.log" 2>&1
BENCH_RC=$?
echo "   benchmarks exit status $BENCH_RC"
grep -E "^(warning|calibration)" "$OUT/bench.log"

step "summary"
echo "tests: exit $TEST_RC ($(tail -n 1 "$OUT/pytest.log"))"
echo "benchmarks: exit $BENCH_RC; files:"
ls -1 "$OUT" | sed 's/^/  /'
LATEST=$(ls -t "$OUT"/*.json 2>/dev/null | head -n 1)
if [[ -n "$LATEST" ]]; then
  "$PY" -m benchmarks.report --text "$LATEST"
else
  echo "no result file (see $OUT/bench.log):"; tail -n 20 "$OUT/bench.log"
fi
echo "== done in $((SECONDS - T0))s"
[[ $TEST_RC == 0 && $BENCH_RC == 0 ]]
