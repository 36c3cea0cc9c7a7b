"""The cross attention of an IDEFICS gated layer (upstream ``IdeficsAttention(is_cross_attention=True)``) and the
per-head RMSNorm it uses."""
from __future__ import annotations

from functools import partial
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ... import functional, masks
from ..._checks import check_linear_input, check_tensor
from ...attention_recording import CROSS, dense_attention, key_shape, recorder_of
from ...cache import ProjectionCache
from ...ops.torch_path import fold_groups, unfold_groups
from . import mask as image_mask
from .config import DEFAULTS, get, latents_per_image, vision_embed_dim
from .model_mask import model_mask


def rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Upstream's IdeficsRMSNorm as a function (see the class)."""
    variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        hidden_states = hidden_states.to(weight.dtype)
    return weight * hidden_states


def kv_projection(states: torch.Tensor, weights, options, *, heads: int, head_dim: int):
    """``k_proj`` / ``v_proj`` of the image hidden states as a pure function of the weights ``[k_proj, v_proj]``,
    followed by the per-head RMSNorm of K when the weights and ``options`` also hold ``k_layer_norm``'s weight and
    epsilon: the media cache's projector (cache.py). Returns ``[k, v]`` of shape (batch, keys, heads, head_dim)."""
    shape = states.shape[:2] + (heads, head_dim)
    k = F.linear(states, weights[0]).view(shape)
    v = F.linear(states, weights[1]).view(shape)
    return [rms_norm(k, weights[2], options[0]) if options else k, v]


