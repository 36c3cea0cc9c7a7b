"""Tanh-gated linear: the gated residual of Flamingo-style blocks fused into the matmul that produces the branch
(OpenFlamingo ``to_out`` / ``ff[3]``, IDEFICS ``o_proj`` / ``down_proj``).

Math, for rows ``a`` of ``inp`` (M, K) and ``weight`` (N, K)::

    h = a @ weight^T (+ bias)                     fp32 accumulation
    y = x + tanh(alpha) * h       where row_gate != 0
    y = x                         where row_gate == 0   (select, not multiply: NaN/inf in h never leak)

``alpha`` is one value (OpenFlamingo, flamingo-pytorch, IDEFICS "float") or one per output channel (IDEFICS
"vector"); ``tanh(alpha)`` is computed in the epilogue (fp32, rounded to alpha's dtype like upstream's
``alpha.tanh()``).

Three forms, one picked per shape by :func:`choose_form` (a small table; a GPU's tuned table may override it):

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

import warnings
from itertools import product
from typing import Dict, List, Optional, Set, Tuple

import torch
import triton
import triton.language as tl

from ._utils import (
    ARCHS,
    INTERPRET,
    TORCH_TO_TRITON_DTYPE,
    AotVariant,
    ConfigChooser,
    aot_dot_precisions,
    aot_launch,
    cdiv,
    config_label,
    device_arch,
    meta_tensor,
    next_power_of_2,
    per_arch,
    size_class,
)
from ._launch import SPLIT_K, split_count

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


# num_slices: split-K's count changes with the shape (and is 1 for cuBLAS's product): not specialized either
@triton.jit(do_not_specialize=("M", "rows_per_batch", "num_slices"))
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

# GPU candidates of the fused form (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages[, architectures]) per input
# precision; a row without architectures ships on sm_80 and sm_90. Large tiles for the long GEMMs (M = tokens),
# narrow-M tiles for short ones. Every entry compiles for its architectures without a register spill, within 240
# registers and within shared memory under the pinned and the newest Triton (``python -m fastflamingo.aot``). fp32
# with IEEE products (``dot_precision``) is lowered to FMA loops: small tiles.
_GPU_CONFIG_TABLE = {
    "lowp": [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
             (64, 64, 64, 4, 4), (32, 128, 64, 4, 4), (16, 128, 64, 4, 4), (16, 64, 128, 4, 3)],
    "fp32": [(64, 64, 32, 8, 2), (32, 64, 32, 4, 2), (32, 32, 32, 4, 2), (16, 64, 32, 4, 2)],
}
_GPU_CONFIGS = per_arch(_GPU_CONFIG_TABLE, _cfg)

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


def _precision(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "lowp"


def shipped_configs(dtype: torch.dtype, arch: Optional[int] = None) -> List[triton.Config]:
    """The GPU configs a fused launch with inputs of ``dtype`` may use on ``arch`` (default: this device's)."""
    return _GPU_CONFIGS[(_precision(dtype), arch or device_arch())]


def splitk_config(dtype: torch.dtype) -> triton.Config:
    return _INTERPRETER_SPLITK_CONFIG if INTERPRET else _SPLITK_CONFIGS[_precision(dtype)]


def epilogue_config(rows: int) -> triton.Config:
    if INTERPRET:
        return _INTERPRETER_EPILOGUE_CONFIG
    return EPILOGUE_CONFIGS[0] if rows <= EPILOGUE_CONFIGS[0].kwargs["BLOCK_M"] else EPILOGUE_CONFIGS[1]


def split_k(rows: int, n: int, k: int, config: triton.Config, sms: int) -> Tuple[int, int]:
    """(number of K slices, K per slice, a multiple of BLOCK_K) for a split-K launch, by ``_launch``'s rule."""
    block_k = config.kwargs["BLOCK_K"]
    tiles = cdiv(rows, config.kwargs["BLOCK_M"]) * cdiv(n, config.kwargs["BLOCK_N"])
    k_blocks = cdiv(max(k, 1), block_k)
    splits = split_count(tiles, k_blocks, sms, SPLIT_K)
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
# Overrides, (rows bucket, N, K, dtype) -> form, set by code; checked first. Then the tuned table of the GPU
# (fastflamingo/configs/: entries of kernel FORM_TABLE_KERNEL keyed by FORM_KEY, written by ``python -m
# benchmarks.tune`` from timing the three forms), then FORM_TABLE. ``FASTFLAMINGO_GATED_LINEAR_FORM`` (read by the
# launcher) forces one form for every shape.
FORM_OVERRIDES: Dict[Tuple[int, int, int, torch.dtype], str] = {}
FORM_TABLE_KERNEL = "gated_linear_form"
FORM_KEY = ("rows_bucket", "n", "k", "dtype")
# Every (rows bucket, N, K, dtype) a launch asked for in this process: what benchmarks.tune times the forms of.
FORM_KEYS_SEEN: Set[Tuple[int, int, int, torch.dtype]] = set()
_TUNED_FORMS: Dict[tuple, Optional[str]] = {}  # (key, device, table generation) -> form from the table, or None


def tuned_form(key: Tuple[int, int, int, torch.dtype], device: torch.device) -> Optional[str]:
    """The form the tuned table of ``device``'s GPU names for ``key``, or None (no table, no entry). Memoised per
    key and device: the decode path asks once per layer and step, and must not parse JSON keys each time."""
    from .. import configs as tables

    memo = (key, device, tables.generation(), tables.tables_enabled())
    if memo not in _TUNED_FORMS:
        table = tables.table_for(tables.device_identity(device))
        form = table.lookup_form(FORM_TABLE_KERNEL, tables.key_dict(key, FORM_KEY)) if table is not None else None
        if form is not None and form not in FORMS:
            warnings.warn(f"{FORM_TABLE_KERNEL}: the tuned table's form {form!r} for {key} is not one of {FORMS} "
                          f"({table.path}); ignored", UserWarning, stacklevel=3)
            form = None
        _TUNED_FORMS[memo] = form
    return _TUNED_FORMS[memo]


def choose_form(rows: int, n: int, k: int, dtype: torch.dtype, sms: int,
                device: Optional[torch.device] = None) -> str:
    """The form of the gated projection for an (M, K) x (K, N) product, from shapes only (no timing, no tensor
    read): :data:`FORM_OVERRIDES`, the tuned table of ``device``'s GPU (when given), then :data:`FORM_TABLE`."""
    key = (row_bucket(rows), n, k, dtype)
    FORM_KEYS_SEEN.add(key)
    override = FORM_OVERRIDES.get(key)
    if override is None and device is not None:
        override = tuned_form(key, device)
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
    return size_class(rows, ROW_CLASSES)


ROW_CLASSES = (16, 128, 1024, 8192)


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
# IDEFICS-80B's (8192 x 8192 over 8192 rows), a decode step at batch 1 (a size of 1 specializes as a constant) and
# IDEFICS-9B's down-projection at a decode step of batch 4 (split-K's long reduction).
_AOT_GEMMS = {"of": (65536, 4096, 512), "idefics": (8192, 8192, 8192), "decode": (1, 4096, 512),
              "decode_long": (4, 4096, 11008)}
# (per-channel alpha, row gate, bias, batched rows): OpenFlamingo / flamingo-pytorch, IDEFICS vector + gate, IDEFICS
# float + gate, a Linear with a bias, and rows of a (B, R) view that does not flatten
_AOT_EPILOGUES = ((False, False, False, False), (True, True, False, False), (False, True, False, False),
                  (False, False, True, False), (False, False, False, True))
_EPILOGUE_FLAGS = ("+vec", "+gate", "+bias", "+3d")
_AOT_SMS = 132  # H100/H200: the split count of the split-K variants


def _aot_operands(dtype: torch.dtype, gemm: str, epilogue: tuple) -> dict:
    """The epilogue's operands as ``fastflamingo/ops/gated_linear.py`` passes them: contiguous x, inp, weight
    (batched: a (4, R) view of inp that does not flatten), alpha in the activation dtype for the OpenFlamingo
    epilogue and fp32 for the others (upstream then promotes the output to fp32), a boolean row gate as uint8."""
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
                HAS_BIAS=has_bias, ALPHA_PER_CHANNEL=per_channel, HAS_GATE=has_gate, BATCHED=batched)


