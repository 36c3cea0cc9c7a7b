"""The ``"fastflamingo"`` attention function for transformers' attention interface.

transformers 5 attention modules call ``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager)``
with ``(module, query, key, value, attention_mask, dropout=..., scaling=..., **kwargs)``: q/k/v as
(batch, heads, seq, head_dim), a dense 4D additive mask, and they expect ``(attn_output (batch, seq, heads,
head_dim), attn_weights or None)``. :func:`attention` is that function. It recognises the Flamingo cross-attention
calls by the calling module's class name and attributes (as ``fastflamingo/models/*/rules.py`` recognise the
modules they patch) and runs fastflamingo's op on them:

- mllama's ``MllamaTextCrossAttention``: :func:`fastflamingo.models.mllama.mllama_xattn`, interval-masked GQA that
  reads every K/V head in place (never repeated), with the closed-form mask recovered from the dense one. The
  module's config is the *text* config, so the vision tile size is unknown here: it is inferred from the mask itself
  (``tokens_per_tile=None, max_tiles=None``), once per mask tensor, and every cross layer of the forward pass shares
  the result (the mask is one tensor for all of them).
- IDEFICS's ``IdeficsAttention`` with ``is_cross_attention``: :func:`fastflamingo.functional.media_xattn`, the op the
  IDEFICS drop-in runs, with the closed form recovered from the expanded (batch, 1, text, images * latents) bias
  (:func:`fastflamingo.models.idefics.mask.idefics_media_mask`, memoised per mask tensor too).

- Idefics2's ``Idefics2PerceiverAttention`` (latents attend to ``[context; latents]``, GQA, ``is_causal=False``):
  :func:`fastflamingo.functional.perceiver_attn` on the two key ranges of the projected keys (media: the first
  ``keys - latents``, then the latents), reading the K/V heads in place, with the padding mask as one (images,
  media tokens) key mask recovered from the 4D mask (the same for every query row; once per mask tensor). A mask
  that is not such a padding mask (a soft bias, rows that differ) and attention dropout go to SDPA.

Everything else (self-attention, the vision towers, any other module) goes to transformers' own SDPA function,
unchanged. When transformers records attention maps (``output_attentions=True``), every call returns what
transformers' eager function returns for it, maps included, as under ``attn_implementation="eager"``: the mask
function registered beside this one is SDPA's, so a self-attention call may bring a boolean mask, or none where SDPA
would apply its causal flag; :func:`eager_mask` turns either into the additive mask eager needs for the same result.

A cross-attention mask of None means every key, as transformers' eager attention does: its SDPA function would make
such a call causal (it reads ``module.is_causal``, or defaults to True when the module has none), which is a latent
transformers bug for cross-attention (transformers #48172).
"""
from __future__ import annotations

import sys
from typing import Callable, Optional, Tuple

import torch

from ..models._outputs import attentions_requested
from ..models._patching import class_named

NAME = "fastflamingo"


def _is_mllama_cross(module) -> bool:
    return class_named(module, "MllamaTextCrossAttention") and hasattr(module, "num_key_value_groups")


def _is_idefics_cross(module) -> bool:
    return class_named(module, "IdeficsAttention") and bool(getattr(module, "is_cross_attention", False))


def _is_idefics2_perceiver(module) -> bool:
    return class_named(module, "Idefics2PerceiverAttention") and hasattr(module, "num_key_value_groups")


