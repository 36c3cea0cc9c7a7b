"""The public functional API: each op validates its arguments once, then dispatches once.

Dispatch (``fastflamingo._backend.choose``): the Triton kernels (``fastflamingo.ops.<stem>``) for CUDA tensors they
support, or whenever the ``triton`` backend is requested; the PyTorch path (``fastflamingo.ops.torch_path``)
otherwise. For masked media cross-attention the Triton side is split once more: decode steps (at most
``DECODE_MAX_TOKENS`` query tokens per sample, no gradient) take the split-key decode kernels, everything else the
prefill kernels. ``docs/design.md`` shows the layers.

Ops, one name each (the stem of its kernel, launcher, test and benchmark where it has a kernel): :func:`media_xattn`,
:func:`perceiver_attn`, :func:`gated_linear` and :func:`gated_residual`; :func:`gelu_linear` is the feed-forward's
memory-saving matmul.
"""
from __future__ import annotations

import operator
from typing import List, Optional, Union

import torch
from torch import nn

from . import _backend
from ._checks import key_mask_as_bool
from .masks import MediaMask
from .ops import torch_path


def _records_graph(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _kv_group(kv_group: int) -> int:
    """``kv_group`` as a Python int >= 1 (an integer-like such as a numpy int passes; a float or a bool does not:
    2.5 must not quietly become 2)."""
    if isinstance(kv_group, bool):
        raise TypeError(f"kv_group must be an int >= 1, got {kv_group!r}")
    try:
        kv_group = operator.index(kv_group)
    except TypeError:
        raise TypeError(f"kv_group must be an int >= 1, got {type(kv_group).__name__} {kv_group!r}") from None
    if kv_group < 1:
        raise ValueError(f"kv_group must be >= 1, got {kv_group}")
    return kv_group


# --------------------------------------------------------------------------------------------------------------
# Masked media cross-attention
# --------------------------------------------------------------------------------------------------------------


def _check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_group: int = 1) -> None:
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
    if q.shape[0] != k.shape[0] * kv_group or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        batch = "batch" if kv_group == 1 else f"batch (q's = k's * kv_group {kv_group})"
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on {batch}, heads and head_dim "
            "(layout: (batch, tokens, heads, head_dim))"
        )


def media_xattn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Union[MediaMask, torch.Tensor],
    *,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    kv_group: int = 1,
    key_mask: Optional[torch.Tensor] = None,
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
        kv_group: r >= 1; k and v hold batch ``batch // r`` and query row ``b`` attends K/V row ``b // r``. Beam
            search repeats every sample's media r times, so the media projection cache keeps one K/V row per
            sample instead of r identical copies (see cache.py). Inference only: with r > 1 nothing may require
            grad. Every path reads the shared rows in place; K/V is never repeated.
        key_mask: None, or (batch of k, keys) over the keys of k and v: bool, or 0/1 integer / floating (nonzero
            = visible). A hidden key is seen by no token (padding inside a media, or a padded source of
            concatenated media); combined (AND) with ``mask``. With ``kv_group`` r, query row ``b`` reads mask row
            ``b // r``, as it reads K/V. Every path takes it (the Triton kernels as a byte mask they read per key
            tile); a hidden key gets zero gradients.

    Returns:
        (batch, text, heads, head_dim) in the dtype of ``q``. A token that sees no key (no media, or every key
        of its media hidden by ``key_mask``) gets exactly 0.

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
    kv_group = _kv_group(kv_group)
    _check_attention_inputs(q, k, v, kv_group)
    if key_mask is not None:
        key_mask = key_mask_as_bool("key_mask", key_mask, k.shape[:2], "(batch of k, keys)", q.device)
    if kv_group > 1 and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        # the grouped paths (and the Triton backward) have no gradient for K/V shared among rows; the media cache
        # that produces grouped K/V never runs while a graph is recorded
        raise ValueError("kv_group > 1 is inference only: call it under torch.no_grad() or without inputs "
                         "that require grad")
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
        if kv_group > 1:  # no graph to keep (inference only): plain zeros of q's batch
            return v.new_zeros(()).expand(batch, num_text, v.shape[2], v.shape[3])
        return torch_path.attend_to_no_keys(q, k, v)  # exact zeros, with a (zero) gradient for q, k and v
    if num_keys % num_media:
        raise ValueError(f"k has {num_keys} keys, which is not a multiple of the {num_media} media of the mask")
    latents = num_keys // num_media
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)

    def triton_reasons() -> List[str]:
        if not isinstance(mask, MediaMask):
            return ["the image mask has no closed form (rows are neither one-hot nor prefixes)"]
        return _media_xattn_reasons(q, k, v, dropout_p)

    if _backend.choose("media_xattn", (q, k, v), triton_reasons) == "torch":
        return torch_path.media_xattn(q, k, v, mask, latents, scale, dropout_p, kv_group, key_mask)
    text_time = mask.text_time.to(q.device)
    args = (q, k, v, text_time, num_media, latents, mask.immediate, scale, kv_group, key_mask)
    if num_text <= _backend.DECODE_MAX_TOKENS and not _records_graph(q, k, v):
        # a decode step: the split-key kernels (no host synchronisation: CUDA-graph capturable, no autograd)
        from .ops.media_decode import media_decode

        return media_decode(*args)
    from .ops.media_xattn import media_xattn as prefill

    return prefill(*args)


