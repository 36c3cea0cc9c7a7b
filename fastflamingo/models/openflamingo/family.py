"""OpenFlamingo's entry in the model registry (``fastflamingo.models.FAMILIES``)."""
from __future__ import annotations

from typing import Iterator

from torch import nn

from ... import masks
from .. import _warm
from .._family import Family
from . import modules, rules


def warmup_shapes(module: nn.Module) -> Iterator[object]:
    """The ops one drop-in launches (flamingo-pytorch's drop-ins are subclasses of these: the same shapes)."""
    if isinstance(module, modules.MaskedCrossAttention):
        yield _warm.MediaXattn(module.heads, module.dim_head, bool(module.only_attend_immediate_media))
    if isinstance(module, modules.GatedCrossAttentionBlock):
        yield _warm.GatedLinear(module.attn.to_out, module.attn_gate, False)
        yield _warm.GatedLinear(module.ff[3], module.ff_gate, False)
    if isinstance(module, modules.PerceiverAttention):
        yield _warm.PerceiverAttn(module.heads, module.dim_head)
    if isinstance(module, modules.PerceiverResampler):
        yield _warm.Latents(int(module.latents.shape[-2]))


FAMILY = Family(
    name="openflamingo",
    upstream="open-flamingo 2.0.1",
    model_classes=("Flamingo",),
    replaces=("GatedCrossAttentionBlock", "MaskedCrossAttention", "PerceiverResampler", "PerceiverAttention"),
    ops=("media_xattn", "media_decode", "perceiver_attn", "gated_linear"),
    mask=masks,
    rules=rules.rules,
    warmup_shapes=warmup_shapes,
)
