"""Perceiver-resampler attention (OpenFlamingo / flamingo-pytorch / IDEFICS) forward and backward.

Math. The latent queries ``q`` (N, L, H, D) of one media (N = samples x media) attend, without a mask, to the keys
and values ``[media tokens; latents]``, read from two sources without concatenating them: ``k_media, v_media``
(N, P, H, D) and ``k_latents, v_latents`` (N, L, H, D)::

    o = softmax(scale * q [k_media; k_latents]^T) [v_media; v_latents]

Two constexpr specializations, off by default (the kernels then compile exactly as without them): ``KV_GROUP``,
grouped-query K/V (IDEFICS2: 16 query heads on 4 KV heads), where query head ``h`` reads KV head ``h // KV_GROUP``
in place; and ``KEY_MASK``, a key padding mask over the media tokens (a (N, P) byte tensor, nonzero = visible; the
latents are always visible, so no row is ever empty).

The softmax runs online in the exp2 domain (``scale * log2(e)`` folded into one multiplier), with fp32 statistics
and fp32 ``tl.dot`` accumulation; the natural-log LSE (fp32, (N, H, L)) is saved for the backward pass.

Scheduling. The grid is (N * H, query tiles). With ``BLOCK_M >= L`` (the shipped GPU configs, L <= 128) one
program owns every latent of a (media, head), so each K/V byte is read from memory exactly once, in the forward and
in the backward pass.

Backward: ONE kernel, same grid. A program first computes ``delta = rowsum(o * do)`` for its own query rows (the
usual "preprocess" step, done in the prologue: the program owns all of those rows, so no separate launch and no
round trip through memory is needed), then walks the key tiles of both sources once. For each key tile it has every
query row it needs, so the tile's dK/dV are final after one step and are stored at once (nothing accumulates across
programs), while dQ accumulates in registers and is stored at the end. No atomics: the backward is deterministic.
When L needs several query tiles (L > BLOCK_M), each query tile writes its own fp32 dK/dV partial (a leading tile
axis on the dK/dV buffers) and the launcher sums the partials in a fixed order: still deterministic. With grouped
K/V the query heads of one KV head write separate slots of that axis in the same way (no atomics).

Tensors are passed with explicit strides (views of a fused K/V projection, e.g. ``kv[..., :inner].view(...)`` with
token stride ``2 * H * D``, are fine); only unit stride along head_dim is assumed. Base offsets (media, head, tile
start) are int64; offsets inside a tile are int32 (the launcher checks ``BLOCK * row stride < 2**31``). head_dim is
padded to the next power of two (at least 16: ``tl.dot`` needs K >= 16) with masked loads; IDEFICS' 96 pads to 128.
"""
from __future__ import annotations

from itertools import product
from typing import List, Optional

import torch
import triton
import triton.language as tl

from ._utils import (ARCHS, INTERPRET, LOG2E, SM80, SM90, TORCH_TO_TRITON_DTYPE, AotVariant, ConfigChooser,
                     aot_dot_precisions, aot_launch, cdiv, config_label, device_arch, head_block, length_bucket,
                     meta_tensor, named_strides, per_arch, size_class, table_key)
from ._launch import PERCEIVER_SPLITS, split_count
from ._attention import LN2
from ._attention import LOG2E as _LOG2E
from ._attention import (attend_keys, key_kept, probabilities, row_delta, sample_and_head, score_grads, softmax_lse,
                         softmax_output, softmax_state)


# ================================================================================================================
# Kernels
# ================================================================================================================


@triton.jit
def _key_range(pid_split, num_splits, num_keys, tiles_before, total_tiles, BLOCK_N: tl.constexpr):
    """This split's keys ``[start, stop)`` of one source: split ``s`` owns the key tiles
    ``[s * total // splits, (s + 1) * total // splits)`` of the media tiles followed by the latent tiles, and a
    source whose tiles start at ``tiles_before`` gets the part of that range that falls in it (maybe empty)."""
    first = pid_split * total_tiles // num_splits - tiles_before
    end = (pid_split + 1) * total_tiles // num_splits - tiles_before
    start = tl.maximum(first, 0) * BLOCK_N
    stop = tl.minimum(tl.maximum(end, 0) * BLOCK_N, num_keys)
    return start, tl.maximum(stop, start)


