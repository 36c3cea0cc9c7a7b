"""IDEFICS's image mask in closed form: from the processor's (batch, text, images) mask, and recovered from the
expanded additive (batch, 1, text, images * latents) bias a gated layer receives.

The closed form itself (:class:`fastflamingo.masks.MediaMask`: ``text_time`` and a mode) and the memoisation are
the op level's; this module only reads IDEFICS's masks. ``model_mask.py`` hands a patched ``IdeficsModel``'s layers
the mask its forward derives with :func:`from_image_attention_mask`; a layer called on its own recovers it from the
bias with :func:`idefics_media_mask`.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ...masks import ALL_PREVIOUS, IMMEDIATE, MediaMask, all_media, memoised


def from_image_attention_mask(image_attention_mask: torch.Tensor) -> "MediaMask | torch.Tensor":
    """IDEFICS: ``image_attention_mask`` (batch, text, num_images), nonzero where a token may see an image.

    The IDEFICS processor produces one-hot rows (the current image) and all-zero rows (before the first image and
    after an end-of-sequence token): that is the immediate mode. Rows that are prefixes ``1..j`` of the images
    give the all-previous mode. Any other pattern is returned as a boolean (batch, text, num_images) tensor,
    which only the PyTorch path serves (with a dense mask).

    Which mode applies is a host decision (one read of the whole mask). It is made once per source tensor: during
    ``generate`` every decode step's mask is a view of the prompt's mask (transformers slices its last row), and a
    view whose rows are rows of a classified tensor has that tensor's mode (both properties hold row by row), so a
    decode step only computes ``text_time`` on the device, with no host read (:func:`_row_source`).
    """
    if image_attention_mask.dim() != 3:
        raise ValueError(
            f"image_attention_mask must have shape (batch, text, num_images), got {tuple(image_attention_mask.shape)}"
        )
    m = image_attention_mask

    def build():
        source = _row_source(m)
        mode = memoised(source, ("idefics-mode",), lambda: _closed_form_mode(source != 0))
        if mode is None and source is not m:  # the larger tensor has no closed form: perhaps these rows do
            mode = _closed_form_mode(m != 0)
        allowed = m != 0
        return allowed if mode is None else MediaMask(_count_and_last(allowed)[1], m.shape[-1], mode)

    return memoised(m, ("idefics",), build)


def _row_source(m: torch.Tensor) -> torch.Tensor:
    """The tensor whose rows (runs of ``num_images`` consecutive elements along its last dim) include every
    (batch, text) row of ``m``: ``m``'s base when ``m`` is a view that selects whole rows of a contiguous base (e.g.
    ``mask[:, -1:]``, or a reshape of a beam-expanded mask), else ``m`` itself. Decided from shapes, strides and
    offsets only (no tensor read)."""
    base = m._base
    images = m.shape[-1]
    if base is None or base.dim() < 2 or base.shape[-1] != images or images == 0 or base.dtype != m.dtype:
        return m
    if not base.is_contiguous() or base.storage_offset() != 0:
        return m
    if base.untyped_storage().nbytes() != base.numel() * base.element_size():
        return m
    if m.stride(-1) != 1 and images > 1:
        return m
    # every row of m starts at a multiple of `images` elements of the base's storage: a whole row of the base
    if any(x % images for x in (m.storage_offset(), m.stride(0), m.stride(1))):
        return m
    return base


def _closed_form_mode(allowed: torch.Tensor) -> Optional[str]:
    """The mode of a (batch, text, num_media) boolean mask: immediate when every row has at most one image,
    all-previous when every row is a prefix ``1..j``, None when neither (two host reads)."""
    count, last = _count_and_last(allowed)
    if bool((count <= 1).all()):
        return IMMEDIATE
    if bool((count == last).all()):  # every row is a prefix 1..j (or empty)
        return ALL_PREVIOUS
    return None


def _count_and_last(allowed: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per row of a (batch, text, num_media) boolean mask: how many media it sees and the 1-based index of the last
    one (0: none), both int32. A row is one-hot or empty when ``count <= 1`` and a prefix ``1..j`` when
    ``count == last``; ``last`` is then its ``text_time``."""
    num_media = allowed.shape[-1]
    count = allowed.sum(-1, dtype=torch.int32)
    index = torch.arange(1, num_media + 1, device=allowed.device, dtype=torch.int32)
    last = torch.where(allowed, index, torch.zeros_like(index)).amax(-1) if num_media else count
    return count, last


