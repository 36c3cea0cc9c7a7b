"""``python -m fastflamingo.info``: what this installation can do on this machine.

Prints the versions that matter (fastflamingo, Python, torch and its CUDA, triton, numpy, transformers), the device,
which backends can serve CUDA tensors and why not, the kernel families, the model families ``fastflamingo.patch``
serves (the registry, ``fastflamingo.models.FAMILIES``), and which tuned config table
(``fastflamingo/configs/``) a launch on this device would use. Works without a GPU and without triton.
"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
from typing import List, Optional, Sequence, Tuple

import torch

from . import _backend, configs
from ._version import __version__


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as exc:  # missing, or broken enough not to import
        return f"not available ({type(exc).__name__})"


def versions() -> List[Tuple[str, str]]:
    cuda = torch.version.cuda or "none (CPU build)"
    return [
        ("fastflamingo", f"{__version__} ({os.path.dirname(os.path.abspath(__file__))})"),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("torch", f"{torch.__version__}, CUDA {cuda}"),
        ("triton", _version("triton")),
        ("numpy", _version("numpy")),
        ("transformers", _version("transformers")),
    ]


def devices() -> List[str]:
    if not torch.cuda.is_available():
        return [f"no CUDA device (torch.cuda.is_available() is False; torch {torch.__version__})"]
    out = []
    for index in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(index)
        out.append(f"cuda:{index} {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                   f"{p.total_memory / 2**30:.1f} GiB")
    return out


def backends() -> List[Tuple[str, str]]:
    """(backend, status) rows: the PyTorch path always serves; the Triton kernels need triton and a CUDA device
    (or the interpreter, for CPU tensors)."""
    rows = [("torch", "available (every device)")]
    reasons = []
    err = _backend.triton_import_error()
    if err:
        reasons.append(err)
    if not torch.cuda.is_available():
        reasons.append("no CUDA device")
    if reasons and _backend.interpret_mode() and not err:
        rows.append(("triton", "interpreter only (TRITON_INTERPRET=1: kernels run on CPU tensors, slowly)"))
    elif reasons:
        rows.append(("triton", "not available: " + "; ".join(reasons)))
    else:
        rows.append(("triton", "available for CUDA tensors"))
    rows.append(("selected", f"{_backend.requested_backend()} (FASTFLAMINGO_BACKEND or fastflamingo.backend(...))"))
    return rows


def kernel_families() -> str:
    from .ops import KERNEL_FAMILIES  # torch only: no triton import

    return ", ".join(KERNEL_FAMILIES)


def model_families() -> List[str]:
    """One line per registered model family: what it patches, the ops it launches, where its mask comes from."""
    from .models import FAMILIES  # torch only: the families import transformers lazily

    return [family.info_line() for family in FAMILIES]


def tuned_table(device: Optional[torch.device] = None) -> List[str]:
    """Which table a launch on ``device`` (default: the current CUDA device) would use, and what is shipped."""
    lines = []
    if not configs.tables_enabled():
        lines.append(f"tuned tables switched off ({configs.ENV_VAR}={os.environ.get(configs.ENV_VAR)})")
    try:
        tables = configs.all_tables()
    except ValueError as exc:
        return [f"a tuned table cannot be read: {exc}"]
    identity = configs.device_identity(device or torch.device("cuda")) if torch.cuda.is_available() else None
    if identity is None:
        lines.append("in use: none (no CUDA device: the interpreter and the CPU never autotune)")
    else:
        table = configs.table_for(identity)
        if table is None:
            lines.append(f"in use: none for {identity}: configs are autotuned at first use "
                         f"(python -m benchmarks.tune OUTDIR writes {identity.filename()})")
        else:
            lines.append(f"in use: {table.path} ({len(table)} entries, {identity})")
    for table in tables:
        lines.append(f"available: {table.path.name if table.path else '?'}: {table.identity}, {len(table)} entries")
    return lines


def report() -> str:
    width = 13
    out = ["fastflamingo.info"]
    out += [f"  {name:<{width}} {value}" for name, value in versions()]
    out.append("device")
    out += [f"  {line}" for line in devices()]
    out.append("backends")
    out += [f"  {name:<{width}} {status}" for name, status in backends()]
    out.append(f"kernel families\n  {kernel_families()}")
    out.append("model families")
    out += [f"  {line}" for line in model_families()]
    out.append("tuned configs")
    out += [f"  {line}" for line in tuned_table()]
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argparse.ArgumentParser(prog="python -m fastflamingo.info", description=__doc__.split("\n\n")[0]).parse_args(argv)
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
