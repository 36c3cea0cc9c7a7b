"""Rules that recognise Hugging Face IDEFICS modules (transformers ``models/idefics``) and build their drop-ins.

Matching is by class name and structure, so transformers is never imported here. The drop-ins are built from the
upstream module's *structure* (sizes, norms, alpha shapes), not from its config alone, so a config edited after the
model was built cannot produce a drop-in that disagrees with the weights it adopts.
"""
from __future__ import annotations

from torch import nn

from .._patching import Rule, class_named
from .layer import IdeficsGatedCrossAttentionLayer
from .perceiver import IdeficsPerceiverAttention, IdeficsPerceiverResampler


def _has(m: nn.Module, *names: str) -> bool:
    return all(hasattr(m, n) for n in names)


def _is_gated_layer(m: nn.Module) -> bool:
    return (
        class_named(m, "IdeficsGatedCrossAttentionLayer")
        and _has(m, "cross_attn", "mlp", "input_layernorm", "post_attention_layernorm", "alpha_cross_attn", "alpha_dense")
        and _has(m.cross_attn, "q_proj", "k_proj", "v_proj", "o_proj", "num_heads", "qk_layer_norms")
        and _has(m.mlp, "gate_proj", "up_proj", "down_proj", "act_fn")
    )


def _convert_gated_layer(m: nn.Module) -> nn.Module:
    attn = m.cross_attn
    upstream_config = getattr(attn, "config", None)
    config = dict(
        hidden_size=attn.q_proj.in_features,
        num_attention_heads=attn.num_heads,
        intermediate_size=m.mlp.gate_proj.out_features,
        # the activation module itself is taken over below; the name only has to build something
        hidden_act="silu",
        rms_norm_eps=m.input_layernorm.variance_epsilon,
        qk_layer_norms=bool(attn.qk_layer_norms),
        dropout=float(getattr(attn, "dropout", 0.0) or 0.0),
        alpha_type="float" if m.alpha_cross_attn.dim() == 1 else "vector",
        alpha_initializer="zeros",  # values are adopted from the upstream Parameters
        vision_config=dict(embed_dim=attn.k_proj.in_features),
    )
    new = IdeficsGatedCrossAttentionLayer(config, layer_idx=getattr(attn, "layer_idx", None))
    if attn.qk_layer_norms:
        new.cross_attn.q_layer_norm.variance_epsilon = attn.q_layer_norm.variance_epsilon
        new.cross_attn.k_layer_norm.variance_epsilon = attn.k_layer_norm.variance_epsilon
    new.post_attention_layernorm.variance_epsilon = m.post_attention_layernorm.variance_epsilon
    # upstream's branch dropout lives under the odd name ``config`` (a float); the attention's under ``dropout``
    branch_dropout = m.config if isinstance(m.config, (int, float)) else config["dropout"]
    new.dropout = new.config = float(branch_dropout)
    new.mlp.act_fn = m.mlp.act_fn  # the very activation upstream uses, whatever its name
    if upstream_config is not None:
        new.cross_attn.config = upstream_config
    if hasattr(attn, "rotary_emb"):
        # unused by cross attention, but its (non-persistent) buffers must follow .to()/.half() and unpatch
        new.cross_attn.rotary_emb = attn.rotary_emb
    return new


def _is_perceiver_attention(m: nn.Module) -> bool:
    return class_named(m, "IdeficsPerceiverAttention") and _has(
        m, "context_layer_norm", "latents_layer_norm", "q_proj", "k_proj", "v_proj", "output_proj", "embed_dim",
        "n_heads", "head_dim", "qk_layer_norms",
    )


def _convert_perceiver_attention(m: nn.Module) -> nn.Module:
    return IdeficsPerceiverAttention(m.embed_dim, m.n_heads, m.head_dim, bool(m.qk_layer_norms))


def _is_resampler(m: nn.Module) -> bool:
    return (
        class_named(m, "IdeficsPerceiverResampler")
        and _has(m, "latents", "blocks", "layer_norm", "embed_dim", "n_heads", "head_dim", "n_latents",
                 "qk_layer_norms", "intermediate_dim")
        and isinstance(m.blocks, nn.ModuleList)
        and all(len(block) == 2 and _is_perceiver_attention(block[0]) for block in m.blocks)
    )


def _convert_resampler(m: nn.Module) -> nn.Module:
    # the MLP width is the vision config's embed_dim upstream (equal to embed_dim in IdeficsModel)
    vision_dim = m.blocks[0][1].embed_dim if len(m.blocks) else m.intermediate_dim // 4
    config = dict(
        perceiver_config=dict(qk_layer_norms_perceiver=bool(m.qk_layer_norms)),
        vision_config=dict(embed_dim=vision_dim),
    )
    new = IdeficsPerceiverResampler(config, m.embed_dim, len(m.blocks), m.n_heads, m.head_dim, m.n_latents)
    if new.intermediate_dim != m.intermediate_dim:
        raise ValueError(
            f"cannot patch IdeficsPerceiverResampler: MLP width {m.intermediate_dim} is not 4 x {vision_dim}"
        )
    return new


RULES = (
    Rule("IdeficsGatedCrossAttentionLayer", _is_gated_layer, _convert_gated_layer),
    Rule("IdeficsPerceiverResampler", _is_resampler, _convert_resampler),
    Rule("IdeficsPerceiverAttention", _is_perceiver_attention, _convert_perceiver_attention),
)


def rules(model: nn.Module, empty_rows: str) -> tuple:
    """IDEFICS's rules do not depend on the model or on ``patch``'s options."""
    return RULES
