"""transformers' ``MllamaVisionModel`` with its attention computed from the tiles' padding, not from an L x L mask.

The vision tower's mask (``_prepare_aspect_ratio_attention_mask``) is ``pad_i * pad_j * finfo.min`` over all
``L = tiles x patches`` tokens of an image (``pad``: the token belongs to a padded tile or to the patches that
round each tile up to a multiple of 8): a query row of a real token sees every key, a padded token's row sees the
real tokens only (finfo.min makes the padded keys' weights exactly 0). transformers builds that mask as an
L x L float matrix per image (165 MB for Llama 3.2's 4 x 1608 tokens, rebuilt for every image) and SDPA reads it in
every layer. Here the mask function returns the (images, L) padding itself and the attention runs two unmasked
SDPA calls per image: real rows over all keys, padded rows over the real keys. Same weights, no L x L tensor.

Scope: only while this plugin's ``embed_multimodal`` runs (:func:`padding_only`), only for a vision config whose
``_attn_implementation`` is :data:`ATTENTION` (the plugin's own tower); every other caller of the mask function
gets transformers' mask. An image whose tokens need no rounding (patches a multiple of 8) keeps transformers'
mask: transformers then marks every token as padding, a quirk the split form would not reproduce.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Optional

import torch
import torch.nn.functional as F

ATTENTION = "fastflamingo_mllama_vision"
_ACTIVE = contextvars.ContextVar("fastflamingo_mllama_vision_padding", default=False)
_installed = False


def _padding_mask(original):
    def prepare(aspect_ratio_mask: torch.Tensor, num_patches: int, target_length: int, dtype: torch.dtype):
        pad_patches = target_length - num_patches
        if not _ACTIVE.get() or pad_patches <= 0:
            return original(aspect_ratio_mask, num_patches, target_length, dtype)
        batch, tiles = aspect_ratio_mask.shape
        keep = aspect_ratio_mask.view(batch, tiles, 1).bool().expand(batch, tiles, target_length).clone()
        keep[:, :, num_patches:] = False
        return ~keep.reshape(batch, tiles * target_length)  # (images, L) bool, True = padding

    prepare.__wrapped__ = original
    return prepare


def attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
              **kwargs):
    """transformers' attention-function signature; ``attention_mask`` is the (images, L) padding from the mask
    function above, or transformers' 4D mask (then plain SDPA, as transformers' own ``sdpa``)."""
    if attention_mask is None or attention_mask.dim() != 2:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                             scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    out = torch.empty_like(query)
    for image in range(query.shape[0]):
        pad = attention_mask[image]
        real = (~pad).nonzero().flatten()
        padded = pad.nonzero().flatten()
        # (1, heads, L, head_dim) each: SDPA's fused CPU kernel takes 4D inputs (3D ones run the unfused math)
        q, k, v = query[image:image + 1], key[image:image + 1], value[image:image + 1]
        out[image:image + 1, :, real] = F.scaled_dot_product_attention(q[:, :, real], k, v, scale=scaling)
        if padded.numel():
            out[image:image + 1, :, padded] = F.scaled_dot_product_attention(q[:, :, padded], k[:, :, real],
                                                                             v[:, :, real], scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def install() -> None:
    """Register :data:`ATTENTION` with transformers and wrap the vision tower's mask function (once)."""
    global _installed
    if _installed:
        return
    from transformers import AttentionInterface
    from transformers.models.mllama import modeling_mllama

    AttentionInterface.register(ATTENTION, attention)
    modeling_mllama._prepare_aspect_ratio_attention_mask = _padding_mask(
        modeling_mllama._prepare_aspect_ratio_attention_mask)
    _installed = True


@contextlib.contextmanager
def padding_only():
    """Within this block the vision tower's mask function returns the padding (for :func:`attention`)."""
    token = _ACTIVE.set(True)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


__all__ = ["ATTENTION", "attention", "install", "padding_only"]
