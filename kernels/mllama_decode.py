"""Llama 3.2 Vision (mllama) cross-attention for decoding: a few new tokens read the transformers ``Cache`` in place.

Math: transformers' own, exactly. Query head ``h`` of token ``t`` attends to every key of the cached vision K/V
(B, Hkv, K, D) (head ``h // G``) with the additive mask the layer receives, ``s = scale * q k^T + mask[t, key]``,
``o = softmax(s) v``. The mask is read, not decoded, so any mask works (soft biases, masks no processor would
make) and nothing has to be known about its structure on the host: no host synchronisation, CUDA-graph capturable.

Skipping padded tiles. The keys are cut into *units* of ``unit_len`` keys (one vision tile: 1601 for Llama 3.2;
the launcher uses one unit of all keys when the key count is not a multiple). A unit whose mask entries are all
``<= finfo.min`` for every token of the sample adds nothing to any row's softmax, so it is never read: the caller
passes, per sample, the visited unit indices (``UNITS``, visited first) and their count (``UNIT_COUNT``), computed
on the device from the mask (``fastflamingo.models.mllama.mask.decode_units``). A padded tile of a 1-tile image is 3/4 of
the cache that upstream reads.

Rows that see nothing. Upstream adds ``finfo.min`` and takes an ordinary softmax, so a row whose every key is masked
gets the uniform average of all keys (never produced by transformers' model, which unmasks such rows, but exact
here too): scores are computed in natural-log units, clamped at ``-1e38`` (so ``finfo.min + score`` stays finite
when moved to the log2 domain: a masked key still weighs ``exp2(-1.4e38) = 0`` next to any real key, and all-masked
rows see equal scores) and ``decode_units`` visits every unit of a sample that has such a row.

Layout (flash-decoding): one program owns all ``Tq`` tokens x the ``G`` query heads of one K/V head (``ROWS`` rows
in one MMA tile; K/V is read once per K/V head, never repeated) and one *split* of the visited units. Each split
writes a normalised partial output and its log2 LSE to an fp32 workspace, merged by media_decode's combine kernel;
with one split the kernel writes the output directly. The split count comes from shapes only
(``media_decode.choose_splits``).
"""
from __future__ import annotations

from itertools import product
from typing import List, Optional

import torch
import triton
import triton.language as tl

from ._utils import (ARCHS, INTERPRET, SM80, SM90, TORCH_TO_TRITON_DTYPE, AotVariant, aot_dot_precisions, aot_launch,
                     cdiv, config_label, device_arch, dot_precision, head_block, meta_tensor, named_strides,
                     next_power_of_2, per_arch)
from ._attention import LOG2E as _LOG2E
from ._attention import online_softmax_step, sample_and_head, softmax_lse, softmax_output, softmax_state

# Scores are clamped here (natural-log units) before the exp2 domain: finfo.min + score would overflow to -inf.
_SCORE_FLOOR = tl.constexpr(-1.0e38)


# Not specialized (they change with the step's token count, the batch, the image count and the split count): the
# mask's batch and token strides, the workspace strides, the unit-list stride and the counts.
@triton.jit(do_not_specialize=("stride_mb", "stride_mt", "stride_wbh", "stride_wt", "stride_lbh", "stride_lt",
                               "stride_ub", "num_tokens", "num_keys", "num_splits"))