def _sdpa() -> Callable:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def _eager(module) -> Callable:
    """The eager function of the module's own modeling file (what ``get_interface`` falls back to for it)."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise RuntimeError(f"{type(module).__module__} has no eager_attention_forward: cannot return the attention "
                           f"maps of {type(module).__name__}")
    return eager


def eager_mask(module, query: torch.Tensor, key: torch.Tensor, attention_mask: Optional[torch.Tensor],
               is_causal: Optional[bool]) -> Optional[torch.Tensor]:
    """The additive mask under which eager computes what SDPA computes from ``(attention_mask, is_causal)``: a
    boolean mask (SDPA's mask function: True attends) becomes 0 / the dtype's minimum; no mask where SDPA would set
    its causal flag (more than one query, the module causal or silent about it) becomes the upper-left causal mask
    SDPA applies (query i sees keys 0..i, later keys none)."""
    if attention_mask is not None:
        if attention_mask.dtype != torch.bool:
            return attention_mask
        bias = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device)
        return bias.masked_fill_(~attention_mask, torch.finfo(query.dtype).min)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q_len, kv_len = query.shape[2], key.shape[2]
    if not (q_len > 1 and causal):
        return None
    seen = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril()
    bias = torch.zeros(q_len, kv_len, dtype=query.dtype, device=query.device)
    return bias.masked_fill_(~seen, torch.finfo(query.dtype).min)[None, None]


def _mllama(module, query, key, value, attention_mask, dropout: float, scaling: Optional[float]) -> torch.Tensor:
    from ..models.mllama import mllama_xattn

    # (batch, heads, text, dim) -> the op's (batch, text, heads, dim): a view, the op takes any strides; K/V are
    # already in the cache layout (batch, kv heads, keys, dim) the op reads in place
    return mllama_xattn(query.transpose(1, 2), key, value, attention_mask, scale=scaling, tokens_per_tile=None,
                        max_tiles=None, dropout_p=dropout)


def _idefics(module, query, key, value, attention_mask, dropout: float, scaling: Optional[float]) -> torch.Tensor:
    from ..functional import media_xattn
    from ..models.idefics import mask as image_mask
    from ..models.idefics.attention import IdeficsCrossAttention, _bias_attention, _broadcast_batch, _common_dtype

    q, k, v = _common_dtype(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
    batch, num_text = q.shape[:2]
    num_keys = k.shape[1]
    scale = q.shape[-1] ** -0.5 if scaling is None else float(scaling)
    if torch.compiler.is_compiling() and attention_mask is not None:
        # the drop-in's traced form (the closed form checked on device, no host read); it reads only the head size,
        # the scaling and the config, which the upstream module has under the same names
        mask = image_mask.checked_idefics_mask(attention_mask, batch, num_text, num_keys)
        return IdeficsCrossAttention._attend_traced(module, q, k, v, mask, 1, dropout)
    mask = image_mask.idefics_media_mask(attention_mask, batch, num_text, num_keys, q.device)
    if mask is None:  # a soft bias: transformers' dense computation, bias included
        return _bias_attention(q, k, v, _broadcast_batch(attention_mask, batch), scale, dropout, 1)
    return media_xattn(q, k, v, mask, scale=scale, dropout_p=dropout)


def _idefics2(module, query, key, value, attention_mask, dropout: float,
              scaling: Optional[float]) -> Optional[torch.Tensor]:
    """Idefics2's perceiver call on ``perceiver_attn``, or None where SDPA must serve it (see the module
    docstring)."""
    from ..functional import perceiver_attn
    from ..models.idefics2.mask import key_mask_of

    batch, _, latents, _ = query.shape
    media = key.shape[2] - latents
    if dropout or media < 0 or key.shape[1] == 0 or query.shape[1] % key.shape[1]:
        return None
    kind, key_mask = key_mask_of(attention_mask, batch, media, latents)
    if kind != "keys":
        return None
    # (batch, heads, keys, dim) -> the op's (batch, keys, heads, dim): views, the op takes any strides
    k, v = key.transpose(1, 2), value.transpose(1, 2)
    return perceiver_attn(query.transpose(1, 2), k[:, :media], v[:, :media], k[:, media:], v[:, media:],
                          scale=scaling, key_mask=key_mask)


def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
              **kwargs) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """transformers' attention-function signature (see the module docstring); returns ``(attn_output (batch, seq,
    heads, head_dim), attn_weights or None)``."""
    cross = _is_mllama_cross(module) or _is_idefics_cross(module)
    # Dynamo cannot trace the collector's ContextVar.get (fullgraph fails): compiled code records no maps here
    if not torch.compiler.is_compiling() and attentions_requested():
        if not cross:
            attention_mask = eager_mask(module, query, key, attention_mask, kwargs.pop("is_causal", None))
        return _eager(module)(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if _is_idefics2_perceiver(module):
        out = _idefics2(module, query, key, value, attention_mask, float(dropout) if module.training else 0.0,
                        scaling)
        if out is not None:
            return out, None
    if not cross:
        return _sdpa()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    attend = _mllama if _is_mllama_cross(module) else _idefics
    dropout = float(dropout) if module.training else 0.0
    return attend(module, query, key, value, attention_mask, dropout, scaling), None


__all__ = ["NAME", "attention", "eager_mask"]
