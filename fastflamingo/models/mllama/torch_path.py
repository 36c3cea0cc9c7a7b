"""The PyTorch path of the mllama cross-attention (CPU, and wherever the Triton kernels cannot serve).

Layouts: q (B, S, H, D); k, v (B, Hkv, K, D) (the transformers cache layout); output (B, S, H, D).

GQA without repeating K/V: ``scaled_dot_product_attention(..., enable_gqa=True)`` reads each K/V head for its
``G = H / Hkv`` query heads in place (transformers' SDPA path repeats K/V G times when there is a mask).

With the closed form (:class:`~fastflamingo.models.mllama.mask.MllamaMask`) the text is cut into runs of tokens that see
the same images; each run attends to exactly its keys, with no mask when it sees one image (its real tiles are one
contiguous slice) or every key, and a small key mask when it sees a run of consecutive images (the padded tiles
between them). Nothing of size text x keys is built. Without it, :func:`dense` is transformers' computation with
the additive mask as given (no repeated K/V either).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ...masks import zero_unseen
from .mask import ALL_KEYS, MllamaMask


def _attend(q, k, v, scale, dropout_p, attn_mask=None):
    """(n, R, H, D) queries on (n, Hkv, K, D) keys/values; ``enable_gqa`` reads each K/V head for its query heads
    in place (CPU flash attention: no copy of q, k or v)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                         scale=scale, enable_gqa=k.shape[1] != q.shape[2])
    return out.transpose(1, 2)


def runs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: MllamaMask, scale: float,
         dropout_p: float = 0.0) -> torch.Tensor:
    """Closed-form attention: one SDPA call per run of tokens that see the same images (see the module docstring),
    written straight into the output; tokens that see nothing get exact zeros."""
    batch, num_text, heads, _ = q.shape
    stride = mask.image_stride
    _, _, image_keys = mask.host()
    out = q.new_empty(batch, num_text, heads, v.shape[-1])
    for b, t0, t1, start, end in mask.runs():
        rows = slice(None) if b is None else slice(b, b + 1)
        sizes = image_keys[b or 0]
        if start == end:  # sees nothing: exact zeros
            out[rows, t0:t1] = 0.0
            continue
        if start == ALL_KEYS:
            keys, key_mask = slice(None), None
        elif end - start == 1:
            keys, key_mask = slice(start * stride, start * stride + sizes[start]), None
        else:  # consecutive images: one slice from the first to the last real key, padded tiles masked out
            last = (end - 1) * stride + sizes[end - 1]
            offset = torch.arange(start * stride, last, device=q.device)
            real = torch.tensor(sizes[start:end], device=q.device)
            key_mask = ((offset % stride) < real[offset // stride - start]).view(1, 1, 1, -1)
            keys = slice(start * stride, last)
        out[rows, t0:t1] = _attend(q[rows, t0:t1], k[rows, :, keys], v[rows, :, keys], scale, dropout_p, key_mask)
    return out


def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: Optional[torch.Tensor], scale: float,
          dropout_p: float = 0.0, zero_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """transformers' attention with the additive (or boolean) (B or 1, 1, S, K) mask as given; None = every key
    (not causal). ``zero_rows`` (B, S) bool: set those rows to exactly 0 ("zero" mode)."""
    mask = attention_mask
    if mask is not None and mask.dtype != torch.bool and mask.dtype != q.dtype:
        mask = mask.clamp(min=torch.finfo(q.dtype).min).to(q.dtype)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale,
                                         enable_gqa=k.shape[1] != q.shape[2])
    out = out.transpose(1, 2)
    return out if zero_rows is None else zero_unseen(out, ~zero_rows)


__all__ = ["runs", "dense"]
