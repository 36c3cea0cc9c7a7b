"""Evolla's masks in the form the ops take.

The aligner (``EvollaSequenceAlignerCrossAttention``) lets every text token see one "media": the concatenated
sources (protein, structure, MSA), each with a key padding mask per sample. Upstream multiplies a (batch, text) query
mask and a (batch, keys) key mask into a dense (batch, 1, text, keys) mask and fills the excluded scores with
``finfo.min``; a query row with no visible key therefore gets the *uniform* average of every key's value (padded keys
included), and so does a text token whose query mask is 0. Here the keys go to ``media_xattn`` as a key mask over a
single media that every token sees, and :func:`uniform_rows` names the rows that must get that average instead.

The compressor (``EvollaSequenceCompressorAttention``) attends to ``[protein tokens; latents]`` with a (batch,
tokens + latents) mask whose latent part is all ones (the resampler appends it): the protein part becomes the key mask
of ``perceiver_attn``.

Upstream excludes a key where ``(1 - mask).bool()``, i.e. wherever the mask is not exactly 1: ``visible`` keeps that
rule for any mask dtype (bool, int, float).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ...masks import IMMEDIATE, MediaMask


def visible(mask: torch.Tensor) -> torch.Tensor:
    """True where upstream's ``(1 - mask).bool()`` is False (the mask equals 1)."""
    return mask == 1


def source_mask(states: Optional[torch.Tensor], kv_attn_mask: Optional[torch.Tensor],
                batch_mask: Optional[torch.Tensor], name: str) -> Optional[torch.Tensor]:
    """The (batch, keys) key mask of one aligner source: the given ``*_kv_attn_mask``, else every key of the samples
    ``*_batch_mask`` selects (upstream's ``ones(batch, keys) * batch_mask``); None for an absent source."""
    if states is None:
        return None
    batch, keys = states.shape[:2]
    if kv_attn_mask is not None:
        if tuple(kv_attn_mask.shape) != (batch, keys):
            raise ValueError(f"{name}_kv_attn_mask must have shape {(batch, keys)} (batch, {name} keys), got "
                             f"{tuple(kv_attn_mask.shape)}")
        return kv_attn_mask.to(states.device)
    if batch_mask is None:
        raise ValueError(f"{name}_kv_states needs {name}_kv_attn_mask or {name}_batch_mask (upstream needs them too)")
    if tuple(batch_mask.shape) != (batch,):
        raise ValueError(f"{name}_batch_mask must have shape ({batch},), got {tuple(batch_mask.shape)}")
    # upstream's ones(batch, keys) * batch_mask: float, the batch mask's value repeated over the keys
    return batch_mask.to(states.device, torch.float32)[:, None].expand(batch, keys)


def key_mask(masks: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
    """The boolean (batch, keys) visibility of the concatenated sources (None entries are absent sources)."""
    return torch.cat([visible(m) for m in masks if m is not None], dim=1)


def query_mask(query_attn_mask: Optional[torch.Tensor], batch: int, text: int, device) -> torch.Tensor:
    """The boolean (batch, text) visibility of the query rows.

    Upstream broadcasts ``query_attn_mask`` (the model's whole text attention mask) against the queries; in a decode
    step with a KV cache the queries are the last token(s) while the mask covers every position, and upstream's
    broadcast turns the step's one row into one row per position (``generate(use_cache=True)`` then fails in the next
    decoder layer). The rows a step computes are the mask's last ``text`` columns, which is what is used here.
    """
    if query_attn_mask is None:
        return torch.ones(batch, text, dtype=torch.bool, device=device)
    if query_attn_mask.dim() != 2 or query_attn_mask.shape[0] != batch or query_attn_mask.shape[1] < text:
        raise ValueError(f"query_attn_mask must have shape ({batch}, >= {text}) (batch, text), got "
                         f"{tuple(query_attn_mask.shape)}")
    return visible(query_attn_mask[:, query_attn_mask.shape[1] - text:]).to(device)


def every_token_sees_one_media(batch: int, text: int, device) -> MediaMask:
    """The closed-form mask of the aligner: every text token sees the one media (the concatenated sources)."""
    return MediaMask(torch.ones(batch, text, dtype=torch.int32, device=device), 1, IMMEDIATE)


def uniform_rows(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(batch, text) True where upstream's softmax sees only ``finfo.min`` scores and averages every key uniformly:
    query rows masked out, and every row of a sample whose keys are all masked."""
    return ~(queries & keys.any(dim=1, keepdim=True))


__all__ = ["visible", "source_mask", "key_mask", "query_mask", "every_token_sees_one_media", "uniform_rows"]
