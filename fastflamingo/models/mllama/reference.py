"""Oracles for the mllama cross-attention, written from the semantics (not from fastflamingo's closed form): used
by the tests and the benchmarks' correctness gate.

- :func:`visible_keys`: the (batch, text, keys) visibility a processor mask (batch, text, images, tiles) means:
  key ``(image j, tile i, token p)`` is visible to token t iff ``mask[t, j, i]``; a row with no visible tile sees
  every key (``"hf"``, transformers 5) or none (``"zero"``).
- :func:`attention`: dense float64 attention over that visibility with GQA (query head h reads K/V head
  ``h // group``); rows that see nothing are exactly 0. Optionally the gradients of q, k, v.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ...reference import visible_softmax


def visible_keys(cross_attention_mask: torch.Tensor, tokens_per_tile: int, empty_rows: str = "hf") -> torch.Tensor:
    """(batch, text, images * tiles * tokens_per_tile) bool visibility of a processor mask."""
    tiles = cross_attention_mask != 0
    keys = tiles.repeat_interleave(tokens_per_tile, dim=3).flatten(2)
    empty = ~keys.any(-1, keepdim=True)
    return keys | empty if empty_rows == "hf" else keys


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float,
              grad_out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[tuple]]:
    """Dense float64 GQA attention. q (B, S, H, D); k, v (B, Hkv, K, D); ``visible`` (B, S, K) bool. Returns o
    (B, S, H, D) and, with ``grad_out``, (dq, dk, dv); all float64 on the CPU."""
    qd, kd, vd = (t.detach().to("cpu", torch.float64).requires_grad_() for t in (q, k, v))
    group = q.shape[2] // k.shape[1]
    kr, vr = kd.repeat_interleave(group, dim=1), vd.repeat_interleave(group, dim=1)
    probs = visible_softmax(torch.einsum("bshd,bhkd->bhsk", qd, kr) * scale, visible.to("cpu")[:, None])
    out = torch.einsum("bhsk,bhkd->bshd", probs, vr)
    if grad_out is None:
        return out.detach(), None
    out.backward(grad_out.detach().to("cpu", torch.float64))
    return out.detach(), (qd.grad, kd.grad, vd.grad)


__all__ = ["visible_keys", "attention"]
