"""Drop-ins for transformers' Idefics2 perceiver (``models/idefics2/modeling_idefics2.py``): the attention and the
layer, with upstream's constructor arguments ``(config, layer_idx)``, attribute names and state_dict keys.

The layer is where the fusions pay: the context's RMSNorm is folded into the K/V projection weight
(:func:`fused.normed_projection`: no normalised copy of the context, no ``[context; latents]`` concatenation), the
latents attend through ``functional.perceiver_attn`` (GQA: the 4 K/V heads are read in place by their 4 query heads
each, never repeated; the padding mask as one (images, patches) key mask) and both residual adds are done by the
GEMM that makes the branch (:func:`fused.residual_linear`).
"""
from __future__ import annotations

import types
from typing import Any, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ... import functional
from ..._checks import check_tensor
from ...attention_recording import PERCEIVER, dense_attention, recorder_of
from .._outputs import attentions_requested
from ..idefics.config import activation
from ..mllama.layers import MllamaTextRMSNorm
from . import fused
from .mask import Recovered, key_mask_of


def _config(config: Any) -> Any:
    return types.SimpleNamespace(**config) if isinstance(config, dict) else config


class Idefics2RMSNorm(MllamaTextRMSNorm):
    """Upstream's ``Idefics2RMSNorm`` (key ``weight``): the same T5-style RMSNorm as mllama's."""


def _plain_silu(act: nn.Module) -> bool:
    """torch's or transformers' SiLU module, without hooks (anything else, a hub kernel included, runs as is)."""
    silu = type(act) is nn.SiLU or (type(act).__name__ == "SiLUActivation"
                                    and type(act).__module__ == "transformers.activations")
    return silu and not (act._forward_hooks or act._forward_pre_hooks)


class Idefics2MLP(nn.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))`` (upstream ``Idefics2MLP``, same keys)."""

    _fastflamingo_dropin = True

    def __init__(self, hidden_size: int, intermediate_size: int, output_size: int, hidden_act: str) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, output_size, bias=False)
        self.act_fn = activation(hidden_act)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """``act(gate_proj(x)) * up_proj(x)``, the input of ``down_proj``. Without autograd the product (and a
        plain SiLU) is computed in place: one intermediate-sized tensor alive instead of three."""
        gate = self.gate_proj(x)
        if torch.is_grad_enabled():
            return self.act_fn(gate) * self.up_proj(x)
        gate = F.silu(gate, inplace=True) if _plain_silu(self.act_fn) else self.act_fn(gate)
        return gate.mul_(self.up_proj(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.hidden(x))


class Idefics2PerceiverAttention(nn.Module):
    """Latents attend to ``[context; latents]`` (upstream ``Idefics2PerceiverAttention``): the K/V of each source
    are projected on their own and the attention reads both, with the padding mask as a key mask over the context.
    Returns ``(attn_output, attn_weights)`` like upstream: the weights are eager's probabilities when transformers
    records attention maps under ``eager`` / ``"fastflamingo"``, else None."""

    _fastflamingo_dropin = True
    _fastflamingo_attention_site = PERCEIVER  # fastflamingo.attention_maps(..., perceiver=True) records it
    _fastflamingo_attention_maps = None

    def __init__(self, config: Any, layer_idx: Optional[int] = None) -> None:
        super().__init__()
        config = _config(config)
        self.config = config
        self.layer_idx = None  # as upstream, which never keeps the index it is given
        self.hidden_size = config.hidden_size
        self.num_heads = config.resampler_n_heads
        self.head_dim = config.resampler_head_dim
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.attention_dropout = getattr(config, "attention_dropout", 0.0)
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(self.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(self.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(self.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, self.hidden_size, bias=False)
        self.is_causal = False

    def check_inputs(self, latents: torch.Tensor, context: torch.Tensor, cache: Any) -> None:
        check_tensor("latents", latents, 3, self.hidden_size, "(images, n_latents, hidden_size)")
        check_tensor("context", context, 3, self.hidden_size, "(images, media tokens, hidden_size)")
        if context.shape[0] != latents.shape[0]:
            raise ValueError(f"context {tuple(context.shape)} and latents {tuple(latents.shape)} must share the "
                             "image count")
        if getattr(self, "cache", cache) is not None:
            raise ValueError("the Idefics2 perceiver drop-in keeps no K/V cache (upstream's resampler passes none)")

    def forward(self, latents: torch.Tensor, context: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, cache: Any = None,
                **kwargs) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """
        Args:
            latents: (images, n_latents, hidden_size), normalised by the layer.
            context: (images, media tokens, hidden_size), normalised by the layer.
            attention_mask: upstream's 4D mask over ``[context; latents]``, an (images, media tokens) patch mask
                (True / 1 = visible), or None (every key).
        Returns:
            ``(attn_output (images, n_latents, hidden_size), attn_weights or None)``.
        """
        cache = kwargs.pop("past_key_values", cache)
        self.check_inputs(latents, context, cache)
        mask = key_mask_of(attention_mask, context.shape[0], context.shape[1], latents.shape[1])
        out, weights = self.attend(self.q_proj(latents), self.k_proj(context), self.v_proj(context),
                                   self.k_proj(latents), self.v_proj(latents), mask)
        return self.o_proj(out), weights

    def attend(self, q: torch.Tensor, k_media: torch.Tensor, v_media: torch.Tensor, k_latents: torch.Tensor,
               v_latents: torch.Tensor, mask: Recovered) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The attention of the projected latents ``q`` (images, n_latents, heads * head_dim) over the projected
        media and latent keys ((images, tokens, kv_heads * head_dim), any row strides): returns the output before
        ``o_proj``, (images, n_latents, heads * head_dim), and the weights or None."""
        images, n_latents = q.shape[:2]

        def heads(t: torch.Tensor, count: int) -> torch.Tensor:
            return t.unflatten(-1, (count, self.head_dim))

        q = heads(q, self.num_heads)
        k_media, v_media = heads(k_media, self.num_key_value_heads), heads(v_media, self.num_key_value_heads)
        k_latents, v_latents = heads(k_latents, self.num_key_value_heads), heads(v_latents, self.num_key_value_heads)
        kind, key_mask = mask
        recorder = recorder_of(self)
        # Dynamo cannot trace the output collector's ContextVar: compiled code returns no maps (as hf/attention.py)
        wanted = not torch.compiler.is_compiling() and attentions_requested() and getattr(
            self.config, "_attn_implementation", "eager") in ("eager", "fastflamingo")
        dropout = float(self.attention_dropout) if self.training else 0.0
        if kind == "keys" and recorder is None and not wanted and not dropout:
            out = functional.perceiver_attn(q, k_media, v_media, k_latents, v_latents, scale=self.scaling,
                                            key_mask=key_mask)
            return out.reshape(images, n_latents, self.num_heads * self.head_dim), None
        # eager's computation over the concatenated keys: maps recorded or returned, attention dropout, soft masks
        k = torch.cat((k_media, k_latents), 1).transpose(1, 2)
        v = torch.cat((v_media, v_latents), 1).transpose(1, 2)
        if kind == "keys" and key_mask is not None:
            visible = torch.cat((key_mask, key_mask.new_ones(images, n_latents)), 1)
            dense_mask = visible[:, None, None, :]
        else:
            dense_mask = key_mask
        out, probs = dense_attention(q.transpose(1, 2), k, v, self.scaling, mask=dense_mask, dropout_p=dropout)
        if recorder is not None:
            recorder.record(self, probs, (k.shape[2],))
        return out.reshape(images, n_latents, self.num_heads * self.head_dim), probs if wanted else None