@triton.jit
def _fwd_source(b_q, b_m, b_l, b_acc, p_k, p_v, stride_k, stride_v, start, stop, qk_scale, d_ok,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, p_keep=None,
                KEY_MASK: tl.constexpr = False):
    """Online-softmax update of (running max, running sum, accumulator) with the keys ``[start, stop)`` of one
    source (``p_k`` / ``p_v`` point at key ``start``). Without ``KEY_MASK`` every latent sees every key; with it
    only the keys whose byte at ``p_keep`` + key index is nonzero (``p_keep`` points at the source's key 0)."""
    cols = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kt_offs = offs_d[:, None] + cols[None, :] * stride_k  # [BLOCK_D, BLOCK_N]: K loaded transposed
    v_offs = cols[:, None] * stride_v + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
    b_m, b_l, b_acc = attend_keys(b_q, p_k, p_v, b_m, b_l, b_acc, kt_offs, v_offs, start, stop, start, stop, d_ok,
                                  qk_scale, stride_k, stride_v, BLOCK_N, DOT_PRECISION, "all", False, p_keep, KEY_MASK)
    return b_m, b_l, b_acc


@triton.jit(do_not_specialize=("num_splits",))
def _perceiver_fwd_kernel(
    Q, KM, VM, KL, VL, O, LSE,
    stride_qn, stride_ql, stride_qh, stride_kmn, stride_kmp, stride_kmh, stride_vmn, stride_vmp, stride_vmh,
    stride_kln, stride_kll, stride_klh, stride_vln, stride_vll, stride_vlh,
    stride_os, stride_on, stride_ol, stride_oh, stride_ss, stride_sn, stride_sh,
    num_heads, media_tokens, latents, num_splits, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, KEEP=None, KV_GROUP: tl.constexpr = 1, KEY_MASK: tl.constexpr = False,
):
    """One program: one query tile of one (media, head) and one split (grid axis 2) of the key tiles (media keys,
    then latent keys). With one split O and LSE are the results; with several, each split writes its normalised
    fp32 partial and its LSE (split strides ``stride_os`` / ``stride_ss``) for the launcher's combine.

    ``KV_GROUP`` > 1: grouped-query K/V (strides of the KV heads), query head ``h`` reads KV head
    ``h // KV_GROUP``. ``KEY_MASK``: ``KEEP`` is a contiguous (N, media_tokens) byte mask, nonzero = visible media
    token (the latents are always visible, so a row is never empty, but a split may see no key)."""
    pid_nh = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_split = tl.program_id(2)
    n, h = sample_and_head(pid_nh, num_heads)
    hk = h
    if KV_GROUP > 1:
        hk = h // KV_GROUP
    p_keep = KEEP
    if KEY_MASK:
        p_keep = KEEP + n * media_tokens  # this sample's media tokens
    m0 = pid_m.to(tl.int64) * BLOCK_M

    rows = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = pid_m * BLOCK_M + rows < latents
    d_ok = offs_d < HEAD_DIM
    md_ok = m_ok[:, None] & d_ok[None, :]

    p_q = Q + n * stride_qn + h * stride_qh + m0 * stride_ql
    b_q = tl.load(p_q + rows[:, None] * stride_ql + offs_d[None, :], mask=md_ok, other=0.0)
    b_m, b_l, b_acc = softmax_state(BLOCK_M, BLOCK_D)
    media_tiles = tl.cdiv(media_tokens, BLOCK_N)
    total_tiles = media_tiles + tl.cdiv(latents, BLOCK_N)
    start, stop = _key_range(pid_split, num_splits, media_tokens, 0, total_tiles, BLOCK_N)
    b_m, b_l, b_acc = _fwd_source(
        b_q, b_m, b_l, b_acc,
        KM + n * stride_kmn + hk * stride_kmh + start.to(tl.int64) * stride_kmp,
        VM + n * stride_vmn + hk * stride_vmh + start.to(tl.int64) * stride_vmp, stride_kmp, stride_vmp,
        start, stop, qk_scale, d_ok, BLOCK_N, BLOCK_D, DOT_PRECISION, p_keep, KEY_MASK)
    start, stop = _key_range(pid_split, num_splits, latents, media_tiles, total_tiles, BLOCK_N)
    b_m, b_l, b_acc = _fwd_source(
        b_q, b_m, b_l, b_acc,
        KL + n * stride_kln + hk * stride_klh + start.to(tl.int64) * stride_kll,
        VL + n * stride_vln + hk * stride_vlh + start.to(tl.int64) * stride_vll, stride_kll, stride_vll,
        start, stop, qk_scale, d_ok, BLOCK_N, BLOCK_D, DOT_PRECISION)

    if KEY_MASK:
        # a split whose keys are all hidden media tokens saw nothing: output 0 and LSE -inf, so the launcher's
        # combine weighs it 0 (every row sees the latents, so the combined LSE is finite)
        b_o = softmax_output(b_l, b_acc, True)
        b_lse = softmax_lse(b_m, b_l, True, False) * LN2
    else:
        # every split owns at least one key tile (the launcher keeps splits <= tiles), and every row saw all of its
        # keys (padding rows too, with q = 0), so l >= 1
        b_o = softmax_output(b_l, b_acc, False)
        b_lse = softmax_lse(b_m, b_l, False, True)
    split = pid_split.to(tl.int64)
    p_o = O + split * stride_os + n * stride_on + h * stride_oh + m0 * stride_ol
    tl.store(p_o + rows[:, None] * stride_ol + offs_d[None, :], b_o.to(O.dtype.element_ty), mask=md_ok)
    tl.store(LSE + split * stride_ss + n * stride_sn + h * stride_sh + m0 + rows, b_lse, mask=m_ok)


