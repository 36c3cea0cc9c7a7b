#!/usr/bin/env bash
# Set up a test environment on a fresh machine (idempotent; a minute or two the first time).
#
#   bash tools/bootstrap.sh           .venv/ from the lock: every package at the exact version of
#                                     requirements/lock.txt (checked afterwards by tools/lock_check.py), so any run
#                                     can be reproduced; plus .triton-newest/, the compiler of the newest Triton release
#                                     (requirements/triton-newest.txt, `pip --target`, not on the path unless asked:
#                                     PYTHONPATH=.triton-newest python -m fastflamingo.aot)
#   bash tools/bootstrap.sh --newest  .venv-newest/: the newest release of every dependency, resolved now (torch held
#                                     at the lock's CPU wheel: any newer torch on PyPI is a multi-GB CUDA build); what
#                                     it got is printed and written to .venv-newest/versions.txt
#
# Both install fastflamingo in editable mode with its test and benchmark extras, without build isolation (as on the
# GPU machines: the build runs beside transformers and Hugging Face's `kernels`), and the upstream reference packages
# the tests compare against (--no-deps: open-flamingo pins torch==2.0.1). tools/relock.sh moves the lock forward.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOCK=requirements/lock.txt
TIER=lock
case "${1:-}" in
  "") ;;
  --newest) TIER=newest ;;
  *) echo "usage: tools/bootstrap.sh [--newest]" >&2; exit 2 ;;
esac
VENV=$([[ $TIER == lock ]] && echo .venv || echo .venv-newest)

fresh=0
[[ -x $VENV/bin/python ]] || { "$PYTHON" -m venv "$VENV"; fresh=1; }
if [[ $TIER == lock ]] && ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "the lock ($LOCK) is for CPython 3.11; $VENV has $("$VENV/bin/python" -V 2>&1)." >&2
  echo "rm -rf $VENV, then PYTHON=python3.11 bash tools/bootstrap.sh (or bash tools/bootstrap.sh --newest)." >&2
  exit 2
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }

if [[ $TIER == lock ]]; then
  pip install -c "$LOCK" torch setuptools build
  pip install -c "$LOCK" --no-build-isolation -e '.[test,bench]'
  pip install -c "$LOCK" --no-deps open-flamingo flamingo-pytorch
  "$VENV/bin/python" tools/lock_check.py check "$VENV/bin/python" "$LOCK" $([[ $fresh == 1 ]] && echo --strict) \
    || { echo "$VENV does not match the lock; rm -rf $VENV and run this again for a clean one" >&2; exit 1; }
  # --no-deps: only the compiler, never a torch; the directory is git-ignored
  TRITON_NEWEST_SPEC=$(grep -v '^#' requirements/triton-newest.txt | grep .)
  if [[ "$(cat .triton-newest/.spec 2> /dev/null)" != "$TRITON_NEWEST_SPEC" ]]; then
    rm -rf .triton-newest
    pip install --no-deps --target .triton-newest "$TRITON_NEWEST_SPEC"
    echo "$TRITON_NEWEST_SPEC" > .triton-newest/.spec
  fi
else
  HELD_TORCH=$(mktemp)
  trap 'rm -f "$HELD_TORCH"' EXIT
  grep -i '^torch==' "$LOCK" > "$HELD_TORCH"
  pip install -c "$HELD_TORCH" --upgrade torch setuptools build
  pip install -c "$HELD_TORCH" --upgrade --upgrade-strategy eager --no-build-isolation -e '.[test,bench]'
  pip install -c "$HELD_TORCH" --upgrade --no-deps open-flamingo flamingo-pytorch
  "$VENV/bin/python" -m pip --disable-pip-version-check list --format=freeze 2> /dev/null > "$VENV/versions.txt"
  echo "newest tier ($VENV/versions.txt), against the lock:"
  "$VENV/bin/python" tools/lock_check.py check "$VENV/bin/python" "$LOCK" 2>&1 | sed 's/^/  /' || true
fi

"$VENV/bin/python" - "$VENV" <<'EOF'
import importlib.metadata as md, sys
import torch, triton, transformers, fastflamingo
try:
    hub_kernels = md.version("kernels")
except md.PackageNotFoundError:
    hub_kernels = "not installed"
print(f"{sys.argv[1]}: fastflamingo {fastflamingo.__version__} | torch {torch.__version__} | triton {triton.__version__}"
      f" | transformers {transformers.__version__} | kernels (Hugging Face) {hub_kernels}")
EOF
if [[ $TIER == lock ]]; then
  PYTHONPATH=.triton-newest "$VENV/bin/python" -c "import triton; print('newest triton (.triton-newest/):', triton.__version__)"
fi
