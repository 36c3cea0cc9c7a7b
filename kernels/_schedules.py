"""Device-side schedules of the prefill kernels, built with torch ops on the device from each token's visible media
(no host synchronisation): run-aligned query tiles (``media_xattn``'s forward and dQ kernels, ``mllama_xattn``'s on
run ids) and, per media, the range of tokens that see it (``media_xattn``'s dK/dV kernel). The launchers memoise
them on the mask (``fastflamingo/ops/media_xattn.py``)."""
from __future__ import annotations

if not __name__.startswith("fastflamingo.kernels."):  # kernels/ has no __init__.py on purpose (kernels/README.md)
    raise ImportError(f"{__name__}: the Triton kernels are imported as fastflamingo.kernels.<module>, never as a "
                      "top-level 'kernels' (that name is Hugging Face's package, which transformers imports)")

from typing import Tuple

import torch


def query_tile_slots(num_tokens: int, num_media: int, block_m: int) -> int:
    """Upper bound of run-aligned query tiles per sample (see the module docstring); also >= ceil(T / BLOCK_M)."""
    return max(1, min(num_tokens, num_tokens // block_m + num_media + 2))


def query_tile_schedule(lo: torch.Tensor, hi: torch.Tensor, num_media: int,
                        block_m: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run-aligned query tiles: int32 (B, slots) ``tile_start`` / ``tile_end``; unused slots have start == end.

    ``lo``, ``hi``: each token's visible media (``fastflamingo.masks.visible_media``); a run is a stretch of
    tokens with equal (lo, hi)."""
    batch, num_tokens = lo.shape
    device = lo.device
    slots = query_tile_slots(num_tokens, num_media, block_m)
    pos = torch.arange(num_tokens, device=device, dtype=torch.int32).expand(batch, num_tokens)
    change = torch.ones((batch, num_tokens), dtype=torch.bool, device=device)
    change[:, 1:] = (lo[:, 1:] != lo[:, :-1]) | (hi[:, 1:] != hi[:, :-1])
    run_start = torch.where(change, pos, torch.zeros_like(pos)).cummax(dim=1).values
    # first change strictly after t (or T): a reversed running minimum of the change positions shifted by one
    change_after = torch.full_like(pos, num_tokens)
    change_after[:, :-1] = torch.where(change[:, 1:], pos[:, 1:], change_after[:, 1:])
    run_end = change_after.flip(1).cummin(dim=1).values.flip(1)
    is_start = (pos - run_start) % block_m == 0
    end_if_start = torch.minimum(pos + block_m, run_end)
    ordinal = is_start.cumsum(dim=1, dtype=torch.int32)  # non-decreasing: the i-th tile starts where it reaches i
    wanted = torch.arange(1, slots + 1, device=device, dtype=torch.int32).expand(batch, slots).contiguous()
    where = torch.searchsorted(ordinal.contiguous(), wanted)  # int64; num_tokens past the last tile
    used = where < num_tokens
    gather_at = where.clamp(max=num_tokens - 1)
    start = torch.where(used, where.to(torch.int32), 0)
    end = torch.where(used, end_if_start.gather(1, gather_at), 0)
    # Too many runs for the slots (only when text_time is not monotone): plain BLOCK_M tiles for that sample.
    plain_start = (wanted - 1) * block_m
    plain_used = plain_start < num_tokens
    plain_end = torch.where(plain_used, torch.clamp(plain_start + block_m, max=num_tokens), 0)
    plain_start = torch.where(plain_used, plain_start, 0)
    overflow = (ordinal[:, -1] > slots)[:, None]
    start = torch.where(overflow, plain_start, start).to(torch.int32).contiguous()
    end = torch.where(overflow, plain_end, end).to(torch.int32).contiguous()
    return start, end


def media_token_ranges(lo: torch.Tensor, hi: torch.Tensor, num_media: int,
                       immediate: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per (sample, media): [first, last + 1) of the tokens that see it, int32 (B, M); empty as (T, 0).
    ``lo``, ``hi``: each token's visible media (``fastflamingo.masks.visible_media``)."""
    batch, num_tokens = lo.shape
    device = lo.device
    pos = torch.arange(num_tokens, device=device, dtype=torch.int32).expand(batch, num_tokens)
    # immediate: a token sees media lo only; all-previous: it sees 0..hi-1, so index it by its last media and
    # spread with a reversed running min/max below. Tokens that see nothing go to a dummy column M.
    index = torch.where(hi > lo, hi - 1, num_media).to(torch.int64)
    first = torch.full((batch, num_media + 1), num_tokens, dtype=torch.int32, device=device)
    last = torch.full((batch, num_media + 1), -1, dtype=torch.int32, device=device)
    first = first.scatter_reduce(1, index, pos, reduce="amin")[:, :num_media]
    last = last.scatter_reduce(1, index, pos, reduce="amax")[:, :num_media]
    if not immediate:
        first = first.flip(1).cummin(dim=1).values.flip(1)
        last = last.flip(1).cummax(dim=1).values.flip(1)
    return first.contiguous(), (last + 1).contiguous()
