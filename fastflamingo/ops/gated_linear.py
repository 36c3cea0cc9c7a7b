"""Tanh-gated linear (``x + tanh(alpha) * rowmask(inp @ weight^T + bias)``) behind ``torch.library`` custom ops.

Forward: the Triton GEMM of ``kernels/gated_linear.py`` with the gate in its epilogue. The branch ``h`` is never
written to memory, and it is not saved for the backward pass either (upstream saves it: one activation-sized tensor
per gated branch), nor recomputed: the only gradient that needs it, ``d alpha``, follows from the weight-gradient
GEMM (below).

Backward (``fastflamingo::tanh_gated_linear_bwd``), with ``t = tanh(alpha)``, ``g = rowmask(dy)`` and
``G = g^T @ inp`` (N, K) computed once in fp32::

    dx      = dy
    dinp    = rowmask(dy @ (t * W))        t folded into the small (N, K) weight, never into the (M, N) dy
    dW      = t * G
    dbias   = t * colsum(g)
    d alpha = (1 - t^2) * sum_m g[m, n] h[m, n] = (1 - t^2) * (sum_k W[n, k] G[n, k] + bias[n] colsum(g)[n])

summed over n as well for a scalar alpha. ``sum_m g h`` equals ``sum_k W * G`` exactly (``h = inp @ W^T``), so
d alpha costs an (N, K) elementwise product instead of a pass over two (M, N) tensors, and it is as accurate as
the fp32 G. The two GEMMs are cuBLAS (torch.mm): they have no epilogue worth fusing once ``t`` sits in the weight
(dinp) or in an (N, K) output scale (dW), and a plain GEMM is what cuBLAS is tuned for (PERF.md row C uses it
as the speed-of-light bound; not measured here: no GPU); the remaining elementwise work is on (N, K) and (M, K)
tensors, never on (M, N). G uses cuBLAS's fp16/bf16 -> fp32 output
(``torch.mm(..., out_dtype=torch.float32)``, CUDA) where available, else upcast operands.

The ops are opaque to torch.compile (an ``autograd.Function`` launching the kernel would be traced into by Dynamo:
/work/shared/CPU_TESTING.md section 5). Importing this module needs torch only: triton and the kernels are imported
on the first call.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .. import _backend

_KERNELS = "gated_linear"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernels():
    return _backend.load_kernels(_KERNELS)


def _result_dtype(x: torch.Tensor, inp: torch.Tensor, alpha: torch.Tensor) -> torch.dtype:
    """upstream's ``linear(inp) * alpha.tanh() + x`` dtype (the same rule as ``kernels.gated_linear.result_dtype``,
    repeated here so the fake implementation does not import triton)."""
    branch = torch.promote_types(inp.dtype, alpha.dtype) if alpha.dim() > 0 else inp.dtype
    return torch.promote_types(branch, x.dtype)


@torch.library.custom_op("fastflamingo::tanh_gated_linear", mutates_args=())
def tanh_gated_linear_op(
    x: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], alpha: torch.Tensor,
    row_gate: Optional[torch.Tensor],
) -> torch.Tensor:
    return _kernels().gated_linear_fwd(x, inp, weight, bias, alpha, row_gate)


@tanh_gated_linear_op.register_fake
def _(x, inp, weight, bias, alpha, row_gate):
    return x.new_empty(x.shape, dtype=_result_dtype(x, inp, alpha))


# ----------------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------------

_MM_F32_OUT = {"cuda": True}  # flips to False if this torch's CUDA mm has no fp16/bf16 -> fp32 overload


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with an fp32 result and fp32 accumulation."""
    if a.dtype != torch.float32 and a.device.type == "cuda" and _MM_F32_OUT["cuda"]:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)  # torch >= 2.8: cuBLAS writes fp32 directly
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_F32_OUT["cuda"] = False
    return torch.mm(a.float(), b.float())


