"""Argument checks shared by the public functional API and the drop-in modules: one definition of each message,
so every entry point names the offending argument, its shape and its dtype the same way."""
from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
from torch import nn

# The floating-point dtypes every path (PyTorch and Triton) serves; the softmax always runs in fp32.
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, t, dims: Union[int, Iterable[int]], feature: Optional[int] = None,
                 what: str = "") -> None:
    """``t`` is a floating-point tensor with one of ``dims`` dimensions and, when ``feature`` is given, that last-dim
    size; ``what`` describes the expected layout (``"(batch, text, dim)"``) in the message."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    if t.dim() not in dims:
        raise ValueError(f"{name} must have shape {what}, got {tuple(t.shape)}")
    if feature is not None and t.shape[-1] != feature:
        raise ValueError(f"{name} has feature size {t.shape[-1]} but the module expects {feature} ({what})")


def check_linear_input(name: str, t: torch.Tensor, linear: nn.Module, linear_name: str) -> None:
    """``t`` goes straight into ``linear`` (as in upstream's module): outside autocast, ``F.linear`` needs the
    weight's dtype, so a mismatch is reported here, naming the argument, instead of as torch's RuntimeError from
    inside the op. Only a plain ``nn.Linear`` with a floating-point weight is checked (a quantized or wrapped
    projection has its own rules)."""
    weight = getattr(linear, "weight", None)
    if type(linear) is not nn.Linear or not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        return
    if t.dtype == weight.dtype or (t.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(t.device.type)):
        return
    raise TypeError(f"{name} has dtype {t.dtype} but {linear_name}.weight is {weight.dtype}: convert the input or "
                    "the module with .to(...), or run under torch.autocast")


def promoted_as_concatenated(*tensors: torch.Tensor):
    """The tensors in the dtype ``torch.cat`` would give them: the perceivers project ``[media; latents]`` as two
    sources where upstream concatenates first, and must accept the same dtype mixes (half media, fp32 latents)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return tuple(t.to(dtype) for t in tensors)


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


def key_mask_as_bool(name: str, mask, shape: tuple, layout: str, device: torch.device) -> torch.Tensor:
    """A key padding mask as a boolean tensor on ``device`` (True = that key is visible). ``mask`` is bool, or
    integer / floating 0-1 (any nonzero value counts as visible, as upstream's ``attention_mask`` does), of exactly
    ``shape``; ``layout`` names its axes (``"(N, media_tokens)"``) in the message. The caller's tensor is never
    modified: a conversion or a move makes a new one."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be None or a torch.Tensor {layout}, got {type(mask).__name__}")
    if mask.is_complex():
        raise TypeError(f"{name} must be bool, integer or floating (nonzero = visible), got dtype {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {layout} = {tuple(shape)}, got {tuple(mask.shape)} "
                         f"(dtype {mask.dtype})")
    if mask.dtype != torch.bool:
        mask = mask != 0
    return mask.to(device)
