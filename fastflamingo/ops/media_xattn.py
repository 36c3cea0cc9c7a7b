"""Triton masked media cross-attention behind ``torch.library`` custom ops.

The kernels are exposed as two custom ops, ``fastflamingo::media_xattn_fwd`` (returns ``o`` and the fp32 LSE) and
``fastflamingo::media_xattn_bwd``, with fake (meta) implementations and an autograd registration, plus the
inference-only decode op ``fastflamingo::media_xattn_decode`` (split-KV flash-decoding kernels, no autograd), which
serves calls with at most ``DECODE_MAX_TOKENS`` query tokens per sample that need no gradient. Custom ops are
opaque to torch.compile, so a compiled model calls the kernels as they are; an ``autograd.Function`` that launches
the kernels itself would be traced into by Dynamo and break (docs: /work/shared/CPU_TESTING.md section 5).

Importing this module needs torch only: triton and the kernels are imported on the first call.
"""
from __future__ import annotations

from typing import List, Tuple

import torch

from .. import _backend

_KERNELS = "media_xattn"
_DECODE_KERNELS = "media_decode"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128


def _kernels():
    return _backend.load_kernels(_KERNELS)


def _decode_kernels():
    return _backend.load_kernels(_DECODE_KERNELS)


# Largest query tokens per sample sent to the decode kernels. They put all of a sample's tokens in one 16-row MMA tile
# (loading each K/V tile once for all of them) and scan the union of the tokens' key ranges; 8 covers a decode step
# (1 token), beam/speculative drafts of a few tokens, and short chunks, while keeping the union of visible ranges of
# tokens that see different media (immediate mode, an <image> inside the chunk) small. Longer queries have enough
# rows to parallelise over, so the prefill kernel (run-aligned query tiles, no split) serves them.
DECODE_MAX_TOKENS = _backend.DECODE_MAX_TOKENS


@torch.library.custom_op("fastflamingo::media_xattn_fwd", mutates_args=())
def media_xattn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_time: torch.Tensor,
    num_media: int, latents: int, immediate: bool, scale: float, kv_repeat: int = 1,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _kernels().media_xattn_fwd(q, k, v, text_time, num_media, latents, immediate, scale, kv_group=kv_repeat)


@media_xattn_fwd.register_fake
def _(q, k, v, text_time, num_media, latents, immediate, scale, kv_repeat=1):
    batch, num_text, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, num_text), dtype=torch.float32)


@torch.library.custom_op("fastflamingo::media_xattn_bwd", mutates_args=())
def media_xattn_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    text_time: torch.Tensor, num_media: int, latents: int, immediate: bool, scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels().media_xattn_bwd(do, q, k, v, o, lse, text_time, num_media, latents, immediate, scale)


@media_xattn_bwd.register_fake
def _(do, q, k, v, o, lse, text_time, num_media, latents, immediate, scale):
    # the kernels allocate contiguous gradients, whatever the strides of q, k, v
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.custom_op("fastflamingo::media_xattn_decode", mutates_args=())
def media_xattn_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_time: torch.Tensor,
    num_media: int, latents: int, immediate: bool, scale: float, kv_repeat: int = 1,
) -> torch.Tensor:
    return _decode_kernels().media_decode_fwd(q, k, v, text_time, num_media, latents, immediate, scale,
                                              kv_group=kv_repeat)


@media_xattn_decode.register_fake
def _(q, k, v, text_time, num_media, latents, immediate, scale, kv_repeat=1):
    return q.new_empty(q.shape)  # the launcher allocates a contiguous output, like new_empty


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _setup_context(ctx, inputs, output):
    q, k, v, text_time, num_media, latents, immediate, scale, kv_repeat = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, text_time)
    ctx.mask_args = (num_media, latents, immediate, scale)
    ctx.kv_repeat = kv_repeat


def _backward(ctx, grad_o, grad_lse):
    # lse is an internal statistic: the public function never returns it, so its gradient is ignored.
    q, k, v, o, lse, text_time = ctx.saved_tensors
    num_media, latents, immediate, scale = ctx.mask_args
    if grad_o is None:
        return None, None, None, None, None, None, None, None, None
    if ctx.kv_repeat != 1:
        # the backward kernels take one K/V row per sample; grouped K/V only ever comes from the inference cache
        raise ValueError("media_xattn_fwd with kv_repeat > 1 has no backward (inference only)")
    dq, dk, dv = media_xattn_bwd(grad_o, q, k, v, o, lse, text_time, num_media, latents, immediate, scale)
    return dq, dk, dv, None, None, None, None, None, None


media_xattn_fwd.register_autograd(_backward, setup_context=_setup_context)


def media_cross_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_time: torch.Tensor,
    num_media: int, latents: int, immediate: bool, scale: float, kv_repeat: int = 1,
) -> torch.Tensor:
    """Masked media cross-attention through the Triton kernels; differentiable w.r.t. q, k and v.

    Calls that need no gradient (``torch.no_grad()``, or none of q, k, v requires grad) with at most
    ``DECODE_MAX_TOKENS`` query tokens per sample run the decode kernels; everything else the prefill kernels.

    Shapes and semantics: :func:`fastflamingo.functional.media_cross_attention` (q (B, T, H, D), k/v
    (B, num_media * latents, H, D), ``text_time`` (B, T) 1-based media index, 0 for none). ``kv_repeat`` r: k/v
    have batch B // r and sample b reads K/V row b // r (forward only).
    """
    if text_time.dtype != torch.int32:
        text_time = text_time.to(torch.int32)
    kv_repeat = int(kv_repeat)
    if kv_repeat != 1 and _needs_grad(q, k, v):
        raise ValueError("kv_repeat > 1 is inference only: the backward kernels need one K/V row per sample")
    if q.shape[1] <= DECODE_MAX_TOKENS and not _needs_grad(q, k, v):
        # decode step: split-KV kernels, no host synchronisation (CUDA-graph capturable), no autograd needed
        return media_xattn_decode(q, k, v, text_time, int(num_media), int(latents), bool(immediate), float(scale),
                                  kv_repeat)
    o, _ = media_xattn_fwd(q, k, v, text_time, int(num_media), int(latents), bool(immediate), float(scale),
                           kv_repeat)
    return o


def unsupported_reasons(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> List[str]:
    """What the kernels cannot serve about these inputs (devices are checked by ``_backend``); empty: supported."""
    reasons = []
    dtypes = {t.dtype for t in (q, k, v)}
    if len(dtypes) > 1:
        reasons.append(f"q, k, v have different dtypes {sorted(str(d) for d in dtypes)}")
    for dtype in sorted(dtypes, key=str):
        if dtype not in SUPPORTED_DTYPES:
            reasons.append(f"dtype {dtype} is not supported (fp32, fp16, bf16)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            reasons.append(f"{name} must be 4-D (batch, tokens, heads, head_dim), got shape {tuple(t.shape)}")
    if all(t.dim() == 4 for t in (q, k, v)):
        head_dims = {q.shape[-1], k.shape[-1], v.shape[-1]}
        if len(head_dims) > 1:
            reasons.append(f"q, k, v head_dims differ: {sorted(head_dims)}")
        for head_dim in sorted(head_dims):
            if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
                reasons.append(f"head_dim {head_dim} is outside the supported {MIN_HEAD_DIM}..{MAX_HEAD_DIM}")
    reasons += _backend.interpreter_bf16_reasons((q, k, v))
    return reasons