class IdeficsRMSNorm(nn.Module):
    """Upstream's RMSNorm, same arithmetic: variance in fp32, the result cast to the weight's dtype only when the
    weight is half precision (so fp32 weights on bf16 activations give fp32, as upstream)."""

    _fastflamingo_dropin = True

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class IdeficsCrossAttention(nn.Module):
    """The ``cross_attn`` of an IDEFICS gated layer: upstream ``IdeficsAttention(is_cross_attention=True)`` keys
    (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, optional per-head RMSNorm ``q_layer_norm``/``k_layer_norm``);
    no RoPE, as upstream for cross attention."""

    _fastflamingo_dropin = True
    _fastflamingo_attention_site = CROSS  # fastflamingo.attention_maps records it
    _fastflamingo_attention_maps = None  # the recorder of an attention_maps block, while one records this module

    def __init__(self, config: Any, layer_idx: Optional[int] = None):
        super().__init__()
        self.config = config
        self.hidden_size = int(get(config, "hidden_size", DEFAULTS))
        self.num_heads = int(get(config, "num_attention_heads", DEFAULTS))
        self.head_dim = self.hidden_size // self.num_heads
        if self.head_dim * self.num_heads != self.hidden_size:
            raise ValueError(
                f"hidden_size must be divisible by num_heads (got `hidden_size`: {self.hidden_size} and "
                f"`num_heads`: {self.num_heads})."
            )
        self.dropout = float(get(config, "dropout", DEFAULTS))
        self.scaling = self.head_dim**-0.5
        self.layer_idx = layer_idx
        self.is_cross_attention = True
        vision_dim = vision_embed_dim(config)
        self.kv_input_dim = self.hidden_size if vision_dim is None else int(vision_dim)
        inner = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(self.hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(self.kv_input_dim, inner, bias=False)
        self.v_proj = nn.Linear(self.kv_input_dim, inner, bias=False)
        self.o_proj = nn.Linear(inner, self.hidden_size, bias=False)
        self.qk_layer_norms = bool(get(config, "qk_layer_norms", DEFAULTS))
        if self.qk_layer_norms:
            eps = float(get(config, "rms_norm_eps", DEFAULTS))
            self.q_layer_norm = IdeficsRMSNorm(self.head_dim, eps=eps)
            self.k_layer_norm = IdeficsRMSNorm(self.head_dim, eps=eps)
        # normalized K and V of the last images, reused across decode steps, compiled or not (see cache.py)
        self.media_cache = ProjectionCache(partial(kv_projection, heads=self.num_heads, head_dim=self.head_dim))

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

        norm = [self.k_layer_norm] if self.qk_layer_norms else []
        if torch.compiler.is_compiling() and self._plain_projections():
            # compiled: the cache is read through a custom op (no beam grouping)
            weights = [m.weight for m in (self.k_proj, self.v_proj, *norm)]
            k, v = self.media_cache.traced(self, image_hidden_states, weights, [n.variance_epsilon for n in norm])
            return k, v, 1

        def project(states: torch.Tensor):
            shape = states.shape[:2] + (self.num_heads, self.head_dim)
            k = self.k_proj(states).view(shape)
            v = self.v_proj(states).view(shape)
            return (self.k_layer_norm(k) if self.qk_layer_norms else k), v

        weights = [p for m in (self.k_proj, self.v_proj, *norm) for p in m.parameters()]
        (k, v), r = self.media_cache.get_grouped(self, image_hidden_states, weights, project)
        return k, v, r

    def _plain_projections(self) -> bool:
        """True when the K/V projection is exactly :func:`kv_projection` of ``weights`` (no adapter replaced a
        projection, no bias was added), so the media cache's projector stands for it."""
        plain = all(type(m) is nn.Linear and m.bias is None for m in (self.k_proj, self.v_proj))
        return plain and (not self.qk_layer_norms or type(self.k_layer_norm) is IdeficsRMSNorm)

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
        check_tensor("hidden_states", hidden_states, 3, self.hidden_size, "(batch, text, hidden_size)")
        check_tensor("image_hidden_states", key_value_states, 3, self.kv_input_dim,
                      "(batch, images * latents, vision embed_dim)")
        batch, num_text = hidden_states.shape[:2]
        if key_value_states.shape[0] != batch:
            raise ValueError(
                f"image_hidden_states {tuple(key_value_states.shape)} and hidden_states {tuple(hidden_states.shape)} "
                "must have the same batch size"
            )
        check_linear_input("hidden_states", hidden_states, self.q_proj, "q_proj")
        check_linear_input("image_hidden_states", key_value_states, self.k_proj, "k_proj")
        num_keys = key_value_states.shape[1]
        traced = torch.compiler.is_compiling() and attention_mask is not None
        if traced:  # the closed form is found on device, below (the host-side recovery cannot be traced)
            mask = image_mask.checked_idefics_mask(attention_mask, batch, num_text, num_keys)
        else:
            # the closed form published by the enclosing IdeficsModel forward (no read of the expanded bias), else
            # recovered from the bias itself
            mask = model_mask(batch, num_text, num_keys)
            if mask is None:
                mask = image_mask.idefics_media_mask(attention_mask, batch, num_text, num_keys,
                                                     hidden_states.device)
        heads = (self.num_heads, self.head_dim)
        q = self.q_proj(hidden_states).view(batch, num_text, *heads)
        if self.qk_layer_norms:
            q = self.q_layer_norm(q)
        k, v, r = self.project_media_grouped(key_value_states)
        q, k, v = _common_dtype(q, k, v)
        dropout_p = self.dropout if self.training else 0.0
        recorder = recorder_of(self)
        if recorder is not None:  # an attention_maps block: this call attends densely, as upstream's eager path
            out, probs = self._dense(q, k, v, attention_mask, batch, r, dropout_p)
            recorder.record(self, probs, key_shape(num_keys, latents_per_image(self.config) or num_keys))
        elif traced:
            out = self._attend_traced(q, k, v, mask, r, dropout_p)
        elif mask is None:  # soft additive bias: upstream's dense computation, bias included
            out = _bias_attention(q, k, v, _broadcast_batch(attention_mask, batch), self.scaling, dropout_p, r)
        else:
            out = functional.media_xattn(q, k, v, mask, scale=self.scaling, dropout_p=dropout_p, kv_group=r)
        return out.reshape(batch, num_text, self.num_heads * self.head_dim)

    def _dense(self, q, k, v, attention_mask: Optional[torch.Tensor], batch: int, r: int, dropout_p: float):
        """Upstream's eager attention with the layer's mask as given (None: every key), ``(out, probs)``; a token
        that sees no image under a hard mask gets exactly 0, as every other path gives it (:func:`_kept_rows`)."""
        mask = zero_rows = None
        if attention_mask is not None:
            mask = image_mask.checked_idefics_mask(attention_mask, batch, q.shape[1], k.shape[1])
            zero_rows = ~_kept_rows(mask)
        return dense_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.scaling, mask=mask,
                               zero_rows=zero_rows, dropout_p=dropout_p, kv_group=r)

    def _attend_traced(self, q, k, v, mask: torch.Tensor, r: int, dropout_p: float) -> torch.Tensor:
        """:meth:`attend` for code being traced (torch.compile / torch.export), same results as eager.

        On the Triton backend the closed form is checked on device for the latent count the config implies
        (:func:`.mask.idefics_closed_form_traced`) and ``torch.cond`` picks the kernel (immediate or all-previous
        mode) or, for any other mask, the dense computation. On the PyTorch path, which attends
        densely while traced anyway, the dense computation runs directly.
        """
        # torch.cond takes no symbolic float among the values its branches capture, and floats read from module
        # attributes are symbolic under dynamic=True: comparing specializes them, so the branches capture constants
        scale = self.head_dim**-0.5 if self.scaling == self.head_dim**-0.5 else self.scaling
        dropout_p = 0.0 if dropout_p == 0 else dropout_p  # (nonzero: the kernels refuse dropout, no cond below)
        dense = partial(_dense_traced, scale=scale, dropout_p=dropout_p, r=r)
        num_keys = k.shape[1]
        latents = latents_per_image(self.config)
        if not latents or num_keys % latents or functional.media_xattn_backend(q, k, v, dropout_p=dropout_p) != "triton":
            return dense(q, k, v, mask)
        text_time, immediate, all_previous = image_mask.idefics_closed_form_traced(mask, latents)
        num_images = num_keys // latents

        def closed_form(mode):
            def attend(q, k, v, mask, text_time, all_previous):
                media_mask = masks.MediaMask(text_time, num_images, mode)
                return functional.media_xattn(q, k, v, media_mask, scale=scale, kv_group=r).contiguous()

            return attend

        def otherwise(q, k, v, mask, text_time, all_previous):
            operands = (q, k, v, mask, text_time, all_previous)
            return torch.cond(all_previous, closed_form(masks.ALL_PREVIOUS),
                              lambda q, k, v, mask, *_: dense(q, k, v, mask), operands)

        return torch.cond(immediate, closed_form(masks.IMMEDIATE), otherwise, (q, k, v, mask, text_time, all_previous))


