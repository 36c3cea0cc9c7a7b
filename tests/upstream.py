"""Load the real upstream implementations used as test oracles.

OpenFlamingo's ``open_flamingo/__init__`` imports open_clip, which needs a torchvision that does not exist beside
the CPU torch wheel, so ``helpers.py`` (which needs only torch, einops and einops_exts) is loaded by file path.
"""
import importlib.util
import sys
from pathlib import Path

import pytest


def _site_file(package: str, relative: str) -> Path:
    for entry in sys.path:
        candidate = Path(entry) / package / relative
        if candidate.is_file():
            return candidate
    pytest.skip(f"{package} is not installed (pip install --no-deps open-flamingo==2.0.1 flamingo-pytorch==0.1.2)")


def _load(name: str, path: Path):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def of():
    """The real OpenFlamingo helpers module (``import`` this fixture into a test file to use it)."""
    from fastflamingo.testing import load_open_flamingo

    try:
        return load_open_flamingo().helpers
    except ModuleNotFoundError as exc:
        pytest.skip(str(exc))


def open_flamingo_helpers():
    """``open_flamingo/src/helpers.py`` of open-flamingo 2.0.1: MaskedCrossAttention, GatedCrossAttentionBlock,
    PerceiverAttention, PerceiverResampler, FeedForward."""
    pytest.importorskip("einops_exts")
    return _load("open_flamingo_src_helpers", _site_file("open_flamingo", "src/helpers.py"))


def flamingo_pytorch():
    """lucidrains flamingo-pytorch 0.1.2 (imports cleanly)."""
    pytest.importorskip("einops_exts")
    import flamingo_pytorch.flamingo_pytorch as fp

    return fp
