"""Launch rules every kernel family shares, on the host side: which tensors the kernels can address (unit last
stride, int32 offsets inside a tile), the launchers' output buffers, and into how many splits a launch cuts its
reduction axis when its grid alone cannot fill the GPU.

Torch only, no triton: the launchers of ``fastflamingo.ops`` import it with their module (``import fastflamingo``
needs torch only), the kernel families with theirs (``aot_variants`` sizes its workspaces with the split rules).
"""
from __future__ import annotations

if not __name__.startswith("fastflamingo.kernels."):  # kernels/ has no __init__.py on purpose (kernels/README.md)
    raise ImportError(f"{__name__}: the Triton kernels are imported as fastflamingo.kernels.<module>, never as a "
                      "top-level 'kernels' (that name is Hugging Face's package, which transformers imports)")

from typing import TYPE_CHECKING, Mapping, NamedTuple, Optional, Sequence, Union

import torch

if TYPE_CHECKING:
    import triton

# A launch config: a ``triton.Config`` or a plain mapping ``{"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4}``.
ConfigLike = Union["triton.Config", Mapping[str, int]]


# The widest head the attention kernels take: one head tile (BLOCK_D) of at most 128 columns.
MAX_HEAD_DIM = 128
# CUDA caps a grid's second and third axes at 65535 programs; the attention kernels put (sample, head) pairs there.
MAX_GRID_Y = 65535


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------------------------------------------
# What the kernels can address
# ----------------------------------------------------------------------------------------------------------------

# Offsets inside a tile are int32 (64-bit offset tensors would double the address registers and spill); base
# offsets (sample, head, tile start) are int64. No kernel's tile holds more than MAX_TILE_ROWS rows along an axis.
MAX_TILE_ROWS = 128
_INT32_LIMIT = 2 ** 31


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels take every stride explicitly but assume unit stride along the last (feature) dimension, for
    vectorised loads: anything else is copied."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _tile_span(t: torch.Tensor, dims: Sequence[int], rows: int) -> int:
    """The largest in-tile offset a kernel can form in ``t``: ``rows`` rows along each of ``dims`` plus a row of
    features."""
    return rows * sum(abs(t.stride(d)) for d in dims if d < t.dim()) + t.shape[-1]


def tile_offsets_fit(t: torch.Tensor, dims: Sequence[int] = (1,), rows: int = MAX_TILE_ROWS) -> bool:
    """Whether every in-tile offset of ``t`` fits int32 (see :func:`addressable`)."""
    return t.numel() == 0 or _tile_span(t, dims, rows) < _INT32_LIMIT


def addressable(t: torch.Tensor, name: str, *, dims: Sequence[int] = (1,), rows: int = MAX_TILE_ROWS,
                copy: bool = True) -> torch.Tensor:
    """``t`` as the kernels address it: unit stride along the last dimension, and in-tile offsets that fit int32.

    ``dims``: the dimensions a tile spans (the token axis; mllama's query tiles also span the heads of a group, its
    key tiles the keys of a head); ``rows``: the most rows a tile holds along each. A tensor whose offsets do not
    fit is copied (``copy``; never an output buffer, which the caller reads back) and refused if they still do not.
    """
    t = unit_last_stride(t)
    if not tile_offsets_fit(t, dims, rows):
        if copy:
            t = t.contiguous()
        if not tile_offsets_fit(t, dims, rows):
            strides = [t.stride(d) for d in dims if d < t.dim()]
            raise ValueError(f"{name} has strides {strides} along dims {tuple(dims)}: {rows} rows of them pass the "
                             f"kernels' int32 offsets inside a tile (2**31 elements); not supported")
    return t


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


# ----------------------------------------------------------------------------------------------------------------
# Split counts
# ----------------------------------------------------------------------------------------------------------------

# A launch whose grid has fewer than WAVES programs per SM cuts its reduction axis (keys, tokens, K) into splits
# (one more grid axis) until it has: enough loads in flight to cover memory latency. The splits write fp32 partials
# that the launcher (or a combine kernel) reduces in split order, so the result stays deterministic.
WAVES = 2


class SplitRule(NamedTuple):
    """``min_blocks``: the fewest blocks of the split axis a split gets (a split costs a partial write and its share
    of the reduction); ``max_splits``: the most splits (the partial buffers grow with them)."""

    min_blocks: int
    max_splits: int


# The caps differ with what one split's partials cost. media_xattn's dK/dV token splits: a K/V-sized fp32 copy of
# dK and dV per split. Decode's key splits (media_decode, mllama_decode): one row per (sample, head, new token) per
# split, a few tokens: tiny, and a batch-1 step over a long all-previous prefix needs many splits to fill the GPU.
# perceiver_attn's key splits: an output-sized fp32 partial (forward) and a dQ-sized one (backward) per split, over
# a short key axis (media tokens + latents: a few tiles). gated_linear's split-K slices: an fp32 (rows, N) partial
# each, and a K block is short (its dot products amortise the partial write only over several blocks).
DKDV_SPLITS = SplitRule(min_blocks=2, max_splits=16)
DECODE_SPLITS = SplitRule(min_blocks=2, max_splits=64)
PERCEIVER_SPLITS = SplitRule(min_blocks=2, max_splits=8)
SPLIT_K = SplitRule(min_blocks=4, max_splits=16)


def split_count(programs: int, blocks: int, sms: int, rule: SplitRule) -> int:
    """Splits of a launch with ``programs`` programs per split and ``blocks`` blocks along its split axis on ``sms``
    SMs, from shapes only (no tensor read, so a decode step stays free of host synchronisation): enough for
    :data:`WAVES` programs per SM, at most one per ``rule.min_blocks`` blocks and ``rule.max_splits``; at least 1."""
    return max(1, min(_cdiv(WAVES * sms, max(programs, 1)), _cdiv(blocks, rule.min_blocks), rule.max_splits))
