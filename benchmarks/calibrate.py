"""Measured ceilings of the machine, used as roofline denominators in the same run (docs/performance.md, "Roofline").

A large device-to-device copy gives the achievable memory bandwidth (read + write bytes counted) and a large
square matmul gives the achievable dense FLOP/s of the benchmark dtype. Spec sheets overstate both by 10-20 %, so
"% of measured" is the number that says how close a kernel is to what the card can actually do.
"""
from __future__ import annotations

from typing import Dict

import torch

from .timing import time_call

# CUDA: 1 GiB copy (far beyond L2) and an 8192^3 GEMM; CPU: sizes that take ~0.1 s on 2 cores
_SIZES = {
    "cuda": dict(copy_bytes=1 << 30, gemm_n=8192),
    "cpu": dict(copy_bytes=256 << 20, gemm_n=2048),
    "tiny": dict(copy_bytes=8 << 20, gemm_n=256),
}


def calibrate(device: str, dtype: torch.dtype, budget_s: float = 0.5, tiny: bool = False) -> Dict[str, float]:
    sizes = _SIZES["tiny" if tiny else device]
    numel = sizes["copy_bytes"] // 4
    src = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    copy = time_call(lambda: dst.copy_(src), device, budget_s)
    copy_gbps = 2 * sizes["copy_bytes"] / (copy.median_ms * 1e-3) / 1e9
    del src, dst

    n = sizes["gemm_n"]
    # the CPU has no fast bf16/fp16 GEMM on most parts: calibrate fp32 there, the benchmark dtype on CUDA
    gemm_dtype = dtype if device == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=gemm_dtype)
    b = torch.randn(n, n, device=device, dtype=gemm_dtype)
    gemm = time_call(lambda: a @ b, device, budget_s)
    gemm_tflops = 2 * n**3 / (gemm.median_ms * 1e-3) / 1e12
    return {
        "copy_bytes": sizes["copy_bytes"],
        "copy_ms": copy.median_ms,
        "copy_gbps": copy_gbps,
        "gemm_n": n,
        "gemm_dtype": str(gemm_dtype).replace("torch.", ""),
        "gemm_ms": gemm.median_ms,
        "gemm_tflops": gemm_tflops,
    }