def _fused_args(dtype: torch.dtype, gemm: str, epilogue: tuple, precision: str) -> dict:
    """A fused launch: the whole K as one slice."""
    args = _aot_operands(dtype, gemm, epilogue)
    return dict(args, k_split=args["K"], PARTIAL=False, GROUP=GROUP_M, DOT_PRECISION=precision)


def _splitk_workspace(dtype: torch.dtype, gemm: str, batched: bool) -> Tuple[torch.Tensor, int]:
    rows, n, k = _AOT_GEMMS[gemm]
    num_slices, k_split = split_k(rows, n, k, _SPLITK_CONFIGS[_precision(dtype)], _AOT_SMS)
    return meta_tensor((num_slices, rows, cdiv(n, 16) * 16), torch.float32), k_split


def _splitk_args(dtype: torch.dtype, gemm: str, batched: bool, precision: str) -> dict:
    """A split-K partial launch: the launcher's fixed placeholders for the unused epilogue operands."""
    args = _aot_operands(dtype, gemm, (False, False, False, batched))
    h, k_split = _splitk_workspace(dtype, gemm, batched)
    return dict(args, BIAS=args["W"], GATE=args["X"], Y=h, stride_xb=0, stride_xt=0, stride_yb=h.stride(0),
                stride_yt=h.stride(1), stride_alpha=0, stride_gate=0, k_split=k_split, PARTIAL=True, GROUP=GROUP_M,
                DOT_PRECISION=precision)


