"""Rules that recognise transformers' Idefics2 perceiver modules (``models/idefics2``) and build their drop-ins.

Matching is by class name and structure (transformers is never imported here), and the drop-ins are built from the
upstream module's structure: sizes, head counts and each norm's epsilon are read from the modules, the activation
module is taken over as it is, and the upstream attention's config (``_attn_implementation``) is kept.
"""
from __future__ import annotations

import types

from torch import nn

from .._patching import Rule, class_named
from .modules import Idefics2PerceiverAttention, Idefics2PerceiverLayer


def _has(m: nn.Module, *names: str) -> bool:
    return all(hasattr(m, n) for n in names)


def _is_attention(m: nn.Module) -> bool:
    return class_named(m, "Idefics2PerceiverAttention") and _has(
        m, "q_proj", "k_proj", "v_proj", "o_proj", "num_heads", "head_dim", "num_key_value_heads", "scaling")


def _config_of(attn: nn.Module, eps: float, depth: int = 1) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        hidden_size=attn.q_proj.in_features, resampler_n_heads=attn.num_heads, resampler_head_dim=attn.head_dim,
        num_key_value_heads=attn.num_key_value_heads, attention_dropout=getattr(attn, "attention_dropout", 0.0),
        rms_norm_eps=eps, resampler_n_latents=0, resampler_depth=depth, hidden_act="silu",
    )


def _adopt_attention_state(new: Idefics2PerceiverAttention, old: nn.Module) -> None:
    if old.scaling != new.scaling:
        raise ValueError(f"cannot patch Idefics2PerceiverAttention: scaling {old.scaling} is not head_dim ** -0.5")
    upstream_config = getattr(old, "config", None)
    if upstream_config is not None:
        new.config = upstream_config  # _attn_implementation, read when attention maps are asked for


def _convert_attention(m: nn.Module) -> nn.Module:
    new = Idefics2PerceiverAttention(_config_of(m, 1e-6))
    _adopt_attention_state(new, m)
    return new


def _is_layer(m: nn.Module) -> bool:
    return (class_named(m, "Idefics2PerceiverLayer")
            and _has(m, "input_latents_norm", "input_context_norm", "self_attn", "post_attention_layernorm", "mlp")
            and _is_attention(m.self_attn) and _has(m.mlp, "gate_proj", "up_proj", "down_proj", "act_fn"))


def _convert_layer(m: nn.Module) -> nn.Module:
    attn = m.self_attn
    config = _config_of(attn, m.input_latents_norm.variance_epsilon, getattr(m, "depth", 1))
    config.resampler_n_latents = getattr(m, "n_latents", 0)
    if m.mlp.gate_proj.out_features != 4 * config.hidden_size:
        raise ValueError(f"cannot patch Idefics2PerceiverLayer: MLP width {m.mlp.gate_proj.out_features} is not "
                         f"4 x {config.hidden_size}")
    new = Idefics2PerceiverLayer(config, layer_idx=0)
    for name in ("input_latents_norm", "input_context_norm", "post_attention_layernorm"):
        getattr(new, name).variance_epsilon = getattr(m, name).variance_epsilon
    new.rms_norm_eps = getattr(m, "rms_norm_eps", new.rms_norm_eps)
    new.mlp.act_fn = m.mlp.act_fn  # the very activation upstream uses, whatever its name
    _adopt_attention_state(new.self_attn, attn)
    return new


RULES = (
    Rule("Idefics2PerceiverLayer", _is_layer, _convert_layer),
    Rule("Idefics2PerceiverAttention", _is_attention, _convert_attention),
)


def rules(model: nn.Module, empty_rows: str) -> tuple:
    """Idefics2's rules do not depend on the model or on ``patch``'s options."""
    return RULES
