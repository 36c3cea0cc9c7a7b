"""The tree keeps its shape: one stem per op across kernels/, fastflamingo/ops/, tests/ and benchmarks/; small
modules; no project module loaded through importlib; no reference to a file outside the repository."""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# limits of docs/design.md, "Layout": a module that outgrows them holds more than one concept
MAX_LINES = {"fastflamingo": 450, "kernels": 600}
# assembled from pieces, so that this file does not match itself
OUTSIDE = re.compile("|".join((r"\.\./" + "shared", "/work/" + "shared", r"\b(PERF|SEMANTICS|CPU_TESTING|STYLE)\." + r"md\b")))


def _tracked(*patterns):
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [ROOT / line for line in out.stdout.split()]


def test_every_kernel_family_has_its_four_files():
    from fastflamingo.ops import KERNEL_FAMILIES

    for stem in KERNEL_FAMILIES:
        for path in (f"kernels/{stem}.py", f"fastflamingo/ops/{stem}.py", f"tests/test_{stem}.py",
                     f"benchmarks/ops_{stem}.py"):
            assert (ROOT / path).is_file(), f"kernel family {stem!r} has no {path}"


def test_modules_stay_small():
    too_big = []
    for folder, limit in MAX_LINES.items():
        for path in _tracked(f"{folder}/*.py", f"{folder}/**/*.py"):
            lines = path.read_text().count("\n")
            if lines > limit:
                too_big.append(f"{path.relative_to(ROOT)}: {lines} lines > {limit}")
    assert not too_big, too_big


def test_no_importlib_of_project_modules():
    offenders = []
    for path in _tracked("fastflamingo/*.py", "fastflamingo/**/*.py", "kernels/*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"importlib\.(import_module|util\.spec_from_file_location)\([^)]*(fastflamingo|kernels|\"\.)",
                         line) or "spec_from_file_location" in line:
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, offenders


def test_nothing_cites_a_path_outside_the_repository():
    offenders = []
    for path in _tracked("*.py", "*.md", "*.sh", "*.ini", "*.cfg", "*.toml", ".ci/*"):
        if "benchmarks/results" in str(path) or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not offenders, offenders


def test_tests_named_by_the_readme_exist():
    """The README's tables name the test behind each claim (``test_x.py::test_y``, then ``::test_z`` for more of
    the same file): every one of them exists."""
    text = (ROOT / "README.md").read_text()
    missing = []
    for line in text.splitlines():
        current = None
        for match in re.finditer(r"(test_\w+\.py)?::(\w+)", line):
            current = match.group(1) or current
            if current is None:
                continue
            source = ROOT / "tests" / current
            if not source.is_file() or not re.search(rf"def {match.group(2)}\b", source.read_text()):
                missing.append(f"{current}::{match.group(2)}")
    assert not missing, missing
