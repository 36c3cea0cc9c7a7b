"""Drop-in modules for Hugging Face IDEFICS (transformers ``models/idefics``).

Constructor arguments, submodule names and state_dict keys are those of upstream's
``IdeficsGatedCrossAttentionLayer`` and ``IdeficsPerceiverResampler``, so
``load_state_dict(upstream.state_dict(), strict=True)`` works in both directions. transformers is not imported:
the config is any object (or dict) with IdeficsConfig's attributes, read with upstream's defaults.

How the gated layer recovers the media structure. IdeficsModel hands every gated layer the image mask already
expanded to an additive (batch, 1, text, images * latents) bias, and the number of latents per image is not passed
(it is ``image_hidden_states.size(1)`` *before* IdeficsModel flattens the images, and depends on the resampler, the
image size and ``interpolate_pos_encoding``). The layer does not need it: call ``b`` a *block size* when ``b``
divides the key count and every mask row is constant on each block of ``b`` consecutive keys. Any block size gives
a lossless (batch, text, keys / b) per-block mask, and the block sizes are exactly the divisors of
``gcd(keys, every column where some row changes value)``. The largest one, that gcd, is a multiple of the true
latent count, so a one-hot image row stays one-hot (blocks only merge images whose columns are identical in every
row, i.e. images no token attends to) and the mask keeps its closed form (:class:`fastflamingo.masks.MediaMask`).
Masks with values other than 0 and ``finfo.min`` / ``-inf`` are soft biases with no such form: they run through
dense ``scaled_dot_product_attention`` with the bias itself, which is upstream's computation.

Divergences from upstream, all deliberate:

- ``alpha_type="float"`` with a normal initializer raises a TypeError upstream (``torch.normal(size=(1))``); here
  it draws a (1,)-shaped normal sample, as intended.
- A token that sees no image gets an attention output of exactly 0 from ``cross_attn``, where upstream averages
  every key (uniform softmax over ``finfo.min`` scores). The layer's ``cross_attention_gate`` zeroes those rows on
  both sides, so the layer output is the same; the difference is that fp16 can no longer give NaN gradients there.
- ``image_attention_mask=None`` means every token sees every key (upstream's eager attention); upstream's sdpa path
  would apply a causal mask over (text, keys) because ``IdeficsAttention.is_causal`` is True.
"""
from __future__ import annotations

import math
import warnings
from functools import partial
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as FF
from ..cache import ProjectionCache
from .. import masks

# --------------------------------------------------------------------------------------------------------------
# Config access (no transformers import: any object with the attributes, or a plain dict)
# --------------------------------------------------------------------------------------------------------------

# IdeficsConfig's defaults (transformers models/idefics/configuration_idefics.py), used for missing attributes.
_DEFAULTS = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_attention_heads=32,
    dropout=0.0,
    hidden_act="silu",
    alpha_initializer="zeros",
    alphas_initializer_range=0.0,
    alpha_type="float",
    rms_norm_eps=1e-6,
    qk_layer_norms=False,
)
_PERCEIVER_DEFAULTS = dict(qk_layer_norms_perceiver=False)


def _get(config: Any, name: str, defaults: Optional[dict] = None):
    if isinstance(config, dict):
        if name in config:
            return config[name]
    elif hasattr(config, name):
        return getattr(config, name)
    if defaults is not None and name in defaults:
        return defaults[name]
    raise AttributeError(f"the IDEFICS config ({type(config).__name__}) has no attribute {name!r}")


def _has(config: Any, name: str) -> bool:
    return name in config if isinstance(config, dict) else hasattr(config, name)


def _vision_embed_dim(config: Any) -> Optional[int]:
    vision = _get(config, "vision_config", {"vision_config": None})
    return None if vision is None or not _has(vision, "embed_dim") else _get(vision, "embed_dim")


