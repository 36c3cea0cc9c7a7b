"""Evolla's entry in the model registry (``fastflamingo.models.FAMILIES``)."""
from __future__ import annotations

from typing import Iterator

from torch import nn

from .. import _warm
from .._family import Family
from . import decoding, mask, protein_cache, rules
from .aligner import EvollaSequenceAlignerCrossAttention
from .resampler import EvollaSequenceCompressorAttention, EvollaSequenceCompressorResampler


def warmup_shapes(module: nn.Module) -> Iterator[object]:
    """The ops one drop-in launches: the aligner's attention and its two gated projections (no row gate), the
    compressor's perceiver attention."""
    if isinstance(module, EvollaSequenceAlignerCrossAttention):
        yield _warm.MediaXattn(module.num_attention_heads, module.attention_head_size, True)
        yield _warm.GatedLinear(module.out_proj, module.gate_attention, False)
        yield _warm.GatedLinear(module.ff.fc2, module.gate_ffw, False)
    if isinstance(module, EvollaSequenceCompressorAttention):
        yield _warm.PerceiverAttn(module.heads, module.dim_head)
    if isinstance(module, EvollaSequenceCompressorResampler):
        yield _warm.Latents(int(module.latents.shape[0]))


def install_hooks(model: nn.Module) -> int:
    """The protein encoded once per sequence (``protein_cache.py``) and KV-cached ``generate`` (``decoding.py``)."""
    return protein_cache.install(model) + decoding.install(model)


def remove_hooks(model: nn.Module) -> int:
    return protein_cache.uninstall(model) + decoding.uninstall(model)


FAMILY = Family(
    name="evolla",
    upstream="transformers 5.x",
    model_classes=("EvollaForProteinText2Text", "EvollaModel"),
    replaces=("EvollaSequenceCompressorResampler", "EvollaSequenceCompressorAttention",
              "EvollaSequenceAlignerCrossAttention"),
    ops=("media_xattn", "media_decode", "perceiver_attn", "gated_linear"),
    mask=mask,
    rules=rules.rules,
    warmup_shapes=warmup_shapes,
    install_hooks=install_hooks,
    remove_hooks=remove_hooks,
)
