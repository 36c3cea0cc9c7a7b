"""Load the real upstream implementations used as test oracles.

OpenFlamingo's ``open_flamingo/__init__`` imports open_clip, which needs a torchvision that does not exist beside
the CPU torch wheel; ``fastflamingo.testing.load_open_flamingo`` loads its modules without it.
"""
import pytest


@pytest.fixture(scope="module")
def of():
    """The real OpenFlamingo helpers module (``import`` this fixture into a test file to use it)."""
    from fastflamingo.testing import load_open_flamingo

    try:
        return load_open_flamingo().helpers
    except ModuleNotFoundError as exc:
        pytest.skip(str(exc))


def flamingo_pytorch():
    """lucidrains flamingo-pytorch 0.1.2 (imports cleanly)."""
    pytest.importorskip("einops_exts")
    import flamingo_pytorch.flamingo_pytorch as fp

    return fp
