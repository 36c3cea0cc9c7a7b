"""The lock file and a virtual environment: write one from the other, or check that they agree.

    python tools/lock_check.py write VENV_PYTHON requirements/lock.txt    # tools/relock.sh
    python tools/lock_check.py check VENV_PYTHON requirements/lock.txt [--strict]   # tools/bootstrap.sh

``check`` fails when a locked package is installed at another version; with ``--strict`` (a virtual environment
the bootstrap has just created) also when a package is installed that the lock does not name: the lock must name
every package the bootstrap installs, or a run could not be reproduced from it. pip itself comes with the venv and
fastflamingo is the editable checkout; neither is locked. Versions are locked without their local label
(``torch==2.13.0``, not ``2.13.0+cpu``): PyPI does not serve local labels, so a pin with one could not install on a
machine without a wheel folder that has the CPU build; pip prefers that build where it has one.
"""
import subprocess
import sys
from pathlib import Path

UNLOCKED = {"pip", "fastflamingo"}
HEADER = """\
# Every package tools/bootstrap.sh installs into .venv, at the exact version the tests last passed with (CPython 3.11,
# Linux x86_64; fastflamingo itself is the editable checkout, pip comes with the venv). Written by tools/relock.sh
# from the newest releases, except what requirements/held.txt holds; do not edit by hand. bootstrap.sh installs with
# `pip install -c requirements/lock.txt` and checks the result with tools/lock_check.py.
"""


def _key(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _public(version: str) -> str:
    return version.split("+", 1)[0]


def installed(python: str) -> dict:
    out = subprocess.run([python, "-m", "pip", "--disable-pip-version-check", "list", "--format=freeze"],
                         capture_output=True, text=True, check=True).stdout
    pins = {}
    for line in out.splitlines():
        if "==" in line:
            name, version = line.split("==", 1)
            if _key(name) not in UNLOCKED:
                pins[_key(name)] = (name, _public(version.strip()))
    return pins


def locked(path: Path) -> dict:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==", 1)
            pins[_key(name)] = (name, _public(version.strip()))
    return pins


def write(python: str, path: Path) -> None:
    pins = installed(python)
    body = "".join(f"{name}=={version}\n" for name, version in sorted(pins.values(), key=lambda p: _key(p[0])))
    path.write_text(HEADER + body)


def check(python: str, path: Path, strict: bool) -> int:
    have, want = installed(python), locked(path)
    wrong = [f"{want[k][0]}: installed {have[k][1]}, locked {want[k][1]}" for k in want if k in have
             and have[k][1] != want[k][1]]
    missing = [want[k][0] for k in want if k not in have]
    extra = [f"{name}=={version}" for k, (name, version) in have.items() if k not in want]
    for label, items in (("installed at another version than the lock", wrong), ("locked, not installed", missing),
                         ("installed, not in the lock", extra)):
        if items:
            print(f"{path}: {label}: {', '.join(sorted(items))}", file=sys.stderr)
    failed = bool(wrong or missing or (strict and extra))
    if not failed:
        print(f"{path}: the environment matches the lock ({len(want)} packages"
              f"{'' if not extra else f'; {len(extra)} more installed by hand'})")
    return int(failed)


def main(argv) -> int:
    if len(argv) < 3 or argv[0] not in ("write", "check"):
        print(__doc__, file=sys.stderr)
        return 2
    command, python, path = argv[0], argv[1], Path(argv[2])
    if command == "write":
        write(python, path)
        return 0
    return check(python, path, strict="--strict" in argv[3:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
