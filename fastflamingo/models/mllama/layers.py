"""Drop-in modules for transformers' mllama (Llama 3.2 Vision) cross-attention layers.

``MllamaTextCrossAttention`` and ``MllamaCrossAttentionDecoderLayer`` take transformers' constructor arguments
(``config, layer_idx``), forward arguments and return values, and have its submodule names and state_dict keys
(``load_state_dict(upstream.state_dict(), strict=True)`` works both ways). They read and write the transformers
``Cache`` as upstream does (prefill: ``cache.update(k, v, layer_idx)`` with K after ``k_norm``, V, in the
(batch, kv_heads, keys, head_dim) layout, dynamic or static layers; later steps: ``cache.layers[layer_idx]``), so
``generate``, beam search, the static cache and ``torch.compile`` keep working. transformers is not imported: the
config is any object with MllamaTextConfig's attributes (or a dict).

Differences from upstream, all deliberate:

- K/V are projected only for the real tiles when no row needs the padded ones (every row sees an image, or
  ``empty_rows="zero"``): a 1-tile image is 3/4 padding. The cache then holds zeros at the padded tiles, which no
  later step of the same generation reads (decode rows repeat the prompt's last row).
- ``attention_mask=None`` attends to every key (upstream's eager path); upstream's SDPA path makes it causal
  (transformers #48172).
- ``empty_rows="zero"`` (a ``fastflamingo.patch`` option): rows that see no image get no attention output (Meta's
  reference and vLLM); the default ``"hf"`` is transformers 5 exactly (transformers #39379).
- Attention weights: only when the forward pass records them (``output_attentions=True``, read from transformers'
  output collector: :func:`fastflamingo.models._outputs.attentions_requested`), and then what upstream's attention
  function for ``config._attn_implementation`` returns: eager (and ``"fastflamingo"``, ``"paged|eager"``): the
  probabilities, computed densely for that call (:func:`fastflamingo.attention_recording.dense_attention`); sdpa: None,
  with transformers' warning; any other implementation: transformers' own function runs that call. Rows that see no
  image under ``empty_rows="zero"`` get all-zero probabilities (their attention output is 0). Otherwise the kernels
  run and no probability is formed.
"""
from __future__ import annotations

import warnings
from functools import partial
from types import SimpleNamespace
from typing import Any, Optional

import torch
from torch import nn

from ... import functional as FF
from ...attention_recording import CROSS, dense_attention, key_shape, recorder_of
from ...masks import zero_unseen
from .._outputs import attentions_requested
from ..idefics.attention import _common_dtype
from ..idefics.config import activation
from . import mask as mask_mod
from .functional import _check, mllama_xattn


def _config(config: Any):
    return SimpleNamespace(**config) if isinstance(config, dict) else config


