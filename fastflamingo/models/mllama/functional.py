"""``mllama_xattn``: the mllama cross-attention core, validated once and dispatched once.

Paths (``FASTFLAMINGO_BACKEND`` / ``fastflamingo.backend(...)`` pick the backend as for every op):

- Triton prefill: the closed-form kernels (interval-masked GQA, forward and backward) whenever the mask has the
  closed form (:func:`.mask.from_additive_mask`: one derivation per mask tensor, shared by every layer, one host
  synchronisation);
- Triton decode (at most ``DECODE_MAX_TOKENS`` new tokens, no gradient, an additive mask or None): the decode kernel
  reads the mask and the cache tensors in place and skips the tiles no token sees, with no host synchronisation;
- PyTorch: runs of tokens with the closed form, else transformers' dense attention with the mask as given (no
  repeated K/V either way); under ``torch.compile`` always the dense one (no host synchronisation in the graph).
  A compiled prefill whose tile sizes are to be inferred (``tokens_per_tile=None``: the attention route) takes this
  path on the ``auto`` backend too (an explicit ``triton`` raises): the inference reads the mask on the host.
"""
from __future__ import annotations

from typing import List, Optional, Union

import torch

from ... import _backend
from ...masks import zero_unseen
from . import mask as mask_mod
from . import torch_path
from .mask import MllamaMask

MaskLike = Union[None, torch.Tensor, MllamaMask]


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: MaskLike) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            layout = "(batch, text, heads, head_dim)" if name == "q" else "(batch, kv_heads, keys, head_dim)"
            raise ValueError(f"{name} must have shape {layout}, got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    batch, num_text, heads, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be (batch, kv_heads, keys, head_dim) "
                         f"with q's batch and head_dim (q: {tuple(q.shape)})")
    if k.shape[1] == 0 or heads % k.shape[1]:
        raise ValueError(f"q has {heads} heads, which is not a multiple of the {k.shape[1]} K/V heads")
    num_keys = k.shape[2]
    if isinstance(attention_mask, MllamaMask):
        if attention_mask.shape != (batch, num_text) or attention_mask.num_keys != num_keys:
            raise ValueError(f"the MllamaMask covers (batch, text) = {attention_mask.shape} and "
                             f"{attention_mask.num_keys} keys; q and k have {(batch, num_text)} and {num_keys}")
    elif isinstance(attention_mask, torch.Tensor):
        m = attention_mask
        if m.dim() != 4 or m.shape[1] != 1 or m.shape[0] not in (1, batch) or tuple(m.shape[2:]) != (num_text,
                                                                                                       num_keys):
            raise ValueError(f"attention_mask must have shape (batch, 1, text, keys) = (B, 1, {num_text}, "
                             f"{num_keys}), got {tuple(m.shape)}")
        if not (m.is_floating_point() or m.dtype == torch.bool):
            raise TypeError(f"attention_mask must be additive (float) or boolean, got dtype {m.dtype}")
    elif attention_mask is not None:
        raise TypeError("attention_mask must be None, a (batch, 1, text, keys) tensor or an MllamaMask, got "
                        f"{type(attention_mask).__name__}")


def _row_flag(row_flag: Optional[torch.Tensor], batch: int, num_text: int) -> Optional[torch.Tensor]:
    if row_flag is None:
        return None
    if row_flag.numel() != batch * num_text and row_flag.numel() != num_text:
        raise ValueError(f"row_flag must have batch x text = {batch} x {num_text} entries ((batch, 1, text, 1) or "
                         f"(batch, text)), got shape {tuple(row_flag.shape)}")
    return row_flag.reshape(-1, num_text).expand(batch, num_text)


