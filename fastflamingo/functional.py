"""Functional ops: validation, backend dispatch, and the optimized PyTorch path.

The PyTorch path is what runs on CPU (and wherever the Triton kernels cannot serve). It already exploits the
mask structure: text is cut into runs of consecutive tokens that see the same media, and each run attends only
to its own media's latents with one fused ``scaled_dot_product_attention`` call. Nothing of size
text x media-tokens is ever built, in the forward or in the backward pass.
"""
from __future__ import annotations

import importlib
from typing import List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import _backend
from .masks import MediaMask

# --------------------------------------------------------------------------------------------------------------
# Masked media cross-attention
# --------------------------------------------------------------------------------------------------------------


def _triton_module(name: str):
    """The Triton boundary module ``fastflamingo.<name>``, or None when this build does not have it."""
    try:
        return importlib.import_module(f".{name}", __package__)
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.{name}":
            raise
        return None


def _check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_repeat: int = 1) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, tokens, heads, head_dim), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape[:3] + (k.shape[3],) or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree on (batch, keys, heads)")
    if q.shape[0] != k.shape[0] * kv_repeat or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        batch = "batch" if kv_repeat == 1 else f"batch (q's = k's * kv_repeat {kv_repeat})"
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on {batch}, heads and head_dim "
            "(layout: (batch, tokens, heads, head_dim))"
        )


