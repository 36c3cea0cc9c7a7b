#!/usr/bin/env bash
# Move the lock forward: resolve every package tools/bootstrap.sh installs anew, to its newest release, except the
# versions requirements/held.txt holds (each with its reason), in a fresh virtual environment (.venv-relock/, removed
# afterwards), and write what was installed to requirements/lock.txt and the newest Triton release to
# requirements/triton-newest.txt. Run it when the newest tier (bash tools/test.sh newest) passes with releases newer
# than the lock, then `bash tools/bootstrap.sh && bash tools/test.sh` and commit the two files with the fixes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || { echo "the lock is for CPython 3.11 (tools/bootstrap.sh checks it): PYTHON=python3.11 bash tools/relock.sh" >&2; exit 2; }
VENV=.venv-relock
rm -rf "$VENV"
trap 'rm -rf "$VENV"' EXIT
"$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
HELD=requirements/held.txt
pip install -c "$HELD" torch setuptools build
pip install -c "$HELD" --no-build-isolation -e '.[test,bench]'
# open-flamingo pins torch==2.0.1 and flamingo-pytorch an old einops: the reference packages go in without their deps
pip install -c "$HELD" --no-deps open-flamingo flamingo-pytorch
"$VENV/bin/python" tools/lock_check.py write "$VENV/bin/python" requirements/lock.txt
newest=$("$VENV/bin/python" - <<'EOF'
import json, subprocess, sys, tempfile
with tempfile.NamedTemporaryFile(suffix=".json") as report:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed", "--no-deps",
                    "--report", report.name, "triton"], check=True, stdout=subprocess.DEVNULL)
    print(json.load(open(report.name))["install"][0]["metadata"]["version"])
EOF
)
cat > requirements/triton-newest.txt <<EOF
# The newest Triton release, installed by tools/bootstrap.sh into .triton-newest/ (the compiler only) for the compile
# check under it: PYTHONPATH=.triton-newest python -m fastflamingo.aot. Written by tools/relock.sh.
triton==$newest
EOF
echo "requirements/lock.txt: $(grep -c '==' requirements/lock.txt) packages; newest triton $newest"
git --no-pager diff --stat -- requirements/ 2> /dev/null || true