def mllama_xattn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attention_mask: MaskLike = None,
    *,
    scale: Optional[float] = None,
    tokens_per_tile: Optional[int] = mask_mod.TOKENS_PER_TILE,
    max_tiles: Optional[int] = mask_mod.MAX_TILES,
    row_flag: Optional[torch.Tensor] = None,
    empty_rows: str = "hf",
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """mllama cross-attention: ``softmax(scale * q k^T + mask) v`` with GQA, never repeating K/V.

    Args:
        q: (batch, text, heads, head_dim) queries (after ``q_norm``).
        k, v: (batch, kv_heads, keys, head_dim): the transformers cache layout (``cache.layers[i].keys``), read in
            place; ``heads`` a multiple of ``kv_heads`` (query head h reads K/V head h // group).
        attention_mask: the additive (batch or 1, 1, text, keys) mask transformers gives the layer (0 = attend,
            ``finfo.min`` = blocked; boolean True = attend also accepted), an
            :class:`~fastflamingo.models.mllama.mask.MllamaMask`, or None: every key (not causal, unlike transformers'
            SDPA path without a mask, transformers #48172).
        scale: softmax scale, default ``head_dim ** -0.5``.
        tokens_per_tile, max_tiles: the vision tile size and tiles per image, to recover the closed form
            (Llama 3.2: 1601 and 4); a key count they do not divide means the dense path. Both None: inferred
            from the mask (:func:`.mask.from_additive_mask`; decode steps then visit keys in units of 1601 when
            that divides the key count, else all of them).
        row_flag, empty_rows: ``empty_rows="zero"`` with transformers' ``full_text_row_masked_out_mask``: rows whose
            flag is 0 get exactly 0 (Meta's reference, vLLM). ``"hf"`` (default): the mask decides alone (such rows'
            masks are all zeros: attention over every key, transformers 5).
        dropout_p: attention dropout (PyTorch path).

    Returns:
        (batch, text, heads, head_dim) in q's dtype.
    """
    _check(q, k, v, attention_mask)
    mask_mod._check_empty_rows(empty_rows)
    mask_mod.check_tile_sizes(tokens_per_tile, max_tiles)
    batch, num_text, _, head_dim = q.shape
    num_keys = k.shape[2]
    scale = head_dim ** -0.5 if scale is None else float(scale)
    flag = _row_flag(row_flag, batch, num_text) if empty_rows == "zero" else None
    if isinstance(attention_mask, torch.Tensor) and attention_mask.shape[0] != batch:
        attention_mask = attention_mask.expand(batch, -1, -1, -1)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    is_tensor_mask = not isinstance(attention_mask, MllamaMask)
    decode = is_tensor_mask and num_text <= _backend.DECODE_MAX_TOKENS and not needs_grad and not dropout_p
    state = {}

    def closed_form() -> Optional[MllamaMask]:
        if "closed" not in state:
            if isinstance(attention_mask, MllamaMask):
                state["closed"] = attention_mask
            elif attention_mask is None:
                state["closed"] = mask_mod.full(batch, num_text, num_keys, q.device)
                if flag is not None:  # "zero" rows without a mask: rows that see nothing
                    state["closed"] = None
            else:
                state["closed"] = mask_mod.cached(attention_mask, tokens_per_tile, max_tiles, flag, empty_rows)
        return state["closed"]

    def triton_reasons() -> List[str]:
        if dropout_p:
            return [f"attention dropout (dropout_p={dropout_p}) is not supported by the kernels"]
        from ...ops import mllama_decode as decode_ops
        from ...ops import mllama_xattn as ops

        reasons = ops.unsupported_reasons(q, k, v)
        group = q.shape[2] // k.shape[1]
        if decode:
            if num_text * group > decode_ops.MAX_ROWS:
                reasons.append(f"decode: {num_text} tokens x {group} heads per K/V head > {decode_ops.MAX_ROWS}")
        elif not reasons and tokens_per_tile is None and torch.compiler.is_compiling():
            # the sizes are inferred from the mask on the host, which a graph cannot do (fullgraph would fail)
            reasons.append("the tile sizes are to be inferred from the mask (tokens_per_tile=None), which needs "
                           "host reads that a torch.compile graph cannot make: the PyTorch path serves it densely")
        elif not reasons and closed_form() is None:
            reasons.append("the cross-attention mask has no closed form (not runs of images with tile prefixes, "
                           "or a soft bias): the dense PyTorch path serves it")
        return reasons

    if _backend.choose("mllama_xattn", (q, k, v), triton_reasons) == "triton":
        if decode:
            from ...ops.mllama_decode import mllama_decode

            unit = mask_mod.TOKENS_PER_TILE if tokens_per_tile is None else tokens_per_tile
            units, count, unit_len = mask_mod.decode_units(attention_mask, num_keys, unit, batch, q.device, flag)
            mask3 = None if attention_mask is None else attention_mask[:, 0]
            out = mllama_decode(q, k, v, mask3, units, count, unit_len, scale)
            return out if flag is None else zero_unseen(out, flag != 0)
        from ...ops.mllama_xattn import mllama_xattn as kernel_path

        return kernel_path(q, k, v, closed_form(), scale)

    zero_rows = None if flag is None else flag == 0
    if torch.compiler.is_compiling() and is_tensor_mask:  # no host synchronisation inside a compiled graph
        return torch_path.dense(q, k, v, attention_mask, scale, dropout_p, zero_rows)
    closed = closed_form()
    if closed is None:
        return torch_path.dense(q, k, v, attention_mask, scale, dropout_p, zero_rows)
    return torch_path.runs(q, k, v, closed, scale, dropout_p)


__all__ = ["mllama_xattn"]