def _classify_allowed(allowed: torch.Tensor) -> "MediaMask | torch.Tensor":
    """Closed form of a (batch, text, num_media) boolean mask when there is one, else the mask itself."""
    mode = _closed_form_mode(allowed)
    return allowed if mode is None else MediaMask(_count_and_last(allowed)[1], allowed.shape[-1], mode)


def from_idefics_additive_mask(mask: torch.Tensor, num_images: int, latents_per_image: int) -> "MediaMask | torch.Tensor":
    """IDEFICS layers receive the mask already expanded to an additive (batch, 1, text, images * latents) bias
    (0 where allowed, ``finfo.min`` elsewhere). Read one column per image, then as :func:`from_image_attention_mask`.
    """
    expected_keys = num_images * latents_per_image
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-1] != expected_keys:
        raise ValueError(
            "image_attention_mask must have shape (batch, 1, text, num_images * latents) = "
            f"(B, 1, T, {expected_keys}), got {tuple(mask.shape)}"
        )

    def build():
        per_image = mask[:, 0, :, ::latents_per_image] if latents_per_image else mask[:, 0, :, :0]
        allowed = per_image == 0 if mask.is_floating_point() else per_image != 0
        return _classify_allowed(allowed)

    return memoised(mask, ("idefics-additive", num_images, latents_per_image), build)


# --------------------------------------------------------------------------------------------------------------
# Inside a layer: recover the closed form from the expanded additive mask
# --------------------------------------------------------------------------------------------------------------

# How the gated layer recovers the media structure. IdeficsModel hands every gated layer the image mask already
# expanded to an additive (batch, 1, text, images * latents) bias, and the number of latents per image is not passed
# (it is ``image_hidden_states.size(1)`` *before* IdeficsModel flattens the images, and depends on the resampler, the
# image size and ``interpolate_pos_encoding``). The layer does not need it: call ``b`` a *block size* when ``b``
# divides the key count and every mask row is constant on each block of ``b`` consecutive keys. Any block size gives
# a lossless (batch, text, keys / b) per-block mask, and the block sizes are exactly the divisors of
# ``gcd(keys, every column where some row changes value)``. The largest one, that gcd, is a multiple of the true
# latent count, so a one-hot image row stays one-hot (blocks only merge images whose columns are identical in every
# row, i.e. images no token attends to) and the mask keeps its closed form (:class:`fastflamingo.masks.MediaMask`).
# Masks with values other than 0 and ``finfo.min`` / ``-inf`` are soft biases with no such form: they run through
# dense ``scaled_dot_product_attention`` with the bias itself, which is upstream's computation.


def hard_mask_flag(mask: torch.Tensor) -> torch.Tensor:
    """0-dim bool tensor, True when every entry is "attend" or "blocked" (no soft bias): a 0/1 pattern."""
    if mask.dtype == torch.bool:
        return torch.ones((), dtype=torch.bool, device=mask.device)
    blocked = torch.finfo(mask.dtype).min
    return ((mask == 0) | (mask == blocked) | (mask == float("-inf"))).all()


def _is_hard_mask(mask: torch.Tensor) -> bool:
    return mask.dtype == torch.bool or bool(hard_mask_flag(mask))


def allowed_keys(mask: torch.Tensor) -> torch.Tensor:
    """(batch, text, keys) boolean: True where a token may attend (bool masks: True; additive masks: 0)."""
    return mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] == 0


