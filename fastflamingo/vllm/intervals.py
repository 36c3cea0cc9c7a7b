"""Which images each prompt token of a vLLM step sees, in closed form, on the device.

transformers' mllama processor (``get_cross_attention_token_mask``) lets image ``i`` be seen from its ``<|image|>``
token up to the next image token, a run of consecutive image tokens extending together to the end of the run's span.
Per token ``t`` of one prompt that is: with ``hi`` = the number of image tokens at positions ``<= t``, the token sees
no image when ``hi == 0``, else the images ``[lo, hi)`` where ``lo`` is the first image of the run holding image
``hi - 1``. Decode tokens repeat the last prompt token's images (transformers' ``generate`` repeats the last mask
row), so one prefill computes everything a request ever needs.

vLLM packs the step's requests into one token tensor with boundaries ``query_start_loc``; in its encoder-decoder mode
every request's first step is its whole prompt (no chunked prefill), so the prefill segments start at position 0.
:func:`prompt_image_ranges` handles all segments at once with segmented cumulative sums (no host synchronisation, no
Python loop over requests). Imports torch only.
"""
from __future__ import annotations

from typing import Tuple

import torch


def prompt_image_ranges(input_ids: torch.Tensor, query_start_loc: torch.Tensor,
                        image_token_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per token, the request-local images ``[img_start, img_end)`` it sees (``img_start == img_end == 0``: none).

    Args:
        input_ids: (tokens,) the step's packed prompt tokens; each segment is a whole prompt.
        query_start_loc: (requests + 1,) segment boundaries, ``query_start_loc[0] == 0``, nondecreasing.
        image_token_id: the ``<|image|>`` token id.

    Returns:
        ``(img_start, img_end)``, int32 (tokens,) on ``input_ids``' device.
    """
    if input_ids.dim() != 1 or query_start_loc.dim() != 1:
        raise ValueError(f"input_ids and query_start_loc must be 1-D, got {tuple(input_ids.shape)} and "
                         f"{tuple(query_start_loc.shape)}")
    n = input_ids.shape[0]
    device = input_ids.device
    bounds = query_start_loc.to(device=device, dtype=torch.int64)
    pos = torch.arange(n, device=device)
    # request of each token: the number of segment ends at or before it
    req = torch.searchsorted(bounds[1:], pos, right=True)
    seg_start = bounds[req]
    is_image = input_ids == image_token_id
    count = torch.cumsum(is_image.to(torch.int64), 0)  # image tokens at positions <= t, over the whole step
    # images of earlier segments: the exclusive count at each segment's first token
    before = (count - is_image.to(torch.int64))[seg_start.clamp(max=max(n - 1, 0))] if n else count
    hi = count - before
    # a run starts at an image token whose predecessor in the same segment is not one
    prev_image = torch.zeros_like(is_image)
    prev_image[1:] = is_image[:-1]
    prev_image &= pos != seg_start
    run_start = is_image & ~prev_image
    # global index of the latest run's first image at or before t; image indices grow along the step, so a running
    # maximum finds it, and a segment's own images always come after every earlier segment's
    first = torch.where(run_start, count - 1, torch.full_like(count, -1))
    lo = torch.cummax(first, 0).values - before if n else first
    sees = hi > 0
    img_start = torch.where(sees, lo, torch.zeros_like(lo)).to(torch.int32)
    img_end = torch.where(sees, hi, torch.zeros_like(hi)).to(torch.int32)
    return img_start, img_end


__all__ = ["prompt_image_ranges"]
