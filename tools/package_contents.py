"""Check a built sdist or wheel against the tree: it holds every library file git tracks (``fastflamingo/**/*.py``,
the tuned-config JSON files, and ``kernels/*.py`` under ``fastflamingo/kernels/``), and a wheel installs no
top-level package but ``fastflamingo`` (never a ``kernels``: that name is Hugging Face's).

    python tools/package_contents.py ARCHIVE...     # from inside the checkout; exit 1 and a list of what is wrong
"""
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path


def expected_files() -> set:
    tracked = subprocess.run(["git", "ls-files", "kernels/*.py", "fastflamingo/*.py", "fastflamingo/**/*.py",
                              "fastflamingo/configs/*.json"], capture_output=True, text=True, check=True).stdout
    return {f"fastflamingo/{p}" if p.startswith("kernels/") else p for p in tracked.split()}


def problems(archive: Path, expected: set) -> list:
    if archive.name.endswith(".whl"):
        names = set(zipfile.ZipFile(archive).namelist())
        top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
        wrong = [] if top == {"fastflamingo"} else [f"{archive.name}: top-level packages {sorted(top)}, "
                                                   "expected only fastflamingo"]
    else:  # an sdist: every member under one <name>-<version>/ folder
        with tarfile.open(archive) as tar:
            names = {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile() and "/" in m.name}
        wrong = []
    return wrong + [f"{archive.name} lacks {p}" for p in sorted(expected - names)]


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    expected = expected_files()
    found = [p for archive in sys.argv[1:] for p in problems(Path(archive), expected)]
    if found:
        sys.exit("\n".join(found))
    print(f"{', '.join(Path(a).name for a in sys.argv[1:])}: all {len(expected)} library files; "
          "no top-level package but fastflamingo")
