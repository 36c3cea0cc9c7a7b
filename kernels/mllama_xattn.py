"""Llama 3.2 Vision (mllama) cross-attention, prefill forward and backward: interval-masked GQA attention.

Math. Text queries ``q`` (B, S, H, D) attend to the vision keys/values ``k, v`` of the transformers cache layout
(B, Hkv, I * L, D): I image slots of ``L = max_tiles * tokens_per_tile`` keys each (1601 tokens per tile, 4 tiles
for Llama 3.2). Query head ``h`` reads K/V head ``h // G`` (GQA, ``G = H / Hkv``). Token ``t`` sees

* the images ``[img_start[t], img_end[t])``, and of image ``j`` only its real keys ``[j*L, j*L + image_keys[j])``
  (``image_keys = num_tiles * tokens_per_tile``; padded tiles and padded image slots are never visited), or
* every key ``[0, I*L)``, padded tiles included, when ``img_start[t] == -1`` (transformers' semantics for a row that
  sees no image: its additive mask is all zeros), or
* nothing when ``img_start[t] == img_end[t]``: ``o = 0``, LSE ``+inf``, zero gradients.

``o = softmax(scale * q k^T over the visible keys) v`` with an online softmax in the exp2 domain, fp32 statistics
and fp32 ``tl.dot`` accumulation; the natural-log LSE (fp32, (B, H, S)) is saved for the backward pass.

GQA without repeating K/V. One program owns ``BLOCK_M`` tokens x the ``G`` query heads of one K/V head: its
``ROWS = BLOCK_M * G`` query rows (row ``r`` = token ``r // G``, head ``r % G`` of the group) share every K/V tile
it loads, so K/V is read once per K/V head and query tile, never once per query head, and never copied. The
backward's dK/dV program loops over the same rows, so the sum over the group's query heads happens in registers
(no atomics, deterministic).

Loops. A query tile visits the images ``[min start, max end)`` of its rows and, inside image ``j``, its real keys
in ``BLOCK_N`` steps; ``tokens_per_tile`` (1601) is not a multiple of any tile size, so the last key tile of each
image is partial and masked (keys past the image's real keys are neither loaded nor scored). Query tiles are aligned
to runs of tokens that see the same images (``_schedules.query_tile_schedule`` on run ids), so every row of a tile
normally needs exactly the keys the tile visits; each row is still masked by its own range, so any tile split stays
exact. dK/dV programs own one ``BLOCK_N`` key tile of one image slot and loop over the tokens that see that image
(``image_token_ranges``); key tiles nobody sees (padding, unless some row sees every key) write zeros and stop.

q/k RMSNorm are not fused here, on purpose: ``q_norm`` is one elementwise pass over q (S x H x D, about 0.1% of
this kernel's work at 1601 keys per token), and ``k_norm`` runs once per image and layer on the projection, whose
normalised result is what the transformers ``Cache`` stores and every decode step reuses; inside this kernel it would
be recomputed for every query tile, and in the backward both norms' weight gradients would need a reduction across
programs. Likewise the gated epilogues (``o_proj``, ``down_proj``) are the gated projection op, not this kernel.

Offsets: sample/head/image/tile bases are int64 scalars; offsets inside a tile are int32 (the launchers keep
``ROWS * token stride`` and ``BLOCK_N * key stride`` below 2**31). head_dim is padded to a power of two >= 16.
"""
from __future__ import annotations

from itertools import product
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._utils import (ARCHS, INTERPRET, LOG2E, SM80, SM90, TORCH_TO_TRITON_DTYPE, AotVariant, ConfigChooser,
                     aot_dot_precisions, aot_launch, config_label, device_arch, head_block,
                     meta_tensor, named_strides, per_arch, table_key, text_class)
from ._attention import LOG2E as _LOG2E
from ._attention import (attend_keys, dkdv_step, dq_keys, sample_and_head, scheduled_tile, softmax_lse,
                         softmax_output, softmax_state)
