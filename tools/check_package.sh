#!/usr/bin/env bash
# Packaging proof: build the sdist, and the wheel from the sdist (python -m build, without isolation, so the build
# runs beside transformers >= 5.25 and Hugging Face's `kernels`, as a GPU machine's `pip install --no-build-isolation`
# does), from a copy of the working tree that holds what a fresh clone holds; install the wheel into a clean virtual
# environment (torch, triton and numpy at the lock's versions, nothing else from the checkout); then, from a folder
# outside the checkout, `python -m fastflamingo.info` and `python -m fastflamingo.selftest --dry-run`. That catches a
# module, a kernel or a config JSON missing from the sdist or the wheel. ~2 min, most of it the clean install.
#
#   bash tools/check_package.sh [PYTHON]    # PYTHON builds (default .venv/bin/python); tools/test.sh package runs it
set -euo pipefail
# the interpreter that builds, as an absolute path (it is used from other folders): a path relative to the caller's
# folder, or a command name on PATH
BUILD_PY=${1:-$(dirname "$0")/../.venv/bin/python}
[[ $BUILD_PY == */* ]] || BUILD_PY=$(command -v "$BUILD_PY")
BUILD_PY="$(cd "$(dirname "$BUILD_PY")" && pwd)/$(basename "$BUILD_PY")"
cd "$(dirname "$0")/.."
LOCK=requirements/lock.txt
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastflamingo-package.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

echo "--- build environment"
"$BUILD_PY" - <<'EOF'
import importlib.metadata as md
import sys
def version(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None
have = {dist: version(dist) for dist in ("transformers", "kernels", "setuptools", "build")}
print(" | ".join(f"{d} {v or 'missing'}" for d, v in have.items()))
major_minor = tuple(int(p) for p in (have["transformers"] or "0.0").split(".")[:2])
if major_minor < (5, 25) or not have["kernels"]:
    sys.exit("the package check builds beside transformers >= 5.25 and Hugging Face's `kernels` (what a GPU machine "
             "with current transformers has): bash tools/bootstrap.sh installs them")
EOF

echo "--- a copy of the tree (tracked and new files, links kept; no build/ or *.egg-info of earlier builds)"
"$BUILD_PY" tools/copy_tree.py "$WORK/src"

echo "--- python -m build --no-isolation (sdist, then the wheel from the sdist)"
(cd "$WORK/src" && "$BUILD_PY" -m build --no-isolation --outdir "$WORK/dist" . > "$WORK/build.log" 2>&1) \
  || { tail -n 40 "$WORK/build.log"; exit 1; }
ls -1 "$WORK/dist"
SDIST=$(ls "$WORK"/dist/fastflamingo-*.tar.gz)
WHEEL=$(ls "$WORK"/dist/fastflamingo-*.whl)
"$BUILD_PY" tools/package_contents.py "$SDIST" "$WHEEL"

echo "--- clean venv: the wheel, with torch, triton and numpy at the lock's versions"
"$BUILD_PY" -m venv "$WORK/venv"
VPIP=("$WORK/venv/bin/python" -m pip --disable-pip-version-check -q)
"${VPIP[@]}" install -c "$LOCK" torch
"${VPIP[@]}" install -c "$LOCK" "$WHEEL[triton]" numpy
mkdir "$WORK/elsewhere"
cd "$WORK/elsewhere"
"$WORK/venv/bin/python" - <<EOF
import importlib.util, fastflamingo, fastflamingo.kernels
assert fastflamingo.__file__.startswith("$WORK/venv/"), fastflamingo.__file__
assert all(str(p).startswith("$WORK/venv/") for p in fastflamingo.kernels.__path__), list(fastflamingo.kernels.__path__)
assert importlib.util.find_spec("kernels") is None, "the wheel installed a top-level 'kernels'"
print("installed from the wheel:", fastflamingo.__file__)
EOF
echo "--- python -m fastflamingo.info"
"$WORK/venv/bin/python" -m fastflamingo.info
echo "--- python -m fastflamingo.selftest --dry-run"
"$WORK/venv/bin/python" -m fastflamingo.selftest --dry-run
echo "package check passed: $(basename "$SDIST"), $(basename "$WHEEL")"