def _mllama_decode_split_kernel(
    Q, K, V, MASK, O, O_PART, LSE_PART, UNITS, UNIT_COUNT,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
    stride_mb, stride_mt, stride_mk, stride_ob, stride_ot, stride_oh, stride_wbh, stride_wt, stride_ws,
    stride_lbh, stride_lt, stride_ub,
    num_kv_heads, num_tokens, num_keys, unit_len, num_splits, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, DIRECT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: every token x group head of one (sample, K/V head), one split of the sample's visited units.

    ``DIRECT`` (one split): write the normalised output to ``O``. Otherwise write the fp32 partial ``acc / l`` to
    ``O_PART[b*H + h, t, split, :]`` and ``m + log2(l)`` (``-inf`` if no key) to ``LSE_PART[b*H + h, t, split]``.
    """
    pid_split = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, kvh = sample_and_head(pid_bh, num_kv_heads)

    rows = tl.arange(0, ROWS)
    tok = rows // GROUP  # row r = token r // GROUP, query head kvh * GROUP + r % GROUP
    head = rows % GROUP
    cols = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = tok < num_tokens
    d_ok = offs_d < HEAD_DIM
    md_ok = m_ok[:, None] & d_ok[None, :]

    count = tl.load(UNIT_COUNT + b).to(tl.int64)
    unit_first = (pid_split * count // num_splits).to(tl.int32)
    unit_end = ((pid_split + 1) * count // num_splits).to(tl.int32)

    q_offs = tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    b_q = tl.load(Q + b * stride_qb + kvh * GROUP * stride_qh + q_offs, mask=md_ok, other=0.0)  # [ROWS, BLOCK_D]
    kt_offs = offs_d[:, None] + cols[None, :] * stride_kl  # [BLOCK_D, BLOCK_N]
    v_offs = cols[:, None] * stride_vl + offs_d[None, :]
    m_offs = tok[:, None] * stride_mt + cols[None, :] * stride_mk  # [ROWS, BLOCK_N]
    p_k0 = K + b * stride_kb + kvh * stride_kh
    p_v0 = V + b * stride_vb + kvh * stride_vh
    p_m0 = MASK + b * stride_mb

    b_m, b_l, b_acc = softmax_state(ROWS, BLOCK_D)
    # one flat loop over (unit, key tile) pairs: tile t of the split is tile t % tiles_per_unit of unit t // ...
    tiles_per_unit = tl.cdiv(unit_len, BLOCK_N)
    for t in range(unit_first * tiles_per_unit, unit_end * tiles_per_unit):
        unit = tl.load(UNITS + b * stride_ub + t // tiles_per_unit)
        start = (t % tiles_per_unit) * BLOCK_N
        key0 = unit.to(tl.int64) * unit_len + start
        n_ok = cols < tl.minimum(unit_len - start, num_keys - key0)  # the unit's end (the last unit may be short)
        b_kt = tl.load(p_k0 + key0 * stride_kl + kt_offs, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        b_s = tl.dot(b_q, b_kt, input_precision=DOT_PRECISION) * sm_scale  # natural-log units
        if HAS_MASK:
            b_s += tl.load(p_m0 + key0 * stride_mk + m_offs, mask=m_ok[:, None] & n_ok[None, :],
                           other=0.0).to(tl.float32)
            b_s = tl.maximum(b_s, _SCORE_FLOOR)
        b_s2 = tl.where(m_ok[:, None] & n_ok[None, :], b_s * _LOG2E, float("-inf"))
        b_v = tl.load(p_v0 + key0 * stride_vl + v_offs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        b_m, b_l, b_acc = online_softmax_step(b_s2, b_v, b_m, b_l, b_acc, DOT_PRECISION, True)

    b_o = softmax_output(b_l, b_acc, True)  # exactly 0 for rows that saw nothing here
    if DIRECT:
        o_offs = tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
        tl.store(O + b * stride_ob + kvh * GROUP * stride_oh + o_offs, b_o.to(O.dtype.element_ty), mask=md_ok)
    else:
        split = pid_split.to(tl.int64)
        bh = b * (num_kv_heads * GROUP) + kvh * GROUP + head  # the combine kernel's (sample, query head) row
        w_offs = bh[:, None] * stride_wbh + tok[:, None] * stride_wt + offs_d[None, :]
        tl.store(O_PART + split * stride_ws + w_offs, b_o, mask=md_ok)
        b_lse = softmax_lse(b_m, b_l, True, False)  # -inf for rows that saw nothing: they weigh 0 in the combine
        tl.store(LSE_PART + split + bh * stride_lbh + tok * stride_lt, b_lse, mask=m_ok)


# ================================================================================================================
# Launch configuration (shapes only: nothing here reads a tensor value or times anything)
# ================================================================================================================

INTERPRETER_CONFIG = triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=1)

# GPU config per (precision, head tile): (BLOCK_N, num_warps, num_stages[, architectures]), the first row that ships
# on the device's architecture (a row without architectures ships on sm_80 and sm_90). Decode is bandwidth-bound, so
# the key tile is sized for bytes in flight (pipelined K and V tiles) rather than for MMA shape. fp32 has a row per
# dot precision ("ieee": FMA loops with operands in registers; "tf32": tensor cores), which compile differently: at
# head_dim 128 on sm_90 no config is clean both ways under both Triton releases. Every entry compiles for its
# architectures at <= 240 registers without spills at every shape of ``aot_variants`` (with and without a mask,
# direct and split, 1 or 8 draft tokens) under the pinned and the newest Triton: 64-key tiles spilled at head_dim
# 128, as did most fp32 configs.
_GPU_CONFIG_TABLE = {
    ("lowp", 64): [(64, 4, 3)],
    ("lowp", 128): [(32, 4, 3, SM80), (16, 4, 3, SM90)],
    ("ieee", 64): [(32, 8, 1)],
    ("ieee", 128): [(16, 8, 2, SM80), (32, 8, 2, SM90)],
    ("tf32", 64): [(32, 8, 1)],
    ("tf32", 128): [(16, 8, 2, SM80), (16, 8, 1, SM90)],
}
_GPU_CONFIGS = per_arch(_GPU_CONFIG_TABLE, lambda n, w, s: triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s))


def shipped_config(dtype: torch.dtype, head_dim: int, arch: Optional[int] = None,
                   precision: Optional[str] = None) -> triton.Config:
    """The GPU config of the split kernel for this dtype and head size on ``arch`` (default: this device's); fp32
    by dot ``precision`` (default: what a launch uses now, ``dot_precision``)."""
    key = "lowp" if dtype != torch.float32 else (precision or dot_precision(dtype))
    return _GPU_CONFIGS[((key, 64 if head_block(head_dim) <= 64 else 128), arch or device_arch())][0]


def default_config(dtype: torch.dtype, head_dim: int, device: Optional[torch.device] = None) -> triton.Config:
    return INTERPRETER_CONFIG if INTERPRET else shipped_config(dtype, head_dim, device_arch(device))


def rows_for(num_tokens: int, group: int) -> int:
    """Rows of the program's tile: tokens x group heads, padded to a power of two, at least 16 (``tl.dot``)."""
    return max(16, next_power_of_2(num_tokens * group))


# ================================================================================================================
# Ahead-of-time compile variants (python -m fastflamingo.aot)
# ================================================================================================================

# (head_dim, group, tokens): a Llama 3.2 11B / 90B decode step (groups 4 / 8, one token), 11B with 8 draft tokens
# (32 rows), and a 64-wide head without GQA; batch 4, 8 K/V heads, one cached image of 4 tiles x 1601 keys.
_AOT_SHAPES = ((128, 4, 1), (128, 8, 1), (128, 4, 8), (64, 1, 1))
_AOT_BATCH, _AOT_KV_HEADS, _AOT_UNIT, _AOT_UNITS, _AOT_SPLITS = 4, 8, 1601, 4, 8


def _aot_args(dtype: torch.dtype, shape: tuple, splits: int, has_mask: bool, precision: str) -> dict:
    """What ``fastflamingo/ops/mllama_decode.py`` passes: q (B, Tq, H, D) contiguous, the cache's k, v (B, Hkv, K, D),
    the additive mask's last rows (B, Tq, K) (or q in its place), int32 units (B, U), fp32 partials for splits
    (media_decode's padded layout)."""
    head_dim, group, tokens = shape
    batch, kv_heads, keys = _AOT_BATCH, _AOT_KV_HEADS, _AOT_UNIT * _AOT_UNITS
    heads = kv_heads * group
    q = meta_tensor((batch, tokens, heads, head_dim), dtype)
    k = meta_tensor((batch, kv_heads, keys, head_dim), dtype)
    mask = meta_tensor((batch, tokens, keys), dtype) if has_mask else q
    units = meta_tensor((batch, _AOT_UNITS), torch.int32)
    part = meta_tensor((batch * heads, tokens, splits, head_block(head_dim)), torch.float32) if splits > 1 else q
    lse = meta_tensor((batch * heads, tokens, cdiv(splits, 16) * 16), torch.float32) if splits > 1 else q
    args = dict(Q=q, K=k, V=k, MASK=mask, O=q, O_PART=part, LSE_PART=lse, UNITS=units,
                UNIT_COUNT=meta_tensor((batch,), torch.int32), stride_ub=units.stride(0), num_kv_heads=kv_heads,
                num_tokens=tokens, num_keys=keys, unit_len=_AOT_UNIT, num_splits=splits, sm_scale=head_dim ** -0.5,
                GROUP=group, HEAD_DIM=head_dim, BLOCK_D=head_block(head_dim), ROWS=rows_for(tokens, group),
                HAS_MASK=has_mask, DIRECT=splits == 1, DOT_PRECISION=precision,
                stride_mb=0, stride_mt=0, stride_mk=0, stride_wbh=0, stride_wt=0, stride_ws=0, stride_lbh=0, stride_lt=0)
    for names, t in ((("stride_qb", "stride_qt", "stride_qh"), q), (("stride_kb", "stride_kh", "stride_kl"), k),
                     (("stride_vb", "stride_vh", "stride_vl"), k), (("stride_ob", "stride_ot", "stride_oh"), q)):
        args.update(named_strides(names, t))
    if has_mask:
        args.update(named_strides(("stride_mb", "stride_mt", "stride_mk"), mask))
    if splits > 1:
        args.update(named_strides(("stride_wbh", "stride_wt", "stride_ws"), part),
                    **named_strides(("stride_lbh", "stride_lt"), lse))
    return args


def aot_variants(quick: bool = False) -> List[AotVariant]:
    """The split kernel (one split writing the output and several writing partials, with and without a mask) at
    the config each architecture ships for every dtype and shape; the combine kernel is media_decode's (compiled by
    that family). ``quick``: bf16, 11B decode."""
    dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16, torch.float32)
    variants = []
    for dtype, shape, arch in ((d, s, a) for d in dtypes for s in (_AOT_SHAPES[:1] if quick else _AOT_SHAPES)
                               for a in ARCHS):
        io = TORCH_TO_TRITON_DTYPE[dtype]
        for splits, has_mask, precision in product((1, _AOT_SPLITS), (True, False), aot_dot_precisions(dtype)):
            config = shipped_config(dtype, shape[0], arch, precision)
            label = (f"{io}{'/tf32' if precision == 'tf32' and dtype == torch.float32 else ''} d{shape[0]} "
                     f"g{shape[1]} t{shape[2]} {'direct' if splits == 1 else 'split'} "
                     f"{'mask' if has_mask else 'nomask'} {config_label(config)}")
            variants.append(aot_launch("mllama_decode_split", _mllama_decode_split_kernel,
                                       _aot_args(dtype, shape, splits, has_mask, precision), config, label,
                                       archs=(arch,)))
    return variants
