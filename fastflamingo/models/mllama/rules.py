"""Rules that recognise transformers' mllama (Llama 3.2 Vision) cross-attention layers and build their drop-ins.

``MllamaForConditionalGeneration``, ``MllamaModel``, ``MllamaForCausalLM`` (and ``MllamaTextModel``): only the
cross-attention decoder layers are replaced; the self-attention layers and the vision model are not ours.

The drop-ins need the vision tile size (tokens per tile, tiles per image) to read the closed form of the mask their
layer receives; it comes from the model's ``MllamaVisionModel`` when the patched model has one, else Llama 3.2's
(1601 tokens, 4 tiles). Matching is by class name and structure; transformers is imported only to install its
output-recording hooks before the swap (so ``output_hidden_states`` keeps seeing the cross layers).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import List, Tuple

from torch import nn

from .._patching import Rule, class_named
from . import layers as ff
from . import mask as mask_mod

def _has(m: nn.Module, *names: str) -> bool:
    return all(hasattr(m, n) for n in names)


def _is_attention(m: nn.Module) -> bool:
    return class_named(m, "MllamaTextCrossAttention") and _has(
        m, "q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "num_heads", "num_key_value_heads")


def _is_decoder_layer(m: nn.Module) -> bool:
    return (
        class_named(m, "MllamaCrossAttentionDecoderLayer")
        and _has(m, "cross_attn", "mlp", "input_layernorm", "post_attention_layernorm", "cross_attn_attn_gate",
                 "cross_attn_mlp_gate")
        and _is_attention(m.cross_attn)
        and _has(m.mlp, "gate_proj", "up_proj", "down_proj", "act_fn")
    )


def vision_sizes(root: nn.Module) -> Tuple[int, int]:
    """(tokens per tile, tiles per image) of the model's vision encoder, else Llama 3.2's."""
    for module in root.modules():
        if type(module).__name__ == "MllamaVisionModel" and _has(module, "num_patches", "max_num_tiles"):
            return int(module.num_patches), int(module.max_num_tiles)
    return mask_mod.TOKENS_PER_TILE, mask_mod.MAX_TILES


def _install_output_hooks(root: nn.Module) -> None:
    """transformers installs its output-recording hooks (``output_hidden_states``) on the first forward, on the
    modules that are instances of its own classes: install them now, on the upstream layers, and the drop-ins take
    them over (``models/_patching.py``, ``carry_attachments``)."""
    for module in root.modules():
        if type(module).__name__ == "MllamaTextModel" and hasattr(module, "_can_record_outputs"):
            try:
                from transformers.utils.output_capturing import maybe_install_capturing_hooks
            except ImportError:  # an older transformers without them: nothing to keep
                return
            maybe_install_capturing_hooks(module)


def _attention(m: nn.Module, sizes: Tuple[int, int], config=None) -> nn.Module:
    config = config or _config_of(m, None)
    new = ff.MllamaTextCrossAttention(config, layer_idx=m.layer_idx, tokens_per_tile=sizes[0],
                                      max_num_tiles=sizes[1])
    new.q_norm.variance_epsilon = m.q_norm.variance_epsilon
    new.k_norm.variance_epsilon = m.k_norm.variance_epsilon
    if getattr(m, "config", None) is not None:
        new.config = m.config  # the very upstream config object (``_attn_implementation`` and the rest)
    return new


def _config_of(attn: nn.Module, layer) -> SimpleNamespace:
    """The sizes of the drop-in, read from the upstream modules themselves (a config edited after the model was
    built cannot disagree with the weights adopted)."""
    return SimpleNamespace(
        hidden_size=attn.q_proj.in_features,
        num_attention_heads=attn.num_heads,
        num_key_value_heads=attn.num_key_value_heads,
        dropout=float(getattr(attn, "dropout", 0.0) or 0.0),
        rms_norm_eps=attn.q_norm.variance_epsilon if layer is None else layer.input_layernorm.variance_epsilon,
        intermediate_size=layer.mlp.gate_proj.out_features if layer is not None else 1,
        hidden_act="silu",  # the activation module itself is taken over from upstream
    )


def _decoder_layer(m: nn.Module, sizes: Tuple[int, int], empty_rows: str) -> nn.Module:
    config = _config_of(m.cross_attn, m)
    new = ff.MllamaCrossAttentionDecoderLayer(config, m.layer_idx, empty_rows=empty_rows, tokens_per_tile=sizes[0],
                                              max_num_tiles=sizes[1])
    new.cross_attn = _attention(m.cross_attn, sizes, config)
    new.post_attention_layernorm.variance_epsilon = m.post_attention_layernorm.variance_epsilon
    new.mlp.act_fn = m.mlp.act_fn  # the very activation upstream uses, whatever its name
    if getattr(m.mlp, "config", None) is not None:
        new.mlp.config = m.mlp.config
    # hooks and markers set on the upstream layers (output recording, gradient checkpointing) are carried over by
    # models/_patching.py (carry_attachments), as for every drop-in
    return new


def rules(root: nn.Module, empty_rows: str) -> List[Rule]:
    """The mllama rules for patching ``root``: tile sizes from its vision encoder, ``empty_rows`` for every layer."""
    mask_mod._check_empty_rows(empty_rows)
    if not any(_is_decoder_layer(m) or _is_attention(m) for m in root.modules()):
        return []
    sizes = vision_sizes(root)
    _install_output_hooks(root)
    return [
        Rule("MllamaCrossAttentionDecoderLayer", _is_decoder_layer, lambda m: _decoder_layer(m, sizes, empty_rows)),
        Rule("MllamaTextCrossAttention", _is_attention, lambda m: _attention(m, sizes)),
    ]


__all__ = ["rules", "vision_sizes"]
