"""Rules that recognise transformers' Evolla modules (``models/evolla/modeling_evolla.py``) and build their drop-ins.

Matching is by class name and structure (transformers is not imported); the drop-ins are built from the upstream
modules' sizes. The protein encoder stays upstream's module (its caching forward is a model-level hook:
``protein_cache.py``); its compressor, stand-alone compressors and their attention layers have rules.
"""
from __future__ import annotations

import types

from torch import nn

from .._patching import Rule, class_named
from .aligner import SOURCES, EvollaSequenceAlignerCrossAttention
from .resampler import EvollaSequenceCompressorAttention, EvollaSequenceCompressorResampler, resampler_config


def _has(m: nn.Module, *names: str) -> bool:
    return all(hasattr(m, n) for n in names)


def _is_feed_forward(m: nn.Module) -> bool:
    return _has(m, "norm", "fc1", "activation", "fc2") and isinstance(m.norm, nn.LayerNorm)


def _is_compressor_attention(m: nn.Module) -> bool:
    return class_named(m, "EvollaSequenceCompressorAttention") and _has(
        m, "norm_media", "norm_latents", "to_q", "to_kv", "to_out", "heads", "scale")


def _convert_compressor_attention(m: nn.Module) -> nn.Module:
    new = EvollaSequenceCompressorAttention(dim=m.to_q.in_features, dim_head=m.to_q.out_features // m.heads,
                                            heads=m.heads)
    new.scale = m.scale
    return new


def _is_resampler(m: nn.Module) -> bool:
    return (class_named(m, "EvollaSequenceCompressorResampler")
            and _has(m, "latents", "layers", "norm", "protein_projector", "num_latents")
            and isinstance(m.layers, nn.ModuleList)
            and all(len(pair) == 2 and _is_compressor_attention(pair[0]) and _is_feed_forward(pair[1])
                    for pair in m.layers))


def _convert_resampler(m: nn.Module) -> nn.Module:
    new = EvollaSequenceCompressorResampler(resampler_config(m))
    for (attn, _), (old_attn, _) in zip(new.layers, m.layers):
        attn.scale = old_attn.scale
    return new


def _is_aligner(m: nn.Module) -> bool:
    return (class_named(m, "EvollaSequenceAlignerCrossAttention")
            and _has(m, "query", "attention_norm", "out_proj", "ff", "gate_attention", "gate_ffw",
                     "num_attention_heads", *(f"{kind}_{s}" for kind in ("key", "value") for s in SOURCES))
            and _is_feed_forward(m.ff))


def _convert_aligner(m: nn.Module) -> nn.Module:
    dims = {f"{s}_encoder_dim": getattr(m, f"key_{s}").in_features if getattr(m, f"key_{s}") is not None else None
            for s in SOURCES}
    config = types.SimpleNamespace(
        hidden_size=m.query.in_features, num_attention_heads=m.num_attention_heads,
        aligner_attention_probs_dropout_prob=float(getattr(m.dropout, "p", 0.0)),
        aligner_enable_bias=m.out_proj.bias is not None, aligner_ffn_mult=m.ff.fc1.out_features / m.query.in_features,
    )
    new = EvollaSequenceAlignerCrossAttention(config, **dims)
    new.scale = m.scale
    new.attention_norm.variance_epsilon = m.attention_norm.variance_epsilon
    return new


RULES = (
    Rule("EvollaSequenceCompressorResampler", _is_resampler, _convert_resampler),
    Rule("EvollaSequenceCompressorAttention", _is_compressor_attention, _convert_compressor_attention),
    Rule("EvollaSequenceAlignerCrossAttention", _is_aligner, _convert_aligner),
)


def rules(model: nn.Module, empty_rows: str) -> tuple:
    """Evolla's rules do not depend on the model or on ``patch``'s options."""
    return RULES