def _bias_attention(q, k, v, bias: torch.Tensor, scale: float, dropout_p: float, r: int) -> torch.Tensor:
    """SDPA with an additive (float) or boolean (batch, 1 or heads, text, keys) mask: upstream's dense computation.
    ``r`` > 1: K/V shared by r beams (cached, inference only): each group's r query rows are folded into one longer
    row, and their mask rows with them, so one SDPA call reads each shared K/V row once."""
    if bias.dtype != torch.bool:
        bias = bias.to(q.dtype)
    q_rows = q
    if r > 1:
        q_rows = fold_groups(q, r)
        bias = fold_groups(bias.transpose(1, 2), r).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q_rows.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias, dropout_p=dropout_p, scale=scale,
    ).transpose(1, 2)
    return unfold_groups(out, r) if r > 1 else out


def _dense_traced(q, k, v, mask: torch.Tensor, *, scale: float, dropout_p: float, r: int) -> torch.Tensor:
    """Every key through SDPA with the (checked) layer mask itself, as eager attends with it: a soft bias as is; a
    hard mask with exact zeros for tokens that see no key (eager's closed form and dense paths give those). Rows
    that see nothing attend to every key first, so the softmax stays finite (no NaN forward or backward)."""
    allowed = image_mask.allowed_keys(mask)  # (batch, text, keys)
    keep = _kept_rows(mask, allowed)
    if mask.dtype == torch.bool:
        bias = (allowed | ~keep[..., None])[:, None]
    else:
        bias = torch.where(keep[:, None, :, None], mask, mask.new_zeros(()))
    out = _bias_attention(q, k, v, bias, scale, dropout_p, r)
    return masks.zero_unseen(out, keep).contiguous()


def _kept_rows(mask: torch.Tensor, allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(batch, text) True for the rows whose dense attention output is kept: every row of a soft bias, the rows
    of a hard mask that see some key (the others are exactly 0)."""
    allowed = image_mask.allowed_keys(mask) if allowed is None else allowed
    return allowed.any(-1) | ~image_mask.hard_mask_flag(mask)


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