from ._schedules import query_tile_schedule, query_tile_slots

_NO_IMAGE = tl.constexpr(2147483647)  # identity of the min over the rows' first images

# ================================================================================================================
# Kernels
# ================================================================================================================


@triton.jit
def _rows_images(p_start, p_end, tok, m_ok, stride_st, num_images):
    """Per row: first image, end image, and whether it sees every key (``img_start == -1``); ``p_start`` /
    ``p_end`` point at the tile's first token; rows past the tile see nothing."""
    b_s = tl.load(p_start + tok * stride_st, mask=m_ok, other=0)
    b_e = tl.load(p_end + tok * stride_st, mask=m_ok, other=0)
    b_all = b_s < 0
    b_s = tl.where(b_all, 0, b_s)
    b_e = tl.where(b_all, num_images, b_e)
    return b_s, b_e, b_all


@triton.jit
def _tile_images(p_start, p_end, tok, m_ok, stride_st, num_images):
    """:func:`_rows_images` plus what the query tile loops over: the images ``[img_lo, img_hi)`` any row sees
    (empty when none does) and whether some row sees every key."""
    b_s, b_e, b_all = _rows_images(p_start, p_end, tok, m_ok, stride_st, num_images)
    img_lo = tl.min(tl.where(b_e > b_s, b_s, _NO_IMAGE), axis=0)
    img_hi = tl.max(b_e, axis=0)
    any_all = tl.max(b_all.to(tl.int32), axis=0) > 0
    return b_s, b_e, b_all, img_lo, img_hi, any_all


@triton.jit
def _image_span(j, b_s, b_e, b_all, any_all, n_real, image_stride):
    """Keys of image slot ``j`` the tile visits (``[0, limit)``: its real keys, or the whole slot when some row
    sees every key) and, per row, the keys ``[0, row_end)`` it sees there (0 for rows that do not see ``j``)."""
    limit = tl.where(any_all, image_stride, n_real)
    row_end = tl.where((j >= b_s) & (j < b_e), tl.where(b_all, image_stride, n_real), 0)
    return limit, row_end


