"""Drop-in for transformers' ``IdeficsGatedCrossAttentionLayer``: the gated cross-attention layer and its MLP."""
from __future__ import annotations

import warnings
from functools import partial
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ... import functional
from ..._checks import check_tensor
from ...attention_recording import recorder_of
from .attention import IdeficsCrossAttention, IdeficsRMSNorm
from .config import DEFAULTS, activation, get


class IdeficsMLP(nn.Module):
    """SwiGLU: ``down_proj(act(gate_proj(x)) * up_proj(x))`` (keys ``gate_proj``, ``up_proj``, ``down_proj``)."""

    _fastflamingo_dropin = True

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.act_fn = activation(hidden_act)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The SwiGLU activations that ``down_proj`` consumes."""
        return self.act_fn(self.gate_proj(x)) * self.up_proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.hidden(x))


def _alpha(config: Any, hidden_size: int) -> nn.Parameter:
    init = get(config, "alpha_initializer", DEFAULTS)
    kind = get(config, "alpha_type", DEFAULTS)
    if kind == "vector":
        shape = (1, 1, hidden_size)
    elif kind == "float":
        shape = (1,)
    else:
        raise ValueError(f"Unknown value for `alpha_type` ({kind})")
    if init == "zeros":
        return nn.Parameter(torch.zeros(shape))
    if init == "ones":
        return nn.Parameter(torch.ones(shape))
    if init in {"normal", "gaussian", "random"}:
        # upstream crashes for "float" here (size=(1) is an int); a (1,) sample is what it means
        std = float(get(config, "alphas_initializer_range", DEFAULTS))
        return nn.Parameter(torch.normal(mean=0.0, std=std, size=shape))
    raise NotImplementedError(f"Alpha initialization scheme {init} not yet implemented!")


class IdeficsGatedCrossAttentionLayer(nn.Module):
    """Drop-in for transformers' ``IdeficsGatedCrossAttentionLayer``::

        x = x + tanh(alpha_cross_attn) * gate(dropout(cross_attn(RMSNorm(x), image_hidden_states)))
        x = x + tanh(alpha_dense) * dropout(mlp(RMSNorm(x)))

    The attention visits only the keys each token may see (closed-form mask, no text x key score matrix); tokens
    that see no image get exactly 0 before the gate, so fully-masked rows never produce NaN (upstream's fp16 eager
    attention can, in the backward pass).
    """

    _fastflamingo_dropin = True
    # transformers' set_gradient_checkpointing() flips this on every module that has it (upstream's layer is a
    # GradientCheckpointingLayer); forward() then checkpoints the same way.
    gradient_checkpointing = False

    def __init__(self, config: Any, layer_idx: Optional[int] = None):
        super().__init__()
        self.hidden_size = int(get(config, "hidden_size", DEFAULTS))
        self.cross_attn = IdeficsCrossAttention(config, layer_idx=layer_idx)
        self.mlp = IdeficsMLP(
            hidden_size=self.hidden_size,
            intermediate_size=int(get(config, "intermediate_size", DEFAULTS)),
            hidden_act=get(config, "hidden_act", DEFAULTS),
        )
        eps = float(get(config, "rms_norm_eps", DEFAULTS))
        self.input_layernorm = IdeficsRMSNorm(self.hidden_size, eps=eps)
        self.post_attention_layernorm = IdeficsRMSNorm(self.hidden_size, eps=eps)
        self.dropout = float(get(config, "dropout", DEFAULTS))
        self.config = self.dropout  # upstream stores the dropout probability under this name; kept for parity
        self.alpha_cross_attn = _alpha(config, self.hidden_size)
        self.alpha_dense = _alpha(config, self.hidden_size)

    def forward(self, hidden_states, attention_mask=None, image_hidden_states=None, image_attention_mask=None,
                cross_attention_gate=None, cache=None, **kwargs):
        """Same arguments as upstream.

        Args:
            hidden_states: (batch, text, hidden_size).
            attention_mask: the LM's causal mask; unused by cross attention (as upstream).
            image_hidden_states: (batch, images * latents, vision embed_dim), images-major.
            image_attention_mask: additive (batch, 1, text, images * latents): 0 where a token may attend,
                ``finfo.min`` elsewhere (IdeficsModel's expansion of the (batch, text, images) mask).
            cross_attention_gate: (batch, text); the attention branch is zeroed where it is 0.
            cache: must be None (cross-attention caching is not implemented upstream either).
        """
        if "past_key_values" in kwargs:  # upstream's deprecate_kwarg("past_key_values", new_name="cache")
            old = kwargs.pop("past_key_values")
            warnings.warn(
                "`past_key_values` is deprecated and will be removed in version 5.40.0 for "
                f"`{type(self).__name__}.forward`. Use `cache` instead.",
                FutureWarning,
                stacklevel=2,
            )
            if cache is None:
                cache = old
        # a call that records its attention map runs unchecked (a recomputation would record it twice)
        recorded = recorder_of(self.cross_attn) is not None
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and not recorded:
            if cache is not None:
                cache = None  # as GradientCheckpointingLayer (and upstream raises for a cache anyway)
            inner = partial(self._forward, cross_attention_gate=cross_attention_gate, cache=cache)
            return self._gradient_checkpointing_func(
                inner, hidden_states, attention_mask, image_hidden_states, image_attention_mask
            )
        return self._forward(hidden_states, attention_mask, image_hidden_states, image_attention_mask,
                             cross_attention_gate=cross_attention_gate, cache=cache)

    def _forward(self, hidden_states, attention_mask, image_hidden_states, image_attention_mask,
                 cross_attention_gate=None, cache=None):
        if image_hidden_states is None:
            raise ValueError(
                "`image_hidden_states` is required for Idefics cross attention module which are visual features to be"
                " conditioned on."
            )
        if cross_attention_gate is None:
            raise ValueError(
                "`cross_attention_gate` is required for Idefics cross attention module to zero-out the "
                "cross-attention hidden_states attending to no images."
            )
        if cache is not None:
            raise NotImplementedError("Past key value states are not implemented for Idefics cross attention module.")
        check_tensor("hidden_states", hidden_states, 3, self.hidden_size, "(batch, text, hidden_size)")
        if not isinstance(cross_attention_gate, torch.Tensor) or tuple(cross_attention_gate.shape) != tuple(
            hidden_states.shape[:2]
        ):
            shape = tuple(cross_attention_gate.shape) if isinstance(cross_attention_gate, torch.Tensor) else None
            raise ValueError(
                f"cross_attention_gate must be a (batch, text) = {tuple(hidden_states.shape[:2])} tensor, got {shape}"
            )

        # Without branch dropout, each branch's last projection (o_proj, down_proj) carries the gated residual in
        # its epilogue (fused on the Triton backend); with it, dropout has to sit between the two.
        fuse = not (self.training and self.dropout > 0)
        residual = hidden_states
        normed = self.input_layernorm(hidden_states)
        if fuse and isinstance(self.cross_attn, IdeficsCrossAttention):
            attended = self.cross_attn.attend(normed, image_hidden_states, image_attention_mask)
            hidden_states = functional.gated_linear(residual, attended, self.cross_attn.o_proj, self.alpha_cross_attn,
                                                 row_gate=cross_attention_gate)
        else:
            h, _ = self.cross_attn(normed, image_hidden_states, image_attention_mask)
            h = F.dropout(h, p=self.dropout, training=self.training)
            hidden_states = functional.gated_residual(residual, h, self.alpha_cross_attn, row_gate=cross_attention_gate)

        residual = hidden_states
        normed = self.post_attention_layernorm(hidden_states)
        if fuse and isinstance(self.mlp, IdeficsMLP):
            return functional.gated_linear(residual, self.mlp.hidden(normed), self.mlp.down_proj, self.alpha_dense)
        h = F.dropout(self.mlp(normed), p=self.dropout, training=self.training)
        return functional.gated_residual(residual, h, self.alpha_dense)
