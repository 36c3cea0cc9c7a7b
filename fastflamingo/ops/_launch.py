"""Host-side helpers shared by the kernel launchers of ``fastflamingo.ops``: output buffers, strides the kernels can
address, the launch-config type. Torch only (the launchers import triton and the kernels on their first call)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Mapping, Optional, Union

import torch

if TYPE_CHECKING:
    import triton

# A launch config: a ``triton.Config`` or a plain mapping ``{"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4}``.
ConfigLike = Union["triton.Config", Mapping[str, int]]


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels take every stride explicitly but assume unit stride along the last (feature) dimension, for
    vectorised loads: anything else is copied."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def check_row_strides(tensors: Iterable[torch.Tensor], block: int) -> None:
    """Offsets inside a tile are int32 (64-bit offset tensors would double the address registers): ``block`` rows
    of any tensor must stay below 2**31 elements."""
    for t in tensors:
        if t.dim() >= 2 and t.numel() and abs(t.stride(1)) * block >= 2**31:
            raise ValueError(f"token stride {t.stride(1)} is too large for int32 tile offsets (block {block})")


def check_out(name: str, out: Optional[torch.Tensor], shape, dtype, device) -> torch.Tensor:
    """A launcher's output buffer: a fresh ``torch.empty``, or the caller's preallocated tensor (tests pass
    NaN-filled ones to prove every element is written) after checking its shape, dtype, device and unit last
    stride."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != torch.device(device):
        raise ValueError(f"{name} must be a {dtype} tensor of shape {tuple(shape)} on {device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    if out.stride(-1) != 1 and out.shape[-1] > 1:
        raise ValueError(f"{name} must have unit stride along its last dimension, got strides {out.stride()}")
    return out