def _epilogue_kernel_args(dtype: torch.dtype, gemm: str, epilogue: tuple, source: str) -> dict:
    """The epilogue kernel on split-K's fp32 slices or on cuBLAS's product (one slice in the input dtype)."""
    args = _aot_operands(dtype, gemm, epilogue)
    rows, n, _ = _AOT_GEMMS[gemm]
    if source == "splitk":
        h = _splitk_workspace(dtype, gemm, epilogue[3])[0]
        slices, slice_stride = h.shape[0], h.stride(0)
    else:
        h, slices, slice_stride = meta_tensor((rows, n), dtype), 1, 0
    keep = ("X", "BIAS", "ALPHA", "GATE", "Y", "stride_xb", "stride_xt", "stride_yb", "stride_yt", "stride_alpha",
            "stride_gate", "M", "N", "rows_per_batch", "HAS_BIAS", "ALPHA_PER_CHANNEL", "HAS_GATE", "BATCHED")
    return dict({name: args[name] for name in keep}, H=h, stride_hs=slice_stride, stride_ht=h.stride(-2),
                num_slices=slices)


def aot_variants(quick: bool = False) -> List[AotVariant]:
    """Per architecture and dot precision, as the launcher passes them (exact specialization). Fused: every shipped
    config with the OpenFlamingo epilogue at OpenFlamingo's GEMM, the first config with every other epilogue at
    IDEFICS' GEMM, the narrowest-M configs at one row (a tuned table may pick the fused form for decode), fp16 at its
    first config only (bf16's code with another element type). Split-K: the partial-product launch at its config, at
    IDEFICS-9B's decode down-projection. Epilogue kernel: both configs on split-K's fp32 slices and on cuBLAS's
    product (decode and prefill rows), every epilogue at the first. ``quick``: bf16, first configs, every
    epilogue."""
    plans = [(torch.bfloat16, True)] if quick else [(torch.bfloat16, False), (torch.float16, True),
                                                    (torch.float32, False)]
    variants = []
    for dtype, first_only in plans:
        io = TORCH_TO_TRITON_DTYPE[dtype]
        for precision in aot_dot_precisions(dtype):
            tag = "" if precision == "tf32" or dtype != torch.float32 else "/ieee"
            for arch in ARCHS:
                configs = shipped_configs(dtype, arch)
                narrowest = min(c.kwargs["BLOCK_M"] for c in configs)  # what the pruner keeps for one row
                for i, config in enumerate(configs[:1] if first_only else configs):
                    launches = [("of", _AOT_EPILOGUES[0])] + [("idefics", e) for e in _AOT_EPILOGUES[1:] if i == 0]
                    if config.kwargs["BLOCK_M"] == narrowest:
                        launches.append(("decode", _AOT_EPILOGUES[0]))
                    for gemm, epilogue in launches:
                        flags = "".join(name for name, on in zip(_EPILOGUE_FLAGS, epilogue) if on)
                        label = f"{io}{'/a32' if any(epilogue) else ''}{flags}{tag} {gemm} {config_label(config)}"
                        variants.append(aot_launch("gated_linear_fwd", _gated_linear_fwd_kernel,
                                                   _fused_args(dtype, gemm, epilogue, precision), config, label,
                                                   archs=(arch,)))
            config = _SPLITK_CONFIGS[_precision(dtype)]
            for batched in (False, True):
                variants.append(aot_launch(
                    "gated_linear_splitk", _gated_linear_fwd_kernel,
                    _splitk_args(dtype, "decode_long", batched, precision), config,
                    f"{io}{tag}{'+3d' if batched else ''} partial {config_label(config)}"))
        for source, gemms in (("splitk", ("decode_long",)), ("cublas", ("decode", "idefics"))):
            for gemm, (i, config) in product(gemms, enumerate(EPILOGUE_CONFIGS[:1] if quick else EPILOGUE_CONFIGS)):
                for epilogue in _AOT_EPILOGUES if i == 0 else _AOT_EPILOGUES[:1]:
                    flags = "".join(name for name, on in zip(_EPILOGUE_FLAGS, epilogue) if on)
                    label = f"{io}{'/a32' if any(epilogue) else ''}{flags} {source} {gemm} {config_label(config)}"
                    variants.append(aot_launch("gated_linear_epilogue", _gated_linear_epilogue_kernel,
                                               _epilogue_kernel_args(dtype, gemm, epilogue, source), config, label))
    return variants
