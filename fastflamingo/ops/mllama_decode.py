"""mllama (Llama 3.2 Vision) cross-attention for decode steps on the kernel of ``kernels/mllama_decode.py``: the
launcher and the ``fastflamingo::mllama_xattn_decode`` custom op (inference only: no autograd). It reads the cache
layer's K/V and the additive mask in place, visits only the tiles some token can see (the unit list of
:func:`fastflamingo.models.mllama.mask.decode_units`) and merges the key splits with media_decode's combine kernel.

No host synchronisation and no data-dependent host decision: capturable in a CUDA graph after the first call.
Importing this module needs torch only: triton and the kernels are imported on the first launch.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import SUPPORTED_DTYPES
from . import media_decode as media_decode_ops
from ..kernels._launch import MAX_HEAD_DIM, ConfigLike, addressable, check_out
from .mllama_xattn import KEY_TILE_DIMS, QUERY_TILE_DIMS

MAX_ROWS = 128  # query tokens x group heads in one tile


def _kernels():
    """(the kernel module, media_decode's kernel module for the split count and the combine kernel, kernels/_utils):
    imported on the first launch, since they import triton."""
    from ..kernels import _utils, media_decode, mllama_decode

    return mllama_decode, media_decode, _utils


@torch.library.custom_op("fastflamingo::mllama_xattn_decode", mutates_args=())
def decode_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], units: torch.Tensor,
    unit_count: torch.Tensor, unit_len: int, scale: float,
) -> torch.Tensor:
    # called by fastflamingo.models.mllama.mllama_xattn, which validated the arguments and built the unit list: the
    # launcher checks nothing again
    return launch(q, k, v, mask, units, unit_count, unit_len, scale, validated=True)


@decode_op.register_fake
def _(q, k, v, mask, units, unit_count, unit_len, scale):
    return q.new_empty(q.shape)


def mllama_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                  units: torch.Tensor, unit_count: torch.Tensor, unit_len: int, scale: float) -> torch.Tensor:
    """A decode step with the additive (B, S, K) mask (or None), visiting only the listed key units."""
    return decode_op(q, k, v, mask, units, unit_count, int(unit_len), float(scale))


def _check_inputs(q, k, v, mask, units, unit_count) -> None:
    """What memory safety needs of a direct launcher call (ValueError / TypeError otherwise)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"q must be (B, Tq, H, D) and k, v (B, Hkv, K, D), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q, k, v must share a dtype among fp32/fp16/bf16, got {q.dtype}, {k.dtype}, {v.dtype}")
    batch, num_tokens, heads, head_dim = q.shape
    kv_heads, num_keys = k.shape[1], k.shape[2]
    if k.shape[0] != batch or k.shape[3] != head_dim or kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"k {tuple(k.shape)} does not fit q {tuple(q.shape)} (B, Hkv | H, K, D)")
    group = heads // kv_heads
    if num_tokens * group > MAX_ROWS or head_dim > MAX_HEAD_DIM:
        raise ValueError(f"decode serves tokens x group <= {MAX_ROWS} and head_dim <= {MAX_HEAD_DIM}, got "
                         f"{num_tokens} x {group}, {head_dim}")
    if units.dim() != 2 or units.shape[0] != batch or units.dtype != torch.int32 \
            or tuple(unit_count.shape) != (batch,) or unit_count.dtype != torch.int32:
        raise ValueError("units must be int32 (B, U) and unit_count int32 (B,)")
    if mask is not None and (mask.dim() != 3 or mask.shape[1:] != (num_tokens, num_keys)
                             or mask.shape[0] not in (1, batch)):
        raise ValueError(f"mask must be (B, Tq, K) = {(batch, num_tokens, num_keys)}, got {tuple(mask.shape)}")


def launch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], units: torch.Tensor,
    unit_count: torch.Tensor, unit_len: int, scale: float, config: Optional[ConfigLike] = None,
    num_splits: Optional[int] = None, *, out: Optional[torch.Tensor] = None, validated: bool = False,
) -> torch.Tensor:
    """Decode-step forward: o (B, Tq, H, D) in q's dtype.

    Args:
        q: (B, Tq, H, D), Tq * (H / Hkv) <= 128. k, v: (B, Hkv, K, D), the cache layer's tensors (any strides with
            unit last stride: read in place). fp32/fp16/bf16, D <= 128.
        mask: additive float mask (B or 1, Tq, K) (any strides, 0 strides included), or None (every key).
        units, unit_count: int32 (B, U) unit indices (visited first) and (B,) how many to visit; ``unit_len`` keys
            per unit (the last unit may be shorter).
        config: force ``{"BLOCK_N": 16}``. num_splits: force the split count.
        validated: the caller checked the arguments (the custom op, after the mllama entry's checks); a direct call
            is checked here.
    """
    K, D, U = _kernels()
    if not validated:
        _check_inputs(q, k, v, mask, units, unit_count)
    batch, num_tokens, heads, head_dim = q.shape
    kv_heads, num_keys = k.shape[1], k.shape[2]
    group = heads // kv_heads
    o = addressable(check_out("out", out, q.shape, q.dtype, q.device), "out", dims=QUERY_TILE_DIMS, copy=False)
    if o.numel() == 0:
        return o
    if num_keys == 0:
        return o.zero_()
    q = addressable(q, "q", dims=QUERY_TILE_DIMS)
    k, v = (addressable(t, name, dims=KEY_TILE_DIMS) for t, name in ((k, "k"), (v, "v")))
    if mask is not None:
        if mask.dtype == torch.bool:  # True = attend
            mask = torch.where(mask, 0.0, float("-inf")).to(q.dtype)
        mask = mask.expand(batch, -1, -1)
    units = units.contiguous()

    cfg = U.as_config(config) if config is not None else K.default_config(q.dtype, head_dim, q.device)
    block_n = cfg.kwargs["BLOCK_N"]
    if num_splits is None:
        num_splits = D.choose_splits(batch, kv_heads, num_keys, block_n, U.sm_count(q.device))
    num_splits = int(num_splits)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    mask_arg = mask if mask is not None else q
    mask_strides = (mask.stride(0), mask.stride(1), mask.stride(2)) if mask is not None else (0, 0, 0)
    common = dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_D=U.head_block(head_dim), ROWS=K.rows_for(num_tokens, group),
                  BLOCK_N=block_n, HAS_MASK=mask is not None, DOT_PRECISION=U.dot_precision(q.dtype),
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    args = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), *mask_strides, o.stride(0), o.stride(1), o.stride(2))
    grid = (num_splits, batch * kv_heads)
    if num_splits == 1:
        K._mllama_decode_split_kernel[grid](
            q, k, v, mask_arg, o, o, o, units, unit_count, *args, 0, 0, 0, 0, 0, units.stride(0),
            kv_heads, num_tokens, num_keys, unit_len, 1, float(scale), DIRECT=True, **common)
        return o
    # fp32 partials in the layout of media_decode's combine kernel
    o_part, lse_part = media_decode_ops.split_workspace(batch * heads, num_tokens, num_splits, head_dim, q.device)
    K._mllama_decode_split_kernel[grid](
        q, k, v, mask_arg, o, o_part, lse_part, units, unit_count, *args,
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
        units.stride(0), kv_heads, num_tokens, num_keys, unit_len, num_splits, float(scale), DIRECT=False, **common)
    media_decode_ops.combine(o_part, lse_part, o, num_splits)
    return o


__all__ = ["mllama_decode", "launch", "decode_op"]
