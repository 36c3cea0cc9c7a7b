"""Drop-in modules for lucidrains' flamingo-pytorch 0.1.2 (``flamingo_pytorch/flamingo_pytorch.py``).

Same math as the OpenFlamingo drop-ins, with flamingo-pytorch's signatures: no ``dim_visual`` (media already have
the language model's width), no ``use_cached_media``, and a resampler with ``media_pos_emb`` that also accepts
(batch, tokens, dim) input.
"""
from __future__ import annotations

import torch
from torch import nn

from ..openflamingo import modules
from ..._checks import check_tensor
from ..openflamingo.modules import FeedForward, PerceiverAttention

__all__ = ["FeedForward", "PerceiverAttention", "MaskedCrossAttention", "GatedCrossAttentionBlock", "PerceiverResampler"]


class MaskedCrossAttention(modules.MaskedCrossAttention):
    def __init__(self, *, dim, dim_head=64, heads=8, only_attend_immediate_media=True):
        super().__init__(dim=dim, dim_visual=dim, dim_head=dim_head, heads=heads,
                         only_attend_immediate_media=only_attend_immediate_media)

    def forward(self, x, media, media_locations=None):
        return super().forward(x, media, media_locations=media_locations)


class GatedCrossAttentionBlock(modules.GatedCrossAttentionBlock):
    def __init__(self, *, dim, dim_head=64, heads=8, ff_mult=4, only_attend_immediate_media=True):
        super().__init__(dim=dim, dim_visual=dim, dim_head=dim_head, heads=heads, ff_mult=ff_mult,
                         only_attend_immediate_media=only_attend_immediate_media)

    def forward(self, x, media, media_locations=None):
        return super().forward(x, media, media_locations=media_locations)


class PerceiverResampler(modules.PerceiverResampler):
    """(b, n, dim) or (b, T, n, dim) -> (b, T, num_latents, dim), with a learned ``media_pos_emb`` per media.

    flamingo-pytorch crashes with a shape error for more than ``num_media_embeds`` media; this raises a ValueError.
    """

    def __init__(self, *, dim, depth, dim_head=64, heads=8, num_latents=64, num_media_embeds=4, ff_mult=4):
        super().__init__(dim=dim, depth=depth, dim_head=dim_head, heads=heads, num_latents=num_latents,
                         ff_mult=ff_mult)
        del self.frame_embs, self.media_time_embs
        self.media_pos_emb = nn.Parameter(torch.randn(num_media_embeds, 1, dim))

    def forward(self, x):
        dim = self.latents.shape[-1]
        check_tensor("x", x, (3, 4), dim, "(batch, tokens, dim) or (batch, num_media, tokens, dim)")
        if x.dim() == 3:
            x = x[:, None]
        if x.shape[1] > self.media_pos_emb.shape[0]:
            raise ValueError(
                f"x has {x.shape[1]} media per sample but the resampler has {self.media_pos_emb.shape[0]} media "
                "position embeddings (num_media_embeds)"
            )
        return self.resample(x + self.media_pos_emb[: x.shape[1]])
