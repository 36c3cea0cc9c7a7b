#!/usr/bin/env bash
# Set up .venv on a fresh machine: CPU torch (pinned: an open range would pull a multi-GB CUDA build), fastflamingo
# in editable mode with its test and benchmark extras, and the upstream reference packages the tests compare against
# (--no-deps: open-flamingo pins torch==2.0.1). Idempotent; takes about a minute the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${FASTFLAMINGO_TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
.venv/bin/python -c "import torch" 2>/dev/null || pip install "$TORCH_SPEC"
pip install -e '.[test,bench]'
pip install --no-deps open-flamingo==2.0.1 flamingo-pytorch==0.1.2
.venv/bin/python -c "import torch, triton, transformers, fastflamingo; print('fastflamingo', fastflamingo.__version__, '| torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__)"