def gated_linear_bwd(
    dy: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], alpha: torch.Tensor,
    row_gate: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dinp, dweight, dbias, dalpha) of the gated linear; dbias is empty when there is no bias. See the module
    docstring for the arrangement. dx (= dy) is not computed here: it is the incoming gradient itself."""
    n_out, k_in = weight.shape
    compute = inp.dtype  # upstream's gradient of h is in h's dtype
    g = dy.reshape(-1, n_out).to(compute)
    a = inp.reshape(-1, k_in)
    t = torch.tanh(alpha).float()  # in alpha's dtype first, as upstream's alpha.tanh()
    per_channel = alpha.numel() > 1
    t_col = t.reshape(n_out, 1) if per_channel else t.reshape(())
    keep = None
    if row_gate is not None:
        keep = (row_gate.reshape(-1) != 0)[:, None]
        # masked_fill semantics: rows the gate drops contribute nothing, even where inp (so h) is inf or NaN
        a = torch.where(keep, a, a.new_zeros(()))
    dinp = torch.mm(g, (weight.float() * t_col).to(compute))
    if keep is not None:
        dinp = torch.where(keep, dinp, dinp.new_zeros(()))
    grad_w = _mm_f32(g.t(), a)  # G = g^T inp, (N, K), fp32
    dweight = (grad_w * t_col).to(weight.dtype)
    per_row = (weight.float() * grad_w).sum(dim=1)  # sum_m g[m, n] (inp @ W^T)[m, n]
    if bias is not None:
        g_kept = g if keep is None else torch.where(keep, g, g.new_zeros(()))
        colsum = g_kept.sum(dim=0, dtype=torch.float32)
        dbias = (colsum * t_col.reshape(-1)).to(bias.dtype)
        per_row = per_row + bias.float() * colsum
    else:
        dbias = weight.new_empty((0,))
    sech2 = 1.0 - t * t
    dalpha = per_row.reshape(alpha.shape) * sech2 if per_channel else per_row.sum().reshape(alpha.shape) * sech2
    return dinp.reshape(inp.shape), dweight, dbias, dalpha.to(alpha.dtype)


@torch.library.custom_op("fastflamingo::tanh_gated_linear_bwd", mutates_args=())
def tanh_gated_linear_bwd_op(
    dy: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], alpha: torch.Tensor,
    row_gate: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return gated_linear_bwd(dy, inp, weight, bias, alpha, row_gate)


@tanh_gated_linear_bwd_op.register_fake
def _(dy, inp, weight, bias, alpha, row_gate):
    dbias = bias.new_empty(bias.shape) if bias is not None else weight.new_empty((0,))
    return inp.new_empty(inp.shape), weight.new_empty(weight.shape), dbias, alpha.new_empty(alpha.shape)


def _setup_context(ctx, inputs, output):
    x, inp, weight, bias, alpha, row_gate = inputs
    ctx.save_for_backward(inp, weight, bias, alpha, row_gate)
    ctx.x_dtype = x.dtype


def _backward(ctx, dy):
    inp, weight, bias, alpha, row_gate = ctx.saved_tensors
    dinp, dweight, dbias, dalpha = tanh_gated_linear_bwd_op(dy, inp, weight, bias, alpha, row_gate)
    return dy.to(ctx.x_dtype), dinp, dweight, dbias if bias is not None else None, dalpha, None


tanh_gated_linear_op.register_autograd(_backward, setup_context=_setup_context)


def tanh_gated_linear(
    x: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], alpha: torch.Tensor,
    row_gate: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``x + tanh(alpha) * (inp @ weight^T + bias)`` with rows where ``row_gate == 0`` exactly ``x``, the gate in
    the epilogue of the Triton GEMM; differentiable w.r.t. x, inp, weight, bias and alpha. The result dtype is
    upstream's promotion of (branch, alpha, x)."""
    return tanh_gated_linear_op(x, inp, weight, bias, alpha, row_gate)


def unsupported_reasons(x: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        alpha: torch.Tensor, row_gate: Optional[torch.Tensor]) -> List[str]:
    """What the kernel cannot serve about these inputs (devices are checked by ``_backend``); empty: supported."""
    reasons = []
    for name, t in (("x", x), ("inp", inp), ("weight", weight), ("bias", bias), ("alpha", alpha)):
        if t is not None and t.dtype not in SUPPORTED_DTYPES:
            reasons.append(f"{name} dtype {t.dtype} is not supported (fp32, fp16, bf16)")
    if inp.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        reasons.append(f"inp ({inp.dtype}), weight ({weight.dtype})"
                       + (f" and bias ({bias.dtype})" if bias is not None else "") + " must share a dtype")
    if weight.dim() != 2:
        reasons.append(f"weight must be 2-D (out_features, in_features), got {tuple(weight.shape)}")
        return reasons
    n_out, k_in = weight.shape
    if x.dim() < 1 or inp.dim() < 1 or x.shape[:-1] != inp.shape[:-1] or x.shape[-1] != n_out \
            or inp.shape[-1] != k_in:
        reasons.append(f"x {tuple(x.shape)} and inp {tuple(inp.shape)} do not fit weight {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (n_out,):
        reasons.append(f"bias must have shape ({n_out},), got {tuple(bias.shape)}")
    if not (alpha.numel() == 1 or (alpha.numel() == n_out and alpha.dim() >= 1 and alpha.shape[-1] == n_out)):
        reasons.append(f"alpha must have 1 element or {n_out} channels, got shape {tuple(alpha.shape)}")
    elif alpha.dim() > x.dim():
        reasons.append(f"alpha {tuple(alpha.shape)} has more dims than x {tuple(x.shape)} (the result would "
                       "broadcast to a new shape)")
    if row_gate is not None:
        if tuple(row_gate.shape) != tuple(x.shape[:-1]):
            reasons.append(f"row_gate must have shape {tuple(x.shape[:-1])}, got {tuple(row_gate.shape)}")
        if row_gate.is_complex():
            reasons.append(f"row_gate dtype {row_gate.dtype} is not supported")
    reasons += _backend.interpreter_bf16_reasons((inp, weight))
    return reasons
