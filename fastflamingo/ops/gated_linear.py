"""Tanh-gated linear (``x + tanh(alpha) * rowmask(inp @ weight^T + bias)``): the launcher of the Triton GEMM in
``kernels/gated_linear.py``, the backward, and the ``torch.library`` custom ops around them.

Forward: the Triton GEMM of ``kernels/gated_linear.py`` with the gate in its epilogue. The branch ``h`` is never
written to memory, and it is not saved for the backward pass either (upstream saves it: one activation-sized tensor
per gated branch), nor recomputed: the only gradient that needs it, ``d alpha``, follows from the weight-gradient
GEMM (below).

Backward (``fastflamingo::gated_linear_bwd``), with ``t = tanh(alpha)``, ``g = rowmask(dy)`` and
``G = g^T @ inp`` (N, K)::

    dx      = dy
    dinp    = rowmask((t * g) @ W)         t scales the smallest of g, the result, or (per channel) W
    dW      = t * G                        G in fp32 blocks of rows, each scaled and rounded once into dW
    dbias   = t * colsum(g)
    d alpha = (1 - t^2) * sum_m g[m, n] h[m, n] = (1 - t^2) * (sum_k W[n, k] G[n, k] + bias[n] colsum(g)[n])

summed over n as well for a scalar alpha. ``sum_m g h`` equals ``sum_k W * G`` exactly (``h = inp @ W^T``), so
d alpha costs N row dot products (fp32 accumulation) instead of a pass over two (M, N) tensors. The two GEMMs are
cuBLAS (torch.mm, fp32 accumulation): they have no epilogue worth fusing, and a plain GEMM is what cuBLAS is tuned
for (docs/performance.md uses it as the speed-of-light bound). The row dots read G before any rounding: G rounded
to a half-precision weight's dtype puts an error into d alpha as large as the PyTorch path's own, so FlashAttention's
bound (at most twice that error) failed for about one random small shape in fifteen. So cuBLAS writes G in fp32, in
blocks of rows of at most 32 MiB, each scaled and rounded once into dW: nothing weight-sized is ever fp32 (an fp32
copy of IDEFICS-80B's ``down_proj`` weight alone is ~720 MB). ``1 - t^2`` comes from tanh in fp32 likewise.

The ops are opaque to torch.compile (an ``autograd.Function`` launching the kernel would be traced into by Dynamo:
docs/testing.md, "torch.compile"). Importing this module needs torch only: triton and the kernels are imported
on the first call.
"""
from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Tuple

import torch

from .. import _backend
from .._checks import SUPPORTED_DTYPES
from ..kernels._launch import ConfigLike, unit_last_stride


def _kernels():
    """(the kernel module, kernels/_utils): imported on the first launch, since they import triton."""
    from ..kernels import _utils, gated_linear

    return gated_linear, _utils


def result_dtype(x: torch.Tensor, inp: torch.Tensor, alpha: torch.Tensor) -> torch.dtype:
    """dtype of upstream's ``linear(inp) * alpha.tanh() + x``: PyTorch promotion, where a 0-dim alpha does not
    promote a floating-point branch (a (1,)-shaped alpha does: bf16 activations with an fp32 gate give fp32)."""
    branch = torch.promote_types(inp.dtype, alpha.dtype) if alpha.dim() > 0 else inp.dtype
    return torch.promote_types(branch, x.dtype) if x.dim() > 0 else branch


@torch.library.custom_op("fastflamingo::gated_linear", mutates_args=())
def fwd_op(
    x: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], alpha: torch.Tensor,
    row_gate: Optional[torch.Tensor],
) -> torch.Tensor:
    # called by fastflamingo.functional.gated_linear once unsupported_reasons found nothing: the launcher checks
    # nothing again
    return launch_fwd(x, inp, weight, bias, alpha, row_gate, validated=True)


@fwd_op.register_fake
def _(x, inp, weight, bias, alpha, row_gate):
    return x.new_empty(x.shape, dtype=result_dtype(x, inp, alpha))


# ----------------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------------

# G = g^T inp is produced in fp32 blocks of rows of at most this many bytes (32 MiB): d alpha needs G before any
# rounding (G rounded to a half-precision weight's dtype puts an error into d alpha as large as the PyTorch path's
# own, so often more than twice it), while a whole fp32 G of IDEFICS-80B's ``down_proj`` would be ~720 MB.
FP32_BLOCK_BYTES = 32 << 20

