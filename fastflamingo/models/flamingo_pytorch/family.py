"""flamingo-pytorch's entry in the model registry (``fastflamingo.models.FAMILIES``)."""
from __future__ import annotations

from ... import masks
from .._family import Family
from ..openflamingo.family import warmup_shapes
from . import rules

FAMILY = Family(
    name="flamingo_pytorch",
    upstream="flamingo-pytorch 0.1.2",
    model_classes=("FlamingoPaLM",),
    replaces=("GatedCrossAttentionBlock", "MaskedCrossAttention", "PerceiverResampler"),
    ops=("media_xattn", "media_decode", "perceiver_attn", "gated_linear"),
    mask=masks,
    rules=rules.rules,
    # the drop-ins subclass OpenFlamingo's and launch the same ops
    warmup_shapes=warmup_shapes,
)