def media_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Union[MediaMask, torch.Tensor],
    *,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    kv_repeat: int = 1,
) -> torch.Tensor:
    """Masked media cross-attention core: each text token attends only to the latents of the media it may see.

    Args:
        q: (batch, text, heads, head_dim) queries, any strides.
        k, v: (batch, num_media * latents, heads, head_dim) media keys and values, media-major (the latents of
            media ``i`` are rows ``i * latents .. (i + 1) * latents - 1``); views into a fused K/V projection are
            fine.
        mask: a :class:`~fastflamingo.masks.MediaMask` (closed form: ``text_time`` per token and a mode), or, for
            the rare IDEFICS mask that has no closed form, a boolean (batch, text, num_media) tensor (PyTorch path
            only).
        scale: softmax scale, default ``head_dim ** -0.5``.
        dropout_p: attention dropout probability (PyTorch path only; IDEFICS trains with it).
        kv_repeat: r >= 1; k and v hold batch ``batch // r`` and query row ``b`` attends K/V row ``b // r``. Beam
            search repeats every sample's media r times, so the media projection cache keeps one K/V row per
            sample instead of r identical copies (see cache.py). Inference only: with r > 1 nothing may require
            grad. Every path reads the shared rows in place; K/V is never repeated.

    Returns:
        (batch, text, heads, head_dim) in the dtype of ``q``. A token that sees no media gets exactly 0.

    Mask rule, for ``text_time = cumsum(media_locations)`` (``<image>`` tokens marked ``I``, 3 media of
    ``n`` latents each)::

        tokens      t  I  t  t  I  t  I  t          immediate            all_previous
        text_time   0  1  1  1  2  2  3  3          keys seen            keys seen
        token 0 (text_time 0)                        none -> 0            none -> 0
        token 2 (text_time 1)                        [0, n)               [0, n)
        token 5 (text_time 2)                        [n, 2n)              [0, 2n)
        token 7 (text_time 3)                        [2n, 3n)             [0, 3n)

    Dtypes: fp32, fp16, bf16; the softmax is computed in fp32 on every path.
    """
    kv_repeat = int(kv_repeat)
    if kv_repeat < 1:
        raise ValueError(f"kv_repeat must be >= 1, got {kv_repeat}")
    _check_attention_inputs(q, k, v, kv_repeat)
    if kv_repeat > 1 and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        # the grouped paths (and the Triton backward) have no gradient for K/V shared among rows; the media cache
        # that produces grouped K/V never runs while a graph is recorded
        raise ValueError("kv_repeat > 1 is inference only: call it under torch.no_grad() or without inputs that "
                         "require grad")
    batch, num_text = q.shape[:2]
    if isinstance(mask, MediaMask):
        num_media = mask.num_media
        if mask.shape != (batch, num_text):
            raise ValueError(
                f"mask covers (batch, text) = {mask.shape} but q has (batch, text) = {(batch, num_text)}"
            )
    elif isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.dim() == 3:
        num_media = mask.shape[-1]
        if tuple(mask.shape[:2]) != (batch, num_text):
            raise ValueError(f"mask has shape {tuple(mask.shape)} but q has (batch, text) = {(batch, num_text)}")
    else:
        raise TypeError(
            "mask must be a fastflamingo.masks.MediaMask or a boolean (batch, text, num_media) tensor, got "
            f"{type(mask).__name__}{tuple(mask.shape) if isinstance(mask, torch.Tensor) else ''}"
        )
    num_keys = k.shape[1]
    if num_media == 0:
        if num_keys != 0:
            raise ValueError(f"mask has no media but k has {num_keys} keys")
        if kv_repeat > 1:  # no graph to keep (inference only): plain zeros of q's batch
            return v.new_zeros(()).expand(batch, num_text, v.shape[2], v.shape[3])
        return v.sum(dim=1, keepdim=True).expand(-1, num_text, -1, -1)  # exact zeros, still in the graph
    if num_keys % num_media:
        raise ValueError(f"k has {num_keys} keys, which is not a multiple of the {num_media} media of the mask")
    latents = num_keys // num_media
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)

    def triton_reasons() -> List[str]:
        if not isinstance(mask, MediaMask):
            return ["the image mask has no closed form (rows are neither one-hot nor prefixes)"]
        if dropout_p:
            return [f"attention dropout (dropout_p={dropout_p}) is not supported by the kernels"]
        from .ops import media_xattn as _triton_xattn

        return _triton_xattn.unsupported_reasons(q, k, v)

    if _backend.choose("media_cross_attention", (q, k, v), triton_reasons) == "triton":
        from .ops import media_xattn as _triton_xattn

        return _triton_xattn.media_cross_attention(
            q, k, v, mask.text_time.to(q.device), num_media, latents, mask.immediate, scale, kv_repeat
        )
    if isinstance(mask, MediaMask):
        mask = mask.to(q.device)
        if mask.immediate:
            if len(mask.runs()) > _FEW_RUNS:
                return _media_cross_attention_chunks(q, k, v, mask, latents, scale, dropout_p, kv_repeat)
        elif num_text <= _backend.DECODE_MAX_TOKENS:
            return _media_cross_attention_prefix(q, k, v, mask, latents, scale, dropout_p, kv_repeat)
        if kv_repeat > 1:
            return _runs_forward_grouped(q, k, v, mask.runs(), latents, scale, dropout_p, kv_repeat)
        return _media_cross_attention_runs(q, k, v, mask, latents, scale, dropout_p)
    return _media_cross_attention_dense(q, k, v, mask.to(q.device), latents, scale, dropout_p, kv_repeat)


# With this many runs or fewer (e.g. a single image: every token sees it) one SDPA call per run on views of q, k, v
# beats gathering the runs into chunks, which copies q and the used K/V once.
_FEW_RUNS = 4


