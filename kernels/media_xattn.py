"""Masked media cross-attention (Flamingo / IDEFICS) forward and backward, FlashAttention style.

Math. Text queries ``q`` (B, T, H, D) attend to media keys/values ``k, v`` (B, M*n, H, D): M media of n latents,
media-major. Token ``t`` of sample ``b`` with ``j = text_time[b, t]`` sees the contiguous key range ``[lo, hi)``:

* immediate:     ``[(j-1)*n, j*n)`` if ``1 <= j <= M`` else nothing;
* all-previous:  ``[0, min(j, M)*n)`` (nothing for ``j <= 0``).

``o = softmax(scale * q k^T restricted to [lo, hi)) v``; a token that sees nothing gets ``o = 0`` and zero
gradients. ``KEY_MASK`` (a constexpr, off by default: the kernels then compile exactly as without it) adds a key
padding mask, a contiguous (K/V rows, M*n) byte tensor ``KEEP`` (nonzero = visible) ANDed with that rule: a token
sees the keys of ``[lo, hi)`` whose byte is set (Evolla's aligner: one media made of padded protein, structure and
MSA sources), so it may see none, and a hidden key gets zero dK/dV. The tiles and schedules do not change: the mask
is read per key tile next to K (``kernels/_attention.py``). The softmax runs online in the exp2 domain (``scale * log2(e)`` folded into one multiplier) with fp32
statistics and fp32 ``tl.dot`` accumulation; the natural-log LSE (fp32, (B, H, T), ``+inf`` for tokens that see
nothing) is saved for the backward pass. Backward: ``delta = rowsum(o * do)``, then one kernel per key tile for
dK/dV and one per query tile for dQ, both deterministic (no atomics).

Scheduling (all on device, no host synchronisation, so decode steps can be captured in a CUDA graph):

* Query tiles (forward and dQ) are aligned to *runs*, maximal stretches of consecutive tokens that see the same key
  range: a run of R tokens gets ``ceil(R / BLOCK_M)`` tiles and no tile crosses a run boundary. Every token of a
  tile therefore needs exactly the keys the tile loops over; the only keys beyond what a token needs are the
  padding of the last partial key tile. A run-aligned schedule has at most ``T // BLOCK_M + runs`` tiles, and a
  ``text_time = cumsum(<image> flags)`` layout has at most ``M + 2`` runs (text before the first media, one per
  media, one past the last media), so the grid is sized ``min(T, T // BLOCK_M + M + 2)`` tiles per sample and the
  surplus programs exit at once. A sample whose layout has more runs (non-monotone ``text_time``, e.g. IDEFICS
  resetting to 0 after an end-of-sequence token) falls back to plain ``BLOCK_M`` tiles: still exact, because every
  row is masked by its own ``[lo, hi)``, only slower when a tile spans several runs.
* Key tiles (dK/dV) are aligned to media: media ``m`` owns ``ceil(n / BLOCK_N)`` tiles, so a tile's keys belong to
  one media and the tile visits only the tokens between the first and the last token that see that media
  (computed per (sample, media) with ``scatter_reduce``; with all-previous a reversed running min/max over media).
  When ``n`` is not a multiple of ``BLOCK_N`` the last tile of each media is partly padding; the autotuner
  prefers a ``BLOCK_N`` that divides ``n``.

Tensors are passed with explicit strides (views of a fused K/V projection are fine; only unit stride along
head_dim is assumed). Sample, head and tile-start offsets are int64 scalars, so texts of any length and any number
of media index correctly; offsets inside a tile are int32 (``rows * token stride``, kept below 2**31 by the
launchers), which keeps the address arithmetic out of the register budget. head_dim is padded to the next power of
two (at least 16) with masked loads.

This file holds the kernels and their launch configurations; the device-side schedules are in ``_schedules.py``
(shared with mllama_xattn), the host-side launchers and the custom ops in ``fastflamingo/ops/media_xattn.py``
(``docs/design.md`` shows the layers).
"""
from __future__ import annotations

from itertools import product
from typing import List, Optional

import torch
import triton
import triton.language as tl

from ._utils import (ARCHS, INTERPRET, LOG2E, SM80, SM90, TORCH_TO_TRITON_DTYPE, AotVariant, ConfigChooser,
                     aot_dot_precisions, aot_launch, cdiv, config_label, device_arch, head_block, meta_tensor,
                     named_strides, per_arch, size_class, table_key, text_class)
from ._attention import LOG2E as _LOG2E
from ._attention import (attend_keys, dkdv_step, dq_keys, key_kept, key_span, row_deltas_aot_variant, sample_and_head,
                         scheduled_tile, softmax_lse, softmax_output, softmax_state, text_time_keys)
