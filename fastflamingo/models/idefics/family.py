"""IDEFICS's entry in the model registry (``fastflamingo.models.FAMILIES``)."""
from __future__ import annotations

from typing import Iterator

from torch import nn

from .. import _warm
from .._family import Family
from . import mask, model_mask, rules
from .attention import IdeficsCrossAttention
from .layer import IdeficsGatedCrossAttentionLayer
from .perceiver import IdeficsPerceiverAttention, IdeficsPerceiverResampler


def warmup_shapes(module: nn.Module) -> Iterator[object]:
    """The ops one drop-in launches: the attention output's projection is gated per row (tokens that see no image
    keep their input), the MLP's is not."""
    if isinstance(module, IdeficsCrossAttention):
        yield _warm.MediaXattn(module.num_heads, module.head_dim, True)
    if isinstance(module, IdeficsGatedCrossAttentionLayer):
        yield _warm.GatedLinear(module.cross_attn.o_proj, module.alpha_cross_attn, True)
        yield _warm.GatedLinear(module.mlp.down_proj, module.alpha_dense, False)
    if isinstance(module, IdeficsPerceiverAttention):
        yield _warm.PerceiverAttn(module.n_heads, module.head_dim)
    if isinstance(module, IdeficsPerceiverResampler):
        yield _warm.Latents(int(module.latents.shape[-2]))


FAMILY = Family(
    name="idefics",
    upstream="transformers 5.x",
    model_classes=("IdeficsForVisionText2Text", "IdeficsModel"),
    replaces=("IdeficsGatedCrossAttentionLayer", "IdeficsPerceiverResampler", "IdeficsPerceiverAttention"),
    ops=("media_xattn", "media_decode", "perceiver_attn", "gated_linear"),
    mask=mask,
    rules=rules.rules,
    warmup_shapes=warmup_shapes,
    install_hooks=model_mask.install,
    remove_hooks=model_mask.uninstall,
)
