"""The checkout never stands in for an installed package, and it builds where transformers >= 5.25 is installed.

transformers 5.25 imports Hugging Face's ``kernels`` (a hard dependency). Every process started from the checkout
root (``python -m pytest``, ``python -m benchmarks``, ``python -c``, setup.py while pip builds without isolation)
has the root on ``sys.path`` ahead of site-packages, so a regular top-level package there named like an installed
one wins. ``kernels/`` therefore has no ``__init__.py`` and the library reaches it as ``fastflamingo.kernels``
(docs/design.md, "Why kernels/ has no __init__.py"). The wheel test of the whole package (a clean venv,
``fastflamingo.info`` and the selftest's dry run from outside the checkout) is ``tools/check_package.sh``.
"""
import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _hugging_face_kernels():
    """The installed distribution ``kernels`` (Hugging Face's), or skip: the checks below are about living beside it."""
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's `kernels` is not installed (transformers >= 5.25 requires it)")
    return dist


def _from_root(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -c CODE`` from the checkout root: the root is ``sys.path[0]``, as under ``python -m pytest``."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_no_regular_package_in_the_root_shadows_an_installed_distribution():
    """Every module a ``python`` started in the checkout root could import from the root itself (a folder with
    ``__init__.py``, a ``.py`` file) has a name no installed distribution provides."""
    if not hasattr(importlib.metadata, "packages_distributions"):  # Python 3.10+
        pytest.skip("importlib.metadata.packages_distributions needs Python 3.10")
    provided = importlib.metadata.packages_distributions()
    ours = [p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").is_file()]
    ours += [p.stem for p in ROOT.glob("*.py")]
    clashes = {name: provided[name] for name in ours if name in provided and set(provided[name]) != {"fastflamingo"}}
    assert not clashes, f"top-level names in the checkout that shadow installed distributions: {clashes}"
    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/ must stay without __init__.py"


def test_checkout_root_imports_hugging_face_kernels_beside_fastflamingo():
    dist = _hugging_face_kernels()
    theirs = Path(dist.locate_file("kernels/__init__.py")).resolve()
    code = f"""
import sys
from pathlib import Path
import kernels
assert sys.path[0] in ("", {str(ROOT)!r}), sys.path[:3]
assert kernels.__file__ is not None and Path(kernels.__file__).resolve() == Path({str(theirs)!r}), kernels.__file__
import transformers.integrations.hub_kernels as hub
from transformers import IdeficsForVisionText2Text, IdeficsModel, MllamaForConditionalGeneration, MllamaModel
import fastflamingo
import fastflamingo.kernels
assert [str(Path(p).resolve()) for p in fastflamingo.kernels.__path__] == [{str((ROOT / "kernels").resolve())!r}], \\
    list(fastflamingo.kernels.__path__)
assert sys.modules["kernels"] is kernels
print("ok", kernels.__file__)
"""
    result = _from_root(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok"), result.stdout


def test_kernel_modules_import_from_the_root():
    """Every kernel family loads as ``fastflamingo.kernels.<stem>`` (their relative imports resolve there) with its
    ``aot_variants``, and no file of ``kernels/`` lands in ``sys.modules`` under any other name."""
    pytest.importorskip("triton")
    code = f"""
import sys
from pathlib import Path
from fastflamingo.ops import KERNEL_FAMILIES, kernel_modules
mods = kernel_modules()
assert tuple(mods) == KERNEL_FAMILIES, (tuple(mods), KERNEL_FAMILIES)
assert all(m.__name__ == "fastflamingo.kernels." + name for name, m in mods.items())
assert all(callable(m.aot_variants) for m in mods.values())
folder = Path({str((ROOT / "kernels").resolve())!r})
ours = {{n: f for n, m in list(sys.modules.items()) if (f := getattr(m, "__file__", None))
        and Path(f).resolve().parent == folder}}
stray = sorted(n for n in ours if not n.startswith("fastflamingo.kernels."))
assert not stray and len(ours) >= len(KERNEL_FAMILIES), (stray, sorted(ours))
print("ok")
"""
    result = _from_root(code)
    assert result.returncode == 0, result.stderr[-3000:]


def test_kernels_folder_is_not_a_top_level_package_even_without_hugging_face_kernels():
    """Where Hugging Face's ``kernels`` is not installed (hidden here by a finder that looks for ``kernels`` only
    outside site-packages), ``import kernels`` from the root finds our folder as an empty namespace package, and a
    module of it fails to import under that name with a message that names ``fastflamingo.kernels``."""
    code = """
import importlib.machinery, sys
class WithoutHuggingFaceKernels:
    def find_spec(self, name, path=None, target=None):
        if name == "kernels":
            return importlib.machinery.PathFinder.find_spec(name, [p for p in sys.path if "-packages" not in p])
        return None
sys.meta_path.insert(0, WithoutHuggingFaceKernels())
import kernels
assert getattr(kernels, "__file__", None) is None and not [n for n in dir(kernels) if not n.startswith("__")], dir(kernels)
for name in ("_utils", "_schedules", "_interpreter", "media_xattn", "mllama_decode"):
    try:
        __import__("kernels." + name)
    except ImportError as exc:
        assert "fastflamingo.kernels" in str(exc), (name, exc)
    else:
        raise AssertionError(f"kernels.{name} imported as a top-level module")
print("ok")
"""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("the kernel modules import triton first")
    result = _from_root(code)
    assert result.returncode == 0, result.stderr[-3000:]


def test_editable_install_resolves_the_kernels_from_elsewhere(tmp_path):
    """Where fastflamingo is installed in editable mode, a process started outside the checkout (nothing of it on
    ``sys.path``) finds ``fastflamingo.kernels`` in the checkout's ``kernels/`` through setuptools' editable finder."""
    try:
        direct_url = importlib.metadata.distribution("fastflamingo").read_text("direct_url.json") or ""
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("fastflamingo is not installed")
    if '"editable": true' not in direct_url.replace("'", '"'):
        pytest.skip("fastflamingo is not an editable install")
    code = ("import importlib.util, fastflamingo.kernels as k; "
            "print(importlib.util.find_spec('fastflamingo.kernels.media_xattn').origin)")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert Path(result.stdout.strip()).resolve() == (ROOT / "kernels" / "media_xattn.py").resolve(), result.stdout


def _copy_of_the_checkout(dst: Path) -> Path:
    """What a fresh clone holds, with the uncommitted changes (tools/copy_tree.py): no stale ``build/``."""
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "copy_tree.py"), str(dst)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        pytest.skip(f"cannot copy the checkout (not a git checkout?): {result.stderr[-300:]}")
    return dst


def test_builds_without_isolation_beside_hugging_face_kernels(tmp_path):
    """``pip wheel --no-build-isolation`` runs setup.py with the checkout root on ``sys.path`` in an environment that
    has Hugging Face's ``kernels`` (which registers a setuptools egg-info writer); the PEP 660 editable build that
    ``pip install --no-build-isolation -e .`` runs does the same. The wheel holds every library file, the kernels
    under ``fastflamingo/kernels/``, and no top-level package but ``fastflamingo``."""
    _hugging_face_kernels()
    pytest.importorskip("setuptools")
    src = _copy_of_the_checkout(tmp_path / "checkout")
    wheel_dir, editable_dir = tmp_path / "wheel", tmp_path / "editable"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-w", str(wheel_dir), "."],
        cwd=src, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, (build.stdout + build.stderr)[-4000:]
    editable = subprocess.run(
        [sys.executable, "-c", f"from setuptools import build_meta as b; print(b.build_editable({str(editable_dir)!r}))"],
        cwd=src, capture_output=True, text=True, timeout=600)
    assert editable.returncode == 0, editable.stderr[-4000:]
    assert list(editable_dir.glob("fastflamingo-*.whl")), editable.stdout

    (wheel,) = wheel_dir.glob("fastflamingo-*.whl")
    contents = subprocess.run([sys.executable, str(ROOT / "tools" / "package_contents.py"), str(wheel)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    assert contents.returncode == 0, contents.stderr[-4000:]


def test_readme_tested_versions_match_the_lock(monkeypatch):
    """The README's "Tested versions" table quotes the lock tier's versions as requirements/lock.txt pins them, and
    the newest Triton of the compile check as requirements/triton-newest.txt does."""
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    from lock_check import locked  # the parser the bootstrap checks the venv with

    lock = {key: version for key, (_, version) in locked(ROOT / "requirements" / "lock.txt").items()}
    newest_triton = locked(ROOT / "requirements" / "triton-newest.txt")["triton"][1]
    text = (ROOT / "README.md").read_text()
    table = text[text.index("### Tested versions"):].split("\n\n")[1]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    checked = []
    for name, lock_cell, _ in rows:
        package = name.split(" (")[0].lower()
        if package == "python":
            assert lock_cell == "3.11", lock_cell  # the interpreter the lock is for (tools/bootstrap.sh checks it)
            continue
        if package not in lock:
            continue  # the last row points to the files
        version = lock_cell.split(" ")[0]
        assert version == lock[package], f"README quotes {package} {version}, the lock pins {lock[package]}"
        checked.append(package)
        if package == "triton":
            assert f"also under {newest_triton}" in lock_cell, (lock_cell, newest_triton)
    assert {"torch", "triton", "transformers", "kernels", "numpy"} <= set(checked), checked
