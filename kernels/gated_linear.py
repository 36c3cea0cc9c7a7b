"""Tanh-gated linear: the gated residual of Flamingo-style blocks fused into the epilogue of the matmul that
produces the branch (OpenFlamingo ``to_out`` / ``ff[3]``, IDEFICS ``o_proj`` / ``down_proj``).

Math, for rows ``a`` of ``inp`` (M, K) and ``weight`` (N, K)::

    h = a @ weight^T (+ bias)                     fp32 accumulation, never written to memory
    y = x + tanh(alpha) * h       where row_gate != 0
    y = x                         where row_gate == 0   (select, not multiply: NaN/inf in h never leak)

``alpha`` is one value (OpenFlamingo, flamingo-pytorch, IDEFICS "float") or one per output channel (IDEFICS
"vector"); ``tanh(alpha)`` is computed in the epilogue (fp32, rounded to alpha's dtype like upstream's
``alpha.tanh()``). Every program computes one (BLOCK_M, BLOCK_N) output tile: a K loop of ``tl.dot`` on
(BLOCK_M, BLOCK_K) x (BLOCK_K, BLOCK_N) tiles, then the epilogue reads the matching tile of ``x`` and writes ``y``.
Compared with the unfused ``x + tanh(alpha) * linear(a)`` this saves writing and re-reading ``h`` (and the
masked copy of it with a row gate): with OpenFlamingo's K=512 the GEMM is near the roofline ridge, so that
traffic is most of the difference.

Rows: the leading dims of ``x``, ``inp`` and ``y`` are flattened to M rows addressed as
``(row // rows_per_batch) * stride_b + (row % rows_per_batch) * stride_t``, so any 3-D view (a slice of a fused
projection, a transposed batch) is read in place; only unit stride along the feature dim is assumed. Row offsets
are int64. The launcher and the backward pass are in ``fastflamingo/ops/gated_linear.py`` (the backward runs on
cuBLAS GEMMs; see there why).
"""
from __future__ import annotations

from typing import List

import torch
import triton
import triton.language as tl

from ._utils import (
    INTERPRET,
    TORCH_TO_TRITON_DTYPE,
    AotVariant,
    ConfigChooser,
    config_label,
    dot_precision,
    make_aot_variant,
    next_power_of_2,
)

GROUP_M = 8  # output tiles are visited in groups of GROUP_M tile rows, so a weight tile is reused from L2

# ================================================================================================================
# Kernel
# ================================================================================================================


