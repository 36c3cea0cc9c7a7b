"""Tanh-gated linear: the gated residual of Flamingo-style blocks fused into the matmul that produces the branch
(OpenFlamingo ``to_out`` / ``ff[3]``, IDEFICS ``o_proj`` / ``down_proj``).

Math, for rows ``a`` of ``inp`` (M, K) and ``weight`` (N, K)::

    h = a @ weight^T (+ bias)                     fp32 accumulation
    y = x + tanh(alpha) * h       where row_gate != 0
    y = x                         where row_gate == 0   (select, not multiply: NaN/inf in h never leak)

``alpha`` is one value (OpenFlamingo, flamingo-pytorch, IDEFICS "float") or one per output channel (IDEFICS
"vector"); ``tanh(alpha)`` is computed in the epilogue (fp32, rounded to alpha's dtype like upstream's
``alpha.tanh()``).

Three forms, one picked per shape by :func:`choose_form` (a small table; tuned tables may override it):

* ``fused``: one kernel; each program computes one (BLOCK_M, BLOCK_N) output tile with a K loop of ``tl.dot``,
  then the epilogue reads the matching tile of ``x`` and writes ``y``. ``h`` never reaches memory: with
  OpenFlamingo's K=512 the GEMM is near the roofline ridge, so that traffic is most of the cost.
* ``splitk`` (a few rows: decode): the same kernel with ``PARTIAL`` over K slices on grid axis 1, writing fp32
  partial products to a workspace, then the epilogue kernel adds the slices in a fixed order (deterministic) and
  applies the gate. A decode step's output tiles alone leave most SMs idle while the layer's largest weights
  stream through; the K slices put every SM to work.
* ``cublas``: ``h`` from cuBLAS (``torch.mm``, in the input dtype, as upstream's ``F.linear``), then the epilogue
  kernel. For long reductions (IDEFICS' K = 4096..22016) a cp.async Triton GEMM without TMA reaches well below
  cuBLAS, which costs more than the round trip of ``h`` that fusing saves.

Rows: the leading dims of ``x``, ``inp`` and ``y`` are flattened to M rows addressed as
``(row // rows_per_batch) * stride_b + (row % rows_per_batch) * stride_t``, so any 3-D view (a slice of a fused
projection, a transposed batch) is read in place; only unit stride along the feature dim is assumed. Row offsets
are int64. The launcher and the backward pass are in ``fastflamingo/ops/gated_linear.py`` (the backward runs on
cuBLAS GEMMs; see there why).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._utils import (
    INTERPRET,
    TORCH_TO_TRITON_DTYPE,
    AotVariant,
    ConfigChooser,
    aot_dot_precisions,
    cdiv,
    config_label,
    make_aot_variant,
    next_power_of_2,
    size_class,
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
def _row_address(rows, rows_per_batch, BATCHED: tl.constexpr):
    """(batch, within) int64 row coordinates: rows of a (B, R) view that does not flatten split the row index (an
    int32 division, cheap); rows of a flat (M, D) view use one row stride."""
    rows64 = rows.to(tl.int64)
    if BATCHED:
        return (rows // rows_per_batch).to(tl.int64), (rows % rows_per_batch).to(tl.int64)
    return tl.zeros_like(rows64), rows64


@triton.jit
def _gate_epilogue(acc, rows, cols, m_ok, n_ok, batch, within, X, BIAS, ALPHA, GATE, Y,
                   stride_xb, stride_xt, stride_yb, stride_yt, stride_alpha, stride_gate,
                   HAS_BIAS: tl.constexpr, ALPHA_PER_CHANNEL: tl.constexpr, HAS_GATE: tl.constexpr):
    """``y = x + tanh(alpha) * rowgate(acc + bias)`` for one (rows, cols) tile of the fp32 product ``acc``; all in
    fp32 (elementwise math never runs in bf16: the interpreter gets it wrong)."""
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
        keep = tl.load(GATE + rows.to(tl.int64) * stride_gate, mask=m_ok, other=0).to(tl.float32) != 0.0
        branch = tl.where(keep[:, None], branch, 0.0)  # masked_fill: a NaN/inf branch row never reaches y
    mn_ok = m_ok[:, None] & n_ok[None, :]
    p_x = X + (batch * stride_xb + within * stride_xt)[:, None] + cols[None, :]
    b_x = tl.load(p_x, mask=mn_ok, other=0.0).to(tl.float32)
    p_y = Y + (batch * stride_yb + within * stride_yt)[:, None] + cols[None, :]
    tl.store(p_y, (b_x + branch).to(Y.dtype.element_ty), mask=mn_ok)


# M and rows_per_batch change with the prompt and the batch (they only feed masks and the row split): not
# specialized, so a new prompt length compiles nothing (docs/steady_state.md, "Specializations").
@triton.jit(do_not_specialize=("M", "rows_per_batch"))
def _gated_linear_fwd_kernel(
    X, A, W, BIAS, ALPHA, GATE, Y,
    stride_xb, stride_xt,
    stride_ab, stride_at,
    stride_wn,
    stride_yb, stride_yt,
    stride_alpha, stride_gate,
    M, N, K, rows_per_batch, k_split,
    HAS_BIAS: tl.constexpr, ALPHA_PER_CHANNEL: tl.constexpr, HAS_GATE: tl.constexpr, BATCHED: tl.constexpr,
    PARTIAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program: one (BLOCK_M, BLOCK_N) tile of y, over the K slice ``[pid_k * k_split, (pid_k + 1) * k_split)``
    (grid axis 1; one slice covering K unless split).

    ``PARTIAL`` (split-K): store the fp32 product of this slice to ``Y``, a [split, M, N] workspace addressed
    ``split * stride_yb + row * stride_yt`` (batch and epilogue arguments unused); the epilogue kernel sums the
    slices in a fixed order. Otherwise apply the gate epilogue and store y.
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
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
    batch, within = _row_address(rows, rows_per_batch, BATCHED)
    if PARTIAL:  # k_split is a multiple of BLOCK_K (launcher): the K offsets keep their alignment
        k_start = tl.multiple_of(pid_k * k_split, BLOCK_K)
        k_end = tl.minimum(k_start + k_split, K)
    else:
        k_start = 0
        k_end = K

    a_ptrs = A + (batch * stride_ab + within * stride_at)[:, None] + (k_start + offs_k)[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = W + cols.to(tl.int64)[None, :] * stride_wn + (k_start + offs_k)[:, None]  # [BLOCK_K, BLOCK_N]: W^T
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_ok = k0 + offs_k < k_end
        b_a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b_w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(b_a, b_w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if PARTIAL:
        p_w = Y + pid_k.to(tl.int64) * stride_yb + rows.to(tl.int64)[:, None] * stride_yt + cols[None, :]
        tl.store(p_w, acc, mask=m_ok[:, None] & n_ok[None, :])
    else:
        _gate_epilogue(acc, rows, cols, m_ok, n_ok, batch, within, X, BIAS, ALPHA, GATE, Y,
                       stride_xb, stride_xt, stride_yb, stride_yt, stride_alpha, stride_gate,
                       HAS_BIAS, ALPHA_PER_CHANNEL, HAS_GATE)


@triton.jit(do_not_specialize=("M", "rows_per_batch"))
def _gated_linear_epilogue_kernel(
    H, X, BIAS, ALPHA, GATE, Y,
    stride_hs, stride_ht,
    stride_xb, stride_xt,
    stride_yb, stride_yt,
    stride_alpha, stride_gate,
    M, N, rows_per_batch, num_slices,
    HAS_BIAS: tl.constexpr, ALPHA_PER_CHANNEL: tl.constexpr, HAS_GATE: tl.constexpr, BATCHED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The gate epilogue on a product computed elsewhere: ``h`` = the sum of ``num_slices`` (M, N) slices of ``H``
    (fp32 split-K partials, added in slice order: deterministic; or one slice, cuBLAS's product in the input
    dtype). One program: one (BLOCK_M, BLOCK_N) tile of y."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rows < M
    n_ok = cols < N
    mn_ok = m_ok[:, None] & n_ok[None, :]
    p_h = H + rows.to(tl.int64)[:, None] * stride_ht + cols[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for _ in range(0, num_slices):
        acc += tl.load(p_h, mask=mn_ok, other=0.0).to(tl.float32)
        p_h += stride_hs
    batch, within = _row_address(rows, rows_per_batch, BATCHED)
    _gate_epilogue(acc, rows, cols, m_ok, n_ok, batch, within, X, BIAS, ALPHA, GATE, Y,
                   stride_xb, stride_xt, stride_yb, stride_yt, stride_alpha, stride_gate,
                   HAS_BIAS, ALPHA_PER_CHANNEL, HAS_GATE)


# ================================================================================================================
# Launch configurations
# ================================================================================================================


def _cfg(block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=num_warps,
                         num_stages=num_stages)


# Under the interpreter one config, and a big one: the interpreter's cost is per tile, not per FLOP.
INTERPRETER_CONFIG = _cfg(64, 64, 64, 4, 1)

# GPU candidates of the fused form (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per input precision. Large
# tiles for the long GEMMs (M = tokens), narrow-M tiles for short ones. Every entry compiles for sm_80 and sm_90
# without a register spill and within shared memory (``python -m fastflamingo.aot``); configs that spilled there
# were dropped. fp32 with IEEE products (``dot_precision``) is lowered to FMA loops: small tiles.
_GPU_CONFIG_TABLE = {
    "lowp": [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
             (64, 64, 64, 4, 4), (32, 128, 64, 4, 4), (16, 128, 64, 4, 4), (16, 64, 128, 4, 3)],
    "fp32": [(64, 64, 32, 8, 2), (32, 64, 32, 4, 2), (32, 32, 32, 4, 2), (16, 64, 32, 4, 2)],
}
_GPU_CONFIGS = {key: [_cfg(*c) for c in table] for key, table in _GPU_CONFIG_TABLE.items()}

# Fixed configs of the decode forms (never timed: a decode step must not autotune, and CUDA-graph capture cannot
# time anything). Split-K partials: 16-row tiles (a decode step has a few rows), 64 output columns and 128-deep K
# blocks (bandwidth-bound: bytes in flight per program) over 8 warps: 160 registers on sm_80/sm_90, where 4 warps
# need 255 and spill on sm_80 (python -m fastflamingo.aot; fp32 likewise needs 8 warps). The epilogue is elementwise: 16 rows for decode, 64 for
# prefill.
_SPLITK_CONFIGS = {"lowp": _cfg(16, 64, 128, 8, 3), "fp32": _cfg(16, 64, 32, 8, 2)}
_INTERPRETER_SPLITK_CONFIG = _cfg(16, 64, 64, 4, 1)
EPILOGUE_CONFIGS = (triton.Config({"BLOCK_M": 16, "BLOCK_N": 128}, num_warps=4, num_stages=1),
                    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8, num_stages=1))
_INTERPRETER_EPILOGUE_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)
# Split-K: aim at SPLIT_WAVES programs per SM, give every slice at least MIN_K_BLOCKS_PER_SPLIT K blocks, and
# keep the fp32 workspace to MAX_SPLITS slices.
SPLIT_WAVES = 2
MIN_K_BLOCKS_PER_SPLIT = 4
MAX_SPLITS = 16


def _precision(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "lowp"


def shipped_configs(dtype: torch.dtype) -> List[triton.Config]:
    """The GPU configs a fused launch with inputs of ``dtype`` may use (what ``fastflamingo.aot`` compiles)."""
    return _GPU_CONFIGS[_precision(dtype)]


def splitk_config(dtype: torch.dtype) -> triton.Config:
    return _INTERPRETER_SPLITK_CONFIG if INTERPRET else _SPLITK_CONFIGS[_precision(dtype)]


def epilogue_config(rows: int) -> triton.Config:
    if INTERPRET:
        return _INTERPRETER_EPILOGUE_CONFIG
    return EPILOGUE_CONFIGS[0] if rows <= EPILOGUE_CONFIGS[0].kwargs["BLOCK_M"] else EPILOGUE_CONFIGS[1]


def split_k(rows: int, n: int, k: int, config: triton.Config, sms: int) -> Tuple[int, int]:
    """(number of K slices, K per slice, a multiple of BLOCK_K) for a split-K launch, from shapes only."""
    block_k = config.kwargs["BLOCK_K"]
    tiles = cdiv(rows, config.kwargs["BLOCK_M"]) * cdiv(n, config.kwargs["BLOCK_N"])
    k_blocks = cdiv(max(k, 1), block_k)
    splits = max(1, min(cdiv(SPLIT_WAVES * sms, tiles), cdiv(k_blocks, MIN_K_BLOCKS_PER_SPLIT), MAX_SPLITS))
    k_split = cdiv(k_blocks, splits) * block_k
    return cdiv(max(k, 1), k_split), k_split


# ----------------------------------------------------------------------------------------------------------------
# Which form serves a shape
# ----------------------------------------------------------------------------------------------------------------

FORMS = ("fused", "splitk", "cublas")

# (largest M or None, smallest K, form): the first row with M <= largest and K >= smallest decides. Defaults from
# the roofline argument of docs/steady_state.md ("Gated projection forms"), not yet from a GPU measurement:
# - decode (a few rows) with a long reduction: split-K, unless the output tiles alone already fill the GPU;
# - decode with a short reduction: cuBLAS (its GEMV is tuned for exactly this) + the epilogue;
# - prefill with a long reduction (IDEFICS): cuBLAS + the epilogue (see the module docstring);
# - prefill with a short reduction (OpenFlamingo's 512): the fused GEMM, which saves the round trip of h.
FORM_TABLE: Tuple[Tuple[Optional[int], int, str], ...] = (
    (16, 2048, "splitk"),
    (16, 0, "cublas"),
    (None, 4096, "cublas"),
    (None, 0, "fused"),
)
# Tuned overrides, (rows bucket, N, K, dtype) -> form: filled from the GPU's tuned table (fastflamingo/configs,
# issue 9) when one exists; checked before FORM_TABLE. ``FASTFLAMINGO_GATED_LINEAR_FORM`` forces one form.
FORM_OVERRIDES: Dict[Tuple[int, int, int, torch.dtype], str] = {}


def choose_form(rows: int, n: int, k: int, dtype: torch.dtype, sms: int) -> str:
    """The form of the gated projection for an (M, K) x (K, N) product, from shapes only (no timing, no tensor
    read): tuned overrides, then :data:`FORM_TABLE`."""
    override = FORM_OVERRIDES.get((row_bucket(rows), n, k, dtype))
    if override is not None:
        return override
    for max_rows, min_k, form in FORM_TABLE:
        if (max_rows is None or rows <= max_rows) and k >= min_k:
            if form == "splitk" and cdiv(n, splitk_config(dtype).kwargs["BLOCK_N"]) >= sms:
                continue  # the output tiles alone fill the GPU: nothing to gain from slicing K
            return form
    return "fused"


def row_bucket(rows: int) -> int:
    """Autotune-key bucket of the row count: a handful of classes, so a new prompt length or batch size does not
    time the candidates again."""
    return size_class(rows, (16, 128, 1024, 8192))


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
_EPILOGUE_FLAGS = ("+vec", "+gate", "+bias", "+3d")


def _epilogue_args(io: str, epilogue: tuple) -> Tuple[Dict[str, str], Dict[str, bool], str]:
    """Pointer types, constexprs and label of an epilogue: the OpenFlamingo one with alpha and x in the activation
    dtype, the others with an fp32 alpha (fp32 output: upstream's promotion of bf16 activations with an fp32
    gate)."""
    per_channel, has_gate, has_bias, batched = epilogue
    mixed = any(epilogue)
    alpha_io = "fp32" if mixed else io
    pointers = {"X": io, "BIAS": io, "ALPHA": alpha_io, "GATE": "fp32", "Y": alpha_io if mixed else io}
    constexprs = dict(HAS_BIAS=has_bias, ALPHA_PER_CHANNEL=per_channel, HAS_GATE=has_gate, BATCHED=batched)
    flags = "".join(name for name, on in zip(_EPILOGUE_FLAGS, epilogue) if on)
    return pointers, constexprs, f"{io}{'/a32' if mixed else ''}{flags}"


def aot_variants(quick: bool = False) -> List[AotVariant]:
    """Fused: every shipped config per dtype (and fp32 precision) with the OpenFlamingo epilogue, and the first
    config with each other epilogue. Split-K: the partial-product launch at its config. Epilogue kernel: both
    configs on fp32 slices (split-K) and on cuBLAS's product, every epilogue at the first. ``quick``: bf16, first
    configs, every epilogue."""
    variants = []
    for dtype in (torch.bfloat16,) if quick else _AOT_DTYPES:
        io = TORCH_TO_TRITON_DTYPE[dtype]
        for precision in aot_dot_precisions(dtype):
            configs = shipped_configs(dtype)
            tag = "" if precision == "tf32" or dtype != torch.float32 else "/ieee"
            for i, config in enumerate(configs[:1] if quick else configs):
                for epilogue in _AOT_EPILOGUES if i == 0 else _AOT_EPILOGUES[:1]:
                    pointers, flags, label = _epilogue_args(io, epilogue)
                    constexprs = dict(flags, PARTIAL=False, GROUP=GROUP_M, DOT_PRECISION=precision, **config.kwargs)
                    variants.append(make_aot_variant(
                        "gated_linear_fwd", _gated_linear_fwd_kernel, pointers={**pointers, "A": io, "W": io},
                        constexprs=constexprs, config=config, label=f"{label}{tag} {config_label(config)}",
                        unaligned=("stride_alpha", "stride_gate")))
            for batched in (False, True):
                config = _SPLITK_CONFIGS[_precision(dtype)]
                pointers = {"X": io, "A": io, "W": io, "BIAS": io, "ALPHA": io, "GATE": io, "Y": "fp32"}
                constexprs = dict(HAS_BIAS=False, ALPHA_PER_CHANNEL=False, HAS_GATE=False, BATCHED=batched,
                                  PARTIAL=True, GROUP=GROUP_M, DOT_PRECISION=precision, **config.kwargs)
                variants.append(make_aot_variant(
                    "gated_linear_splitk", _gated_linear_fwd_kernel, pointers=pointers, constexprs=constexprs,
                    config=config, label=f"{io}{tag}{'+3d' if batched else ''} partial {config_label(config)}",
                    unaligned=("stride_alpha", "stride_gate"), aligned_ints=("k_split",)))
        for h_io in sorted({io, "fp32"}):
            for i, config in enumerate(EPILOGUE_CONFIGS[:1] if quick else EPILOGUE_CONFIGS):
                for epilogue in _AOT_EPILOGUES if i == 0 else _AOT_EPILOGUES[:1]:
                    pointers, flags, label = _epilogue_args(io, epilogue)
                    variants.append(make_aot_variant(
                        "gated_linear_epilogue", _gated_linear_epilogue_kernel, pointers={**pointers, "H": h_io},
                        constexprs=dict(flags, **config.kwargs), config=config,
                        label=f"{label} h:{h_io} {config_label(config)}", unaligned=("stride_alpha", "stride_gate")))
    return variants