class Idefics2PerceiverLayer(nn.Module):
    """Drop-in for upstream's ``Idefics2PerceiverLayer``: RMSNorm both inputs, perceiver attention, residual,
    RMSNorm, gated MLP, residual; returns the new latents."""

    _fastflamingo_dropin = True

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        config = _config(config)
        self.hidden_size = config.hidden_size
        self.n_latents = config.resampler_n_latents
        self.depth = config.resampler_depth
        self.rms_norm_eps = config.rms_norm_eps
        self.input_latents_norm = Idefics2RMSNorm(self.hidden_size, eps=self.rms_norm_eps)
        self.input_context_norm = Idefics2RMSNorm(self.hidden_size, eps=self.rms_norm_eps)
        self.self_attn = Idefics2PerceiverAttention(config, layer_idx=layer_idx)
        self.post_attention_layernorm = Idefics2RMSNorm(self.hidden_size, eps=self.rms_norm_eps)
        self.mlp = Idefics2MLP(self.hidden_size, self.hidden_size * 4, self.hidden_size, config.hidden_act)

    def _context_kv(self, context: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """K and V of the normalised context: the raw context times each projection's weight with the norm folded
        in (one weight-sized temporary at a time), where the projections are plain Linears; else upstream's norm,
        then each projection."""
        attn, norm = self.self_attn, self.input_context_norm
        projections = (attn.k_proj, attn.v_proj)
        if not all(fused._plain(p) and p.bias is None and p.weight.dtype == context.dtype for p in projections):
            normed = norm(context)
            return attn.k_proj(normed), attn.v_proj(normed)
        inv_rms = fused.inverse_rms(context, norm.variance_epsilon)
        k, v = (fused.normed_projection(context, inv_rms, norm.weight, p.weight) for p in projections)
        return k, v

    def forward(self, latents: torch.Tensor, context: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, cache: Any = None, **kwargs) -> torch.Tensor:
        """
        Args:
            latents: (images, n_latents, hidden_size).
            context: (images, media tokens, hidden_size), the projected patch features.
            attention_mask: an (images, media tokens) patch mask (True / 1 = visible; the patched resampler's),
                upstream's 4D mask over ``[context; latents]``, or None.
        Returns:
            (images, n_latents, hidden_size).
        """
        attn = self.self_attn
        attn.check_inputs(latents, context, kwargs.pop("past_key_values", cache))
        mask = key_mask_of(attention_mask, context.shape[0], context.shape[1], latents.shape[1])
        latents = fused.residual_linear(latents, self._attention(latents, context, mask), attn.o_proj)
        return fused.residual_linear(latents, self.mlp.hidden(self.post_attention_layernorm(latents)),
                                     self.mlp.down_proj)

    def _attention(self, latents: torch.Tensor, context: torch.Tensor, mask) -> torch.Tensor:
        """The attention output before ``o_proj`` (its own frame: the K/V are freed before the MLP runs)."""
        attn = self.self_attn
        normed = self.input_latents_norm(latents)
        k_media, v_media = self._context_kv(context)
        return attn.attend(attn.q_proj(normed), k_media, v_media, attn.k_proj(normed), attn.v_proj(normed), mask)[0]


__all__ = ["Idefics2RMSNorm", "Idefics2MLP", "Idefics2PerceiverAttention", "Idefics2PerceiverLayer"]
