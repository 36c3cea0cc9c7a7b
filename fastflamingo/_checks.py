"""Argument checks shared by the public functional API and the drop-in modules: one definition of each message,
so every entry point names the offending argument, its shape and its dtype the same way."""
from __future__ import annotations

from typing import Iterable, Optional, Union

import torch

# The floating-point dtypes every path (PyTorch and Triton) serves; the softmax always runs in fp32.
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, t, dims: Union[int, Iterable[int]], feature: Optional[int] = None,
                 what: str = "") -> None:
    """``t`` is a tensor with one of ``dims`` dimensions and, when ``feature`` is given, that last-dim size;
    ``what`` describes the expected layout (``"(batch, text, dim)"``) in the message."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    if t.dim() not in dims:
        raise ValueError(f"{name} must have shape {what}, got {tuple(t.shape)}")
    if feature is not None and t.shape[-1] != feature:
        raise ValueError(f"{name} has feature size {t.shape[-1]} but the module expects {feature} ({what})")


def unsupported_dtype_reasons(tensors) -> list:
    """Reasons the kernels cannot serve these ``(name, tensor)`` pairs' dtypes (empty: all supported, one dtype)."""
    reasons = []
    dtypes = {t.dtype for _, t in tensors}
    if len(dtypes) > 1:
        names = ", ".join(name for name, _ in tensors)
        reasons.append(f"{names} have different dtypes {sorted(str(d) for d in dtypes)}")
    for dtype in sorted(dtypes, key=str):
        if dtype not in SUPPORTED_DTYPES:
            reasons.append(f"dtype {dtype} is not supported (fp32, fp16, bf16)")
    return reasons