def _block_size(mask: torch.Tensor) -> Optional[int]:
    """Largest block size on which every row of a hard mask is constant (see the module docstring), or None
    when the mask is a soft bias."""
    if not _is_hard_mask(mask):
        return None
    allowed = allowed_keys(mask)
    num_keys = allowed.shape[-1]
    if num_keys == 0:
        return 0
    # columns j where some row differs from column j - 1: a block boundary has to fall on each of them
    changes = (allowed[..., 1:] != allowed[..., :-1]).flatten(0, -2).any(0).nonzero().flatten() + 1
    block = num_keys
    for j in changes.tolist():
        block = math.gcd(block, j)
        if block == 1:
            break
    return block


def checked_idefics_mask(image_attention_mask: torch.Tensor, batch: int, num_text: int, num_keys: int) -> torch.Tensor:
    """The (batch, 1, text, keys) mask an IDEFICS gated layer receives, validated and broadcast to the batch."""
    m = image_attention_mask
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"image_attention_mask must be a torch.Tensor, got {type(m).__name__}")
    expected = f"(batch, 1, text, images * latents) = ({batch}, 1, {num_text}, {num_keys})"
    if m.dim() != 4 or m.shape[1] != 1 or m.shape[2] != num_text or m.shape[3] != num_keys:
        raise ValueError(f"image_attention_mask must have shape {expected}, got {tuple(m.shape)}")
    if m.shape[0] != batch:
        if m.shape[0] != 1:
            raise ValueError(f"image_attention_mask must have shape {expected}, got {tuple(m.shape)}")
        m = m.expand(batch, -1, -1, -1)  # upstream broadcasts a batch-1 mask
    if not (m.is_floating_point() or m.dtype == torch.bool):
        raise TypeError(
            "image_attention_mask must be an additive float mask (0 = attend, finfo.min = blocked) or a boolean "
            f"mask (True = attend), got dtype {m.dtype}"
        )
    return m


def idefics_media_mask(image_attention_mask: Optional[torch.Tensor], batch: int, num_text: int, num_keys: int,
                       device=None):
    """The mask an IDEFICS gated layer receives, as :func:`fastflamingo.functional.media_xattn` takes it.

    Returns a :class:`MediaMask` (closed form), a boolean (batch, text, media) tensor (hard
    mask without closed form), or None when the mask is a soft additive bias (the caller then uses it as is).
    ``image_attention_mask`` None means every token sees every key (upstream's eager attention without a mask).
    Reads the mask on the host: :func:`idefics_closed_form_traced` is the form for code being traced.
    """
    if image_attention_mask is None:
        return all_media(batch, num_text, 1 if num_keys else 0, device)
    m = checked_idefics_mask(image_attention_mask, batch, num_text, num_keys)
    if m.is_meta:  # no data to recover a closed form from (meta-device tracing): the bias as is, as upstream does
        return None
    block = memoised(m, ("idefics-block-size",), lambda: _block_size(m))
    if block is None:
        return None
    if block == 0:
        return from_idefics_additive_mask(m, 0, 0)
    return from_idefics_additive_mask(m, num_keys // block, block)


def idefics_closed_form_traced(mask: torch.Tensor, latents: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The closed form of a checked (:func:`checked_idefics_mask`) IDEFICS mask for a *given* number of keys per
    image, with no host read (traceable by torch.compile / torch.export).

    The block size (:func:`_block_size`) depends on the data, so code being traced cannot derive it; it checks a
    candidate instead (the latent count the model's config implies) on device. Returns ``(text_time, immediate,
    all_previous)``: ``text_time`` (batch, text) int32 for ``keys // latents`` images, and two 0-dim boolean
    tensors, True when the mask is exactly the closed form in that mode (hard, constant on each image's
    ``latents`` keys, rows one-hot or empty / rows prefixes). A caller picks the closed form or a dense fallback
    with ``torch.cond`` on them.
    """
    allowed = allowed_keys(mask)
    num_keys = allowed.shape[-1]
    if latents <= 0 or num_keys % latents:
        raise ValueError(f"{num_keys} keys are not a whole number of images of {latents} latents")
    blocks = allowed.unflatten(-1, (num_keys // latents, latents))
    per_image = blocks[..., 0]
    exact = hard_mask_flag(mask) & (blocks == per_image[..., None]).all()
    count, last = _count_and_last(per_image)
    return last, exact & (count <= 1).all(), exact & (count == last).all()