@triton.jit
def _bwd_source(b_q, b_do, b_lse2, b_delta, b_dq, p_k, p_v, p_dk, p_dv, stride_k, stride_v, stride_dk, stride_dv,
                start, stop, m_ok, d_ok, qk_scale, sm_scale,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, p_keep=None,
                KEY_MASK: tl.constexpr = False):
    """dK/dV of the key tiles ``[start, stop)`` of one source (stored at once: this program holds all of their
    query rows; the pointers point at key ``start``) and the dQ contribution of those keys (returned, unscaled):
    ``dv = p^T do``, ``dk = scale * ds^T q``, ``dq += ds k`` with ``ds = p * (do v^T - delta)``.

    Scores are [queries, keys], so the loop-invariant q and dO are the row-distributed operand of the score
    products; only dK/dV need them as the column operand. ``KEY_MASK``: as in :func:`_fwd_source`; a hidden key
    has p = 0, so its dK/dV are stored as exact zeros.
    """
    cols = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kt_offs = offs_d[:, None] + cols[None, :] * stride_k  # [BLOCK_D, BLOCK_N]
    vt_offs = offs_d[:, None] + cols[None, :] * stride_v
    dk_offs = cols[:, None] * stride_dk + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
    dv_offs = cols[:, None] * stride_dv + offs_d[None, :]
    for start_n in range(start, stop, BLOCK_N):
        n_ok = start_n + cols < stop
        dn_ok = d_ok[:, None] & n_ok[None, :]
        b_kt = tl.load(p_k + kt_offs, mask=dn_ok, other=0.0)
        b_vt = tl.load(p_v + vt_offs, mask=dn_ok, other=0.0)
        b_s = tl.dot(b_q, b_kt, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        if KEY_MASK:
            b_p = probabilities(b_s, b_lse2, m_ok[:, None] & key_kept(p_keep, start_n + cols, n_ok)[None, :])
        else:
            b_p = probabilities(b_s, b_lse2, m_ok[:, None] & n_ok[None, :])
        b_dv = tl.dot(tl.trans(b_p.to(b_do.dtype)), b_do, input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_D]
        b_ds = score_grads(b_p, b_do, b_vt, b_delta, DOT_PRECISION).to(b_q.dtype)
        b_dq += tl.dot(b_ds, tl.trans(b_kt), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_D]
        b_dk = tl.dot(tl.trans(b_ds), b_q, input_precision=DOT_PRECISION) * sm_scale
        tl.store(p_dk + dk_offs, b_dk.to(p_dk.dtype.element_ty), mask=tl.trans(dn_ok))
        tl.store(p_dv + dv_offs, b_dv.to(p_dv.dtype.element_ty), mask=tl.trans(dn_ok))
        p_k += BLOCK_N * stride_k
        p_v += BLOCK_N * stride_v
        p_dk += BLOCK_N * stride_dk
        p_dv += BLOCK_N * stride_dv
    return b_dq


@triton.jit(do_not_specialize=("num_splits",))
def _perceiver_bwd_kernel(
    Q, KM, VM, KL, VL, O, DO, LSE, DQ, DKM, DVM, DKL, DVL,
    stride_qn, stride_ql, stride_qh, stride_kmn, stride_kmp, stride_kmh, stride_vmn, stride_vmp, stride_vmh,
    stride_kln, stride_kll, stride_klh, stride_vln, stride_vll, stride_vlh, stride_on, stride_ol, stride_oh,
    stride_gn, stride_gl, stride_gh, stride_sn, stride_sh, stride_dqs, stride_dqn, stride_dql, stride_dqh,
    stride_dkmt, stride_dkmn, stride_dkmp, stride_dkmh, stride_dvmt, stride_dvmn, stride_dvmp, stride_dvmh,
    stride_dklt, stride_dkln, stride_dkll, stride_dklh, stride_dvlt, stride_dvln, stride_dvll, stride_dvlh,
    num_heads, media_tokens, latents, num_splits, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, KEEP=None, KV_GROUP: tl.constexpr = 1, KEY_MASK: tl.constexpr = False,
):
    """One program: one query tile of one (media, head) and one split (grid axis 2) of the key tiles. dK/dV of
    those keys go to tile ``pid_m`` of the dK/dV buffers (their ``stride_*t``; with one query tile that is the
    gradient itself): final, since no other program touches those keys for this query tile. dQ goes to split
    ``pid_split`` of DQ (``stride_dqs``): the gradient itself with one split, fp32 partials summed by the launcher
    in split order otherwise.

    ``KV_GROUP`` > 1 (grouped-query K/V: query head ``h`` reads KV head ``h // KV_GROUP``): the dK/dV of a KV head
    sum over its query heads, so each query head writes its own slot ``pid_m * KV_GROUP + h % KV_GROUP`` of the
    fp32 partial buffers (the tile axis), which the launcher sums in a fixed order: deterministic, no atomics.
    ``KEY_MASK``, ``KEEP``: as in the forward kernel."""
    pid_nh = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_split = tl.program_id(2)
    n, h = sample_and_head(pid_nh, num_heads)
    t = pid_m.to(tl.int64)
    m0 = t * BLOCK_M
    hk = h
    slot = t
    if KV_GROUP > 1:
        hk = h // KV_GROUP
        slot = t * KV_GROUP + h % KV_GROUP
    p_keep = KEEP
    if KEY_MASK:
        p_keep = KEEP + n * media_tokens  # this sample's media tokens

    rows = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = pid_m * BLOCK_M + rows < latents
    d_ok = offs_d < HEAD_DIM
    md_ok = m_ok[:, None] & d_ok[None, :]

    p_q = Q + n * stride_qn + h * stride_qh + m0 * stride_ql
    p_o = O + n * stride_on + h * stride_oh + m0 * stride_ol
    p_do = DO + n * stride_gn + h * stride_gh + m0 * stride_gl
    b_q = tl.load(p_q + rows[:, None] * stride_ql + offs_d[None, :], mask=md_ok, other=0.0)
    b_do = tl.load(p_do + rows[:, None] * stride_gl + offs_d[None, :], mask=md_ok, other=0.0)
    b_o = tl.load(p_o + rows[:, None] * stride_ol + offs_d[None, :], mask=md_ok, other=0.0)
    b_delta = row_delta(b_o, b_do)  # this program owns all of its rows' keys: no pre-pass
    b_lse2 = tl.load(LSE + n * stride_sn + h * stride_sh + m0 + rows, mask=m_ok, other=0.0) * _LOG2E

    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    media_tiles = tl.cdiv(media_tokens, BLOCK_N)
    total_tiles = media_tiles + tl.cdiv(latents, BLOCK_N)
    start, stop = _key_range(pid_split, num_splits, media_tokens, 0, total_tiles, BLOCK_N)
    first = start.to(tl.int64)
    b_dq = _bwd_source(
        b_q, b_do, b_lse2, b_delta, b_dq,
        KM + n * stride_kmn + hk * stride_kmh + first * stride_kmp,
        VM + n * stride_vmn + hk * stride_vmh + first * stride_vmp,
        DKM + slot * stride_dkmt + n * stride_dkmn + hk * stride_dkmh + first * stride_dkmp,
        DVM + slot * stride_dvmt + n * stride_dvmn + hk * stride_dvmh + first * stride_dvmp,
        stride_kmp, stride_vmp, stride_dkmp, stride_dvmp,
        start, stop, m_ok, d_ok, qk_scale, sm_scale, BLOCK_N, BLOCK_D, DOT_PRECISION, p_keep, KEY_MASK)
    start, stop = _key_range(pid_split, num_splits, latents, media_tiles, total_tiles, BLOCK_N)
    first = start.to(tl.int64)
    b_dq = _bwd_source(
        b_q, b_do, b_lse2, b_delta, b_dq,
        KL + n * stride_kln + hk * stride_klh + first * stride_kll,
        VL + n * stride_vln + hk * stride_vlh + first * stride_vll,
        DKL + slot * stride_dklt + n * stride_dkln + hk * stride_dklh + first * stride_dkll,
        DVL + slot * stride_dvlt + n * stride_dvln + hk * stride_dvlh + first * stride_dvll,
        stride_kll, stride_vll, stride_dkll, stride_dvll,
        start, stop, m_ok, d_ok, qk_scale, sm_scale, BLOCK_N, BLOCK_D, DOT_PRECISION)

    p_dq = DQ + pid_split.to(tl.int64) * stride_dqs + n * stride_dqn + h * stride_dqh + m0 * stride_dql
    tl.store(p_dq + rows[:, None] * stride_dql + offs_d[None, :], (b_dq * sm_scale).to(DQ.dtype.element_ty),
             mask=md_ok)


# ================================================================================================================
# Launch configurations
# ================================================================================================================


def _cfg(block_m: int, block_n: int, num_warps: int, num_stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


# Under the interpreter one config, and a big one: the interpreter's cost is per tile, not per FLOP.
INTERPRETER_CONFIG = _cfg(64, 64, 4, 1)

# GPU candidates: (BLOCK_M, BLOCK_N, num_warps, num_stages[, architectures]) per kernel, input precision and head
# tile (BLOCK_D <= 64 or 128); a row without architectures ships on sm_80 and sm_90. BLOCK_M is the query tile: the
# pruner keeps the configs whose BLOCK_M covers all latents (L <= 128), so K/V are read once. Every entry compiles
# for its architectures without a register spill, within 240 registers and within shared memory under the pinned
# and the newest Triton (``python -m fastflamingo.aot``). fp32 uses IEEE products (see ``dot_precision``), lowered
# to FMA loops rather than tensor cores: a correctness path with small tiles.
_GPU_CONFIG_TABLE = {
    ("fwd", "lowp", 64): [(64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3), (128, 32, 8, 3), (32, 64, 4, 3),
                          (16, 64, 4, 3), (64, 128, 8, 3, SM90), (128, 32, 4, 3, SM90)],
    ("fwd", "lowp", 128): [(64, 64, 8, 3), (64, 32, 4, 3, SM90), (128, 32, 8, 3), (32, 64, 4, 3), (16, 64, 4, 3),
                           (64, 64, 4, 3, SM90), (128, 64, 8, 3, SM90)],
    ("bwd", "lowp", 64): [(64, 16, 8, 2), (64, 16, 4, 2), (128, 16, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2),
                          (16, 64, 4, 2), (64, 64, 8, 2, SM90), (64, 32, 4, 2, SM90), (128, 32, 8, 2, SM90)],
    ("bwd", "lowp", 128): [(64, 32, 8, 2), (64, 16, 8, 2), (32, 32, 8, 2), (32, 16, 8, 2), (16, 64, 8, 2),
                           (16, 32, 4, 2), (128, 16, 8, 2, SM90)],
    ("fwd", "fp32", 64): [(16, 64, 4, 2, SM80), (32, 32, 8, 2), (16, 32, 4, 2)],  # 16x64x4w spills with TF32 on sm_90
    ("fwd", "fp32", 128): [(16, 64, 8, 2, SM80), (16, 64, 4, 2, SM90)],
    ("bwd", "fp32", 64): [(16, 32, 8, 2), (32, 32, 8, 1, SM80)],
    ("bwd", "fp32", 128): [(16, 32, 8, 2)],
}
_GPU_CONFIGS = per_arch(_GPU_CONFIG_TABLE, _cfg)

# The grouped-query / key-mask specialization (KV_GROUP > 1 or KEY_MASK) needs more registers than the plain kernels
# (the KV head index, the mask bytes, the backward's per-slot partials), so it ships its own lists where the plain
# ones fail the compile check; other table keys use the plain lists. Left out for head tile 128, Triton 3.6:
# fwd 32x64x4w spills (sm_80 and sm_90; 32x32x4w takes its place), fwd 64x64x4w (sm_90, 255 registers); bwd
# 64x32x8w (sm_90 252; sm_80 245 under Triton 3.9), 16x64x8w (sm_90 250, sm_80 at the 240 limit), 128x16x8w
# (sm_90, 255).
_SPECIALIZED_CONFIG_TABLE = {
    ("fwd", "lowp", 128): [(64, 64, 8, 3), (64, 32, 4, 3, SM90), (128, 32, 8, 3), (32, 32, 4, 3), (16, 64, 4, 3),
                           (128, 64, 8, 3, SM90)],
    ("bwd", "lowp", 128): [(64, 16, 8, 2), (32, 32, 8, 2), (32, 16, 8, 2), (16, 32, 4, 2)],
}
_SPECIALIZED_CONFIGS = per_arch(_SPECIALIZED_CONFIG_TABLE, _cfg)


def shipped_configs(kind: str, dtype: torch.dtype, head_dim: int, arch: Optional[int] = None,
                    specialized: bool = False) -> List[triton.Config]:
    """The GPU configs a launch of ``kind`` ("fwd", "bwd") may use on ``arch`` (default: this device's);
    ``specialized``: for the grouped-query / key-mask kernels (``KV_GROUP`` > 1 or ``KEY_MASK``)."""
    index = ((kind, *table_key(dtype, head_dim)), arch or device_arch())
    if specialized and index in _SPECIALIZED_CONFIGS:
        return _SPECIALIZED_CONFIGS[index]
    return _GPU_CONFIGS[index]


def is_specialized(key: tuple) -> bool:
    """Whether an autotune key launches the grouped-query / key-mask specialization."""
    return len(key) > 5 and (key[5] > 1 or bool(key[6]))


# The autotune key, by the names tuned tables use (fastflamingo/configs/).
AUTOTUNE_KEY = ("head_dim", "dtype", "latents", "media_bucket", "rows_bucket", "kv_group", "key_mask")


def autotune_key(q: torch.Tensor, media_tokens: int, kv_group: int = 1, key_mask: bool = False) -> tuple:
    """head_dim, dtype, latents (exact: it decides the query tile), bucketed media length (fixed per model), the
    class of (media x heads), which changes with the batch and the image count: up to 128, up to 1024, more; and
    the kernel's specialization (query heads per KV head, key mask), which compiles to other code."""
    return (q.shape[-1], q.dtype, q.shape[1], length_bucket(media_tokens),
            size_class(q.shape[0] * q.shape[2], ROW_CLASSES), kv_group, bool(key_mask))


ROW_CLASSES = (128, 1024)  # classes of (media x heads) in the autotune key


def gpu_candidates(kind: str, key: tuple) -> List[triton.Config]:
    """The shipped GPU configs worth timing for an autotune key: the smallest BLOCK_M that covers all latents
    (one query tile per (media, head) reads every K/V byte once), or the largest BLOCK_M when none does."""
    head_dim, dtype, latents = key[:3]
    shipped = shipped_configs(kind, dtype, head_dim, specialized=is_specialized(key))
    largest = max(c.kwargs["BLOCK_M"] for c in shipped)
    wanted = min(largest, max(16, triton.next_power_of_2(max(latents, 1))))
    return [c for c in shipped if c.kwargs["BLOCK_M"] == wanted] or shipped


def key_splits(programs: int, media_tokens: int, latents: int, block_n: int, sms: int) -> int:
    """Key splits (grid axis 2) of a launch with ``programs`` programs per split (a few images at batch 1), by
    ``_launch``'s rule; never more than the key tiles (every split owns at least one tile). The forward's normalised
    partials are merged with their LSEs and the backward's dQ partials summed, both in split order by the launcher
    (deterministic two-pass reductions); dK/dV need no reduction (each key tile belongs to one split)."""
    return split_count(programs, cdiv(media_tokens, block_n) + cdiv(latents, block_n), sms, PERCEIVER_SPLITS)


def _pruner(kind: str):
    def prune(configs: List[triton.Config], key: tuple) -> List[triton.Config]:
        return configs if INTERPRET else gpu_candidates(kind, key)

    return prune


# The candidate list is chosen at import: the interpreter has one config; on the GPU the pruner picks the shipped
# list for the key's dtype and head_dim (the chooser's own list is then unused).
_CANDIDATES = [INTERPRETER_CONFIG] if INTERPRET else []
FWD_CHOOSER = ConfigChooser("perceiver_fwd", _CANDIDATES, _pruner("fwd"), AUTOTUNE_KEY)
BWD_CHOOSER = ConfigChooser("perceiver_bwd", _CANDIDATES, _pruner("bwd"), AUTOTUNE_KEY)


# ================================================================================================================
# Ahead-of-time compile variants (python -m fastflamingo.aot)
# ================================================================================================================

# Representative launches (head_dim, heads, media tokens): OpenFlamingo-9B (8 x 64, 256 patches) and IDEFICS (16 x 96
# padded to 128, 257 patches), 16 samples x 33 media, 64 latents; K/V views of fused projections (token stride 2HD).
_AOT_SHAPES = ((64, 8, 256), (96, 16, 257))
_AOT_MEDIA, _AOT_LATENTS = 16 * 33, 64


def _aot_args(kind: str, dtype: torch.dtype, shape: tuple, precision: str, partial: bool = False,
              split: bool = False, kv_heads: Optional[int] = None, key_mask: bool = False) -> dict:
    """What ``fastflamingo/ops/perceiver_attn.py`` passes to the ``kind`` ("fwd", "bwd") kernel. ``split``: three
    key splits writing fp32 partials (the forward's O and LSE, the backward's dQ), else the results themselves with
    a size-1 split axis; ``partial``: the backward's fp32 dK/dV partials (a leading query-tile axis), else gradients
    in the input dtype with a size-1 tile axis. ``kv_heads``: grouped-query K/V with that many heads (the backward
    then always writes fp32 partials, one slot per query head of a KV head); ``key_mask``: a (N, P) byte mask."""
    head_dim, heads, tokens = shape
    kv_heads = kv_heads or heads
    count = 3 if split else 1
    q = meta_tensor((_AOT_MEDIA, _AOT_LATENTS, heads, head_dim), dtype)
    km = meta_tensor((_AOT_MEDIA, tokens, 2, kv_heads, head_dim), dtype)[:, :, 0]
    kl = meta_tensor((_AOT_MEDIA, _AOT_LATENTS, 2, kv_heads, head_dim), dtype)[:, :, 0]
    lse = meta_tensor((_AOT_MEDIA, heads, _AOT_LATENTS), torch.float32)
    args = dict(Q=q, KM=km, VM=km, KL=kl, VL=kl, num_heads=heads, media_tokens=tokens, latents=_AOT_LATENTS,
                num_splits=count, qk_scale=head_dim ** -0.5 * LOG2E, HEAD_DIM=head_dim, BLOCK_D=head_block(head_dim),
                DOT_PRECISION=precision, KV_GROUP=heads // kv_heads, KEY_MASK=key_mask,
                KEEP=meta_tensor((_AOT_MEDIA, tokens), torch.uint8) if key_mask else None)
    for names, t in ((("stride_qn", "stride_ql", "stride_qh"), q), (("stride_kmn", "stride_kmp", "stride_kmh"), km),
                     (("stride_vmn", "stride_vmp", "stride_vmh"), km), (("stride_kln", "stride_kll", "stride_klh"), kl),
                     (("stride_vln", "stride_vll", "stride_vlh"), kl)):
        args.update(named_strides(names, t))
    if kind == "fwd":
        o = meta_tensor((count,) + tuple(q.shape), torch.float32) if split else q[None]
        part_lse = meta_tensor((count,) + tuple(lse.shape), torch.float32) if split else lse[None]
        return dict(args, O=o, LSE=part_lse, **named_strides(("stride_os", "stride_on", "stride_ol", "stride_oh"), o),
                    **named_strides(("stride_ss", "stride_sn", "stride_sh"), part_lse))
    dq = meta_tensor((count,) + tuple(q.shape), torch.float32) if split else q[None]
    args.update(O=q, DO=q, LSE=lse, DQ=dq, sm_scale=head_dim ** -0.5,
                **named_strides(("stride_on", "stride_ol", "stride_oh"), q),
                **named_strides(("stride_gn", "stride_gl", "stride_gh"), q),
                **named_strides(("stride_sn", "stride_sh"), lse),
                **named_strides(("stride_dqs", "stride_dqn", "stride_dql", "stride_dqh"), dq))
    grad_dtype, tiles = (torch.float32, 2 * (heads // kv_heads)) if partial else (dtype, 1)
    for prefix, rows, axis in (("dkm", tokens, "p"), ("dvm", tokens, "p"), ("dkl", _AOT_LATENTS, "l"),
                               ("dvl", _AOT_LATENTS, "l")):
        g = meta_tensor((tiles, _AOT_MEDIA, rows, kv_heads, head_dim), grad_dtype)
        args[prefix.upper()] = g
        args.update(named_strides([f"stride_{prefix}{x}" for x in ("t", "n", axis, "h")], g))
    return args


def aot_variants(quick: bool = False) -> List[AotVariant]:
    """Both kernels at every config each architecture ships, per head size and dot precision: bf16, fp32 with its
    own configs, fp16 with the first config of each list; with their split specializations (fp32 output partials of
    the forward, fp32 dQ partials of the backward: the first config stands for the others, same code) and the
    backward's fp32 dK/dV-partial specialization (L > BLOCK_M) for the largest query tile. ``quick``: the first
    config of each kernel in bf16 at head_dim 96."""
    plans = [(torch.bfloat16, True)] if quick else [(torch.bfloat16, False), (torch.float16, True),
                                                    (torch.float32, False)]
    variants = []
    for dtype, first_only in plans:
        io = TORCH_TO_TRITON_DTYPE[dtype]
        for shape, arch, precision in product([s for s in _AOT_SHAPES if not quick or s[0] == 96], ARCHS,
                                              aot_dot_precisions(dtype)):
            head_dim = shape[0]
            tag = "/tf32" if precision == "tf32" and dtype == torch.float32 else ""
            for kind, fn in (("fwd", _perceiver_fwd_kernel), ("bwd", _perceiver_bwd_kernel)):
                configs = shipped_configs(kind, dtype, head_dim, arch)
                largest = max(c.kwargs["BLOCK_M"] for c in configs)
                for i, config in enumerate(configs[:1] if first_only else configs):
                    # L > BLOCK_M (fp32 dK/dV partials) only happens with the largest query tile (see the pruner)
                    partials = (False, True) if kind == "bwd" and config.kwargs["BLOCK_M"] == largest else (False,)
                    splits = (False, True) if i == 0 and dtype != torch.float32 else (False,)
                    for partial, split in product(partials, splits):
                        args = _aot_args(kind, dtype, shape, precision, partial, split)
                        label = (f"{io}{tag} d{head_dim} {config_label(config)}{' partial' if partial else ''}"
                                 f"{' split' if split else ''}")
                        variants.append(aot_launch(f"perceiver_{kind}", fn, args, config, label, archs=(arch,)))
    if not quick:
        variants += _padded_gqa_variants()
    return variants


# IDEFICS2's resampler: 16 query heads on 4 KV heads of 96 (padded to 128), a key padding mask over the media tokens.
_AOT_GQA_SHAPE, _AOT_GQA_KV_HEADS = (96, 16, 257), 4


def _padded_gqa_variants() -> List[AotVariant]:
    """The key-mask + grouped-query specialization of both kernels: every shipped config in bf16, the first in
    fp16, each with and without key splits for the first config; the backward always with its fp32 dK/dV partials
    (one slot per query head of a KV head)."""
    variants = []
    head_dim = _AOT_GQA_SHAPE[0]
    for dtype, first_only in ((torch.bfloat16, False), (torch.float16, True)):
        io = TORCH_TO_TRITON_DTYPE[dtype]
        for arch, precision in product(ARCHS, aot_dot_precisions(dtype)):
            for kind, fn in (("fwd", _perceiver_fwd_kernel), ("bwd", _perceiver_bwd_kernel)):
                configs = shipped_configs(kind, dtype, head_dim, arch, specialized=True)
                for i, config in enumerate(configs[:1] if first_only else configs):
                    for split in ((False, True) if i == 0 else (False,)):
                        args = _aot_args(kind, dtype, _AOT_GQA_SHAPE, precision, partial=kind == "bwd", split=split,
                                         kv_heads=_AOT_GQA_KV_HEADS, key_mask=True)
                        label = (f"{io} d{head_dim} gqa{_AOT_GQA_SHAPE[1] // _AOT_GQA_KV_HEADS} key_mask "
                                 f"{config_label(config)}{' split' if split else ''}")
                        variants.append(aot_launch(f"perceiver_{kind}", fn, args, config, label, archs=(arch,)))
    return variants