def _sdpa(q, k, v, scale, dropout_p, attn_mask=None):
    """SDPA on (batch, tokens, heads, head_dim) views; returns the same layout."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask, dropout_p=dropout_p, scale=scale
    )
    return out.transpose(1, 2)


def _runs_forward(q, k, v, runs, latents: int, scale: float, dropout_p: float):
    """One SDPA call per run of tokens that see the same media: no mask, no text x media-token matrix."""
    batch, num_text, heads, _ = q.shape
    pieces = []
    for b, t0, t1, lo, hi in runs:
        rows = slice(None) if b is None else slice(b, b + 1)
        if hi <= lo:
            # exact zeros that stay in the autograd graph (a sum over no keys), so a call whose tokens all see
            # nothing still has a gradient (exactly zero) instead of an output detached from q, k, v
            pieces.append(v[rows, :0].sum(dim=1, keepdim=True).expand(-1, t1 - t0, -1, -1))
            continue
        keys = slice(lo * latents, hi * latents)
        pieces.append(_sdpa(q[rows, t0:t1], k[rows, keys], v[rows, keys], scale, dropout_p))
    if not pieces:  # no text tokens
        return v[:, :0].sum(dim=1, keepdim=True).expand(-1, 0, -1, -1)
    if runs[0][0] is None:  # one set of runs shared by all samples: concatenate along text
        return torch.cat(pieces, dim=1)
    # per-sample runs, ordered sample-major: concatenate along text, then split back into samples
    return torch.cat(pieces, dim=1).reshape(batch, num_text, heads, v.shape[-1])


def _fold_groups(x: torch.Tensor, r: int) -> torch.Tensor:
    """(B, T, ...) -> (B // r, r * T, ...): the r query rows that share one K/V row become one longer query row
    (attention treats every query token independently), so one SDPA call reads each shared K/V row once. A view
    when x's batch stride is T times its token stride (a projection's output), else a copy of x (queries only)."""
    return x.unflatten(0, (x.shape[0] // r, r)).flatten(1, 2)


def _unfold_groups(x: torch.Tensor, r: int) -> torch.Tensor:
    """Inverse of :func:`_fold_groups`: (B // r, r * T, ...) -> (B, T, ...)."""
    return x.unflatten(1, (r, x.shape[1] // r)).flatten(0, 1)


def _runs_forward_grouped(q, k, v, runs, latents: int, scale: float, dropout_p: float, r: int):
    """:func:`_runs_forward` with K/V shared by groups of r consecutive query rows (``kv_repeat``; no grad).
    Per-sample runs index K/V row ``b // r``; shared runs (the same runs for every sample) fold each group's r
    query rows into one (see :func:`_fold_groups`)."""
    batch, num_text, heads, _ = q.shape
    head_dim_v = v.shape[-1]
    shared = bool(runs) and runs[0][0] is None
    pieces = []
    for b, t0, t1, lo, hi in runs:
        rows = batch if b is None else 1
        if hi <= lo:
            pieces.append(q.new_zeros(rows, t1 - t0, heads, head_dim_v))
            continue
        keys = slice(lo * latents, hi * latents)
        if b is None:
            folded = _fold_groups(q[:, t0:t1], r)
            pieces.append(_unfold_groups(_sdpa(folded, k[:, keys], v[:, keys], scale, dropout_p), r))
        else:
            g = b // r
            pieces.append(_sdpa(q[b:b + 1, t0:t1], k[g:g + 1, keys], v[g:g + 1, keys], scale, dropout_p))
    if not pieces:  # no text tokens
        return q.new_zeros(batch, 0, heads, head_dim_v)
    if shared:
        return torch.cat(pieces, dim=1)
    return torch.cat(pieces, dim=1).reshape(batch, num_text, heads, head_dim_v)


class _RunsAttention(torch.autograd.Function):
    """Run-by-run attention with a recomputing backward.

    Plain autograd through per-run slices would, for every run, materialise a zero tensor of the full size of q, k
    and v in the slice backward (quadratic in the number of runs). Here the backward recomputes each run's
    attention on its own slices (cheap: the forward is a fraction of the backward) and writes the gradients
    straight into one buffer per input; overlapping key ranges (all-previous mode) accumulate.
    """

    @staticmethod
    def forward(ctx, q, k, v, runs, latents, scale):
        ctx.save_for_backward(q, k, v)
        ctx.runs, ctx.latents, ctx.scale = runs, latents, scale
        with torch.no_grad():
            return _runs_forward(q, k, v, runs, latents, scale, 0.0)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        latents = ctx.latents
        for b, t0, t1, lo, hi in ctx.runs:
            if hi <= lo:
                continue  # tokens that see nothing: gradient exactly zero
            rows = slice(None) if b is None else slice(b, b + 1)
            keys = slice(lo * latents, hi * latents)
            with torch.enable_grad():
                qs, ks, vs = (t.detach().requires_grad_(True) for t in (q[rows, t0:t1], k[rows, keys], v[rows, keys]))
                out = _sdpa(qs, ks, vs, ctx.scale, 0.0)
                gq, gk, gv = torch.autograd.grad(out, (qs, ks, vs), grad_out[rows, t0:t1])
            dq[rows, t0:t1] = gq
            dk[rows, keys] += gk
            dv[rows, keys] += gv
        return dq, dk, dv, None, None, None


def _media_cross_attention_runs(q, k, v, mask: MediaMask, latents: int, scale: float, dropout_p: float):
    runs = mask.runs()
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if dropout_p or not needs_grad or len(runs) <= _FEW_RUNS:
        # inference; dropout (whose random mask a recomputing backward could not replay); or so few runs that the
        # slice backward's full-size zero tensors cost less than recomputing the forward: plain autograd
        return _runs_forward(q, k, v, runs, latents, scale, dropout_p)
    return _RunsAttention.apply(q, k, v, runs, latents, scale)


def _media_cross_attention_prefix(q, k, v, mask: MediaMask, latents: int, scale: float, dropout_p: float,
                                  kv_repeat: int = 1):
    """All-previous decode: every token sees a key prefix ``[0, hi * latents)``, so one SDPA call over the keys any
    token sees, with a boolean key mask of only tokens x keys per sample, replaces the per-sample run loop (and its
    host-side run list). Tokens that see nothing attend to every key (a finite softmax, no NaN in the forward or
    backward) and are then set to exactly 0. ``kv_repeat`` r > 1: the r query rows sharing a K/V row are folded into
    one (:func:`_fold_groups`), with their key masks."""
    _, hi = mask.media_range()  # (batch, text) int32; hi <= 0: nothing visible
    if q.device.type == "cpu":
        num_keys = max(int(hi.max()), 0) * latents if hi.numel() else 0  # a free read on CPU: skip unseen keys
    else:
        num_keys = k.shape[1]  # no host read, so a decode step stays capturable in a CUDA graph
    if num_keys == 0:
        if kv_repeat > 1:  # inference only: no graph to keep
            return q.new_zeros(q.shape[0], q.shape[1], v.shape[2], v.shape[3])
        return v[:, :0].sum(dim=1, keepdim=True).expand(-1, q.shape[1], -1, -1)  # exact zeros, still in the graph
    sees = hi > 0
    key_mask = torch.arange(num_keys, device=q.device) < (hi * latents)[..., None]  # (batch, text, keys)
    key_mask = key_mask | ~sees[..., None]
    if kv_repeat > 1:
        out = _sdpa(_fold_groups(q, kv_repeat), k[:, :num_keys], v[:, :num_keys], scale, dropout_p,
                    attn_mask=_fold_groups(key_mask, kv_repeat)[:, None])
        out = _unfold_groups(out, kv_repeat)
    else:
        out = _sdpa(q, k[:, :num_keys], v[:, :num_keys], scale, dropout_p, attn_mask=key_mask[:, None])
    return torch.where(sees[:, :, None, None], out, out.new_zeros(()))


def _media_cross_attention_chunks(q, k, v, mask: MediaMask, latents: int, scale: float, dropout_p: float,
                                  kv_repeat: int = 1):
    """Immediate mode in one SDPA call: every chunk of a run attends to its own media's ``latents`` keys (all of
    them valid, so no mask at all). Gathers copy q once and each used media's K/V once; the result is scattered
    back, and tokens that see nothing keep exact zeros. Autograd goes through index_select / index_copy, whose
    backward is linear in the tensor sizes. ``kv_repeat`` r > 1: sample b's media come from K/V row b // r."""
    batch, num_text, heads, head_dim = q.shape
    token_index, media_index, size = mask.chunks(batch)
    head_dim_v = v.shape[-1]
    flat_q = torch.cat((q.reshape(batch * num_text, heads, head_dim), q.new_zeros(1, heads, head_dim)))
    chunk_q = flat_q.index_select(0, token_index.flatten()).view(-1, size, heads, head_dim)
    num_media = mask.num_media
    kv_rows = k.shape[0]
    if kv_repeat > 1:
        # media_index is sample * num_media + m (m < num_media): remap to the shared K/V row (sample // r)
        media_index = media_index // (num_media * kv_repeat) * num_media + media_index % num_media
    chunk_k = k.reshape(kv_rows * num_media, latents, heads, head_dim).index_select(0, media_index)
    chunk_v = v.reshape(kv_rows * num_media, latents, heads, head_dim_v).index_select(0, media_index)
    chunk_out = _sdpa(chunk_q, chunk_k, chunk_v, scale, dropout_p)
    out = q.new_zeros(batch * num_text + 1, heads, head_dim_v)
    out = out.index_copy(0, token_index.flatten(), chunk_out.reshape(-1, heads, head_dim_v))
    return out[:-1].view(batch, num_text, heads, head_dim_v)


def _media_cross_attention_dense(q, k, v, allowed: torch.Tensor, latents: int, scale: float, dropout_p: float,
                                 kv_repeat: int = 1):
    """General (batch, text, media) boolean mask: dense SDPA mask; rows that see nothing are exactly 0.
    ``kv_repeat`` r > 1: the r query rows sharing a K/V row are folded into one (:func:`_fold_groups`)."""
    sees_any = allowed.any(-1)  # (batch, text)
    # give empty rows every key so the softmax stays finite, then zero them: no NaN in the forward or backward
    key_mask = (allowed | ~sees_any[..., None]).repeat_interleave(latents, dim=-1)
    if kv_repeat > 1:
        out = _sdpa(_fold_groups(q, kv_repeat), k, v, scale, dropout_p,
                    attn_mask=_fold_groups(key_mask, kv_repeat)[:, None])
        out = _unfold_groups(out, kv_repeat)
    else:
        out = _sdpa(q, k, v, scale, dropout_p, attn_mask=key_mask[:, None])
    return torch.where(sees_any[:, :, None, None], out, out.new_zeros(()))


# --------------------------------------------------------------------------------------------------------------
# Perceiver resampler attention
# --------------------------------------------------------------------------------------------------------------


def perceiver_attention(
    q: torch.Tensor,
    k_media: torch.Tensor,
    v_media: torch.Tensor,
    k_latents: torch.Tensor,
    v_latents: torch.Tensor,
    *,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Perceiver resampler attention: latent queries attend to ``[media tokens; latents]``.

    Args:
        q: (N, latents, heads, head_dim), one row of N per (sample, media).
        k_media, v_media: (N, media_tokens, heads, head_dim).
        k_latents, v_latents: (N, latents, heads, head_dim).
        scale: softmax scale, default ``head_dim ** -0.5``.

    Returns:
        (N, latents, heads, head_dim) in the dtype of ``q``. No mask: every latent sees every key.
    """
    tensors = {"q": q, "k_media": k_media, "v_media": v_media, "k_latents": k_latents, "v_latents": v_latents}
    for name, t in tensors.items():
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (N, tokens, heads, head_dim), got {tuple(t.shape)}")
    if k_media.shape[:3] != v_media.shape[:3] or k_latents.shape[:3] != v_latents.shape[:3]:
        raise ValueError(
            f"keys and values disagree: k_media {tuple(k_media.shape)}, v_media {tuple(v_media.shape)}, "
            f"k_latents {tuple(k_latents.shape)}, v_latents {tuple(v_latents.shape)}"
        )
    if k_latents.shape[:3] != q.shape[:3] or k_media.shape[0] != q.shape[0] or k_media.shape[2:] != q.shape[2:]:
        raise ValueError(
            f"q {tuple(q.shape)}, k_media {tuple(k_media.shape)} and k_latents {tuple(k_latents.shape)} must share "
            "N, heads and head_dim, and k_latents must have as many tokens as q"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)

    def triton_reasons() -> List[str]:
        module = _triton_module("ops.perceiver_attn")
        if module is None:
            return ["this build has no Triton kernel for perceiver_attention"]
        return module.unsupported_reasons(q, k_media, v_media, k_latents, v_latents)

    if _backend.choose("perceiver_attention", tensors.values(), triton_reasons) == "triton":
        from .ops import perceiver_attn as _triton_perceiver

        return _triton_perceiver.perceiver_attention(q, k_media, v_media, k_latents, v_latents, scale)
    # PyTorch path: one fused SDPA over the concatenated keys. The concatenation copies only the projected K/V
    # (media_tokens + latents rows), which is small next to the projections that produce them.
    k = torch.cat((k_media, k_latents), dim=1)
    v = torch.cat((v_media, v_latents), dim=1)
    return _sdpa(q, k, v, scale, 0.0)


# --------------------------------------------------------------------------------------------------------------
# tanh-gated residual
# --------------------------------------------------------------------------------------------------------------


def tanh_gated_residual(
    x: torch.Tensor, h: torch.Tensor, alpha: torch.Tensor, row_gate: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``x + tanh(alpha) * h``, with ``h`` zeroed on rows where ``row_gate == 0`` when a row gate is given.

    ``alpha`` is a scalar-like parameter (shape (1,), OpenFlamingo / IDEFICS "float") or per-channel (shape
    (..., dim), IDEFICS "vector"). The result dtype follows PyTorch promotion exactly as upstream does (an fp32
    gate on bf16 activations gives fp32).
    """
    if h.shape != x.shape:
        raise ValueError(f"h {tuple(h.shape)} must have the shape of x {tuple(x.shape)}")
    if alpha.numel() != 1 and alpha.shape[-1] != x.shape[-1]:
        raise ValueError(f"alpha must have 1 element or {x.shape[-1]} channels, got shape {tuple(alpha.shape)}")
    if row_gate is not None:
        if tuple(row_gate.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"row_gate must have shape {tuple(x.shape[:-1])}, got {tuple(row_gate.shape)}")
        h = h.masked_fill((row_gate == 0)[..., None], 0.0)
    return h * alpha.tanh() + x


def tanh_gated_linear(
    x: torch.Tensor,
    inp: torch.Tensor,
    linear: nn.Module,
    alpha: torch.Tensor,
    row_gate: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``x + tanh(alpha) * linear(inp)`` (rows with ``row_gate == 0`` get ``x``): the gated residual fused into
    the epilogue of the matmul that produces the branch, on the Triton backend.

    ``linear`` is the upstream projection module (``to_out``, ``ff[3]``, ``o_proj``, ``down_proj``). Only a plain
    ``nn.Linear`` is fused; anything else (a LoRA wrapper, a quantized layer) runs as a module, then the gated
    residual. Gradients flow to ``x``, ``inp``, the weight (and bias) and ``alpha``.
    """
    if type(linear) is not nn.Linear:
        return tanh_gated_residual(x, linear(inp), alpha, row_gate)
    if inp.shape[:-1] != x.shape[:-1] or inp.shape[-1] != linear.in_features or x.shape[-1] != linear.out_features:
        raise ValueError(
            f"x {tuple(x.shape)} and inp {tuple(inp.shape)} do not fit a Linear({linear.in_features}, "
            f"{linear.out_features})"
        )
    weight, bias = linear.weight, linear.bias

    def triton_reasons() -> List[str]:
        module = _triton_module("ops.gated_linear")
        if module is None:
            return ["this build has no Triton kernel for tanh_gated_linear"]
        return module.unsupported_reasons(x, inp, weight, bias, alpha, row_gate)

    if _backend.choose("tanh_gated_linear", (x, inp, weight, alpha), triton_reasons) == "triton":
        from .ops import gated_linear as _triton_gate

        return _triton_gate.tanh_gated_linear(x, inp, weight, bias, alpha, row_gate)
    return tanh_gated_residual(x, F.linear(inp, weight, bias), alpha, row_gate)


__all__ = ["media_cross_attention", "perceiver_attention", "tanh_gated_residual", "tanh_gated_linear"]
