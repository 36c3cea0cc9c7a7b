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

from typing import List, Optional

import torch
import triton
import triton.language as tl

from ._utils import (
    ARCHS,
    INTERPRET,
    TORCH_TO_TRITON_DTYPE,
    AotVariant,
    ConfigChooser,
    aot_launch,
    config_label,
    device_arch,
    dot_precision,
    meta_tensor,
    next_power_of_2,
    per_arch,
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

# GPU candidates (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages[, architectures]) per input precision; a row
# without architectures ships on sm_80 and sm_90. Large tiles for the long GEMMs (M = tokens), narrow-M tiles for
# decode (M = batch). Every entry compiles for its architectures without a register spill, within 240 registers and
# within shared memory under the pinned and the newest Triton (``python -m fastflamingo.aot``). fp32 uses IEEE
# products (see ``dot_precision``), lowered to FMA loops: a correctness path with small tiles.
_GPU_CONFIG_TABLE = {
    "lowp": [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
             (64, 64, 64, 4, 4), (32, 128, 64, 4, 4), (16, 128, 64, 4, 4), (16, 64, 128, 4, 3)],
    "fp32": [(64, 64, 32, 8, 2), (32, 64, 32, 4, 2), (32, 32, 32, 4, 2), (16, 64, 32, 4, 2)],
}
_GPU_CONFIGS = per_arch(_GPU_CONFIG_TABLE, _cfg)


def shipped_configs(dtype: torch.dtype, arch: Optional[int] = None) -> List[triton.Config]:
    """The GPU configs a launch with inputs of ``dtype`` may use on ``arch`` (default: this device's)."""
    return _GPU_CONFIGS[("fp32" if dtype == torch.float32 else "lowp", arch or device_arch())]


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


# The launcher's autotune key, by the names tuned tables use (fastflamingo/configs/).
AUTOTUNE_KEY = ("rows_bucket", "n", "k", "dtype", "x_dtype", "alpha_dtype", "out_dtype", "alpha_per_channel",
                "row_gate", "bias", "batched")
_CANDIDATES = [INTERPRETER_CONFIG] if INTERPRET else []
FWD_CHOOSER = ConfigChooser("gated_linear_fwd", _CANDIDATES, _prune, AUTOTUNE_KEY)


# ================================================================================================================
# Ahead-of-time compile variants (python -m fastflamingo.aot)
# ================================================================================================================

# Representative GEMMs (rows, N, K): OpenFlamingo-9B's attention out-projection over 16 x 4096 tokens (K = 8 x 64),
# IDEFICS-80B's (8192 x 8192 over 8192 rows) and a decode step at batch 1 (a size of 1 specializes as a constant).
_AOT_GEMMS = {"of": (65536, 4096, 512), "idefics": (8192, 8192, 8192), "decode": (1, 4096, 512)}
# (per-channel alpha, row gate, bias, batched rows): OpenFlamingo / flamingo-pytorch, IDEFICS vector + gate, IDEFICS
# float + gate, a Linear with a bias, and rows of a (B, R) view that does not flatten
_AOT_EPILOGUES = ((False, False, False, False), (True, True, False, False), (False, True, False, False),
                  (False, False, True, False), (False, False, False, True))


def _aot_args(dtype: torch.dtype, gemm: str, epilogue: tuple) -> dict:
    """What ``fastflamingo/ops/gated_linear.py`` passes: contiguous x, inp, weight (batched: a (4, R) view of inp
    that does not flatten), alpha in the activation dtype for the OpenFlamingo epilogue and fp32 for the others
    (upstream then promotes the output to fp32), a boolean row gate as uint8."""
    rows, n, k = _AOT_GEMMS[gemm]
    per_channel, has_gate, has_bias, batched = epilogue
    alpha_dtype = torch.float32 if any(epilogue) else dtype
    x, y = meta_tensor((rows, n), dtype), meta_tensor((rows, n), alpha_dtype)
    a = meta_tensor((4, rows // 4 + 16, k), dtype)[:, : rows // 4] if batched else meta_tensor((rows, k), dtype)
    weight, alpha = meta_tensor((n, k), dtype), meta_tensor((n if per_channel else 1,), alpha_dtype)
    gate = meta_tensor((rows,), torch.uint8) if has_gate else x
    per_batch = rows // 4 if batched else rows
    return dict(X=x, A=a, W=weight, BIAS=meta_tensor((n,), dtype) if has_bias else weight, ALPHA=alpha, GATE=gate,
                Y=y, stride_xb=per_batch * n if batched else 0, stride_xt=n,
                stride_ab=a.stride(0) if batched else 0, stride_at=a.stride(-2), stride_wn=k,
                stride_yb=per_batch * n if batched else 0, stride_yt=n, stride_alpha=alpha.stride(0),
                stride_gate=1 if has_gate else 0, M=rows, N=n, K=k, rows_per_batch=per_batch,
                HAS_BIAS=has_bias, ALPHA_PER_CHANNEL=per_channel, HAS_GATE=has_gate, BATCHED=batched,
                GROUP=GROUP_M, DOT_PRECISION=dot_precision(dtype))


def aot_variants(quick: bool = False) -> List[AotVariant]:
    """Every config each architecture ships with the OpenFlamingo epilogue at OpenFlamingo's GEMM, the first config
    with every other epilogue at IDEFICS' GEMM, the narrowest-M configs (decode's) at one row, per dtype (fp16: the
    first config, its code is bf16's with another element type). ``quick``: bf16, first config, every epilogue."""
    plans = [(torch.bfloat16, True)] if quick else [(torch.bfloat16, False), (torch.float16, True),
                                                    (torch.float32, False)]
    variants = []
    for dtype, first_only in plans:
        io = TORCH_TO_TRITON_DTYPE[dtype]
        for arch in ARCHS:
            configs = shipped_configs(dtype, arch)
            narrowest = min(c.kwargs["BLOCK_M"] for c in configs)  # what the pruner keeps for decode's one row
            for i, config in enumerate(configs[:1] if first_only else configs):
                launches = [("of", _AOT_EPILOGUES[0])] + [("idefics", e) for e in _AOT_EPILOGUES[1:] if i == 0]
                if config.kwargs["BLOCK_M"] == narrowest:
                    launches.append(("decode", _AOT_EPILOGUES[0]))
                for gemm, epilogue in launches:
                    flags = "".join(name for name, on in zip(("+vec", "+gate", "+bias", "+3d"), epilogue) if on)
                    label = f"{io}{'/a32' if any(epilogue) else ''}{flags} {gemm} {config_label(config)}"
                    variants.append(aot_launch("gated_linear_fwd", _gated_linear_fwd_kernel,
                                               _aot_args(dtype, gemm, epilogue), config, label, archs=(arch,)))
    return variants