from ._launch import DKDV_SPLITS, split_count
from ._schedules import media_token_ranges, query_tile_schedule, query_tile_slots  # noqa: F401  (launchers)

# ================================================================================================================
# Kernels (the attention skeleton is kernels/_attention.py; here: the text_time rule's tiles and the addressing)
# ================================================================================================================


@triton.jit
def _query_tile_rows(TEXT_TIME, b, t0, t_start, t_end, stride_tb, stride_tt, num_media, latents,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     IMMEDIATE: tl.constexpr):
    """The prologue of a run-aligned query tile (forward and dQ): row, key and feature offsets and masks, each
    row's keys ``[lo, hi)`` and the keys the tile loops over."""
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = t_start + rows < t_end
    d_ok = offs_d < HEAD_DIM
    md_ok = m_ok[:, None] & d_ok[None, :]
    b_tt = tl.load(TEXT_TIME + b * stride_tb + t0 * stride_tt + rows * stride_tt, mask=m_ok, other=0)
    b_lo, b_hi = text_time_keys(b_tt, num_media, latents, IMMEDIATE)  # [BLOCK_M] each
    key_lo, key_hi = key_span(b_lo, b_hi, False)
    return rows, cols, offs_d, m_ok, d_ok, md_ok, b_lo, b_hi, key_lo, key_hi


# Arguments that only feed masks and offsets and change with the prompt (text length, media count, schedule size,
# strides of the (B, H, T) statistics and of text_time, the beam group) are not specialized: Triton would otherwise
# compile a new variant whenever one of them becomes 1 or a multiple of 16 (docs/steady_state.md, "Specializations").
# The strides of q, k, v, o keep their specialization: they are multiples of 16 whenever heads * head_dim is (every
# Flamingo model), so they do not vary, and their divisibility is what lets the loads vectorize.
_PROMPT_ARGS = ("stride_lb", "stride_lh", "stride_tb", "stride_tt", "num_media")
# text_time may be a view at any offset (a caller's slice of a longer mask): its alignment is not specialized
# either (a few int32 loads per tile)
_ANY_ALIGNMENT = ("TEXT_TIME",)


@triton.jit(do_not_specialize=_PROMPT_ARGS + ("stride_pb", "kv_group"), do_not_specialize_on_alignment=_ANY_ALIGNMENT)
def _media_xattn_fwd_kernel(
    Q, K, V, O, LSE, TEXT_TIME, TILE_START, TILE_END,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kl, stride_kh, stride_vb, stride_vl, stride_vh,
    stride_ob, stride_ot, stride_oh, stride_lb, stride_lh, stride_tb, stride_tt, stride_pb,
    num_heads, num_media, latents, kv_group, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IMMEDIATE: tl.constexpr, DOT_PRECISION: tl.constexpr, KEEP=None, KEY_MASK: tl.constexpr = False,
):
    """One program: one query tile (a slice of one run, from the schedule) of one (sample, head).

    ``KEY_MASK``: ``KEEP`` is a contiguous (K/V rows, num_media * latents) byte mask, nonzero = visible key, ANDed
    with the media rule (a row may then see no key: output 0, LSE +inf). The query sample reads the row of its K/V
    row ``b_kv``, as it reads K and V.

    ``kv_group``: query sample ``b`` reads K/V row ``b // kv_group`` (beam search shares one media projection
    among the ``kv_group`` beams of a sample instead of storing a copy per beam); 1 for ordinary calls. Grid axis 1
    runs over (K/V row, head) and axis 2 over the ``kv_group`` samples of a K/V row, so no program divides by
    ``kv_group`` (a runtime integer division costs registers).

    Pointers: int64 scalar bases (sample, head, tile start), int32 offsets inside a tile (the launcher keeps
    ``BLOCK * row stride`` below 2**31); 64-bit offset tensors would double the address registers and spill.
    """
    pid_tile = tl.program_id(0)
    pid_gh = tl.program_id(1)
    b_kv, h = sample_and_head(pid_gh, num_heads)  # the K/V row (shared by the kv_group samples of a beam group)
    b = b_kv * kv_group + tl.program_id(2)  # the query sample
    t_start, t_end = scheduled_tile(TILE_START, TILE_END, b * stride_pb, pid_tile)
    if t_start >= t_end:  # surplus slot of the upper-bound grid
        return
    t0 = t_start.to(tl.int64)
    rows, cols, offs_d, m_ok, d_ok, md_ok, b_lo, b_hi, key_lo, key_hi = _query_tile_rows(
        TEXT_TIME, b, t0, t_start, t_end, stride_tb, stride_tt, num_media, latents, HEAD_DIM, BLOCK_D, BLOCK_M,
        BLOCK_N, IMMEDIATE)

    p_q = Q + b * stride_qb + h * stride_qh + t0 * stride_qt
    b_q = tl.load(p_q + rows[:, None] * stride_qt + offs_d[None, :], mask=md_ok, other=0.0)  # [BLOCK_M, BLOCK_D]
    # scalar base pointers of the first key tile, advanced by BLOCK_N rows per step
    p_k = K + b_kv * stride_kb + h * stride_kh + key_lo.to(tl.int64) * stride_kl
    p_v = V + b_kv * stride_vb + h * stride_vh + key_lo.to(tl.int64) * stride_vl
    kt_offs = offs_d[:, None] + cols[None, :] * stride_kl  # [BLOCK_D, BLOCK_N]
    v_offs = cols[:, None] * stride_vl + offs_d[None, :]  # [BLOCK_N, BLOCK_D]

    p_keep = KEEP
    if KEY_MASK:
        p_keep = KEEP + b_kv * (num_media * latents)  # this K/V row's keys (int64: b_kv is)

    b_m, b_l, b_acc = softmax_state(BLOCK_M, BLOCK_D)
    b_m, b_l, b_acc = attend_keys(b_q, p_k, p_v, b_m, b_l, b_acc, kt_offs, v_offs, key_lo, key_hi, b_lo, b_hi,
                                  d_ok, qk_scale, stride_kl, stride_vl, BLOCK_N, DOT_PRECISION, "range", False,
                                  p_keep, KEY_MASK)
    b_o = softmax_output(b_l, b_acc, True)  # exactly 0 for rows that see nothing
    b_lse = softmax_lse(b_m, b_l, True, True)

    p_o = O + b * stride_ob + h * stride_oh + t0 * stride_ot
    tl.store(p_o + rows[:, None] * stride_ot + offs_d[None, :], b_o.to(O.dtype.element_ty), mask=md_ok)
    tl.store(LSE + b * stride_lb + h * stride_lh + t0 + rows, b_lse, mask=m_ok)