_ACTIVATIONS = {
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "gelu": nn.GELU,  # transformers' GELUActivation is the exact (erf) GELU
    "gelu_pytorch_tanh": partial(nn.GELU, approximate="tanh"),
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


def _activation(name: str) -> nn.Module:
    if name in _ACTIVATIONS:
        return _ACTIVATIONS[name]()
    # Rare names (gelu_new, quick_gelu, ...): use transformers' own definition so the math is upstream's.
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def _check_tensor(name: str, t, dims: int, feature: Optional[int], what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have shape {what}, got {tuple(t.shape)}")
    if feature is not None and t.shape[-1] != feature:
        raise ValueError(f"{name} has feature size {t.shape[-1]} but the module expects {feature} ({what})")


# --------------------------------------------------------------------------------------------------------------
# Gated cross-attention layer
# --------------------------------------------------------------------------------------------------------------


class IdeficsRMSNorm(nn.Module):
    """Upstream's RMSNorm, same arithmetic: variance in fp32, the result cast to the weight's dtype only when the
    weight is half precision (so fp32 weights on bf16 activations give fp32, as upstream)."""

    _fastflamingo_dropin = True

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class IdeficsMLP(nn.Module):
    """SwiGLU: ``down_proj(act(gate_proj(x)) * up_proj(x))`` (keys ``gate_proj``, ``up_proj``, ``down_proj``)."""

    _fastflamingo_dropin = True

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.act_fn = _activation(hidden_act)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The SwiGLU activations that ``down_proj`` consumes."""
        return self.act_fn(self.gate_proj(x)) * self.up_proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.hidden(x))


def _is_hard_mask(mask: torch.Tensor) -> bool:
    """True when every entry is "attend" or "blocked" (no soft bias), i.e. the mask is a 0/1 pattern."""
    if mask.dtype == torch.bool:
        return True
    blocked = torch.finfo(mask.dtype).min
    return bool(((mask == 0) | (mask == blocked) | (mask == float("-inf"))).all())


def _allowed_keys(mask: torch.Tensor) -> torch.Tensor:
    """(batch, text, keys) boolean: True where a token may attend (bool masks: True; additive masks: 0)."""
    return mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] == 0


def _block_size(mask: torch.Tensor) -> Optional[int]:
    """Largest block size on which every row of a hard mask is constant (see the module docstring), or None
    when the mask is a soft bias."""
    if not _is_hard_mask(mask):
        return None
    allowed = _allowed_keys(mask)
    num_keys = allowed.shape[-1]
    if num_keys == 0:
        return 0
    # columns j where some row differs from column j - 1: a block boundary has to fall on each of them
    changes = (allowed[..., 1:] != allowed[..., :-1]).flatten(0, -2).any(0).nonzero().flatten() + 1
    block = num_keys
    for j in changes.tolist():
        block = math.gcd(block, j)
        if block == 1:
            break
    return block


def idefics_media_mask(image_attention_mask: Optional[torch.Tensor], batch: int, num_text: int, num_keys: int,
                       device=None):
    """The mask an IDEFICS gated layer receives, as ``media_cross_attention`` takes it.

    Returns a :class:`~fastflamingo.masks.MediaMask` (closed form), a boolean (batch, text, media) tensor (hard
    mask without closed form), or None when the mask is a soft additive bias (the caller then uses it as is).
    ``image_attention_mask`` None means every token sees every key (upstream's eager attention without a mask).
    """
    if image_attention_mask is None:
        return masks.all_media(batch, num_text, 1 if num_keys else 0, device)
    m = image_attention_mask
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"image_attention_mask must be a torch.Tensor, got {type(m).__name__}")
    expected = f"(batch, 1, text, images * latents) = ({batch}, 1, {num_text}, {num_keys})"
    if m.dim() != 4 or m.shape[1] != 1 or m.shape[2] != num_text or m.shape[3] != num_keys:
        raise ValueError(f"image_attention_mask must have shape {expected}, got {tuple(m.shape)}")
    if m.shape[0] != batch:
        if m.shape[0] != 1:
            raise ValueError(f"image_attention_mask must have shape {expected}, got {tuple(m.shape)}")
        m = m.expand(batch, -1, -1, -1)  # upstream broadcasts a batch-1 mask
    if not (m.is_floating_point() or m.dtype == torch.bool):
        raise TypeError(
            "image_attention_mask must be an additive float mask (0 = attend, finfo.min = blocked) or a boolean "
            f"mask (True = attend), got dtype {m.dtype}"
        )
    block = masks.memoised(m, ("idefics-block-size",), lambda: _block_size(m))
    if block is None:
        return None
    if block == 0:
        return masks.from_idefics_additive_mask(m, 0, 0)
    return masks.from_idefics_additive_mask(m, num_keys // block, block)


class IdeficsCrossAttention(nn.Module):
    """The ``cross_attn`` of an IDEFICS gated layer: upstream ``IdeficsAttention(is_cross_attention=True)`` keys
    (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, optional per-head RMSNorm ``q_layer_norm``/``k_layer_norm``);
    no RoPE, as upstream for cross attention."""

    _fastflamingo_dropin = True

    def __init__(self, config: Any, layer_idx: Optional[int] = None):
        super().__init__()
        self.config = config
        self.hidden_size = int(_get(config, "hidden_size", _DEFAULTS))
        self.num_heads = int(_get(config, "num_attention_heads", _DEFAULTS))
        self.head_dim = self.hidden_size // self.num_heads
        if self.head_dim * self.num_heads != self.hidden_size:
            raise ValueError(
                f"hidden_size must be divisible by num_heads (got `hidden_size`: {self.hidden_size} and "
                f"`num_heads`: {self.num_heads})."
            )
        self.dropout = float(_get(config, "dropout", _DEFAULTS))
        self.scaling = self.head_dim**-0.5
        self.layer_idx = layer_idx
        self.is_cross_attention = True
        vision_dim = _vision_embed_dim(config)
        self.kv_input_dim = self.hidden_size if vision_dim is None else int(vision_dim)
        inner = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(self.hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(self.kv_input_dim, inner, bias=False)
        self.v_proj = nn.Linear(self.kv_input_dim, inner, bias=False)
        self.o_proj = nn.Linear(inner, self.hidden_size, bias=False)
        self.qk_layer_norms = bool(_get(config, "qk_layer_norms", _DEFAULTS))
        if self.qk_layer_norms:
            eps = float(_get(config, "rms_norm_eps", _DEFAULTS))
            self.q_layer_norm = IdeficsRMSNorm(self.head_dim, eps=eps)
            self.k_layer_norm = IdeficsRMSNorm(self.head_dim, eps=eps)
        self.media_cache = ProjectionCache()  # normalized K and V of the last images, reused across decode steps

    def project_media(self, image_hidden_states: torch.Tensor):
        """K (after the optional per-head RMSNorm) and V of the image hidden states, (batch, keys, heads, head_dim),
        one row per image row. :meth:`attend` uses :meth:`project_media_grouped` instead (no per-beam copies)."""
        k, v, r = self.project_media_grouped(image_hidden_states)
        if r > 1:  # expand the shared rows back for a caller that expects one per image row (not the hot path)
            k, v = k.repeat_interleave(r, dim=0), v.repeat_interleave(r, dim=0)
        return k, v

    def project_media_grouped(self, image_hidden_states: torch.Tensor):
        """``(k, v, r)`` with K and V of batch ``batch // r``: image row b uses K/V row b // r. In eval mode
        without autograd the result is reused while the images and the weights are unchanged, and images whose rows
        repeat in groups of r (beam search expands the inputs per beam) are projected once per group; else r = 1."""

        def project(states: torch.Tensor):
            batch, num_keys = states.shape[:2]
            k = self.k_proj(states).view(batch, num_keys, self.num_heads, self.head_dim)
            v = self.v_proj(states).view(batch, num_keys, self.num_heads, self.head_dim)
            return (self.k_layer_norm(k) if self.qk_layer_norms else k), v

        weights = [*self.k_proj.parameters(), *self.v_proj.parameters()]
        if self.qk_layer_norms:
            weights += list(self.k_layer_norm.parameters())
        (k, v), r = self.media_cache.get_grouped(self, image_hidden_states, weights, project)
        return k, v, r

    def forward(self, hidden_states: torch.Tensor, key_value_states: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, position_ids=None, cache=None, **kwargs):
        """Upstream's ``IdeficsAttention.forward`` arguments and return value ``(attn_output, None)`` (sdpa
        returns no weights upstream either). ``position_ids`` is unused: cross attention has no RoPE."""
        if cache is not None:
            raise NotImplementedError("Past key value states are not implemented for Idefics cross attention module.")
        out = self.attend(hidden_states, key_value_states, attention_mask)
        return self.o_proj(out), None

    def attend(self, hidden_states: torch.Tensor, key_value_states: Optional[torch.Tensor],
               attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The attention output before ``o_proj``: (batch, text, heads * head_dim)."""
        if key_value_states is None:
            raise ValueError("IDEFICS cross attention needs key_value_states (the image hidden states)")
        _check_tensor("hidden_states", hidden_states, 3, self.hidden_size, "(batch, text, hidden_size)")
        _check_tensor("image_hidden_states", key_value_states, 3, self.kv_input_dim,
                      "(batch, images * latents, vision embed_dim)")
        batch, num_text = hidden_states.shape[:2]
        if key_value_states.shape[0] != batch:
            raise ValueError(
                f"image_hidden_states {tuple(key_value_states.shape)} and hidden_states {tuple(hidden_states.shape)} "
                "must have the same batch size"
            )
        num_keys = key_value_states.shape[1]
        mask = idefics_media_mask(attention_mask, batch, num_text, num_keys, hidden_states.device)
        heads = (self.num_heads, self.head_dim)
        q = self.q_proj(hidden_states).view(batch, num_text, *heads)
        if self.qk_layer_norms:
            q = self.q_layer_norm(q)
        k, v, r = self.project_media_grouped(key_value_states)
        q, k, v = _common_dtype(q, k, v)
        dropout_p = self.dropout if self.training else 0.0
        if mask is None:  # soft additive bias: upstream's dense computation, bias included
            bias = _broadcast_batch(attention_mask, batch).to(q.dtype)  # (batch, 1 or heads, text, keys)
            q_rows = q
            if r > 1:
                # K/V shared by r beams (cached, inference only): fold each group's r query rows into one longer
                # row, and their bias rows with them, so one SDPA call reads each shared K/V row once
                q_rows = q.unflatten(0, (batch // r, r)).flatten(1, 2)
                bias = bias.unflatten(0, (batch // r, r)).transpose(1, 2).flatten(2, 3)
            out = F.scaled_dot_product_attention(
                q_rows.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                attn_mask=bias, dropout_p=dropout_p, scale=self.scaling,
            ).transpose(1, 2)
            if r > 1:
                out = out.unflatten(1, (r, num_text)).flatten(0, 1)
        else:
            out = FF.media_cross_attention(q, k, v, mask, scale=self.scaling, dropout_p=dropout_p, kv_repeat=r)
        return out.reshape(batch, num_text, self.num_heads * self.head_dim)


def _broadcast_batch(mask: torch.Tensor, batch: int) -> torch.Tensor:
    return mask if mask.shape[0] == batch else mask.expand(batch, -1, -1, -1)


def _common_dtype(q, k, v):
    """q/k/v can disagree on dtype only when fp32 qk-norm weights meet half-precision activations (autocast);
    upstream's attention matmuls then run in the autocast dtype, so use that (else plain promotion)."""
    if q.dtype == k.dtype == v.dtype:
        return q, k, v
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _alpha(config: Any, hidden_size: int) -> nn.Parameter:
    init = _get(config, "alpha_initializer", _DEFAULTS)
    kind = _get(config, "alpha_type", _DEFAULTS)
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
        std = float(_get(config, "alphas_initializer_range", _DEFAULTS))
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
        self.hidden_size = int(_get(config, "hidden_size", _DEFAULTS))
        self.cross_attn = IdeficsCrossAttention(config, layer_idx=layer_idx)
        self.mlp = IdeficsMLP(
            hidden_size=self.hidden_size,
            intermediate_size=int(_get(config, "intermediate_size", _DEFAULTS)),
            hidden_act=_get(config, "hidden_act", _DEFAULTS),
        )
        eps = float(_get(config, "rms_norm_eps", _DEFAULTS))
        self.input_layernorm = IdeficsRMSNorm(self.hidden_size, eps=eps)
        self.post_attention_layernorm = IdeficsRMSNorm(self.hidden_size, eps=eps)
        self.dropout = float(_get(config, "dropout", _DEFAULTS))
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
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
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
        _check_tensor("hidden_states", hidden_states, 3, self.hidden_size, "(batch, text, hidden_size)")
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
            hidden_states = FF.tanh_gated_linear(residual, attended, self.cross_attn.o_proj, self.alpha_cross_attn,
                                                 row_gate=cross_attention_gate)
        else:
            h, _ = self.cross_attn(normed, image_hidden_states, image_attention_mask)
            h = F.dropout(h, p=self.dropout, training=self.training)
            hidden_states = FF.tanh_gated_residual(residual, h, self.alpha_cross_attn, row_gate=cross_attention_gate)

        residual = hidden_states
        normed = self.post_attention_layernorm(hidden_states)
        if fuse and isinstance(self.mlp, IdeficsMLP):
            return FF.tanh_gated_linear(residual, self.mlp.hidden(normed), self.mlp.down_proj, self.alpha_dense)
        h = F.dropout(self.mlp(normed), p=self.dropout, training=self.training)
        return FF.tanh_gated_residual(residual, h, self.alpha_dense)


# --------------------------------------------------------------------------------------------------------------
# Perceiver resampler
# --------------------------------------------------------------------------------------------------------------


class IdeficsPerceiverAttention(nn.Module):
    """Latents attend to ``[context; latents]`` (upstream ``IdeficsPerceiverAttention``, same keys). K/V are
    projected per source instead of on the concatenated input, and the attention reads both."""

    _fastflamingo_dropin = True

    def __init__(self, embed_dim: int, n_heads: int, head_dim: int, qk_layer_norms: bool) -> None:
        super().__init__()
        self.embed_dim, self.n_heads, self.head_dim = embed_dim, n_heads, head_dim
        self.qk_layer_norms = qk_layer_norms
        self.context_layer_norm = nn.LayerNorm(self.embed_dim)
        self.latents_layer_norm = nn.LayerNorm(self.embed_dim)
        if self.qk_layer_norms:
            self.q_layer_norm = nn.LayerNorm(self.head_dim)
            self.k_layer_norm = nn.LayerNorm(self.head_dim)
        self.qk_scale = self.head_dim**-0.5
        inner = self.n_heads * self.head_dim
        self.q_proj = nn.Linear(self.embed_dim, inner, bias=False)
        self.k_proj = nn.Linear(self.embed_dim, inner, bias=False)
        self.v_proj = nn.Linear(self.embed_dim, inner, bias=False)
        self.output_proj = nn.Linear(inner, embed_dim, bias=False)

    def forward(self, context: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """
        Args:
            context: (batch, seq, embed_dim) tokens to resample (batch = samples * images).
            latents: (batch, n_latents, embed_dim).
        Returns:
            (batch, n_latents, embed_dim).
        """
        _check_tensor("context", context, 3, self.embed_dim, "(batch, seq, embed_dim)")
        _check_tensor("latents", latents, 3, self.embed_dim, "(batch, n_latents, embed_dim)")
        if context.shape[0] != latents.shape[0]:
            raise ValueError(f"context {tuple(context.shape)} and latents {tuple(latents.shape)} must share the batch")
        context = self.context_layer_norm(context)
        latents = self.latents_layer_norm(latents)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(t.shape[0], t.shape[1], self.n_heads, self.head_dim)

        q = heads(self.q_proj(latents))
        k_media, k_latents = heads(self.k_proj(context)), heads(self.k_proj(latents))
        v_media, v_latents = heads(self.v_proj(context)), heads(self.v_proj(latents))
        if self.qk_layer_norms:  # LayerNorm over head_dim is per row, so each key source can be normalized alone
            q = self.q_layer_norm(q)
            k_media, k_latents = self.k_layer_norm(k_media), self.k_layer_norm(k_latents)
        out = FF.perceiver_attention(q, k_media, v_media, k_latents, v_latents, scale=self.qk_scale)
        return self.output_proj(out.reshape(latents.shape[0], latents.shape[1], self.n_heads * self.head_dim))


class IdeficsPerceiverMLP(nn.Module):
    """The resampler's ``c_proj(relu(fc(ln(x))))`` (upstream ``perceiver.IdeficsMLP``; keys ``ln``, ``fc``,
    ``c_proj``). Like upstream, the width is the vision config's ``embed_dim``."""

    _fastflamingo_dropin = True

    def __init__(self, intermediate_size: int, config: Any):
        super().__init__()
        vision_dim = _vision_embed_dim(config)
        if vision_dim is None:
            raise AttributeError("the IDEFICS perceiver MLP needs config.vision_config.embed_dim (as upstream)")
        self.embed_dim = int(vision_dim)
        self.ln = nn.LayerNorm(self.embed_dim)
        self.fc = nn.Linear(self.embed_dim, intermediate_size, bias=False)
        self.act = nn.ReLU()
        self.c_proj = nn.Linear(intermediate_size, self.embed_dim, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.fc(self.ln(hidden_states))))


class IdeficsPerceiverResampler(nn.Module):
    """Drop-in for transformers' ``IdeficsPerceiverResampler``: (batch, seq, embed_dim) context ->
    (batch, n_latents, embed_dim), batch = samples * images (each image is resampled on its own)."""

    _fastflamingo_dropin = True

    def __init__(self, config: Any, embed_dim: int, depth: int, n_heads: int, head_dim: int, n_latents: int) -> None:
        super().__init__()
        self.embed_dim, self.n_heads, self.head_dim, self.n_latents = embed_dim, n_heads, head_dim, n_latents
        perceiver_config = _get(config, "perceiver_config", {"perceiver_config": {}})
        self.qk_layer_norms = bool(_get(perceiver_config, "qk_layer_norms_perceiver", _PERCEIVER_DEFAULTS))
        self.latents = nn.Parameter(torch.randn(self.n_latents, self.embed_dim), requires_grad=True)
        vision_dim = _vision_embed_dim(config)
        self.intermediate_dim = self.embed_dim * 4 if vision_dim is None else int(vision_dim) * 4
        self.blocks = nn.ModuleList(
            nn.ModuleList(
                [
                    IdeficsPerceiverAttention(self.embed_dim, self.n_heads, self.head_dim, self.qk_layer_norms),
                    IdeficsPerceiverMLP(self.intermediate_dim, config),
                ]
            )
            for _ in range(depth)
        )
        self.layer_norm = nn.LayerNorm(self.embed_dim)
        # transformers 5 reruns the resampler on the same vision features at every decode step (SEMANTICS.md 5):
        # in eval mode without autograd the last result is reused while the features and weights are unchanged
        self.media_cache = ProjectionCache()

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        _check_tensor("context", context, 3, self.embed_dim, "(batch * images, seq, embed_dim)")
        return self.media_cache.get(self, context, self.parameters(), lambda: self._resample(context))

    def _resample(self, context: torch.Tensor) -> torch.Tensor:
        latents = self.latents.expand(context.shape[0], *self.latents.shape)
        for attn, ff in self.blocks:
            latents = attn(context, latents) + latents
            latents = ff(latents) + latents
        return self.layer_norm(latents)


__all__ = [
    "IdeficsGatedCrossAttentionLayer",
    "IdeficsCrossAttention",
    "IdeficsMLP",
    "IdeficsRMSNorm",
    "IdeficsPerceiverResampler",
    "IdeficsPerceiverAttention",
    "IdeficsPerceiverMLP",
    "idefics_media_mask",
]