def _vision_sizes(config: Any, tokens_per_tile: Optional[int], max_num_tiles: Optional[int]):
    """Tile size and tiles per image: given, else from a full MllamaConfig's vision_config, else Llama 3.2's."""
    vision = getattr(config, "vision_config", None)
    if tokens_per_tile is None:
        tokens_per_tile = mask_mod.TOKENS_PER_TILE
        if vision is not None and hasattr(vision, "image_size") and hasattr(vision, "patch_size"):
            tokens_per_tile = (vision.image_size // vision.patch_size) ** 2 + 1
    if max_num_tiles is None:
        max_num_tiles = getattr(vision, "max_num_tiles", mask_mod.MAX_TILES) if vision is not None else mask_mod.MAX_TILES
    return int(tokens_per_tile), int(max_num_tiles)


# attention implementations whose weights are the eager probabilities ("fastflamingo": the attention function
# fastflamingo registers with transformers, which returns eager's maps when they are requested)
EAGER_LIKE = ("eager", "paged|eager", "fastflamingo")
SDPA_WARNING = ("`sdpa` attention does not support `output_attentions=True`. Please set your attention to `eager` if "
                "you want any of these features.")


def _weights_route(config: Any) -> str:
    """What upstream's attention returns as weights under ``config._attn_implementation``: ``"eager"`` (the
    probabilities), ``"sdpa"`` (None), or ``"interface"`` (whatever transformers' registered function returns)."""
    implementation = getattr(config, "_attn_implementation", None) or "eager"  # None: upstream's default, eager
    if implementation in EAGER_LIKE:
        return "eager"
    return "sdpa" if implementation == "sdpa" else "interface"


def _weights_wanted(kwargs: dict) -> bool:
    """Whether this call returns attention weights: an ``output_attentions`` argument, else transformers' output
    collector. Compiled code reads no collector (Dynamo cannot trace its ContextVar; ``fullgraph`` would fail):
    there only the argument asks, as in fastflamingo's attention function (fastflamingo/hf/attention.py)."""
    explicit = kwargs.get("output_attentions")
    if explicit is None and torch.compiler.is_compiling():
        return False
    return attentions_requested(explicit)


def _pop_past_key_values(cls_name: str, cache, kwargs: dict):
    """upstream's ``deprecate_kwarg("past_key_values", new_name="cache")``."""
    if "past_key_values" in kwargs:
        old = kwargs.pop("past_key_values")
        warnings.warn(f"`past_key_values` is deprecated and will be removed in version 5.40.0 for `{cls_name}.forward`."
                      " Use `cache` instead.", FutureWarning, stacklevel=3)
        if cache is None:
            cache = old
    return cache


class MllamaTextRMSNorm(nn.Module):
    """Upstream's RMSNorm, same arithmetic: variance in fp32, normalised, cast back to the input dtype, then
    multiplied by the weight."""

    _fastflamingo_dropin = True

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class MllamaTextMLP(nn.Module):
    """SwiGLU ``down_proj(act(gate_proj(x)) * up_proj(x))`` (keys ``gate_proj``, ``up_proj``, ``down_proj``)."""

    _fastflamingo_dropin = True

    def __init__(self, config: Any):
        super().__init__()
        config = _config(config)
        self.config = config
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=False)
        self.act_fn = activation(config.hidden_act)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The activations ``down_proj`` consumes. Without autograd the product is taken in place (the same
        numbers; one (tokens, intermediate) buffer fewer at the peak)."""
        gate = self.act_fn(self.gate_proj(x))
        if gate.requires_grad and torch.is_grad_enabled():
            return gate * self.up_proj(x)
        return gate.mul_(self.up_proj(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.hidden(x))


class MllamaTextCrossAttention(nn.Module):
    """Drop-in for transformers' ``MllamaTextCrossAttention`` (keys ``q_proj``, ``k_proj``, ``v_proj``,
    ``o_proj``, ``q_norm``, ``k_norm``): GQA cross-attention of the text to the projected vision states, no RoPE.

    ``tokens_per_tile`` / ``max_num_tiles`` (default: the config's vision_config, else Llama 3.2's 1601 and 4) let
    the layer recover the closed form of the mask it receives; ``fastflamingo.patch`` sets them from the model.
    """

    _fastflamingo_dropin = True
    _fastflamingo_attention_site = CROSS  # fastflamingo.attention_maps records it
    _fastflamingo_attention_maps = None  # the recorder of an attention_maps block, while one records this module

    def __init__(self, config: Any = None, layer_idx: Optional[int] = None, *, tokens_per_tile: Optional[int] = None,
                 max_num_tiles: Optional[int] = None):
        super().__init__()
        config = _config(config)
        self.config = config
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.dropout = config.dropout
        self.hidden_size = config.hidden_size
        self.head_dim = config.hidden_size // self.num_heads
        self.layer_idx = layer_idx
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim ** -0.5
        self.tokens_per_tile, self.max_num_tiles = _vision_sizes(config, tokens_per_tile, max_num_tiles)
        kv_inner = self.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(self.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(self.hidden_size, kv_inner, bias=False)
        self.v_proj = nn.Linear(self.hidden_size, kv_inner, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, self.hidden_size, bias=False)
        self.q_norm = MllamaTextRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = MllamaTextRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, cross_attention_states: Optional[torch.Tensor] = None,
                cache=None, attention_mask: Optional[torch.Tensor] = None, use_cache: Optional[bool] = None,
                **kwargs):
        """Upstream's arguments (its exact signature) and result ``(attn_output, attn_weights)``: the weights are
        None unless the forward pass records attention maps (see the module docstring). The drop-in decoder layer
        also passes ``row_flag`` and ``empty_rows`` (as :meth:`attend`) among the keyword arguments."""
        cache = _pop_past_key_values(type(self).__name__, cache, kwargs)
        row_flag, empty_rows = kwargs.pop("row_flag", None), kwargs.pop("empty_rows", "hf")
        wanted = _weights_wanted(kwargs)
        out, weights = self._attend(hidden_states, cross_attention_states, cache, attention_mask, row_flag,
                                    empty_rows, wanted)
        return self.o_proj(out), weights

    def attend(self, hidden_states: torch.Tensor, cross_attention_states: Optional[torch.Tensor], cache,
               attention_mask: Optional[torch.Tensor], row_flag: Optional[torch.Tensor] = None,
               empty_rows: str = "hf") -> torch.Tensor:
        """The attention output before ``o_proj``, (batch, text, heads * head_dim)."""
        return self._attend(hidden_states, cross_attention_states, cache, attention_mask, row_flag, empty_rows,
                            False)[0]

    def _attend(self, hidden_states, cross_attention_states, cache, attention_mask, row_flag, empty_rows,
                weights_wanted: bool):
        """``(attention output before o_proj, weights or None)``. The kernels serve unless the weights are wanted
        or an ``attention_maps`` block records this layer: then the call runs densely (every key projected, as
        upstream), or through transformers' own attention function (``_weights_route``)."""
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3 \
                or hidden_states.shape[-1] != self.hidden_size:
            shape = tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else type(hidden_states)
            raise ValueError(f"hidden_states must be (batch, text, {self.hidden_size}), got {shape}")
        batch, num_text, _ = hidden_states.shape
        route = _weights_route(self.config) if weights_wanted else None
        recorder = recorder_of(self)
        every_key = recorder is not None or route in ("eager", "interface")
        q = self.q_norm(self.q_proj(hidden_states).view(batch, num_text, self.num_heads, self.head_dim))
        k, v = self._keys_values(batch, cross_attention_states, cache, attention_mask, row_flag, empty_rows,
                                 every_key)
        q, k, v = _common_dtype(q, k, v)
        weights = None
        if route == "sdpa":
            from transformers.utils import logging  # loaded: the caller asked transformers for the weights

            logging.get_logger("transformers.integrations.sdpa_attention").warning_once(SDPA_WARNING)
        if route == "interface":
            out, weights = self._upstream_attention(q, k, v, attention_mask, row_flag, empty_rows)
        elif every_key:
            out, probs = self._dense(q, k, v, attention_mask, row_flag, empty_rows)
            weights = probs if route == "eager" else None
        else:
            out = mllama_xattn(q, k, v, attention_mask, scale=self.scaling, tokens_per_tile=self.tokens_per_tile,
                               max_tiles=self.max_num_tiles, row_flag=row_flag, empty_rows=empty_rows,
                               dropout_p=self.dropout if self.training else 0.0)
        if recorder is not None:
            if route == "interface":  # the output came from transformers' function: the map is computed beside it
                probs = self._dense(q, k, v, attention_mask, row_flag, empty_rows)[1]
            recorder.record(self, probs, key_shape(k.shape[2], self.max_num_tiles, self.tokens_per_tile))
        return out.reshape(batch, num_text, self.num_heads * self.head_dim), weights

    def _zero_rows(self, row_flag, empty_rows, batch: int, num_text: int) -> Optional[torch.Tensor]:
        """(batch, text) True where ``empty_rows="zero"`` gives a row exactly 0 (its flag is 0)."""
        if empty_rows != "zero" or row_flag is None:
            return None
        return row_flag.reshape(-1, num_text).expand(batch, num_text) == 0

    def _dense(self, q, k, v, attention_mask, row_flag, empty_rows):
        """Upstream's eager attention (mask as given, every key), ``(out (B, S, H, D), probs (B, H, S, keys))``."""
        batch, num_text = q.shape[:2]
        _check(q, k, v, attention_mask)  # the errors the kernels' front end gives, before any computation
        mask_mod._check_empty_rows(empty_rows)
        return dense_attention(q.transpose(1, 2), k, v, self.scaling, mask=attention_mask,
                               zero_rows=self._zero_rows(row_flag, empty_rows, batch, num_text),
                               dropout_p=self.dropout if self.training else 0.0)

    def _upstream_attention(self, q, k, v, attention_mask, row_flag, empty_rows):
        """transformers' registered attention function for this config runs the call (what upstream returns for an
        implementation fastflamingo does not reproduce); "zero" rows are then set to 0."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        function = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, None)
        out, weights = function(self, q.transpose(1, 2), k, v, attention_mask, scaling=self.scaling,
                                dropout=self.dropout if self.training else 0.0)
        zero = self._zero_rows(row_flag, empty_rows, *q.shape[:2])
        return (out, weights) if zero is None else (zero_unseen(out, ~zero), weights)

    def _keys_values(self, batch, states, cache, attention_mask, row_flag, empty_rows, every_key: bool = False):
        """K (after ``k_norm``) and V, (batch, kv_heads, keys, head_dim): projected from ``states`` (and written to
        the cache), or read from the cache layer. ``every_key``: the padded tiles too (a dense call reads them)."""
        if states is None:
            # MllamaTextModel skips this layer when nothing is cached, so the cache exists (upstream fails alike)
            layer = cache.layers[self.layer_idx]
            return layer.keys, layer.values
        # MllamaModel passes (batch * images * tiles, tokens_per_tile, hidden); upstream views it per sample
        if not isinstance(states, torch.Tensor) or states.dim() < 2 or states.shape[-1] != self.hidden_size \
                or states.numel() % (batch * self.hidden_size):
            shape = tuple(states.shape) if isinstance(states, torch.Tensor) else type(states).__name__
            raise ValueError(f"cross_attention_states must hold {batch} samples of (keys, {self.hidden_size}) "
                             f"(e.g. ({batch}, keys, {self.hidden_size})), got {shape}")
        states = states.reshape(batch, -1, self.hidden_size)
        num_keys = states.shape[1]
        rows = None
        if isinstance(attention_mask, torch.Tensor) and not torch.compiler.is_compiling() and not every_key \
                and attention_mask.shape[-1] == num_keys:
            closed = mask_mod.cached(attention_mask.expand(batch, -1, -1, -1) if attention_mask.shape[0] != batch
                                     else attention_mask, self.tokens_per_tile, self.max_num_tiles,
                                     row_flag, empty_rows)
            rows = closed.real_key_ranges() if closed is not None else None
        k, v = self._project(states, rows, zero_padding=cache is not None)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        return k, v

    def _project(self, states: torch.Tensor, ranges, zero_padding: bool):
        """(batch, keys, kv_heads, head_dim) K and V. With ``ranges`` ((sample, first key, end key) of the real
        tiles) only those rows are projected, slice by slice (no gathered copy of the states); the padded tiles
        nobody reads are left unset, or zeros when they go to a cache (``zero_padding``)."""
        batch, num_keys, _ = states.shape
        heads, dim = self.num_key_value_heads, self.head_dim
        if not ranges:
            k = self.k_norm(self.k_proj(states).view(batch, num_keys, heads, dim))
            return k, self.v_proj(states).view(batch, num_keys, heads, dim)
        k = v = None
        for b, start, end in ranges:
            rows = states[b, start:end]
            k_rows = self.k_norm(self.k_proj(rows).view(-1, heads, dim))
            v_rows = self.v_proj(rows).view(-1, heads, dim)
            if k is None:  # the projections' own dtypes (autocast, fp32 norm weights on half activations)
                k = (k_rows.new_zeros if zero_padding else k_rows.new_empty)(batch, num_keys, heads, dim)
                v = (v_rows.new_zeros if zero_padding else v_rows.new_empty)(batch, num_keys, heads, dim)
            k[b, start:end] = k_rows
            v[b, start:end] = v_rows
        return k, v


class MllamaCrossAttentionDecoderLayer(nn.Module):
    """Drop-in for transformers' ``MllamaCrossAttentionDecoderLayer``::

        x = x + tanh(cross_attn_attn_gate) * o_proj(attn(RMSNorm(x)))        ("zero": rows with F = 0 keep x)
        x = x + tanh(cross_attn_mlp_gate) * F * mlp(RMSNorm(x))

    with ``F = full_text_row_masked_out_mask`` (a row sees an image). Both gated residuals run in the epilogue of
    their projection (``o_proj``, ``down_proj``) through ``fastflamingo.functional.gated_linear``.
    ``empty_rows``: ``"hf"`` (transformers 5, default) or ``"zero"`` (Meta / vLLM), see the module docstring.
    """

    _fastflamingo_dropin = True
    # transformers' set_gradient_checkpointing() flips this on every module that has it (upstream's layer is a
    # GradientCheckpointingLayer); forward() then checkpoints as upstream does.
    gradient_checkpointing = False

    def __init__(self, config: Any, layer_idx: int, *, empty_rows: str = "hf", tokens_per_tile: Optional[int] = None,
                 max_num_tiles: Optional[int] = None) -> None:
        super().__init__()
        config = _config(config)
        self.layer_idx = layer_idx
        self.empty_rows = mask_mod._check_empty_rows(empty_rows)
        self.cross_attn = MllamaTextCrossAttention(config, layer_idx=layer_idx, tokens_per_tile=tokens_per_tile,
                                                   max_num_tiles=max_num_tiles)
        self.input_layernorm = MllamaTextRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp = MllamaTextMLP(config)
        self.post_attention_layernorm = MllamaTextRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, hidden_states, cross_attention_states=None, cross_attention_mask=None, attention_mask=None,
                full_text_row_masked_out_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, **kwargs):
        """Upstream's arguments and result (the new hidden states). ``attention_mask`` (the LM's causal mask),
        ``position_ids`` and ``position_embeddings`` are unused, as upstream: cross-attention has no RoPE."""
        cache = _pop_past_key_values(type(self).__name__, cache, kwargs)
        # decided once per call: the attention weights go to transformers' output hooks through the attention
        # module's own forward (and call), so the fused path is left for that call only
        weights_wanted = _weights_wanted(kwargs)
        inner = partial(self._forward, cross_attention_states=cross_attention_states,
                        cross_attention_mask=cross_attention_mask,
                        full_text_row_masked_out_mask=full_text_row_masked_out_mask, weights_wanted=weights_wanted)
        recorded = weights_wanted or recorder_of(self.cross_attn) is not None
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and not recorded:
            # GradientCheckpointingLayer: a writer of the cache never keeps it under checkpointing. A call that
            # records its attention map runs unchecked (a recomputation would record it twice).
            return self._gradient_checkpointing_func(partial(inner, cache=None), hidden_states)
        return inner(hidden_states, cache=cache)

    def _forward(self, hidden_states, cross_attention_states, cross_attention_mask, full_text_row_masked_out_mask,
                 cache=None, weights_wanted: bool = False):
        flag = full_text_row_masked_out_mask
        row_gate = None if flag is None else flag.reshape(flag.shape[0], -1).expand(hidden_states.shape[:2])
        attn_gate = row_gate if self.empty_rows == "zero" else None
        residual = hidden_states
        normed = self.input_layernorm(hidden_states)
        ours = isinstance(self.cross_attn, MllamaTextCrossAttention)
        if ours and not weights_wanted:
            attended = self.cross_attn.attend(normed, cross_attention_states, cache, cross_attention_mask,
                                              row_flag=flag, empty_rows=self.empty_rows)
            hidden_states = FF.gated_linear(residual, attended, self.cross_attn.o_proj,
                                                 self.cross_attn_attn_gate, row_gate=attn_gate)
        else:  # as upstream: call the attention module (its hooks record the weights), or a wrapped or replaced one
            extra = dict(row_flag=flag, empty_rows=self.empty_rows, output_attentions=weights_wanted) if ours else {}
            out, _ = self.cross_attn(hidden_states=normed, attention_mask=cross_attention_mask,
                                     cross_attention_states=cross_attention_states, cache=cache, **extra)
            hidden_states = FF.gated_residual(residual, out, self.cross_attn_attn_gate, row_gate=attn_gate)
        residual = hidden_states
        normed = self.post_attention_layernorm(hidden_states)
        if isinstance(self.mlp, MllamaTextMLP):
            return FF.gated_linear(residual, self.mlp.hidden(normed), self.mlp.down_proj,
                                        self.cross_attn_mlp_gate, row_gate=row_gate)
        return FF.gated_residual(residual, self.mlp(normed), self.cross_attn_mlp_gate, row_gate=row_gate)


__all__ = ["MllamaCrossAttentionDecoderLayer", "MllamaTextCrossAttention", "MllamaTextMLP", "MllamaTextRMSNorm"]