@triton.jit(do_not_specialize=_PROMPT_ARGS + ("stride_rb", "num_splits"),
            do_not_specialize_on_alignment=_ANY_ALIGNMENT)
def _media_xattn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, TEXT_TIME, TOKEN_FIRST, TOKEN_END, DK, DV,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kl, stride_kh, stride_vb, stride_vl, stride_vh,
    stride_gb, stride_gt, stride_gh, stride_lb, stride_lh, stride_tb, stride_tt, stride_rb,
    stride_dks, stride_dkb, stride_dkl, stride_dkh, stride_dvs, stride_dvb, stride_dvl, stride_dvh,
    num_heads, num_media, latents, num_splits, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IMMEDIATE: tl.constexpr, DOT_PRECISION: tl.constexpr, KEEP=None, KEY_MASK: tl.constexpr = False,
):
    """One program: one media-aligned key tile of one (sample, head) and one split (grid axis 2) of the tokens that
    see its media: split ``s`` takes token blocks ``[s * blocks // splits, (s + 1) * blocks // splits)``.
    ``KEY_MASK``, ``KEEP``: as in the forward kernel (one K/V row per sample here); a hidden key has p = 0 for every
    token, so its dK/dV are stored as exact zeros.

    Computed transposed ([keys, tokens]) so that the dK/dV accumulators need no transpose:
    ``dv += p^T do``, ``dk += scale * ds^T q`` with ``ds = p * (do v^T - delta)``. With one split DK/DV are the
    gradients; with several they are fp32 partials (split stride ``stride_dks``) that the launcher sums in split
    order (deterministic).
    """
    pid_tile = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_split = tl.program_id(2)
    b, h = sample_and_head(pid_bh, num_heads)
    tiles_per_media = tl.cdiv(latents, BLOCK_N)
    media = pid_tile // tiles_per_media
    key_start = media * latents + (pid_tile % tiles_per_media) * BLOCK_N
    n0 = key_start.to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = key_start + cols
    n_ok = offs_n < (media + 1) * latents
    d_ok = offs_d < HEAD_DIM
    nd_ok = n_ok[:, None] & d_ok[None, :]

    p_k = K + b * stride_kb + h * stride_kh + n0 * stride_kl
    p_v = V + b * stride_vb + h * stride_vh + n0 * stride_vl
    b_k = tl.load(p_k + cols[:, None] * stride_kl + offs_d[None, :], mask=nd_ok, other=0.0)  # [BLOCK_N, BLOCK_D]
    b_v = tl.load(p_v + cols[:, None] * stride_vl + offs_d[None, :], mask=nd_ok, other=0.0)
    b_keep = None
    if KEY_MASK:  # the tile's keys are the same for every token block: their mask is loaded once
        b_keep = key_kept(KEEP + b * (num_media * latents), offs_n, n_ok)
    tok_first = tl.load(TOKEN_FIRST + b * stride_rb + media)
    tok_end = tl.load(TOKEN_END + b * stride_rb + media)
    # this split's share of the token blocks (an empty media has first = T > end = 0: no blocks)
    num_blocks = tl.cdiv(tl.maximum(tok_end - tok_first, 0), BLOCK_M)
    tok_stop = tl.minimum(tok_first + ((pid_split + 1) * num_blocks // num_splits) * BLOCK_M, tok_end)
    tok_first = tok_first + (pid_split * num_blocks // num_splits) * BLOCK_M
    tok_end = tok_stop

    # scalar base pointers of the current token block, advanced by BLOCK_M tokens per step
    m_first = tok_first.to(tl.int64)
    p_q = Q + b * stride_qb + h * stride_qh + m_first * stride_qt
    p_do = DO + b * stride_gb + h * stride_gh + m_first * stride_gt
    p_tt = TEXT_TIME + b * stride_tb + m_first * stride_tt
    p_lse = LSE + b * stride_lb + h * stride_lh + m_first
    p_delta = DELTA + b * stride_lb + h * stride_lh + m_first
    q_offs = rows[:, None] * stride_qt + offs_d[None, :]  # [BLOCK_M, BLOCK_D]
    do_offs = rows[:, None] * stride_gt + offs_d[None, :]
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(tok_first, tok_end, BLOCK_M):
        m_ok = start_m + rows < tok_end
        md_ok = m_ok[:, None] & d_ok[None, :]
        b_tt = tl.load(p_tt + rows * stride_tt, mask=m_ok, other=0)
        b_lo, b_hi = text_time_keys(b_tt, num_media, latents, IMMEDIATE)
        b_q = tl.load(p_q + q_offs, mask=md_ok, other=0.0)
        b_do = tl.load(p_do + do_offs, mask=md_ok, other=0.0)
        b_lse2 = tl.load(p_lse + rows, mask=m_ok, other=0.0) * _LOG2E
        b_delta = tl.load(p_delta + rows, mask=m_ok, other=0.0)
        b_dk, b_dv = dkdv_step(b_k, b_v, b_q, b_do, b_lse2, b_delta, offs_n, b_lo, b_hi, b_dk, b_dv, qk_scale,
                               DOT_PRECISION, "range", False, b_keep, KEY_MASK)
        p_q += BLOCK_M * stride_qt
        p_do += BLOCK_M * stride_gt
        p_tt += BLOCK_M * stride_tt
        p_lse += BLOCK_M
        p_delta += BLOCK_M

    b_dk = b_dk * sm_scale
    split = pid_split.to(tl.int64)
    p_dk = DK + split * stride_dks + b * stride_dkb + h * stride_dkh + n0 * stride_dkl
    p_dv = DV + split * stride_dvs + b * stride_dvb + h * stride_dvh + n0 * stride_dvl
    tl.store(p_dk + cols[:, None] * stride_dkl + offs_d[None, :], b_dk.to(DK.dtype.element_ty), mask=nd_ok)
    tl.store(p_dv + cols[:, None] * stride_dvl + offs_d[None, :], b_dv.to(DV.dtype.element_ty), mask=nd_ok)


@triton.jit(do_not_specialize=_PROMPT_ARGS + ("stride_pb",), do_not_specialize_on_alignment=_ANY_ALIGNMENT)
def _media_xattn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, TEXT_TIME, TILE_START, TILE_END, DQ,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kl, stride_kh, stride_vb, stride_vl, stride_vh,
    stride_gb, stride_gt, stride_gh, stride_lb, stride_lh, stride_tb, stride_tt, stride_pb,
    stride_dqb, stride_dqt, stride_dqh,
    num_heads, num_media, latents, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IMMEDIATE: tl.constexpr, DOT_PRECISION: tl.constexpr, KEEP=None, KEY_MASK: tl.constexpr = False,
):
    """One program: one run-aligned query tile; ``dq = scale * sum over visible keys of ds k``. ``KEY_MASK``,
    ``KEEP``: as in the forward kernel (one K/V row per sample here)."""
    pid_tile = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h = sample_and_head(pid_bh, num_heads)
    t_start, t_end = scheduled_tile(TILE_START, TILE_END, b * stride_pb, pid_tile)
    if t_start >= t_end:  # surplus slot of the upper-bound grid
        return
    t0 = t_start.to(tl.int64)
    rows, cols, offs_d, m_ok, d_ok, md_ok, b_lo, b_hi, key_lo, key_hi = _query_tile_rows(
        TEXT_TIME, b, t0, t_start, t_end, stride_tb, stride_tt, num_media, latents, HEAD_DIM, BLOCK_D, BLOCK_M,
        BLOCK_N, IMMEDIATE)

    p_q = Q + b * stride_qb + h * stride_qh + t0 * stride_qt
    p_do = DO + b * stride_gb + h * stride_gh + t0 * stride_gt
    b_q = tl.load(p_q + rows[:, None] * stride_qt + offs_d[None, :], mask=md_ok, other=0.0)
    b_do = tl.load(p_do + rows[:, None] * stride_gt + offs_d[None, :], mask=md_ok, other=0.0)
    b_lse2 = tl.load(LSE + b * stride_lb + h * stride_lh + t0 + rows, mask=m_ok, other=0.0) * _LOG2E
    b_delta = tl.load(DELTA + b * stride_lb + h * stride_lh + t0 + rows, mask=m_ok, other=0.0)
    p_k = K + b * stride_kb + h * stride_kh + key_lo.to(tl.int64) * stride_kl
    p_v = V + b * stride_vb + h * stride_vh + key_lo.to(tl.int64) * stride_vl
    kt_offs = offs_d[:, None] + cols[None, :] * stride_kl  # [BLOCK_D, BLOCK_N]
    vt_offs = offs_d[:, None] + cols[None, :] * stride_vl

    p_keep = KEEP
    if KEY_MASK:
        p_keep = KEEP + b * (num_media * latents)  # this sample's keys (int64: b is)

    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    b_dq = dq_keys(b_q, b_do, b_lse2, b_delta, p_k, p_v, b_dq, kt_offs, vt_offs, key_lo, key_hi, b_lo, b_hi, d_ok,
                   qk_scale, stride_kl, stride_vl, BLOCK_N, DOT_PRECISION, "range", p_keep, KEY_MASK)
    b_dq = b_dq * sm_scale
    p_dq = DQ + b * stride_dqb + h * stride_dqh + t0 * stride_dqt
    tl.store(p_dq + rows[:, None] * stride_dqt + offs_d[None, :], b_dq.to(DQ.dtype.element_ty), mask=md_ok)


def dkdv_splits(programs: int, num_tokens: int, num_media: int, immediate: bool, block_m: int, sms: int) -> int:
    """Token splits (grid axis 2; fp32 partials summed in split order) of the dK/dV kernel, by ``_launch``'s rule:
    ``programs`` is its grid without splits; the tokens that see one media are estimated as ``T / M`` (immediate)
    or ``T`` (all previous)."""
    tokens = cdiv(num_tokens, max(num_media, 1)) if immediate else num_tokens
    return split_count(programs, cdiv(max(tokens, 1), block_m), sms, DKDV_SPLITS)


# ================================================================================================================
# Launch configurations
# ================================================================================================================

def _cfg(block_m: int, block_n: int, num_warps: int, num_stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


# Under the interpreter one config, and a big one: the interpreter's cost is per tile, not per FLOP.
INTERPRETER_CONFIG = _cfg(64, 64, 4, 1)

# GPU candidates: (BLOCK_M, BLOCK_N, num_warps, num_stages[, architectures]), BLOCK_M the query tile and BLOCK_N the
# key tile, per kernel, input precision and head tile (BLOCK_D <= 64 or 128); a row without architectures ships on
# sm_80 and sm_90. Every entry compiles for its architectures without a register spill, within 240 registers and
# within shared memory under the pinned and the newest Triton (``python -m fastflamingo.aot``, CI runs both).
# fp32 uses IEEE products (see ``dot_precision``), which Triton lowers to FMA loops, not tensor cores: only 16-row
# tiles stay in registers, so fp32 is a correctness path, not a fast one.
_GPU_CONFIG_TABLE = {
    ("fwd", "lowp", 64): [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3), (64, 32, 4, 2), (16, 64, 4, 2),
                          (128, 32, 4, 3, SM90)],
    ("fwd", "lowp", 128): [(64, 64, 8, 3), (128, 32, 8, 3), (64, 32, 8, 2), (16, 64, 4, 2), (128, 64, 8, 3, SM90),
                           (64, 32, 4, 2, SM90)],
    ("dkdv", "lowp", 64): [(32, 64, 4, 2), (32, 32, 4, 2), (16, 64, 4, 2)],
    ("dkdv", "lowp", 128): [(32, 64, 8, 2), (32, 32, 4, 2, SM80), (32, 32, 8, 2, SM90), (16, 64, 8, 2)],
    ("dq", "lowp", 64): [(128, 32, 8, 2), (64, 32, 4, 2), (16, 64, 4, 2)],
    ("dq", "lowp", 128): [(64, 64, 8, 2), (64, 32, 8, 2), (16, 64, 4, 2), (128, 32, 8, 1, SM90), (64, 32, 4, 2, SM90)],
    ("fwd", "fp32", 64): [(16, 64, 8, 2)],
    ("fwd", "fp32", 128): [(16, 64, 8, 2, SM80), (16, 64, 4, 2, SM90)],
    ("dkdv", "fp32", 64): [(16, 32, 4, 1)],
    ("dkdv", "fp32", 128): [(16, 16, 4, 1)],  # 16x32 tiles spill under 3.6 or 3.9 with IEEE or TF32 products
    ("dq", "fp32", 64): [(16, 64, 4, 2)],
    ("dq", "fp32", 128): [(16, 64, 8, 2)],  # 4 warps: 250+ registers with TF32 products on sm_80
}
_GPU_CONFIGS = per_arch(_GPU_CONFIG_TABLE, _cfg)


# The key-mask specialization (KEY_MASK) loads the mask bytes of every key tile and keeps one more [rows, keys]
# predicate alive, so it ships its own lists where the plain ones fail the compile check; other table keys use the
# plain lists. Left out (Triton 3.6, the compile check of the KEY_MASK variants): fwd bf16/fp16 head tile 64
# 64x64x4w on sm_80 (8-byte spill at 168 registers); dkdv head tile 64 16x64x4w on sm_80 (8-byte spill); dq head
# tile 64 64x32x4w on sm_80 (244 registers) and head tile 128 16x64x4w on sm_90 (8-byte spill; 8 warps take its
# place); fp32 dq head tile 64 16x64x4w on sm_90 (IEEE products: 16-byte spill) and fp32 dkdv head tile 128
# 16x16x4w-s1 on sm_80 (IEEE: 8-byte spill), replaced by the candidates below that compile cleanly.
_SPECIALIZED_CONFIG_TABLE = {
    ("fwd", "lowp", 64): [(128, 64, 8, 3), (64, 64, 4, 3, SM90), (128, 32, 8, 3), (64, 32, 4, 2), (16, 64, 4, 2),
                          (128, 32, 4, 3, SM90)],
    ("dkdv", "lowp", 64): [(32, 64, 4, 2), (32, 32, 4, 2), (16, 64, 4, 2, SM90)],
    ("dq", "lowp", 64): [(128, 32, 8, 2), (64, 32, 4, 2, SM90), (16, 64, 4, 2)],
    ("dq", "lowp", 128): [(64, 64, 8, 2), (64, 32, 8, 2), (16, 64, 4, 2, SM80), (16, 64, 8, 2, SM90),
                          (128, 32, 8, 1, SM90), (64, 32, 4, 2, SM90)],
    ("dq", "fp32", 64): [(16, 64, 4, 2, SM80), (16, 64, 8, 2, SM90), (16, 32, 4, 2, SM90)],
    ("dkdv", "fp32", 128): [(16, 16, 4, 1, SM90), (16, 16, 4, 2, SM80)],  # 16x16x8w-s1 spills too on sm_80
}
_SPECIALIZED_CONFIGS = per_arch(_SPECIALIZED_CONFIG_TABLE, _cfg)


def shipped_configs(kind: str, dtype: torch.dtype, head_dim: int, arch: Optional[int] = None,
                    specialized: bool = False) -> List[triton.Config]:
    """The GPU configs a launch of ``kind`` ("fwd", "dkdv", "dq") may use on ``arch`` (default: this device's);
    ``specialized``: for the key-mask kernels (``KEY_MASK``)."""
    index = ((kind, *table_key(dtype, head_dim)), arch or device_arch())
    if specialized and index in _SPECIALIZED_CONFIGS:
        return _SPECIALIZED_CONFIGS[index]
    return _GPU_CONFIGS[index]


# The autotune key, by the names tuned tables use (fastflamingo/configs/).
AUTOTUNE_KEY = ("head_dim", "latents", "immediate", "dtype", "text_bucket", "media_bucket", "key_mask")


def autotune_key(q: torch.Tensor, num_media: int, latents: int, immediate: bool, key_mask: bool = False) -> tuple:
    """head_dim, latents per media, mode, dtype and the classes of the lengths that change with every prompt (text
    per sample: up to 64, up to 1024, longer; media per sample: 1, up to 8, more), so that generate times the
    candidates for a handful of keys in a process, not for every new prompt length or image count; and whether a
    key mask is given (the ``KEY_MASK`` specialization compiles to other code, so its best config may differ)."""
    return (q.shape[-1], latents, bool(immediate), q.dtype, text_class(q.shape[1]),
            size_class(num_media, MEDIA_CLASSES), bool(key_mask))


MEDIA_CLASSES = (1, 8)


def _pruner(kind: str):
    def prune(configs: List[triton.Config], key: tuple) -> List[triton.Config]:
        if INTERPRET:
            return configs
        head_dim, latents, _, dtype, text_bucket, _, key_mask = key
        kept = shipped_configs(kind, dtype, head_dim, specialized=key_mask)
        # A query tile never needs more rows than a sample has tokens: decode and short texts keep small tiles,
        # and long texts drop the 16-row tiles (they only add programs).
        fitting = [c for c in kept if c.kwargs["BLOCK_M"] <= max(16, text_bucket)]
        if text_bucket > 64:
            fitting = [c for c in fitting if c.kwargs["BLOCK_M"] > 16]
        kept = fitting or kept
        # Key tiles that divide the media length waste no padded keys at media boundaries.
        return [c for c in kept if latents % c.kwargs["BLOCK_N"] == 0] or kept

    return prune


# The candidate list is chosen at import: the interpreter has one config; on the GPU the pruner picks the shipped
# list for the key's dtype and head_dim (the chooser's own list is then unused).
_CANDIDATES = [INTERPRETER_CONFIG] if INTERPRET else []
FWD_CHOOSER = ConfigChooser("media_xattn_fwd", _CANDIDATES, _pruner("fwd"), AUTOTUNE_KEY)
DKDV_CHOOSER = ConfigChooser("media_xattn_bwd_dkdv", _CANDIDATES, _pruner("dkdv"), AUTOTUNE_KEY)
DQ_CHOOSER = ConfigChooser("media_xattn_bwd_dq", _CANDIDATES, _pruner("dq"), AUTOTUNE_KEY)


# ================================================================================================================
# Ahead-of-time compile variants (python -m fastflamingo.aot)
# ================================================================================================================

# Representative launches (head_dim, immediate, batch, text, heads, media), 64 latents per media: OpenFlamingo-9B at
# 32 shots (d64, 8 heads), 16 heads of 96 (padded to 128), IDEFICS-80B (d128, 64 heads) in both modes.
_AOT_SHAPES = ((64, True, 16, 4096, 8, 33), (96, False, 16, 2048, 16, 17), (128, True, 16, 4096, 64, 33),
               (128, False, 16, 4096, 64, 33))
_AOT_LATENTS = 64


def _aot_args(kind: str, dtype: torch.dtype, shape: tuple, block_m: int, precision: str, partial: bool = False,
              key_mask: bool = False) -> dict:
    """What ``fastflamingo/ops/media_xattn.py`` passes at ``shape``: q (B, T, H, D) contiguous, k and v views of one
    fused (B, M*n, 2*H*D) projection (OpenFlamingo's ``to_kv``), int32 text_time (B, T), fresh outputs, lse and
    schedules, one K/V row per sample (``kv_group`` 1); dK/dV: the gradients themselves (one split, an unsqueezed
    view) or fp32 partials per token split (``partial``). ``key_mask``: a (B, M*n) byte mask (``KEY_MASK``)."""
    head_dim, immediate, batch, text, heads, media = shape
    q, do = meta_tensor((batch, text, heads, head_dim), dtype), meta_tensor((batch, text, heads, head_dim), dtype)
    kv = meta_tensor((batch, media * _AOT_LATENTS, 2, heads, head_dim), dtype)
    k, v, lse = kv[:, :, 0], kv[:, :, 1], meta_tensor((batch, heads, text), torch.float32)
    text_time = meta_tensor((batch, text), torch.int32)
    tiles, ranges = meta_tensor((batch, query_tile_slots(text, media, block_m)), torch.int32), meta_tensor(
        (batch, media), torch.int32)
    args = dict(Q=q, K=k, V=v, LSE=lse, TEXT_TIME=text_time, num_heads=heads, num_media=media, latents=_AOT_LATENTS,
                qk_scale=head_dim ** -0.5 * LOG2E, HEAD_DIM=head_dim, BLOCK_D=head_block(head_dim),
                IMMEDIATE=immediate, DOT_PRECISION=precision, KEY_MASK=key_mask,
                KEEP=meta_tensor((batch, media * _AOT_LATENTS), torch.uint8) if key_mask else None)
    for names, t in ((("stride_qb", "stride_qt", "stride_qh"), q), (("stride_kb", "stride_kl", "stride_kh"), k),
                     (("stride_vb", "stride_vl", "stride_vh"), v), (("stride_lb", "stride_lh"), lse),
                     (("stride_tb", "stride_tt"), text_time)):
        args.update(named_strides(names, t))
    if kind == "fwd":
        return dict(args, O=q, TILE_START=tiles, TILE_END=tiles, stride_pb=tiles.stride(0), kv_group=1,
                    **named_strides(("stride_ob", "stride_ot", "stride_oh"), q))
    args.update(DO=do, DELTA=lse, sm_scale=head_dim ** -0.5,
                **named_strides(("stride_gb", "stride_gt", "stride_gh"), do))
    if kind == "dkdv":
        splits = 3 if partial else 1
        dk = meta_tensor((splits,) + tuple(k.shape), torch.float32) if partial else meta_tensor(k.shape, dtype)[None]
        return dict(args, TOKEN_FIRST=ranges, TOKEN_END=ranges, stride_rb=ranges.stride(0), DK=dk, DV=dk,
                    num_splits=splits,
                    **named_strides(("stride_dks", "stride_dkb", "stride_dkl", "stride_dkh"), dk),
                    **named_strides(("stride_dvs", "stride_dvb", "stride_dvl", "stride_dvh"), dk))
    return dict(args, TILE_START=tiles, TILE_END=tiles, stride_pb=tiles.stride(0), DQ=q,
                **named_strides(("stride_dqb", "stride_dqt", "stride_dqh"), q))


def aot_variants(quick: bool = False) -> List[AotVariant]:
    """The launches of every kernel of this family at every config each architecture ships: bf16 at every
    representative shape, fp32 with its own configs, fp16 with the first config of each list (its code is bf16's
    with another element type). ``quick``: bf16, the first config, head_dim 128, both modes."""
    kernels = {"fwd": _media_xattn_fwd_kernel, "dkdv": _media_xattn_bwd_dkdv_kernel, "dq": _media_xattn_bwd_dq_kernel}
    plans = [(torch.bfloat16, True)] if quick else [(torch.bfloat16, False), (torch.float16, True),
                                                    (torch.float32, False)]
    variants = []
    for dtype, first_only in plans:
        io = TORCH_TO_TRITON_DTYPE[dtype]
        for shape in [s for s in _AOT_SHAPES if s[0] == 128] if quick else _AOT_SHAPES:
            head_dim, immediate = shape[:2]
            for (kind, fn), arch in ((item, arch) for item in kernels.items() for arch in ARCHS):
                configs = shipped_configs(kind, dtype, head_dim, arch)
                # dK/dV with token splits writes fp32 partials: its own pointer types
                partials = (False, True) if kind == "dkdv" and dtype != torch.float32 else (False,)
                for config, precision, partial in product(configs[:1] if first_only else configs,
                                                          aot_dot_precisions(dtype), partials):
                    label = (f"{io}{'/tf32' if precision == 'tf32' and dtype == torch.float32 else ''} d{head_dim} "
                             f"{'imm' if immediate else 'prev'} {config_label(config)}{' partial' if partial else ''}")
                    variants.append(aot_launch(
                        "media_xattn_fwd" if kind == "fwd" else f"media_xattn_bwd_{kind}", fn,
                        _aot_args(kind, dtype, shape, config.kwargs["BLOCK_M"], precision, partial), config, label,
                        archs=(arch,)))
        for head_dim, _, batch, text, heads, _ in [s for s in _AOT_SHAPES[:3] if not quick or s[0] == 128]:
            variants.append(row_deltas_aot_variant(dtype, (batch, text, heads, head_dim), f"{io} d{head_dim}"))
    if not quick:
        variants += _key_mask_variants(kernels)
    return variants


# The key-mask specialization at head_dim 64 (immediate) and 128 (all-previous; Evolla's aligner: 32 heads of 128,
# one media whose keys are the padded protein / structure / MSA sources).
_AOT_KEY_MASK_SHAPES = (_AOT_SHAPES[0], _AOT_SHAPES[3])


def _key_mask_variants(kernels: dict) -> List[AotVariant]:
    """Every kernel with ``KEY_MASK`` at every config its specialized list ships: bf16 and fp32 (both dot
    precisions) at every config, fp16 at the first; dK/dV with and without token splits in 16 bits."""
    variants = []
    for dtype, first_only in ((torch.bfloat16, False), (torch.float16, True), (torch.float32, False)):
        io = TORCH_TO_TRITON_DTYPE[dtype]
        for shape in _AOT_KEY_MASK_SHAPES:
            head_dim, immediate = shape[:2]
            for (kind, fn), arch in ((item, arch) for item in kernels.items() for arch in ARCHS):
                configs = shipped_configs(kind, dtype, head_dim, arch, specialized=True)
                partials = (False, True) if kind == "dkdv" and dtype != torch.float32 else (False,)
                for config, precision, partial in product(configs[:1] if first_only else configs,
                                                          aot_dot_precisions(dtype), partials):
                    label = (f"{io}{'/tf32' if precision == 'tf32' and dtype == torch.float32 else ''} d{head_dim} "
                             f"{'imm' if immediate else 'prev'} key_mask {config_label(config)}"
                             f"{' partial' if partial else ''}")
                    variants.append(aot_launch(
                        "media_xattn_fwd" if kind == "fwd" else f"media_xattn_bwd_{kind}", fn,
                        _aot_args(kind, dtype, shape, config.kwargs["BLOCK_M"], precision, partial, key_mask=True),
                        config, label, archs=(arch,)))
    return variants
