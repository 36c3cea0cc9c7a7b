"""The layers of the ``fastflamingo-layers`` kernel repository (``python -m fastflamingo.hf.hub build OUTDIR``),
which Hugging Face's ``kernels`` loads as ``<kernel>.layers``. In the repository this module sits in a copy of
fastflamingo (``fastflamingo_layers/_fastflamingo/hf/hub_layers.py``), so its relative imports reach that copy.

**Stateless layers** (``kernels.kernelize``): each replaces the forward of the transformers class of the same name
and computes it with fastflamingo's ops on the module's *own* parameters and attributes (``kernels`` refuses a
layer with a constructor or members of its own; helpers are module-level functions here):

- ``MllamaTextCrossAttention``, ``MllamaCrossAttentionDecoderLayer``: interval-masked GQA attention
  (``mllama_xattn``), the gated residuals in their projections' epilogue (``gated_linear``);
- ``IdeficsCrossAttention`` (transformers' ``IdeficsAttention`` when ``is_cross_attention``: the layer name carries a
  condition), ``IdeficsGatedCrossAttentionLayer``: the closed-form image mask (``media_xattn``), ``gated_linear``;
- ``IdeficsPerceiverAttention``: the resampler's attention over ``[context; latents]`` without the concatenation.

They know only what the upstream module holds: transformers' semantics (``empty_rows="hf"``), no media K/V cache, and
no vision tile size (the text config has none): the mllama closed form is inferred from the mask itself.
A call that asks for the attention maps (``output_attentions``) runs upstream's forward.

**Stateful layers** (transformers' ``KernelConfig``): a kernel ``X`` with a companion ``XLayout`` in this module;
transformers builds ``XLayout`` in place of the upstream class (through its class-replacement mapping) and kernelize
gives it ``X``'s forward. The layouts here are fastflamingo's drop-ins with their state: the IDEFICS gated layer and
resampler with their media K/V (and resampler output) caches for generation.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import functional as FF
from ..models._outputs import attentions_requested
from ..models.idefics import IdeficsGatedCrossAttentionLayer as _IdeficsLayer
from ..models.idefics import IdeficsPerceiverAttention as _PerceiverAttention
from ..models.idefics import IdeficsPerceiverResampler as _Resampler
from ..models.idefics.attention import _bias_attention, _broadcast_batch, _common_dtype
from ..models.idefics.mask import idefics_media_mask
from ..models.mllama.functional import mllama_xattn
from ..models.mllama.layers import _pop_past_key_values
from ._dropins import complete_idefics_layer

# --------------------------------------------------------------------------------------------------------------
# stateless: functions of the upstream modules
# --------------------------------------------------------------------------------------------------------------


def mllama_attend(attn: nn.Module, hidden_states, states, cache, mask):
    """transformers' ``MllamaTextCrossAttention`` before ``o_proj``: (batch, text, heads * head_dim)."""
    batch, num_text, _ = hidden_states.shape
    heads, kv_heads, dim = attn.num_heads, attn.num_key_value_heads, attn.head_dim
    q = attn.q_norm(attn.q_proj(hidden_states).view(batch, num_text, heads, dim))
    if states is None:  # a decode step: K/V from the cache (MllamaTextModel skips the layer when there is none)
        layer = cache.layers[attn.layer_idx]
        k, v = layer.keys, layer.values
    else:
        states = states.reshape(batch, -1, attn.hidden_size)
        k = attn.k_norm(attn.k_proj(states).view(batch, -1, kv_heads, dim)).transpose(1, 2)
        v = attn.v_proj(states).view(batch, -1, kv_heads, dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, attn.layer_idx)
    q, k, v = _common_dtype(q, k, v)
    # the text config says nothing of the vision tile size: inferred from the mask (Llama 3.2's sizes tried first)
    out = mllama_xattn(q, k, v, mask, scale=attn.scaling, tokens_per_tile=None, max_tiles=None,
                       dropout_p=attn.dropout if attn.training else 0.0)
    return out.reshape(batch, num_text, heads * dim)


