"""Idefics2's padding mask, as the perceiver attention takes it: one boolean (images, media tokens) key mask.

Upstream's resampler appends ones for the latents to the (images, patches) patch mask and expands the result with
``create_bidirectional_mask`` into a 4D mask over ``[context; latents]`` (boolean for SDPA, additive for eager),
the same for every query row. The patched resampler keeps the 2D patch mask (:func:`padding_mask`); a layer or an
attention called with upstream's 4D mask recovers the key mask from it (:func:`key_mask_of`), or keeps the mask
as it is where it is not a per-key padding mask (a soft bias, rows that differ), which then runs densely.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from ...masks import memoised

# what key_mask_of found: ("keys", (N, M) bool or None) or ("dense", a mask for the dense attention)
Recovered = Tuple[str, Optional[torch.Tensor]]


def padding_mask(attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The (images, patches) patch mask (bool or 0/1) as the op's key mask: bool, True = visible; None when every
    patch is visible (one host read, as upstream's own all-visible check). Compiled code keeps the mask as it is
    (an all-True mask gives the same result): the host read would break the graph."""
    if attention_mask is None:
        return None
    visible = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
    if torch.compiler.is_compiling():
        return visible
    return None if bool(visible.all()) else visible


def key_mask_of(attention_mask: Union[None, torch.Tensor], batch: int, media: int, latents: int) -> Recovered:
    """The key mask over the ``media`` context tokens from the mask an upstream caller passes.

    Args:
        attention_mask: None; an (N, media) patch mask (the patched resampler's); or upstream's 4D mask
            (N or 1, 1, latents or 1, media + latents), boolean (True = attend) or additive (0 / very negative).
    Returns:
        ``("keys", key_mask or None)`` or, for a 4D mask that is not a per-key 0 / -inf mask with every latent
        visible, ``("dense", mask)``: the mask as given, for the dense attention.
    """
    if attention_mask is None:
        return "keys", None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor or None, got {type(attention_mask).__name__}")
    if attention_mask.dim() == 2:
        if tuple(attention_mask.shape) != (batch, media):
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)}: a 2D mask is the (images, media tokens) "
                             f"patch mask, expected ({batch}, {media})")
        return "keys", padding_mask(attention_mask)
    if attention_mask.dim() != 4 or attention_mask.shape[-1] != media + latents \
            or attention_mask.shape[0] not in (1, batch) or attention_mask.shape[2] not in (1, latents):
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)}: expected ({batch}, 1, {latents}, "
                         f"{media + latents}) over [context; latents] or ({batch}, {media})")
    # every layer of one resampler forward gets the same 4D mask: it is read on the host once
    return memoised(attention_mask, ("idefics2-keys", batch, media, latents),
                    lambda: _from_4d(attention_mask, batch, media))


def _from_4d(attention_mask: torch.Tensor, batch: int, media: int) -> Recovered:
    if attention_mask.dtype == torch.bool:
        visible = attention_mask
    else:
        # additive: 0 attends, a very negative value (finfo.min, -inf) hides; anything else is a soft bias
        hidden = attention_mask <= torch.finfo(attention_mask.dtype).min / 2
        if not bool(((attention_mask == 0) | hidden).all()):
            return "dense", attention_mask
        visible = ~hidden
    per_key = visible[:, :, :1]
    if not bool(((visible == per_key).all() & per_key[..., media:].all())):
        return "dense", attention_mask
    keys = per_key[:, 0, 0, :media].expand(batch, media)
    return "keys", None if bool(keys.all()) else keys


__all__ = ["padding_mask", "key_mask_of"]