def _media_xattn_reasons(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> List[str]:
    if dropout_p:
        return [f"attention dropout (dropout_p={dropout_p}) is not supported by the kernels"]
    from .ops import media_xattn as xattn_ops

    return xattn_ops.unsupported_reasons(q, k, v)


def media_xattn_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, dropout_p: float = 0.0,
                        key_mask: Optional[torch.Tensor] = None) -> str:
    """The backend (``"torch"`` or ``"triton"``) :func:`media_xattn` uses for these tensors with a closed-form
    mask; raises :class:`~fastflamingo.BackendError` as it would. For callers that prepare the mask differently per
    backend (the IDEFICS layer while traced). ``key_mask`` is accepted for callers that pass one: every backend
    takes a key mask, so it does not change the answer."""
    return _backend.choose("media_xattn", (q, k, v), lambda: _media_xattn_reasons(q, k, v, dropout_p))


# --------------------------------------------------------------------------------------------------------------
# Perceiver resampler attention
# --------------------------------------------------------------------------------------------------------------


def perceiver_attn(
    q: torch.Tensor,
    k_media: torch.Tensor,
    v_media: torch.Tensor,
    k_latents: torch.Tensor,
    v_latents: torch.Tensor,
    *,
    scale: Optional[float] = None,
    key_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Perceiver resampler attention: latent queries attend to ``[media tokens; latents]``.

    Args:
        q: (N, latents, heads, head_dim), one row of N per (sample, media).
        k_media, v_media: (N, media_tokens, kv_heads, head_dim).
        k_latents, v_latents: (N, latents, kv_heads, head_dim).
        scale: softmax scale, default ``head_dim ** -0.5``.
        key_mask: None, or (N, media_tokens): bool, or 0/1 integer / floating (nonzero = visible). Hidden media
            tokens (padding) are seen by no latent; the latents themselves are always visible, so no row is ever
            empty (IDEFICS2 and Evolla's resamplers).

    Grouped-query attention: ``heads`` must be a multiple of ``kv_heads``; query head ``h`` reads KV head
    ``h // (heads // kv_heads)``. K/V are read in place, never repeated per query head.

    Returns:
        (N, latents, heads, head_dim) in the dtype of ``q``.
    """
    tensors = {"q": q, "k_media": k_media, "v_media": v_media, "k_latents": k_latents, "v_latents": v_latents}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (N, tokens, heads, head_dim), got {tuple(t.shape)}")
    if k_media.shape[:3] != v_media.shape[:3] or k_latents.shape[:3] != v_latents.shape[:3]:
        raise ValueError(
            f"keys and values disagree: k_media {tuple(k_media.shape)}, v_media {tuple(v_media.shape)}, "
            f"k_latents {tuple(k_latents.shape)}, v_latents {tuple(v_latents.shape)}"
        )
    num, latents, heads, head_dim = q.shape
    kv_heads = k_media.shape[2]
    if (k_media.shape[0] != num or k_media.shape[3] != head_dim
            or tuple(k_latents.shape) != (num, latents, kv_heads, head_dim)):
        raise ValueError(
            f"q {tuple(q.shape)}, k_media {tuple(k_media.shape)} and k_latents {tuple(k_latents.shape)} must share "
            "N and head_dim, k_media and k_latents must share their (KV) heads, and k_latents must have as many "
            "tokens as q"
        )
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(
            f"q has {heads} heads, not a multiple of the {kv_heads} KV heads of k_media / k_latents (grouped-query "
            "attention: query head h reads KV head h // (heads // kv_heads))"
        )
    if key_mask is not None:
        key_mask = key_mask_as_bool("key_mask", key_mask, k_media.shape[:2], "(N, media_tokens)", q.device)
    scale = head_dim ** -0.5 if scale is None else float(scale)

    def triton_reasons() -> List[str]:
        from .ops import perceiver_attn as perceiver_ops

        return perceiver_ops.unsupported_reasons(q, k_media, v_media, k_latents, v_latents, key_mask=key_mask)

    if _backend.choose("perceiver_attn", tensors.values(), triton_reasons) == "torch":
        return torch_path.perceiver_attn(q, k_media, v_media, k_latents, v_latents, scale, key_mask)
    from .ops.perceiver_attn import perceiver_attn as kernel_path

    return kernel_path(q, k_media, v_media, k_latents, v_latents, scale, key_mask)


# --------------------------------------------------------------------------------------------------------------
# tanh-gated residual
# --------------------------------------------------------------------------------------------------------------


def gated_residual(
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
    if row_gate is not None and tuple(row_gate.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"row_gate must have shape {tuple(x.shape[:-1])}, got {tuple(row_gate.shape)}")
    return torch_path.gated_residual(x, h, alpha, row_gate)


def _plain_linear(linear: nn.Module) -> bool:
    """True when calling ``linear`` is exactly ``F.linear`` with its weight and bias: its class is ``nn.Linear``,
    and nothing wraps its call (an instance ``forward``, as accelerate's hooks install, or forward hooks on it or
    on every module)."""
    from torch.nn.modules import module as torch_module

    return (type(linear) is nn.Linear and "forward" not in linear.__dict__ and not linear._forward_hooks
            and not linear._forward_pre_hooks and not torch_module._global_forward_hooks
            and not torch_module._global_forward_pre_hooks)


def gated_linear(
    x: torch.Tensor,
    inp: torch.Tensor,
    linear: nn.Module,
    alpha: torch.Tensor,
    row_gate: Optional[torch.Tensor] = None,
    *,
    activation: Optional[str] = None,
) -> torch.Tensor:
    """``x + tanh(alpha) * linear(inp)`` (rows with ``row_gate == 0`` get ``x``): the gated residual fused into
    the epilogue of the matmul that produces the branch, on the Triton backend.

    ``activation="gelu"``: ``inp`` is the pre-activation and the branch is ``linear(gelu(inp))`` (exact GELU; the
    OpenFlamingo feed-forward's last two layers). On the PyTorch path the GELU output is then recomputed in the
    backward pass instead of kept (:func:`gelu_linear`).

    ``linear`` is the upstream projection module (``to_out``, ``ff[3]``, ``o_proj``, ``down_proj``). Only a plain
    ``nn.Linear`` is fused; anything else runs as a module, then the gated residual: a LoRA wrapper, a quantized
    layer, and a Linear whose call does more than its math, i.e. one with hooks (accelerate's ``_hf_hook`` moves
    or loads an offloaded weight in its forward, and a weight still on the meta device would otherwise be read).
    Gradients flow to ``x``, ``inp``, the weight (and bias) and ``alpha``.
    """
    if activation not in (None, "gelu"):
        raise ValueError(f"activation must be None or 'gelu', got {activation!r}")
    if not _plain_linear(linear):
        return gated_residual(x, linear(nn.functional.gelu(inp) if activation else inp), alpha, row_gate)
    if inp.shape[:-1] != x.shape[:-1] or inp.shape[-1] != linear.in_features or x.shape[-1] != linear.out_features:
        raise ValueError(
            f"x {tuple(x.shape)} and inp {tuple(inp.shape)} do not fit a Linear({linear.in_features}, "
            f"{linear.out_features})"
        )
    weight, bias = linear.weight, linear.bias

    def triton_reasons() -> List[str]:
        from .ops import gated_linear as gated_ops

        return gated_ops.unsupported_reasons(x, inp, weight, bias, alpha, row_gate)

    if _backend.choose("gated_linear", (x, inp, weight, alpha), triton_reasons) == "torch":
        if activation:
            branch = gelu_linear(inp, weight)
            return gated_residual(x, branch if bias is None else branch + bias, alpha, row_gate)
        return torch_path.gated_linear(x, inp, weight, bias, alpha, row_gate)
    from .ops.gated_linear import gated_linear as kernel_path

    return kernel_path(x, nn.functional.gelu(inp) if activation else inp, weight, bias, alpha, row_gate)


class _GeluLinear(torch.autograd.Function):
    """``linear(gelu(h), weight)`` keeping only ``h`` (and the weight) for the backward pass, which recomputes
    ``gelu(h)``: autograd would keep both ``h`` (for GELU) and ``gelu(h)`` (for the weight gradient). Plain torch ops
    in both directions, so any device and torch.compile serve it. Under autocast the forward's ``F.linear`` casts as
    usual; the backward computes in the gradient's dtype and returns the weight gradient in the weight's."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h, weight)
        return nn.functional.linear(nn.functional.gelu(h), weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, weight = ctx.saved_tensors
        grad_h = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_a = grad.matmul(weight.to(grad.dtype))
            grad_h = torch.ops.aten.gelu_backward(grad_a.to(h.dtype), h)
        if ctx.needs_input_grad[1]:
            a = nn.functional.gelu(h).to(grad.dtype)
            grad_weight = grad.reshape(-1, grad.shape[-1]).t().mm(a.reshape(-1, a.shape[-1])).to(weight.dtype)
        return grad_h, grad_weight


def gelu_linear(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(F.gelu(h), weight)`` (exact GELU, no bias) that saves ``dim * mult`` fewer values per token for the
    backward pass: the GELU output is recomputed there (one elementwise pass) instead of kept. The feed-forward of
    the drop-ins uses it when it records a graph."""
    if _records_graph(h, weight):
        return _GeluLinear.apply(h, weight)
    return nn.functional.linear(nn.functional.gelu(h), weight)


__all__ = [
    "media_xattn",
    "media_xattn_backend",
    "gelu_linear",
    "perceiver_attn",
    "gated_residual",
    "gated_linear",
]
