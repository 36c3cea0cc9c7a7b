"""fastflamingo: fused Triton kernels and drop-in modules for Flamingo-style vision-language models.

The Triton kernels live in the top-level ``kernels/`` folder of the source tree but install as
``fastflamingo.kernels``: Hugging Face publishes a package called ``kernels`` that transformers probes for,
so a top-level ``kernels`` package of ours would shadow it.
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "fastflamingo" / "_version.py").read_text()).group(1)

TEST = [
    "pytest>=8",
    "pytest-xdist>=3",
    "pytest-benchmark>=4",
    "einops>=0.6",
    "einops-exts>=0.0.4",
    "transformers>=4.45",
    # device_map dispatch with CPU/disk offload (tests/test_big_models.py); it needs torch>=2.0, which the CPU
    # build that tools/bootstrap.sh installs first satisfies, so pip never pulls a CUDA build for it
    "accelerate>=1.0",
    # property-based fuzz tier (tests/test_fuzz.py)
    "hypothesis>=6.100",
    # triton 3.6 (the version on the GPU machines) needs numpy<2.4 for runtime-bounded loops under the
    # interpreter (triton-lang/triton#9171).
    "triton==3.6.0",
    "numpy<2.4",
]

setup(
    name="fastflamingo",
    version=VERSION,
    description="Fused Triton kernels and drop-in modules for Flamingo-style vision-language models",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # every package under fastflamingo/ (found, so a new subpackage cannot be left out of a wheel), plus kernels/
    packages=find_packages(include=["fastflamingo", "fastflamingo.*"]) + ["fastflamingo.kernels"],
    package_dir={"fastflamingo": "fastflamingo", "fastflamingo.kernels": "kernels"},
    package_data={"fastflamingo.configs": ["*.json"]},  # tuned launch-config tables, one per GPU x Triton
    install_requires=["torch>=2.4"],
    extras_require={
        "triton": ["triton>=3.2"],
        "hf": ["transformers>=4.45"],
        "test": TEST,
        "bench": ["matplotlib", "pytest-benchmark>=4"],
    },
    license="MIT",
)
