#!/usr/bin/env bash
# Set up .venv on a fresh machine: CPU torch (pinned: an open range would pull a multi-GB CUDA build), fastflamingo
# in editable mode with its test and benchmark extras, and the upstream reference packages the tests compare against
# (--no-deps: open-flamingo pins torch==2.0.1), plus the newest Triton release in .triton-newest/ (pip --target, not
# on the path unless asked: `PYTHONPATH=.triton-newest python -m fastflamingo.aot` compiles the kernels with it, so
# CI checks them under the pinned and the newest compiler). Idempotent; takes about a minute the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${FASTFLAMINGO_TORCH_SPEC:-torch==2.13.0}
# The newest Triton release (bump when a new one appears: the AOT check must pass under it too)
TRITON_NEWEST_SPEC=${FASTFLAMINGO_TRITON_NEWEST_SPEC:-triton==3.9.*}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
.venv/bin/python -c "import torch" 2>/dev/null || pip install "$TORCH_SPEC"
pip install -e '.[test,bench]'
pip install --no-deps open-flamingo==2.0.1 flamingo-pytorch==0.1.2
# --no-deps: only the compiler, never a torch; the directory is git-ignored
if [ "$(cat .triton-newest/.spec 2>/dev/null)" != "$TRITON_NEWEST_SPEC" ]; then
  rm -rf .triton-newest
  pip install --no-deps --target .triton-newest "$TRITON_NEWEST_SPEC"
  echo "$TRITON_NEWEST_SPEC" > .triton-newest/.spec
fi
.venv/bin/python -c "import torch, triton, transformers, fastflamingo; print('fastflamingo', fastflamingo.__version__, '| torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__)"
PYTHONPATH=.triton-newest .venv/bin/python -c "import triton; print('newest triton (.triton-newest/):', triton.__version__)"