@triton.jit
def _tanh(x):
    """fp32 tanh without libdevice (which fails under the interpreter), so the tested code is the GPU code; it
    runs on one value or one row of values per program. Small |x| use the odd Taylor series (no cancellation in
    1 - e^(-2|x|)); error < 3e-7 relative everywhere."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    large = (1.0 - e) / (1.0 + e)
    x2 = x * x
    small = a * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (
        -0.05396825396825397 + x2 * 0.021869488536155203))))
    t = tl.where(a < 0.125, small, large)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def _gated_linear_fwd_kernel(
    X, A, W, BIAS, ALPHA, GATE, Y,
    stride_xb, stride_xt,
    stride_ab, stride_at,
    stride_wn,
    stride_yb, stride_yt,
    stride_alpha, stride_gate,
    M, N, K, rows_per_batch,
    HAS_BIAS: tl.constexpr, ALPHA_PER_CHANNEL: tl.constexpr, HAS_GATE: tl.constexpr, BATCHED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program: one (BLOCK_M, BLOCK_N) tile of y."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP * tiles_n
    first_m = (pid // per_group) * GROUP
    group_rows = tl.minimum(tiles_m - first_m, GROUP)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = rows < M
    n_ok = cols < N
    rows64 = rows.to(tl.int64)
    if BATCHED:  # rows of a (B, R) view that does not flatten: split the row index (int32 division is cheap)
        batch = (rows // rows_per_batch).to(tl.int64)
        within = (rows % rows_per_batch).to(tl.int64)
    else:  # rows of a flat (M, D) view: one row stride
        batch = tl.zeros_like(rows64)
        within = rows64

    a_ptrs = A + (batch * stride_ab + within * stride_at)[:, None] + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = W + cols.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]: W^T
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + offs_k < K
        b_a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b_w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(b_a, b_w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    # epilogue, all in fp32 (elementwise math never runs in bf16: the interpreter gets it wrong)
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if ALPHA_PER_CHANNEL:
        b_alpha = tl.load(ALPHA + cols.to(tl.int64) * stride_alpha, mask=n_ok, other=0.0).to(tl.float32)
        # rounded to alpha's dtype, as upstream's alpha.tanh()
        b_gate = _tanh(b_alpha).to(ALPHA.dtype.element_ty).to(tl.float32)
        branch = acc * b_gate[None, :]
    else:
        b_gate = _tanh(tl.load(ALPHA).to(tl.float32)).to(ALPHA.dtype.element_ty).to(tl.float32)
        branch = acc * b_gate
    if HAS_GATE:
        keep = tl.load(GATE + rows64 * stride_gate, mask=m_ok, other=0).to(tl.float32) != 0.0
        branch = tl.where(keep[:, None], branch, 0.0)  # masked_fill: a NaN/inf branch row never reaches y

    mn_ok = m_ok[:, None] & n_ok[None, :]
    p_x = X + (batch * stride_xb + within * stride_xt)[:, None] + cols[None, :]
    b_x = tl.load(p_x, mask=mn_ok, other=0.0).to(tl.float32)
    p_y = Y + (batch * stride_yb + within * stride_yt)[:, None] + cols[None, :]
    tl.store(p_y, (b_x + branch).to(Y.dtype.element_ty), mask=mn_ok)


# ================================================================================================================
# Launch configurations
# ================================================================================================================


def _cfg(block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=num_warps,
                         num_stages=num_stages)


# Under the interpreter one config, and a big one: the interpreter's cost is per tile, not per FLOP.
INTERPRETER_CONFIG = _cfg(64, 64, 64, 4, 1)

# GPU candidates (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per input precision. Large tiles for the long
# GEMMs (M = tokens), narrow-M tiles for decode (M = batch). Every entry compiles for sm_80 and sm_90 without a
# register spill and within shared memory (``python -m fastflamingo.aot``); configs that spilled there were dropped.
# fp32 uses IEEE products (see ``dot_precision``), lowered to FMA loops: a correctness path with small tiles.
_GPU_CONFIG_TABLE = {
    "lowp": [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
             (64, 64, 64, 4, 4), (32, 128, 64, 4, 4), (16, 128, 64, 4, 4), (16, 64, 128, 4, 3)],
    "fp32": [(64, 64, 32, 8, 2), (32, 64, 32, 4, 2), (32, 32, 32, 4, 2), (16, 64, 32, 4, 2)],
}
_GPU_CONFIGS = {key: [_cfg(*c) for c in table] for key, table in _GPU_CONFIG_TABLE.items()}


def shipped_configs(dtype: torch.dtype) -> List[triton.Config]:
    """The GPU configs a launch with inputs of ``dtype`` may use (what ``fastflamingo.aot`` compiles)."""
    return _GPU_CONFIGS["fp32" if dtype == torch.float32 else "lowp"]


def _prune(configs: List[triton.Config], key: tuple) -> List[triton.Config]:
    if INTERPRET:
        return configs
    m_bucket, n, k, dtype = key[:4]
    shipped = shipped_configs(dtype)

    def fits(c):  # a tile no larger (per dimension) than the next power of two of the problem
        return (c.kwargs["BLOCK_M"] <= max(16, m_bucket) and c.kwargs["BLOCK_N"] <= max(16, next_power_of_2(n))
                and c.kwargs["BLOCK_K"] <= max(16, next_power_of_2(k)))

    kept = [c for c in shipped if fits(c)]
    if not kept:  # tiny problem: the smallest tile
        kept = [min(shipped, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]
    return kept


_CANDIDATES = [INTERPRETER_CONFIG] if INTERPRET else []
FWD_CHOOSER = ConfigChooser("gated_linear_fwd", _CANDIDATES, _prune)


# ================================================================================================================
# Ahead-of-time compile variants (python -m fastflamingo.aot)
# ================================================================================================================

_AOT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# (per-channel alpha, row gate, bias, batched rows): OpenFlamingo / flamingo-pytorch, IDEFICS vector + gate, IDEFICS
# float + gate, a Linear with a bias, and rows of a (B, R) view that does not flatten
_AOT_EPILOGUES = ((False, False, False, False), (True, True, False, False), (False, True, False, False),
                  (False, False, True, False), (False, False, False, True))


def aot_variants(quick: bool = False) -> List[AotVariant]:
    """Every shipped config per dtype with the OpenFlamingo epilogue (alpha and x in the activation dtype), and
    the first config with each other epilogue and an fp32 alpha (fp32 output: upstream's promotion of bf16
    activations with an fp32 gate). ``quick``: bf16, first config, every epilogue."""
    variants = []
    for dtype in (torch.bfloat16,) if quick else _AOT_DTYPES:
        io = TORCH_TO_TRITON_DTYPE[dtype]
        configs = shipped_configs(dtype)
        for i, config in enumerate(configs[:1] if quick else configs):
            for epilogue in _AOT_EPILOGUES if i == 0 else _AOT_EPILOGUES[:1]:
                per_channel, has_gate, has_bias, batched = epilogue
                mixed = any(epilogue)
                alpha_io = "fp32" if mixed else io
                pointers = {"X": io, "A": io, "W": io, "BIAS": io, "ALPHA": alpha_io, "GATE": "fp32",
                            "Y": alpha_io if mixed else io}
                constexprs = dict(HAS_BIAS=has_bias, ALPHA_PER_CHANNEL=per_channel, HAS_GATE=has_gate,
                                  BATCHED=batched, GROUP=GROUP_M, DOT_PRECISION=dot_precision(dtype),
                                  **config.kwargs)
                flags = "".join(name for name, on in zip(("+vec", "+gate", "+bias", "+3d"), epilogue) if on)
                variants.append(make_aot_variant(
                    "gated_linear_fwd", _gated_linear_fwd_kernel, pointers=pointers, constexprs=constexprs,
                    config=config, label=f"{io}{'/a32' if mixed else ''}{flags} {config_label(config)}",
                    unaligned=("stride_alpha", "stride_gate")))
    return variants