# cuBLAS GEMMs of fp16/bf16 inputs with an fp32 result (torch.mm's out_dtype, CUDA only) exist in this torch
_MM_FP32_OUT = "dtype" in torch.ops.aten.mm.overloads()


def _mm_fp32(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x @ y`` as an fp32 tensor: fp32 accumulation of the exact products of the inputs, which cuBLAS writes
    without rounding them to half-precision inputs' dtype. A torch without that GEMM rounds the product first, and
    d alpha then carries that rounding."""
    if x.dtype == torch.float32:
        return torch.mm(x, y)
    if _MM_FP32_OUT:
        return torch.mm(x, y, out_dtype=torch.float32)
    return torch.mm(x, y).float()


def _weight_grad(g: torch.Tensor, a: torch.Tensor, weight: torch.Tensor,
                 t_col: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dW = t * G in the weight's dtype, fp32 ``sum_k W[n, k] G[n, k]`` per output channel) for ``G = g^T a``.

    G is computed in fp32 blocks of rows of at most :data:`FP32_BLOCK_BYTES` (an fp32 weight's G is dW itself: one
    block): each block gives its row dots from unrounded values, then is scaled and rounded once into dW.
    ``t_col``: tanh(alpha) as (N, 1) or (1, 1)."""
    n_out, k_in = weight.shape
    if weight.dtype == torch.float32:
        grad = torch.mm(g.t(), a)
        # N batched (1, K) x (K, 1) products: no weight-sized temporary; TF32 where the matmul precision allows it,
        # as in upstream's own fp32 branch
        per_row = torch.bmm(weight.unsqueeze(1), grad.unsqueeze(2)).view(-1)
        return grad.mul_(t_col), per_row
    if weight.device.type == "cuda":
        g_t, a = g.t().to(weight.dtype), a.to(weight.dtype)
    else:  # CPU, i.e. the interpreter's tests: fp32 copies, whose products are those of cuBLAS's fp32-output GEMM
        g_t, a = g.t().float(), a.float()
    block = max(1, FP32_BLOCK_BYTES // (4 * max(k_in, 1)))
    dweight = torch.empty((n_out, k_in), dtype=weight.dtype, device=weight.device)
    per_row = torch.empty(n_out, dtype=torch.float32, device=weight.device)
    for start in range(0, n_out, block):
        rows = slice(start, start + block)
        grad = _mm_fp32(g_t[rows], a)
        # elementwise fp32 products (one block-sized temporary): a bmm of fp32 blocks could run in TF32, whose
        # 10-bit mantissa would round G as coarsely as fp16 does
        per_row[rows] = grad.mul(weight[rows]).sum(dim=1)
        dweight[rows] = grad.mul_(t_col[rows] if t_col.shape[0] > 1 else t_col)  # the one rounding to dW's dtype
    return dweight, per_row


def backward(
    dy: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], alpha: torch.Tensor,
    row_gate: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dinp, dweight, dbias, dalpha) of the gated linear; dbias is empty when there is no bias. See the module
    docstring for the arrangement. dx (= dy) is not computed here: it is the incoming gradient itself.

    Everything weight-sized stays in the weight's dtype: G is computed by cuBLAS with an fp32 result in blocks of
    rows (:func:`_weight_grad`), each block rounded once into dW; only (N,)-sized reductions are fp32."""
    n_out, k_in = weight.shape
    compute = inp.dtype  # upstream's gradient of h is in h's dtype
    g = dy.reshape(-1, n_out).to(compute)
    a = inp.reshape(-1, k_in)
    rows = g.shape[0]
    t = torch.tanh(alpha).float()  # in alpha's dtype first, as upstream's alpha.tanh()
    per_channel = alpha.numel() > 1
    t_row = t.reshape(1, n_out) if per_channel else t.reshape(1, 1)  # broadcasts over (M, N)
    keep = None
    if row_gate is not None:
        keep = (row_gate.reshape(-1) != 0)[:, None]
        # masked_fill semantics: rows the gate drops contribute nothing, even where inp (so h) is inf or NaN
        a = torch.where(keep, a, a.new_zeros(()))
        g = torch.where(keep, g, g.new_zeros(()))
    # dinp = (t * g) @ W: t scales the smaller of the (M, N) gradient and the (M, K) result (scalar alpha), or of
    # the gradient and the (N, K) weight (per channel); a scaled weight stays in the weight's dtype
    if not per_channel and k_in < n_out:
        dinp = torch.mm(g, weight.to(compute)).mul_(t_row)  # in-place: computed in fp32, stored in compute
    elif per_channel and rows * n_out > n_out * k_in:
        dinp = torch.mm(g, (weight * t.reshape(n_out, 1).to(weight.dtype)).to(compute))
    else:
        dinp = torch.mm((g * t_row).to(compute), weight.to(compute))
    if keep is not None:
        dinp = torch.where(keep, dinp, dinp.new_zeros(()))
    # per_row[n] = sum_m g[m, n] (inp @ W^T)[m, n]
    dweight, per_row = _weight_grad(g, a, weight, t.reshape(n_out, 1) if per_channel else t.reshape(1, 1))
    if bias is not None:
        colsum = g.sum(dim=0, dtype=torch.float32)
        dbias = (colsum * t_row.reshape(-1)).to(bias.dtype)
        per_row = per_row + bias.float() * colsum
    else:
        dbias = weight.new_empty((0,))
    # from tanh in fp32, not from t: t rounded to a half-precision alpha's dtype moves 1 - t^2 by up to
    # 2 t^2 / (1 - t^2) units in its last place, several units of d alpha's for |alpha| near 1
    sech2 = 1.0 - torch.tanh(alpha.float()).square()
    dalpha = per_row.reshape(alpha.shape) * sech2 if per_channel else per_row.sum().reshape(alpha.shape) * sech2
    return dinp.reshape(inp.shape), dweight, dbias, dalpha.to(alpha.dtype)


@torch.library.custom_op("fastflamingo::gated_linear_bwd", mutates_args=())
def bwd_op(
    dy: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], alpha: torch.Tensor,
    row_gate: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return backward(dy, inp, weight, bias, alpha, row_gate)


@bwd_op.register_fake
def _(dy, inp, weight, bias, alpha, row_gate):
    dbias = bias.new_empty(bias.shape) if bias is not None else weight.new_empty((0,))
    return inp.new_empty(inp.shape), weight.new_empty(weight.shape), dbias, alpha.new_empty(alpha.shape)


def _setup_context(ctx, inputs, output):
    x, inp, weight, bias, alpha, row_gate = inputs
    ctx.save_for_backward(inp, weight, bias, alpha, row_gate)
    ctx.x_dtype = x.dtype


def _backward(ctx, dy):
    inp, weight, bias, alpha, row_gate = ctx.saved_tensors
    dinp, dweight, dbias, dalpha = bwd_op(dy, inp, weight, bias, alpha, row_gate)
    return dy.to(ctx.x_dtype), dinp, dweight, dbias if bias is not None else None, dalpha, None


fwd_op.register_autograd(_backward, setup_context=_setup_context)


def gated_linear(
    x: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], alpha: torch.Tensor,
    row_gate: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``x + tanh(alpha) * (inp @ weight^T + bias)`` with rows where ``row_gate == 0`` exactly ``x``, the gate in
    the epilogue of the Triton GEMM; differentiable w.r.t. x, inp, weight, bias and alpha. The result dtype is
    upstream's promotion of (branch, alpha, x)."""
    return fwd_op(x, inp, weight, bias, alpha, row_gate)


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


def _row_views(tensors: Sequence[torch.Tensor]) -> Tuple[List[torch.Tensor], bool, int, List[Tuple[int, int]]]:
    """Address the rows of every tensor (same leading shape) as ``(row // R) * stride_b + (row % R) * stride_t``.

    Returns the tensors (a tensor is copied only if its last stride is not 1 or its leading dims cannot be viewed
    as (B, R)), whether R < M is needed (``BATCHED``; False when every tensor flattens to one row stride), R and
    each tensor's (stride_b, stride_t).
    """
    tensors = [unit_last_stride(t) for t in tensors]
    lead = tuple(tensors[0].shape[:-1])
    rows = math.prod(lead)
    try:  # every tensor flattens to (M, D) with one row stride
        flat = [t.view(rows, t.shape[-1]) for t in tensors]
        return tensors, False, max(rows, 1), [(0, f.stride(0)) for f in flat]
    except RuntimeError:
        pass
    batch = lead[0] if lead else 1
    per_batch = rows // batch if batch else 0
    strides = []
    for i, t in enumerate(tensors):
        try:
            v = t.view(batch, per_batch, t.shape[-1])
        except RuntimeError:
            tensors[i] = t = t.contiguous()
            v = t.view(batch, per_batch, t.shape[-1])
        strides.append((v.stride(0), v.stride(1)))
    return tensors, True, max(per_batch, 1), strides


def _check_inputs(x, inp, weight, bias, alpha, row_gate) -> None:
    """Shapes and dtypes the kernel needs (ValueError / TypeError otherwise)."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be (out_features, in_features), got {tuple(weight.shape)}")
    n_out, k_in = weight.shape
    if inp.dim() < 1 or inp.shape[-1] != k_in or x.shape[-1:] != (n_out,) or x.shape[:-1] != inp.shape[:-1]:
        raise ValueError(f"x {tuple(x.shape)} and inp {tuple(inp.shape)} do not fit weight {tuple(weight.shape)}")
    if inp.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise TypeError(f"inp, weight (and bias) must share a dtype, got {inp.dtype}, {weight.dtype}"
                        + (f", {bias.dtype}" if bias is not None else ""))
    for name, t in (("x", x), ("inp", inp), ("alpha", alpha)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} dtype {t.dtype} is not supported (fp32, fp16, bf16)")
    if bias is not None and tuple(bias.shape) != (n_out,):
        raise ValueError(f"bias must be ({n_out},), got {tuple(bias.shape)}")
    if not (alpha.numel() == 1 or (alpha.numel() == n_out and alpha.dim() >= 1 and alpha.shape[-1] == n_out)):
        raise ValueError(f"alpha must have 1 element or {n_out} channels, got shape {tuple(alpha.shape)}")
    if alpha.dim() > x.dim():
        raise ValueError(f"alpha {tuple(alpha.shape)} has more dims than x {tuple(x.shape)}")
    if row_gate is not None and tuple(row_gate.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"row_gate must have shape {tuple(x.shape[:-1])}, got {tuple(row_gate.shape)}")


def launch_fwd(
    x: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], alpha: torch.Tensor,
    row_gate: Optional[torch.Tensor] = None, config: Optional[ConfigLike] = None, *,
    out: Optional[torch.Tensor] = None, form: Optional[str] = None, validated: bool = False,
) -> torch.Tensor:
    """``y = x + tanh(alpha) * (inp @ weight^T + bias)``, rows with ``row_gate == 0`` exactly ``x``.

    Args:
        x: (..., N) residual; inp: (..., K) with the same leading dims; weight: (N, K); bias: (N,) or None, in
            inp's dtype; alpha: 1 element, or N channels (shape (N,) or (1, 1, N)); row_gate: x's leading shape,
            any dtype, or None. fp32/fp16/bf16; x and alpha may differ from inp.
        config: force the GEMM's launch config (``{"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16}``), bypassing the
            autotuner (fused and split-K forms).
        out: optional preallocated output (x's shape, the dtype of :func:`result_dtype`, unit last stride).
        form: force ``"fused"``, ``"splitk"`` or ``"cublas"`` (``kernels/gated_linear.py``); default: the form the
            shape table picks (``FASTFLAMINGO_GATED_LINEAR_FORM`` forces one everywhere).
        validated: the caller checked the arguments (the custom op, after :func:`unsupported_reasons`); a direct
            call is checked here.

    Returns:
        y with x's shape and the dtype of :func:`result_dtype` (upstream's promotion).

    Only the fused form autotunes, keyed on a few row classes; the decode forms run fixed configs, so a decode
    step never times anything and, once compiled, can be captured in a CUDA graph.
    """
    K, U = _kernels()
    if not validated:
        _check_inputs(x, inp, weight, bias, alpha, row_gate)
    out_dtype = result_dtype(x, inp, alpha)
    n_out, k_in = weight.shape
    if out is None:
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    elif out.shape != x.shape or out.dtype != out_dtype or out.device != x.device:
        raise ValueError(f"out must be a {out_dtype} tensor of shape {tuple(x.shape)} on {x.device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    rows = x.numel() // max(n_out, 1)
    if out.numel() == 0:
        return out
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    alpha_flat = alpha.reshape(-1)
    per_channel = alpha_flat.numel() > 1
    gate = None
    if row_gate is not None:
        gate = row_gate.reshape(-1)  # (M,): a copy only for an odd layout of a small tensor
        if gate.dtype == torch.bool:
            gate = gate.view(torch.uint8)  # the kernel compares the loaded value with 0
    (x2, a2, y2), batched, per_batch, strides = _row_views([x, inp, out])
    if y2.data_ptr() != out.data_ptr():
        raise ValueError("out must have unit stride along its last dimension")
    (sxb, sxt), (sab, sat), (syb, syt) = strides
    form = _form(form, rows, n_out, k_in, inp.dtype, x.device)
    epilogue = dict(HAS_BIAS=bias is not None, ALPHA_PER_CHANNEL=per_channel, HAS_GATE=gate is not None,
                    BATCHED=batched)
    # the epilogue's operands, as both kernels take them
    gated = (x2, bias if bias is not None else weight, alpha_flat, gate if gate is not None else x2, y2)
    gated_strides = (sxb, sxt, syb, syt, alpha_flat.stride(0), gate.stride(0) if gate is not None else 0)
    precision = U.dot_precision(inp.dtype)

    if form == "fused":
        def run(cfg) -> None:
            block_m, block_n = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
            grid = (U.cdiv(rows, block_m) * U.cdiv(n_out, block_n), 1)
            x_, bias_, alpha_, gate_, y_ = gated
            K._gated_linear_fwd_kernel[grid](
                x_, a2, weight, bias_, alpha_, gate_, y_,
                sxb, sxt, sab, sat, weight.stride(0), syb, syt, *gated_strides[4:],
                rows, n_out, k_in, per_batch, k_in,
                PARTIAL=False, GROUP=K.GROUP_M, DOT_PRECISION=precision, **epilogue, **cfg.kwargs,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )

        key = (K.row_bucket(rows), n_out, k_in, inp.dtype, x.dtype, alpha.dtype, out_dtype, per_channel,
               gate is not None, bias is not None, batched)
        cfg = U.as_config(config) if config is not None else K.FWD_CHOOSER.choose(key, run, x.device)
        run(cfg)
        return out

    if form == "splitk":
        cfg = U.as_config(config) if config is not None else K.splitk_config(inp.dtype)
        num_slices, k_split = K.split_k(rows, n_out, k_in, cfg, U.sm_count(x.device))
        # fp32 partials [slice, row, column]; columns padded to a multiple of 16 so the workspace strides never
        # change specialization with the row count
        width = U.cdiv(n_out, 16) * 16
        h = torch.empty((num_slices, rows, width), dtype=torch.float32, device=x.device)
        grid = (U.cdiv(rows, cfg.kwargs["BLOCK_M"]) * U.cdiv(n_out, cfg.kwargs["BLOCK_N"]), num_slices)
        # the epilogue flags are unused by a partial launch: fixed values, so that it compiles one variant
        K._gated_linear_fwd_kernel[grid](
            x2, a2, weight, weight, alpha_flat, x2, h,
            0, 0, sab, sat, weight.stride(0), h.stride(0), h.stride(1), 0, 0,
            rows, n_out, k_in, per_batch, k_split,
            HAS_BIAS=False, ALPHA_PER_CHANNEL=False, HAS_GATE=False, BATCHED=batched, PARTIAL=True,
            GROUP=K.GROUP_M, DOT_PRECISION=precision, **cfg.kwargs,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        slice_stride = h.stride(0)
    else:  # cublas: h in the input dtype, as upstream's F.linear (fp32 inputs follow the matmul precision)
        h = torch.mm(a2.reshape(rows, k_in), weight.t())
        num_slices, slice_stride = 1, 0
    cfg = K.epilogue_config(rows)
    grid = (U.cdiv(rows, cfg.kwargs["BLOCK_M"]), U.cdiv(n_out, cfg.kwargs["BLOCK_N"]))
    K._gated_linear_epilogue_kernel[grid](
        h, *gated,
        slice_stride, h.stride(-2),
        *gated_strides,
        rows, n_out, per_batch, num_slices,
        **epilogue, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


_FORM_ENV = "FASTFLAMINGO_GATED_LINEAR_FORM"


def _form(form: Optional[str], rows: int, n_out: int, k_in: int, dtype: torch.dtype, device: torch.device) -> str:
    K, U = _kernels()
    form = form or os.environ.get(_FORM_ENV) or K.choose_form(rows, n_out, k_in, dtype, U.sm_count(device), device)
    if form not in K.FORMS:
        raise ValueError(f"gated_linear form {form!r} is not one of {K.FORMS} (argument or {_FORM_ENV})")
    return form