@triton.jit
def _query_tile_rows(IMG_START, IMG_END, b, t0, t_start, t_end, stride_sb, stride_st, num_images,
                     GROUP: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """The prologue of a run-aligned query tile (forward and dQ): row ``r`` is token ``r // GROUP`` and query head
    ``r % GROUP`` of the K/V head's group; row/feature masks and the images the tile visits (:func:`_tile_images`)."""
    rows = tl.arange(0, ROWS)
    tok = rows // GROUP
    head = rows % GROUP
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = t_start + tok < t_end
    d_ok = offs_d < HEAD_DIM
    b_s, b_e, b_all, img_lo, img_hi, any_all = _tile_images(
        IMG_START + b * stride_sb + t0 * stride_st, IMG_END + b * stride_sb + t0 * stride_st, tok, m_ok, stride_st,
        num_images)
    return tok, head, offs_d, m_ok, d_ok, b_s, b_e, b_all, img_lo, img_hi, any_all


# Arguments that change with the prompt (the strides of the (B, H, T) statistics, of the per-token image ranges and
# the per-image key counts, the schedule size, the image count) are not specialized: a new prompt length or image
# count compiles nothing new (docs/steady_state.md, "Specializations").
_PROMPT_ARGS = ("stride_lb", "stride_lh", "stride_sb", "stride_st", "stride_nb", "num_images")


@triton.jit(do_not_specialize=_PROMPT_ARGS + ("stride_pb",))
def _mllama_xattn_fwd_kernel(
    Q, K, V, O, LSE, IMG_START, IMG_END, IMG_KEYS, TILE_START, TILE_END,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
    stride_ob, stride_ot, stride_oh, stride_lb, stride_lh, stride_sb, stride_st, stride_nb, stride_pb,
    num_kv_heads, num_images, image_stride, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: one run-aligned tile of ``BLOCK_M`` tokens x the ``GROUP`` query heads of one K/V head."""
    ROWS: tl.constexpr = BLOCK_M * GROUP
    pid_tile = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, kvh = sample_and_head(pid_bh, num_kv_heads)
    t_start, t_end = scheduled_tile(TILE_START, TILE_END, b * stride_pb, pid_tile)
    if t_start >= t_end:  # surplus slot of the upper-bound grid
        return
    t0 = t_start.to(tl.int64)

    tok, head, offs_d, m_ok, d_ok, b_s, b_e, b_all, img_lo, img_hi, any_all = _query_tile_rows(
        IMG_START, IMG_END, b, t0, t_start, t_end, stride_sb, stride_st, num_images, GROUP, ROWS, HEAD_DIM, BLOCK_D)
    md_ok = m_ok[:, None] & d_ok[None, :]
    cols = tl.arange(0, BLOCK_N)

    q_offs = tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    p_q = Q + b * stride_qb + t0 * stride_qt + kvh * GROUP * stride_qh
    b_q = tl.load(p_q + q_offs, mask=md_ok, other=0.0)  # [ROWS, BLOCK_D]
    kt_offs = offs_d[:, None] + cols[None, :] * stride_kl  # [BLOCK_D, BLOCK_N]
    v_offs = cols[:, None] * stride_vl + offs_d[None, :]  # [BLOCK_N, BLOCK_D]

    b_m, b_l, b_acc = softmax_state(ROWS, BLOCK_D)
    for j in range(img_lo, img_hi):
        n_real = tl.load(IMG_KEYS + b * stride_nb + j)
        limit, row_end = _image_span(j, b_s, b_e, b_all, any_all, n_real, image_stride)
        key0 = (j * image_stride).to(tl.int64)  # < 2**31: a key index
        p_k = K + b * stride_kb + kvh * stride_kh + key0 * stride_kl
        p_v = V + b * stride_vb + kvh * stride_vh + key0 * stride_vl
        b_m, b_l, b_acc = attend_keys(b_q, p_k, p_v, b_m, b_l, b_acc, kt_offs, v_offs, 0, limit, row_end, row_end,
                                      d_ok, qk_scale, stride_kl, stride_vl, BLOCK_N, DOT_PRECISION, "end", True)
    b_o = softmax_output(b_l, b_acc, True)  # exactly 0 for rows that see nothing
    b_lse = softmax_lse(b_m, b_l, True, True)
    o_offs = tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    p_o = O + b * stride_ob + t0 * stride_ot + kvh * GROUP * stride_oh
    tl.store(p_o + o_offs, b_o.to(O.dtype.element_ty), mask=md_ok)
    p_lse = LSE + b * stride_lb + kvh * GROUP * stride_lh + t0
    tl.store(p_lse + head * stride_lh + tok, b_lse, mask=m_ok)


@triton.jit(do_not_specialize=_PROMPT_ARGS)
def _mllama_xattn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, IMG_START, IMG_END, IMG_KEYS, HAS_ALL, TOKEN_FIRST, TOKEN_END, DK, DV,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
    stride_gb, stride_gt, stride_gh, stride_lb, stride_lh, stride_sb, stride_st, stride_nb,
    stride_dkb, stride_dkh, stride_dkl, stride_dvb, stride_dvh, stride_dvl,
    num_kv_heads, num_images, image_stride, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: one ``BLOCK_N`` key tile of one image slot and K/V head; loops over the tokens that see the
    image, all ``GROUP`` query heads at once. Computed transposed ([keys, rows]) so the accumulators need no
    transpose: ``dv += p^T do``, ``dk += scale * ds^T q`` with ``ds = p * (do v^T - delta)``."""
    ROWS: tl.constexpr = BLOCK_M * GROUP
    pid_tile = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, kvh = sample_and_head(pid_bh, num_kv_heads)
    tiles_per_image = tl.cdiv(image_stride, BLOCK_N)
    j = pid_tile // tiles_per_image
    start = (pid_tile % tiles_per_image) * BLOCK_N
    n0 = j.to(tl.int64) * image_stride + start
    cols = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_n = start + cols  # key offsets inside the image slot
    nd_ok = (offs_n < image_stride)[:, None] & d_ok[None, :]
    p_dk = DK + b * stride_dkb + kvh * stride_dkh + n0 * stride_dkl
    p_dv = DV + b * stride_dvb + kvh * stride_dvh + n0 * stride_dvl
    dk_offs = cols[:, None] * stride_dkl + offs_d[None, :]
    dv_offs = cols[:, None] * stride_dvl + offs_d[None, :]

    n_real = tl.load(IMG_KEYS + b * stride_nb + j)
    sees_all = tl.load(HAS_ALL + b) != 0
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if (start < n_real) | sees_all:  # else a padded tile no row sees: its gradients are exactly zero
        k_ok = (offs_n < tl.where(sees_all, image_stride, n_real))[:, None] & d_ok[None, :]
        p_k = K + b * stride_kb + kvh * stride_kh + n0 * stride_kl
        p_v = V + b * stride_vb + kvh * stride_vh + n0 * stride_vl
        b_k = tl.load(p_k + cols[:, None] * stride_kl + offs_d[None, :], mask=k_ok, other=0.0)  # [BLOCK_N, BLOCK_D]
        b_v = tl.load(p_v + cols[:, None] * stride_vl + offs_d[None, :], mask=k_ok, other=0.0)
        tok_first = tl.load(TOKEN_FIRST + b * stride_nb + j)
        tok_end = tl.load(TOKEN_END + b * stride_nb + j)

        rows = tl.arange(0, ROWS)
        tok = rows // GROUP
        head = rows % GROUP
        m0 = tok_first.to(tl.int64)
        p_q = Q + b * stride_qb + m0 * stride_qt + kvh * GROUP * stride_qh
        p_do = DO + b * stride_gb + m0 * stride_gt + kvh * GROUP * stride_gh
        p_lse = LSE + b * stride_lb + kvh * GROUP * stride_lh + m0
        p_delta = DELTA + b * stride_lb + kvh * GROUP * stride_lh + m0
        p_start = IMG_START + b * stride_sb + m0 * stride_st
        p_end = IMG_END + b * stride_sb + m0 * stride_st
        q_offs = tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
        do_offs = tok[:, None] * stride_gt + head[:, None] * stride_gh + offs_d[None, :]
        l_offs = head * stride_lh + tok
        for start_m in range(tok_first, tok_end, BLOCK_M):
            m_ok = start_m + tok < tok_end
            md_ok = m_ok[:, None] & d_ok[None, :]
            b_s, b_e, b_all = _rows_images(p_start, p_end, tok, m_ok, stride_st, num_images)
            row_end = tl.where((j >= b_s) & (j < b_e), tl.where(b_all, image_stride, n_real), 0)
            b_q = tl.load(p_q + q_offs, mask=md_ok, other=0.0)
            b_do = tl.load(p_do + do_offs, mask=md_ok, other=0.0)
            b_lse2 = tl.load(p_lse + l_offs, mask=m_ok, other=0.0) * _LOG2E
            b_delta = tl.load(p_delta + l_offs, mask=m_ok, other=0.0)
            b_dk, b_dv = dkdv_step(b_k, b_v, b_q, b_do, b_lse2, b_delta, offs_n, row_end, row_end, b_dk, b_dv,
                                   qk_scale, DOT_PRECISION, "end", True)
            p_q += BLOCK_M * stride_qt
            p_do += BLOCK_M * stride_gt
            p_lse += BLOCK_M
            p_delta += BLOCK_M
            p_start += BLOCK_M * stride_st
            p_end += BLOCK_M * stride_st
    b_dk = b_dk * sm_scale
    tl.store(p_dk + dk_offs, b_dk.to(DK.dtype.element_ty), mask=nd_ok)
    tl.store(p_dv + dv_offs, b_dv.to(DV.dtype.element_ty), mask=nd_ok)


@triton.jit(do_not_specialize=_PROMPT_ARGS + ("stride_pb",))
def _mllama_xattn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, IMG_START, IMG_END, IMG_KEYS, TILE_START, TILE_END, DQ,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
    stride_gb, stride_gt, stride_gh, stride_lb, stride_lh, stride_sb, stride_st, stride_nb, stride_pb,
    stride_dqb, stride_dqt, stride_dqh,
    num_kv_heads, num_images, image_stride, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: one run-aligned query tile of one K/V head (the forward's loops);
    ``dq = scale * sum over visible keys of ds k``."""
    ROWS: tl.constexpr = BLOCK_M * GROUP
    pid_tile = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, kvh = sample_and_head(pid_bh, num_kv_heads)
    t_start, t_end = scheduled_tile(TILE_START, TILE_END, b * stride_pb, pid_tile)
    if t_start >= t_end:
        return
    t0 = t_start.to(tl.int64)

    tok, head, offs_d, m_ok, d_ok, b_s, b_e, b_all, img_lo, img_hi, any_all = _query_tile_rows(
        IMG_START, IMG_END, b, t0, t_start, t_end, stride_sb, stride_st, num_images, GROUP, ROWS, HEAD_DIM, BLOCK_D)
    md_ok = m_ok[:, None] & d_ok[None, :]
    cols = tl.arange(0, BLOCK_N)

    q_offs = tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    do_offs = tok[:, None] * stride_gt + head[:, None] * stride_gh + offs_d[None, :]
    b_q = tl.load(Q + b * stride_qb + t0 * stride_qt + kvh * GROUP * stride_qh + q_offs, mask=md_ok, other=0.0)
    b_do = tl.load(DO + b * stride_gb + t0 * stride_gt + kvh * GROUP * stride_gh + do_offs, mask=md_ok, other=0.0)
    l_offs = head * stride_lh + tok
    l_base = b * stride_lb + kvh * GROUP * stride_lh + t0
    b_lse2 = tl.load(LSE + l_base + l_offs, mask=m_ok, other=0.0) * _LOG2E
    b_delta = tl.load(DELTA + l_base + l_offs, mask=m_ok, other=0.0)
    kt_offs = offs_d[:, None] + cols[None, :] * stride_kl  # [BLOCK_D, BLOCK_N]
    vt_offs = offs_d[:, None] + cols[None, :] * stride_vl

    b_dq = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for j in range(img_lo, img_hi):
        n_real = tl.load(IMG_KEYS + b * stride_nb + j)
        limit, row_end = _image_span(j, b_s, b_e, b_all, any_all, n_real, image_stride)
        key0 = (j * image_stride).to(tl.int64)  # < 2**31: a key index
        p_k = K + b * stride_kb + kvh * stride_kh + key0 * stride_kl
        p_v = V + b * stride_vb + kvh * stride_vh + key0 * stride_vl
        b_dq = dq_keys(b_q, b_do, b_lse2, b_delta, p_k, p_v, b_dq, kt_offs, vt_offs, 0, limit, row_end, row_end,
                       d_ok, qk_scale, stride_kl, stride_vl, BLOCK_N, DOT_PRECISION, "end")

    b_dq = b_dq * sm_scale
    dq_offs = tok[:, None] * stride_dqt + head[:, None] * stride_dqh + offs_d[None, :]
    p_dq = DQ + b * stride_dqb + t0 * stride_dqt + kvh * GROUP * stride_dqh
    tl.store(p_dq + dq_offs, b_dq.to(DQ.dtype.element_ty), mask=md_ok)


# ================================================================================================================
# Device-side schedules (torch ops on the device: no host synchronisation)
# ================================================================================================================


def query_tiles(img_start: torch.Tensor, img_end: torch.Tensor, max_runs: int,
                block_m: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run-aligned query tiles (B, slots) ``tile_start`` / ``tile_end``: media_xattn's schedule, whose runs are the
    stretches of equal (lo, hi) = (img_start, img_end), with ``max_runs`` in place of the media count (so the grid
    bound ``S // BLOCK_M + max_runs + 2`` holds every tile)."""
    return query_tile_schedule(img_start, img_end, max(int(max_runs), 1), block_m)


def image_token_ranges(img_start: torch.Tensor, img_end: torch.Tensor,
                       num_images: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per (sample, image slot): ``[first, last + 1)`` of the tokens that see it (rows that see every key count
    for every slot), int32 (B, I); ``(S, 0)`` when none does."""
    num_tokens = img_start.shape[1]
    slot = torch.arange(num_images, device=img_start.device, dtype=torch.int32)
    sees = (slot >= img_start.clamp(min=0)[..., None]) & (slot < img_end[..., None])  # (B, S, I)
    pos = torch.arange(num_tokens, device=img_start.device, dtype=torch.int32)[:, None]
    first = torch.where(sees, pos, num_tokens).amin(dim=1)
    last = torch.where(sees, pos, -1).amax(dim=1)
    return first.to(torch.int32).contiguous(), (last + 1).to(torch.int32).contiguous()


# ================================================================================================================
# Launch configurations
# ================================================================================================================

def _cfg(rows: int, block_n: int, num_warps: int, num_stages: int) -> triton.Config:
    """``rows`` = BLOCK_M tokens x GROUP heads per program (BLOCK_M follows from the launch's group size)."""
    return triton.Config({"ROWS": rows, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


# Under the interpreter one config, and a big one: the interpreter's cost is per tile, not per FLOP.
INTERPRETER_CONFIG = _cfg(64, 64, 4, 1)

# GPU candidates (ROWS, BLOCK_N, num_warps, num_stages[, architectures]) per kernel, input precision and head tile
# (a row without architectures ships on sm_80 and sm_90). ROWS counts query rows (tokens x heads of a group), the
# quantity that sizes registers. Every entry compiles for its architectures at <= 240 registers without spills at
# every (head_dim, group) of ``aot_variants``, under the pinned and the newest Triton (``python -m fastflamingo.aot
# --family mllama_xattn``); candidates that went over were dropped (4-warp 64-row tiles at head_dim 128 take 255
# registers on sm_80, so the 128-wide heads use 8 warps; the 64 x 64 dQ tile takes 244 on sm_80 under Triton 3.9, so
# it ships on sm_90 only). fp32 uses IEEE products (FMA loops): 16-row tiles, a correctness path, not a fast one.
_GPU_CONFIG_TABLE = {
    ("fwd", "lowp", 64): [(64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 8, 2), (64, 32, 4, 2, SM90)],
    ("fwd", "lowp", 128): [(128, 32, 8, 3), (128, 32, 8, 2), (64, 32, 8, 3), (64, 32, 8, 2)],
    ("dkdv", "lowp", 64): [(64, 32, 8, 2), (32, 64, 8, 2), (32, 64, 4, 2), (32, 32, 4, 2)],
    ("dkdv", "lowp", 128): [(64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2)],
    ("dq", "lowp", 64): [(32, 64, 8, 1), (32, 32, 8, 2), (16, 64, 4, 2)],
    ("dq", "lowp", 128): [(64, 32, 8, 2), (32, 64, 8, 2), (64, 64, 8, 2, SM90)],
    ("fwd", "fp32", 64): [(16, 64, 8, 1, SM80), (16, 32, 8, 2, SM90)],
    ("fwd", "fp32", 128): [(16, 32, 8, 2), (16, 64, 8, 1, SM90)],
    ("dkdv", "fp32", 64): [(16, 32, 4, 1)],
    ("dkdv", "fp32", 128): [(16, 32, 4, 1)],
    ("dq", "fp32", 64): [(16, 16, 8, 1)],
    ("dq", "fp32", 128): [(16, 16, 4, 2, SM80), (16, 16, 8, 2, SM90)],
}
_GPU_CONFIGS = per_arch(_GPU_CONFIG_TABLE, _cfg)


def shipped_configs(kind: str, dtype: torch.dtype, head_dim: int, arch: Optional[int] = None) -> List[triton.Config]:
    """The GPU candidates of one kernel for this dtype and head size on ``arch`` (default: this device's)."""
    return _GPU_CONFIGS[((kind, *table_key(dtype, head_dim)), arch or device_arch())]


def block_m_of(config: triton.Config, group: int) -> int:
    """Tokens per program: the config's query rows shared among the ``group`` heads of a K/V head."""
    return max(1, config.kwargs["ROWS"] // group)


# The autotune key, by the names tuned tables use (fastflamingo/configs/).
AUTOTUNE_KEY = ("head_dim", "group", "image_stride", "dtype", "text_bucket")


def autotune_key(q: torch.Tensor, group: int, image_stride: int) -> tuple:
    return (q.shape[-1], group, image_stride, q.dtype, text_class(q.shape[1]))


def _pruner(kind: str):
    def prune(configs: List[triton.Config], key: tuple) -> List[triton.Config]:
        if INTERPRET:
            return configs
        head_dim, group, _, dtype, text_bucket = key
        kept = [c for c in shipped_configs(kind, dtype, head_dim) if c.kwargs["ROWS"] >= group]
        # a tile never needs more token rows than the text has
        fitting = [c for c in kept if c.kwargs["ROWS"] // group <= max(1, text_bucket)]
        return fitting or kept

    return prune


_CANDIDATES = [INTERPRETER_CONFIG] if INTERPRET else []
FWD_CHOOSER = ConfigChooser("mllama_xattn_fwd", _CANDIDATES, _pruner("fwd"), AUTOTUNE_KEY)
DKDV_CHOOSER = ConfigChooser("mllama_xattn_bwd_dkdv", _CANDIDATES, _pruner("dkdv"), AUTOTUNE_KEY)
DQ_CHOOSER = ConfigChooser("mllama_xattn_bwd_dq", _CANDIDATES, _pruner("dq"), AUTOTUNE_KEY)


# ================================================================================================================
# Ahead-of-time compile variants (python -m fastflamingo.aot)
# ================================================================================================================

# (head_dim, group): Llama 3.2 11B (128, 4) and 90B (128, 8), a 64-wide head with groups 1 and 2; 8 K/V heads, a
# prompt of 2048 tokens and one image of 4 tiles x 1601 keys (image_stride 6404) in the transformers cache layout.
_AOT_SHAPES = ((128, 4), (128, 8), (64, 1), (64, 2))
_AOT_BATCH, _AOT_TEXT, _AOT_KV_HEADS, _AOT_IMAGE_STRIDE, _AOT_RUNS = 2, 2048, 8, 4 * 1601, 3


def _aot_args(kind: str, dtype: torch.dtype, head_dim: int, group: int, block_m: int, precision: str) -> dict:
    """What ``fastflamingo/ops/mllama_xattn.py`` passes: q (B, S, H, D) contiguous, k, v (B, Hkv, K, D) contiguous
    (the cache layout), int32 (B, S) image ranges and (B, 1) image key counts, fresh outputs and schedules."""
    batch, text, kv_heads, keys = _AOT_BATCH, _AOT_TEXT, _AOT_KV_HEADS, _AOT_IMAGE_STRIDE
    q = meta_tensor((batch, text, kv_heads * group, head_dim), dtype)
    k = meta_tensor((batch, kv_heads, keys, head_dim), dtype)
    lse = meta_tensor((batch, kv_heads * group, text), torch.float32)
    ranges, image_keys = meta_tensor((batch, text), torch.int32), meta_tensor((batch, 1), torch.int32)
    tiles = meta_tensor((batch, query_tile_slots(text, _AOT_RUNS, block_m)), torch.int32)
    args = dict(Q=q, K=k, V=k, LSE=lse, IMG_START=ranges, IMG_END=ranges, IMG_KEYS=image_keys,
                num_kv_heads=kv_heads, num_images=1, image_stride=keys, qk_scale=head_dim ** -0.5 * LOG2E,
                GROUP=group, HEAD_DIM=head_dim, BLOCK_D=head_block(head_dim), BLOCK_M=block_m,
                DOT_PRECISION=precision, stride_nb=image_keys.stride(0))
    for names, t in ((("stride_qb", "stride_qt", "stride_qh"), q), (("stride_kb", "stride_kh", "stride_kl"), k),
                     (("stride_vb", "stride_vh", "stride_vl"), k), (("stride_lb", "stride_lh"), lse),
                     (("stride_sb", "stride_st"), ranges)):
        args.update(named_strides(names, t))
    if kind == "fwd":
        return dict(args, O=q, TILE_START=tiles, TILE_END=tiles, stride_pb=tiles.stride(0),
                    **named_strides(("stride_ob", "stride_ot", "stride_oh"), q))
    args.update(DO=q, DELTA=lse, sm_scale=head_dim ** -0.5, **named_strides(("stride_gb", "stride_gt", "stride_gh"), q))
    if kind == "dkdv":
        return dict(args, HAS_ALL=meta_tensor((batch,), torch.int32), TOKEN_FIRST=image_keys, TOKEN_END=image_keys,
                    DK=k, DV=k, **named_strides(("stride_dkb", "stride_dkh", "stride_dkl"), k),
                    **named_strides(("stride_dvb", "stride_dvh", "stride_dvl"), k))
    return dict(args, TILE_START=tiles, TILE_END=tiles, stride_pb=tiles.stride(0), DQ=q,
                **named_strides(("stride_dqb", "stride_dqt", "stride_dqh"), q))


def aot_variants(quick: bool = False) -> List[AotVariant]:
    """The launches of every kernel at every config each architecture ships, per (head_dim, group): bf16, fp32
    with its own configs, fp16 with the first config of each list. ``quick``: bf16, Llama 3.2 11B shape, first
    config of each kernel."""
    kernels = {"fwd": _mllama_xattn_fwd_kernel, "dkdv": _mllama_xattn_bwd_dkdv_kernel, "dq": _mllama_xattn_bwd_dq_kernel}
    plans = [(torch.bfloat16, True)] if quick else [(torch.bfloat16, False), (torch.float16, True),
                                                    (torch.float32, False)]
    variants = []
    for dtype, first_only in plans:
        io = TORCH_TO_TRITON_DTYPE[dtype]
        for (head_dim, group), (kind, fn), arch in ((s, k, a) for s in (_AOT_SHAPES[:1] if quick else _AOT_SHAPES)
                                                    for k in kernels.items() for a in ARCHS):
            configs = [c for c in shipped_configs(kind, dtype, head_dim, arch) if c.kwargs["ROWS"] >= group]
            for config, precision in product(configs[:1] if first_only else configs, aot_dot_precisions(dtype)):
                block_m = block_m_of(config, group)
                tag = "/tf32" if precision == "tf32" and dtype == torch.float32 else ""
                variants.append(aot_launch(
                    f"mllama_xattn_{kind}", fn, dict(_aot_args(kind, dtype, head_dim, group, block_m, precision),
                                                     BLOCK_N=config.kwargs["BLOCK_N"]),
                    triton.Config({}, num_warps=config.num_warps, num_stages=config.num_stages),
                    f"{io}{tag} d{head_dim} g{group} {config_label(config)}", archs=(arch,)))
    return variants