def idefics_attend(attn: nn.Module, hidden_states, image_hidden_states, image_attention_mask):
    """transformers' ``IdeficsAttention`` (cross) before ``o_proj``: (batch, text, heads * head_dim); a token that
    sees no image gets 0 (the gated layer drops its attention output anyway)."""
    batch, num_text = hidden_states.shape[:2]
    num_keys = image_hidden_states.shape[1]
    mask = idefics_media_mask(image_attention_mask, batch, num_text, num_keys, hidden_states.device)
    heads = (attn.num_heads, attn.head_dim)
    q = attn.q_proj(hidden_states).view(batch, num_text, *heads)
    k = attn.k_proj(image_hidden_states).view(batch, num_keys, *heads)
    v = attn.v_proj(image_hidden_states).view(batch, num_keys, *heads)
    if attn.qk_layer_norms:
        q, k = attn.q_layer_norm(q), attn.k_layer_norm(k)
    q, k, v = _common_dtype(q, k, v)
    dropout_p = attn.dropout if attn.training else 0.0
    if mask is None:  # a soft additive bias: upstream's dense computation, bias included
        out = _bias_attention(q, k, v, _broadcast_batch(image_attention_mask, batch), attn.scaling, dropout_p, 1)
    else:
        out = FF.media_xattn(q, k, v, mask, scale=attn.scaling, dropout_p=dropout_p)
    return out.reshape(batch, num_text, attn.num_heads * attn.head_dim)


def swiglu(mlp: nn.Module, x):
    """The activations an upstream SwiGLU MLP's ``down_proj`` consumes."""
    return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)


class MllamaTextCrossAttention(nn.Module):
    def forward(self, hidden_states, cross_attention_states=None, cache=None, attention_mask=None, use_cache=None,
                **kwargs):
        if attentions_requested(kwargs.get("output_attentions")):
            return type(self).forward(self, hidden_states, cross_attention_states, cache, attention_mask, use_cache,
                                      **kwargs)
        cache = _pop_past_key_values(type(self).__name__, cache, kwargs)
        out = mllama_attend(self, hidden_states, cross_attention_states, cache, attention_mask)
        return self.o_proj(out), None


class MllamaCrossAttentionDecoderLayer(nn.Module):
    def forward(self, hidden_states, cross_attention_states, cross_attention_mask, attention_mask,
                full_text_row_masked_out_mask, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, **kwargs):
        if attentions_requested(kwargs.get("output_attentions")):  # upstream's forward records the maps
            return type(self).forward(self, hidden_states, cross_attention_states, cross_attention_mask,
                                      attention_mask, full_text_row_masked_out_mask, position_ids, cache, use_cache,
                                      position_embeddings, **kwargs)
        cache = _pop_past_key_values(type(self).__name__, cache, kwargs)
        flag = full_text_row_masked_out_mask
        row_gate = None if flag is None else flag.reshape(flag.shape[0], -1).expand(hidden_states.shape[:2])
        attended = mllama_attend(self.cross_attn, self.input_layernorm(hidden_states), cross_attention_states,
                                 cache, cross_attention_mask)
        hidden_states = FF.gated_linear(hidden_states, attended, self.cross_attn.o_proj, self.cross_attn_attn_gate)
        normed = self.post_attention_layernorm(hidden_states)
        return FF.gated_linear(hidden_states, swiglu(self.mlp, normed), self.mlp.down_proj, self.cross_attn_mlp_gate,
                               row_gate=row_gate)


class IdeficsCrossAttention(nn.Module):
    def forward(self, hidden_states, key_value_states=None, attention_mask=None, position_ids=None, cache=None,
                **kwargs):
        if key_value_states is None or cache is not None or attentions_requested(kwargs.get("output_attentions")):
            return type(self).forward(self, hidden_states, key_value_states, attention_mask, position_ids, cache,
                                      **kwargs)
        return self.o_proj(idefics_attend(self, hidden_states, key_value_states, attention_mask)), None


def is_cross_attention(module: nn.Module) -> bool:
    """The condition of the ``IdeficsCrossAttention`` layer name on transformers' ``IdeficsAttention``."""
    return bool(getattr(module, "is_cross_attention", False))


