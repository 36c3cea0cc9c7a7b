"""Triton Perceiver-resampler attention behind ``torch.library`` custom ops.

Two custom ops, ``fastflamingo::perceiver_attn_fwd`` (returns ``o`` and the fp32 LSE) and
``fastflamingo::perceiver_attn_bwd`` (the five input gradients), with fake (meta) implementations and an autograd
registration. Custom ops are opaque to torch.compile, so a compiled model calls the kernels as they are (an
``autograd.Function`` launching the kernels would be traced into by Dynamo and break: /work/shared/CPU_TESTING.md
section 5).

Importing this module needs torch only: triton and the kernels are imported on the first call.
"""
from __future__ import annotations

from typing import List, Tuple

import torch

from .. import _backend

_KERNELS = "perceiver_attn"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128


def _kernels():
    return _backend.load_kernels(_KERNELS)


@torch.library.custom_op("fastflamingo::perceiver_attn_fwd", mutates_args=())
def perceiver_attn_fwd(
    q: torch.Tensor, k_media: torch.Tensor, v_media: torch.Tensor, k_latents: torch.Tensor, v_latents: torch.Tensor,
    scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _kernels().perceiver_fwd(q, k_media, v_media, k_latents, v_latents, scale)


@perceiver_attn_fwd.register_fake
def _(q, k_media, v_media, k_latents, v_latents, scale):
    num, latents, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((num, heads, latents), dtype=torch.float32)


@torch.library.custom_op("fastflamingo::perceiver_attn_bwd", mutates_args=())
def perceiver_attn_bwd(
    do: torch.Tensor, q: torch.Tensor, k_media: torch.Tensor, v_media: torch.Tensor, k_latents: torch.Tensor,
    v_latents: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels().perceiver_bwd(do, q, k_media, v_media, k_latents, v_latents, o, lse, scale)


@perceiver_attn_bwd.register_fake
def _(do, q, k_media, v_media, k_latents, v_latents, o, lse, scale):
    # the kernels allocate contiguous gradients, whatever the strides of the inputs
    return tuple(t.new_empty(t.shape) for t in (q, k_media, v_media, k_latents, v_latents))


def _setup_context(ctx, inputs, output):
    q, k_media, v_media, k_latents, v_latents, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k_media, v_media, k_latents, v_latents, o, lse)
    ctx.scale = scale


def _backward(ctx, grad_o, grad_lse):
    # lse is an internal statistic: the public function never returns it, so its gradient is ignored.
    if grad_o is None:
        return None, None, None, None, None, None
    q, k_media, v_media, k_latents, v_latents, o, lse = ctx.saved_tensors
    grads = perceiver_attn_bwd(grad_o, q, k_media, v_media, k_latents, v_latents, o, lse, ctx.scale)
    return (*grads, None)


perceiver_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def perceiver_attention(
    q: torch.Tensor, k_media: torch.Tensor, v_media: torch.Tensor, k_latents: torch.Tensor, v_latents: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Perceiver attention through the Triton kernels: latents ``q`` (N, L, H, D) attend to
    ``[k_media; k_latents]`` / ``[v_media; v_latents]`` ((N, P, H, D) and (N, L, H, D)) without concatenating them.
    Returns (N, L, H, D) in q's dtype; differentiable w.r.t. all five inputs."""
    o, _ = perceiver_attn_fwd(q, k_media, v_media, k_latents, v_latents, float(scale))
    return o


def unsupported_reasons(q: torch.Tensor, k_media: torch.Tensor, v_media: torch.Tensor, k_latents: torch.Tensor,
                        v_latents: torch.Tensor) -> List[str]:
    """What the kernels cannot serve about these inputs (devices are checked by ``_backend``); empty: supported."""
    named = (("q", q), ("k_media", k_media), ("v_media", v_media), ("k_latents", k_latents), ("v_latents", v_latents))
    reasons = []
    dtypes = {t.dtype for _, t in named}
    if len(dtypes) > 1:
        reasons.append(f"q, k, v have different dtypes {sorted(str(d) for d in dtypes)}")
    for dtype in sorted(dtypes, key=str):
        if dtype not in SUPPORTED_DTYPES:
            reasons.append(f"dtype {dtype} is not supported (fp32, fp16, bf16)")
    for name, t in named:
        if t.dim() != 4:
            reasons.append(f"{name} must be 4-D (N, tokens, heads, head_dim), got shape {tuple(t.shape)}")
    if reasons:
        return reasons
    num, latents, heads, head_dim = q.shape
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        reasons.append(f"head_dim {head_dim} is outside the supported 1..{MAX_HEAD_DIM}")
    media = (num, k_media.shape[1], heads, head_dim)
    if tuple(k_media.shape) != media or tuple(v_media.shape) != media:
        reasons.append(f"k_media {tuple(k_media.shape)} and v_media {tuple(v_media.shape)} must be (N, P, H, D) "
                       f"with q's N, H, D {(num, heads, head_dim)}")
    if tuple(k_latents.shape) != tuple(q.shape) or tuple(v_latents.shape) != tuple(q.shape):
        reasons.append(f"k_latents {tuple(k_latents.shape)} and v_latents {tuple(v_latents.shape)} must have q's "
                       f"shape {tuple(q.shape)}")
    # offsets inside a tile are int32 (kernels/perceiver_attention.py): 128 rows of any input must fit
    for name, t in named:
        if t.numel() and abs(t.stride(1)) * 128 >= 2**31:
            reasons.append(f"{name} has token stride {t.stride(1)}, too large for the kernels' int32 tile offsets")
    reasons += _backend.interpreter_bf16_reasons(t for _, t in named)
    return reasons
