"""Triton mllama (Llama 3.2 Vision) cross-attention behind ``torch.library`` custom ops.

- ``fastflamingo::mllama_xattn_fwd`` / ``fastflamingo::mllama_xattn_bwd``: the closed-form (interval-masked GQA)
  prefill kernels of ``kernels/mllama_xattn.py``, with fake implementations and an autograd registration;
- ``fastflamingo::mllama_xattn_decode``: the decode kernel of ``kernels/mllama_decode.py`` (reads the additive
  mask and the cache tensors in place; inference only, no autograd).

Custom ops are opaque to torch.compile, so a compiled model calls the kernels as they are. Importing this module
needs torch only: triton and the kernels are imported on the first call.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .. import _backend

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128
MAX_GROUP = 16  # query heads per K/V head a program tile holds (a power of two)
DECODE_MAX_ROWS = 128  # decode: query tokens x group heads in one tile


@torch.library.custom_op("fastflamingo::mllama_xattn_fwd", mutates_args=())
def mllama_xattn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, img_start: torch.Tensor, img_end: torch.Tensor,
    image_keys: torch.Tensor, image_stride: int, max_runs: int, scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    from fastflamingo.kernels import mllama_xattn as kernels

    return kernels.mllama_xattn_fwd(q, k, v, img_start, img_end, image_keys, image_stride, max_runs, scale)


@mllama_xattn_fwd.register_fake
def _(q, k, v, img_start, img_end, image_keys, image_stride, max_runs, scale):
    batch, num_text, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, num_text), dtype=torch.float32)


@torch.library.custom_op("fastflamingo::mllama_xattn_bwd", mutates_args=())
def mllama_xattn_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    img_start: torch.Tensor, img_end: torch.Tensor, image_keys: torch.Tensor, image_stride: int, max_runs: int,
    scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastflamingo.kernels import mllama_xattn as kernels

    return kernels.mllama_xattn_bwd(do, q, k, v, o, lse, img_start, img_end, image_keys, image_stride, max_runs,
                                    scale)


@mllama_xattn_bwd.register_fake
def _(do, q, k, v, o, lse, img_start, img_end, image_keys, image_stride, max_runs, scale):
    # the kernels allocate contiguous gradients, whatever the strides of q, k, v
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, img_start, img_end, image_keys, image_stride, max_runs, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, img_start, img_end, image_keys)
    ctx.sizes = (image_stride, max_runs, scale)


def _backward(ctx, grad_o, grad_lse):
    # lse is an internal statistic: the public function never returns it, so its gradient is ignored
    q, k, v, o, lse, img_start, img_end, image_keys = ctx.saved_tensors
    if grad_o is None:
        return (None,) * 9
    dq, dk, dv = mllama_xattn_bwd(grad_o, q, k, v, o, lse, img_start, img_end, image_keys, *ctx.sizes)
    return dq, dk, dv, None, None, None, None, None, None


mllama_xattn_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fastflamingo::mllama_xattn_decode", mutates_args=())
def mllama_xattn_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], units: torch.Tensor,
    unit_count: torch.Tensor, unit_len: int, scale: float,
) -> torch.Tensor:
    from fastflamingo.kernels import mllama_decode as kernels

    return kernels.mllama_decode_fwd(q, k, v, mask, units, unit_count, unit_len, scale)


@mllama_xattn_decode.register_fake
def _(q, k, v, mask, units, unit_count, unit_len, scale):
    return q.new_empty(q.shape)


def prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float) -> torch.Tensor:
    """Closed-form attention (``mask`` a :class:`~fastflamingo.mllama.mask.MllamaMask`); differentiable w.r.t.
    q, k and v."""
    o, _ = mllama_xattn_fwd(q, k, v, mask.img_start, mask.img_end, mask.image_keys, mask.image_stride,
                            mask.max_runs, float(scale))
    return o


def decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], units: torch.Tensor,
           unit_count: torch.Tensor, unit_len: int, scale: float) -> torch.Tensor:
    """A decode step with the additive (B, S, K) mask (or None), visiting only the listed key units."""
    return mllama_xattn_decode(q, k, v, mask, units, unit_count, int(unit_len), float(scale))


def unsupported_reasons(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> List[str]:
    """What the kernels cannot serve about these inputs (devices are checked by ``_backend``); empty: supported."""
    reasons = []
    dtypes = {t.dtype for t in (q, k, v)}
    if len(dtypes) > 1:
        reasons.append(f"q, k, v have different dtypes {sorted(str(d) for d in dtypes)}")
    for dtype in sorted(dtypes, key=str):
        if dtype not in SUPPORTED_DTYPES:
            reasons.append(f"dtype {dtype} is not supported (fp32, fp16, bf16)")
    head_dim = q.shape[-1]
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        reasons.append(f"head_dim {head_dim} is outside the supported {MIN_HEAD_DIM}..{MAX_HEAD_DIM}")
    group = q.shape[2] // max(k.shape[1], 1)
    if group > MAX_GROUP or group & (group - 1):
        reasons.append(f"{group} query heads per K/V head: the kernels take a power of two <= {MAX_GROUP}")
    reasons += _backend.interpreter_bf16_reasons((q, k, v))
    return reasons


__all__ = ["prefill", "decode", "unsupported_reasons", "mllama_xattn_fwd", "mllama_xattn_bwd", "mllama_xattn_decode"]