class IdeficsGatedCrossAttentionLayer(nn.Module):
    def forward(self, hidden_states, attention_mask=None, image_hidden_states=None, image_attention_mask=None,
                cross_attention_gate=None, cache=None, **kwargs):
        # upstream's forward for what it refuses (its errors), branch dropout and attention maps
        if image_hidden_states is None or cross_attention_gate is None or cache is not None \
                or (self.training and self.config > 0) or attentions_requested(kwargs.get("output_attentions")):
            return type(self).forward(self, hidden_states, attention_mask, image_hidden_states, image_attention_mask,
                                      cross_attention_gate, cache, **kwargs)
        attended = idefics_attend(self.cross_attn, self.input_layernorm(hidden_states), image_hidden_states,
                                  image_attention_mask)
        hidden_states = FF.gated_linear(hidden_states, attended, self.cross_attn.o_proj, self.alpha_cross_attn,
                                        row_gate=cross_attention_gate)
        normed = self.post_attention_layernorm(hidden_states)
        return FF.gated_linear(hidden_states, swiglu(self.mlp, normed), self.mlp.down_proj, self.alpha_dense)


class IdeficsPerceiverAttention(nn.Module):
    # the drop-in's forward reads only what upstream's module holds (same attributes and submodules)
    forward = _PerceiverAttention.forward


# the kernel layer names of the stateless layers, per upstream transformers class: (module, class, condition)
STATELESS = {
    "MllamaTextCrossAttention": ("transformers.models.mllama.modeling_mllama", "MllamaTextCrossAttention", None),
    "MllamaCrossAttentionDecoderLayer": ("transformers.models.mllama.modeling_mllama",
                                         "MllamaCrossAttentionDecoderLayer", None),
    "IdeficsCrossAttention": ("transformers.models.idefics.modeling_idefics", "IdeficsAttention", is_cross_attention),
    "IdeficsGatedCrossAttentionLayer": ("transformers.models.idefics.modeling_idefics",
                                        "IdeficsGatedCrossAttentionLayer", None),
    "IdeficsPerceiverAttention": ("transformers.models.idefics.perceiver", "IdeficsPerceiverAttention", None),
}

# --------------------------------------------------------------------------------------------------------------
# stateful: KernelConfig layouts (built by transformers in place of the upstream class) and their kernels
# --------------------------------------------------------------------------------------------------------------


class IdeficsGatedCrossAttentionLayerCachedLayout(_IdeficsLayer):
    """fastflamingo's IDEFICS gated layer with upstream's constructor: its cross attention keeps the media K/V
    across decode steps."""

    forward = _IdeficsLayer.forward  # its own (transformers gives a layout without one a forward that does nothing)

    def __init__(self, config, layer_idx=None):
        super().__init__(config, layer_idx=layer_idx)
        complete_idefics_layer(self, config)


class IdeficsGatedCrossAttentionLayerCached(nn.Module):
    forward = _IdeficsLayer.forward


class IdeficsPerceiverResamplerCachedLayout(_Resampler):
    """fastflamingo's IDEFICS resampler (upstream's constructor): transformers 5 reruns it at every decode step on
    the same images; this one returns its cached result."""

    forward = _Resampler.forward


class IdeficsPerceiverResamplerCached(nn.Module):
    forward = _Resampler.forward


# the KernelConfig entries: upstream class name -> kernel layer (its layout is f"{layer}Layout")
STATEFUL = {"IdeficsGatedCrossAttentionLayer": "IdeficsGatedCrossAttentionLayerCached",
            "IdeficsPerceiverResampler": "IdeficsPerceiverResamplerCached"}

__all__ = list(STATELESS) + ["IdeficsGatedCrossAttentionLayerCached", "IdeficsGatedCrossAttentionLayerCachedLayout",
                             "IdeficsPerceiverResamplerCached", "IdeficsPerceiverResamplerCachedLayout",
                             "STATELESS", "STATEFUL", "mllama_attend", "idefics_attend", "swiglu",
                             "is_cross_attention"]
