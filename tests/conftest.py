"""Test configuration shared by every test file.

Without a GPU the Triton kernels run under the Triton interpreter (``TRITON_INTERPRET=1``) on CPU tensors. The
variable has to be set before any kernel module is imported (``@triton.jit`` decides at decoration time), hence
at the top of this file. On a CUDA machine the same tests run natively on the GPU (``DEVICE == "cuda"``).
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if os.environ.get("PYTEST_XDIST_WORKER") and not HAS_CUDA:
    # xdist workers share the cores: two OpenMP pools on two cores spin against each other and run many times
    # slower than one thread each
    torch.set_num_threads(1)
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: E402
except ImportError:  # the torch path is still tested
    triton = None

INTERPRET = triton is not None and os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
DEVICE = "cuda" if (HAS_CUDA and not INTERPRET) else "cpu"


if INTERPRET:
    # stricter (device_assert on) and bf16-exact (tl.dot on bf16 operands): the GPU code stays free of test branches
    from fastflamingo.kernels import _interpreter

    _interpreter.make_strict_and_bf16_exact()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA")
    config.addinivalue_line("markers", "triton: needs triton (interpreter on CPU, native on CUDA)")
    config.addinivalue_line("markers", "slow_interpreter: large shapes, skipped under the Triton interpreter")
    config.addinivalue_line("markers", "slow: long tiers run before a release (pytest -m slow), not by default")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and DEVICE != "cuda":
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))
        if "triton" in item.keywords and triton is None:
            item.add_marker(pytest.mark.skip(reason="triton is not installed"))
        if "slow_interpreter" in item.keywords and INTERPRET:
            item.add_marker(pytest.mark.skip(reason="too slow for the Triton interpreter"))


def pytest_report_header(config):
    tv = triton.__version__ if triton is not None else "missing"
    return f"fastflamingo tests: torch {torch.__version__}, triton {tv}, interpret={INTERPRET}, device={DEVICE}"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
