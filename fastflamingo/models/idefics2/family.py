"""Idefics2's entry in the model registry (``fastflamingo.models.FAMILIES``)."""
from __future__ import annotations

import dataclasses
from typing import Iterator

import torch
from torch import nn

from .. import _warm
from .._family import Family
from . import mask, resampler, rules
from .fused import _plain
from .modules import Idefics2PerceiverAttention, Idefics2PerceiverLayer


@dataclasses.dataclass(frozen=True)
class PerceiverGqa:
    """``functional.perceiver_attn`` with GQA and a key mask: query heads, K/V heads and head size of one
    Idefics2 perceiver attention (warmed only when ``warmup`` is given ``media_tokens``; padded and unpadded)."""

    heads: int
    kv_heads: int
    head_dim: int
    ops = ("perceiver_attn",)

    def warm(self, settings: _warm.WarmSettings) -> int:
        from ... import functional

        s = settings
        if not s.media_tokens:
            return 0
        num = s.batch * max(s.max_media, 1)
        q = s.rand(num, s.latents, self.heads, self.head_dim, grad=s.backward)
        kv_media = s.rand(num, s.media_tokens, 2 * self.kv_heads, self.head_dim, grad=s.backward)
        kv_latents = s.rand(num, s.latents, 2 * self.kv_heads, self.head_dim, grad=s.backward)
        padded = torch.ones(num, s.media_tokens, dtype=torch.bool, device=s.device)
        padded[:, s.media_tokens // 2:] = False
        for key_mask in (None, padded):
            out = functional.perceiver_attn(q, *kv_media.split(self.kv_heads, 2), *kv_latents.split(self.kv_heads, 2),
                                            key_mask=key_mask)
            _warm.backward(out, s)
        return 2


_UNIT = torch.zeros(())  # a stand-in gate: GatedLinear.warm builds its own of this shape


def warmup_shapes(module: nn.Module) -> Iterator[object]:
    """The ops one drop-in launches: the attention, and the two residual projections (o_proj, down_proj) whose
    add is the fused GEMM's epilogue."""
    if isinstance(module, Idefics2PerceiverAttention):
        yield PerceiverGqa(module.num_heads, module.num_key_value_heads, module.head_dim)
    if isinstance(module, Idefics2PerceiverLayer):
        for linear in (module.self_attn.o_proj, module.mlp.down_proj):
            if _plain(linear):
                yield _warm.GatedLinear(linear, _UNIT, False)


FAMILY = Family(
    name="idefics2",
    upstream="transformers 5.x",
    model_classes=("Idefics2ForConditionalGeneration", "Idefics2Model", "Idefics2PerceiverResampler"),
    replaces=("Idefics2PerceiverLayer", "Idefics2PerceiverAttention"),
    ops=("perceiver_attn", "gated_linear"),
    mask=mask,
    rules=rules.rules,
    warmup_shapes=warmup_shapes,
    install_hooks=resampler.install,
    remove_hooks=resampler.uninstall,
)
