"""The attention skeleton every attention kernel family shares, as ``@triton.jit`` helpers.

Every attention kernel of fastflamingo (media_xattn, media_decode, mllama_xattn, mllama_decode, perceiver_attn) is
FlashAttention: an online softmax over key tiles in the exp2 domain with fp32 statistics and fp32 ``tl.dot``
accumulation, an ending that normalises the output and writes the LSE, and a backward pass made of a delta
pre-pass (``rowsum(o * do)``), a dQ step and a transposed dK/dV step. What differs between families is only

* the *visibility rule*: which keys a query row may see (a key range per row from ``text_time`` for Flamingo,
  image intervals for mllama, every key for the Perceiver), passed to these helpers as per-row bounds or a mask;
* the *addressing*: how programs, rows, heads and key tiles map to memory (GQA row packing, two key sources,
  media-aligned tiles), which stays in each family's kernel.

Triton inlines every ``@triton.jit`` call, so a helper costs nothing at run time; the flags below are
``tl.constexpr`` so each kernel compiles only the branch it uses (``python -m fastflamingo.aot --compare`` checks
that the compiled code of every kernel is what it was before the helpers existed).

Conventions: scores in the log2 domain (``qk_scale = softmax scale * log2(e)``), running max ``b_m``, running sum
``b_l``, unnormalised accumulator ``b_acc``; a row that has seen no key has ``b_m = -inf`` and ``b_l = 0``, and its
output is exactly 0 (the rule every family follows: "a token that sees nothing gets exactly 0").
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _utils  # refuses a top-level ``kernels`` import name (kernels/README.md)

NO_KEY = tl.constexpr(2147483647)  # larger than any key index: the identity of a min over the rows' first keys
# constants a @triton.jit body may read (a plain float global is not allowed there)
LOG2E = tl.constexpr(_utils.LOG2E)
LN2 = tl.constexpr(_utils.LN2)


# ----------------------------------------------------------------------------------------------------------------
# Program prologue
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def sample_and_head(pid, num_heads):
    """(sample, head) of a program on a (sample x head) grid axis, int64: they multiply strides."""
    return (pid // num_heads).to(tl.int64), (pid % num_heads).to(tl.int64)


@triton.jit
def scheduled_tile(TILE_START, TILE_END, sample_offset, slot):
    """The tokens ``[t_start, t_end)`` of slot ``slot`` of a sample's run-aligned query-tile schedule
    (``_schedules.py``; the sample's row starts at ``sample_offset``); empty for a surplus slot of the upper-bound
    grid, whose program exits at once."""
    return tl.load(TILE_START + sample_offset + slot), tl.load(TILE_END + sample_offset + slot)


# ----------------------------------------------------------------------------------------------------------------
# Visibility (the Flamingo rule, shared by the media_xattn prefill and the media_decode kernels)
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def text_time_keys(text_time, num_media, latents, IMMEDIATE: tl.constexpr):
    """Key range ``[lo, hi)`` seen by tokens with these ``text_time`` values (Flamingo / IDEFICS masks):
    immediate, media ``j - 1`` only; all-previous, every media before ``j``. ``(0, 0)`` for a token that sees
    nothing."""
    if IMMEDIATE:
        seen = (text_time >= 1) & (text_time <= num_media)
        lo = tl.where(seen, (text_time - 1) * latents, 0)
        hi = tl.where(seen, text_time * latents, 0)
    else:
        hi = tl.minimum(tl.maximum(text_time, 0), num_media) * latents
        lo = tl.zeros_like(hi)
    return lo, hi


@triton.jit
def key_span(b_lo, b_hi, CLAMP_EMPTY: tl.constexpr):
    """The keys a tile of rows loops over: the union ``[key_lo, key_hi)`` of the rows' ranges (rows that see
    nothing do not count). When no row sees a key the span is empty: ``[NO_KEY, 0)``, or with ``CLAMP_EMPTY``
    ``[key_hi, key_hi)`` for callers that do arithmetic on its length (the decode splits)."""
    if CLAMP_EMPTY:
        key_hi = tl.max(b_hi, axis=0)
        key_lo = tl.minimum(tl.min(tl.where(b_hi > b_lo, b_lo, NO_KEY), axis=0), key_hi)
    else:
        key_lo = tl.min(tl.where(b_hi > b_lo, b_lo, NO_KEY), axis=0)
        key_hi = tl.max(b_hi, axis=0)
    return key_lo, key_hi


@triton.jit
def row_keys_visible(offs_n, b_lo, b_hi, ROW_KEYS: tl.constexpr, TRANSPOSED: tl.constexpr):
    """The [rows, keys] (or, ``TRANSPOSED``, [keys, rows]) visibility of keys ``offs_n`` under per-row bounds:
    ``ROW_KEYS`` "range", a row sees ``[b_lo, b_hi)``; "end", the keys ``< b_hi``."""
    if TRANSPOSED:
        if ROW_KEYS == "range":
            visible = (offs_n[:, None] >= b_lo[None, :]) & (offs_n[:, None] < b_hi[None, :])
        else:
            visible = offs_n[:, None] < b_hi[None, :]
    else:
        if ROW_KEYS == "range":
            visible = (offs_n[None, :] >= b_lo[:, None]) & (offs_n[None, :] < b_hi[:, None])
        else:
            visible = offs_n[None, :] < b_hi[:, None]
    return visible


@triton.jit
def key_kept(p_keep, offs_n, n_ok):
    """The key padding mask of keys ``offs_n``: true where the byte at ``p_keep`` + key index is nonzero; false
    where ``n_ok`` is (keys past the source, never read)."""
    return tl.load(p_keep + offs_n, mask=n_ok, other=0) != 0


# ----------------------------------------------------------------------------------------------------------------
# Forward: online softmax and its ending
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def softmax_state(ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """The online softmax's starting state: running max ``-inf``, running sum 0, accumulator 0 (fp32)."""
    b_m = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([ROWS], dtype=tl.float32)
    b_acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    return b_m, b_l, b_acc


@triton.jit
def softmax_rescale(b_s2, b_m, b_l, MAY_BE_EMPTY: tl.constexpr):
    """The statistics half of one online-softmax step: ``b_s2`` are a key tile's scores in the log2 domain
    (``-inf`` where a row may not look). Returns the new running max and sum, the tile's weights ``p`` and the
    factor ``alpha`` that rescales what was accumulated before.

    ``MAY_BE_EMPTY``: a row may have seen no key yet (masked families); it then keeps a finite pivot so that
    ``exp2(-inf - pivot)`` is 0 and not NaN. Without it (every tile holds a key of every row) the pivot is the max.
    """
    b_m_new = tl.maximum(b_m, tl.max(b_s2, axis=1))
    if MAY_BE_EMPTY:
        b_pivot = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
    else:
        b_pivot = b_m_new
    b_p = tl.exp2(b_s2 - b_pivot[:, None])
    b_alpha = tl.exp2(b_m - b_pivot)
    b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
    return b_m_new, b_l, b_p, b_alpha


@triton.jit
def online_softmax_step(b_s2, b_v, b_m, b_l, b_acc, DOT_PRECISION: tl.constexpr, MAY_BE_EMPTY: tl.constexpr):
    """One key tile of FlashAttention's online softmax, its values ``b_v`` already loaded: :func:`softmax_rescale`,
    then the accumulator. P is rounded to the value dtype before the product, as every fp16/bf16 FlashAttention
    does."""
    b_m, b_l, b_p, b_alpha = softmax_rescale(b_s2, b_m, b_l, MAY_BE_EMPTY)
    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
    return b_m, b_l, b_acc


@triton.jit
def attend_keys(b_q, p_k, p_v, b_m, b_l, b_acc, kt_offs, v_offs, start, stop, b_lo, b_hi, d_ok, qk_scale,
                stride_kl, stride_vl, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, ROW_KEYS: tl.constexpr,
                V_FIRST: tl.constexpr, p_keep=None, KEY_MASK: tl.constexpr = False):
    """The online softmax over the keys ``[start, stop)`` of one contiguous key source (``p_k`` / ``p_v`` point at
    key ``start``; ``kt_offs`` / ``v_offs`` are the in-tile offsets of a K^T and a V tile), continuing from the
    state ``(b_m, b_l, b_acc)``.

    ``ROW_KEYS``, the family's visibility rule as per-row bounds in the same key numbering as ``start``: "range",
    a row sees the keys ``[b_lo, b_hi)``; "end", the keys ``< b_hi``; "all", every key of the range (no row is
    ever empty, ``b_lo`` / ``b_hi`` are not read).

    ``KEY_MASK``: a key padding mask ANDed with the rule: a row sees only the keys whose byte at ``p_keep`` + key
    index (the same numbering) is nonzero, the same for every row. A row may then see none of its keys, so the
    online softmax runs with ``MAY_BE_EMPTY`` whenever ``ROW_KEYS`` is not "all" or the mask is on. Off (the
    default), the helper compiles exactly as without it.

    ``V_FIRST``: load the V tile with the K tile, before the softmax statistics, rather than once the weights are
    known. Which order compiles to fewer registers depends on the family's tiles (the compile check measured it:
    mllama's GQA row tiles, notably its unpipelined fp32 configs, want V first; the others V last)."""
    cols = tl.arange(0, BLOCK_N)
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + cols
        n_ok = offs_n < stop
        b_kt = tl.load(p_k + kt_offs, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        b_s = tl.dot(b_q, b_kt, input_precision=DOT_PRECISION) * qk_scale  # [rows, BLOCK_N], log2 domain
        if ROW_KEYS == "all":
            if KEY_MASK:  # the keep bytes past ``stop`` read as 0: the padding of the last tile stays hidden
                b_s = tl.where(key_kept(p_keep, offs_n, n_ok)[None, :], b_s, float("-inf"))
            else:
                b_s = tl.where(n_ok[None, :], b_s, float("-inf"))
        else:
            visible = row_keys_visible(offs_n, b_lo, b_hi, ROW_KEYS, False)
            if KEY_MASK:
                visible = visible & key_kept(p_keep, offs_n, n_ok)[None, :]
            b_s = tl.where(visible, b_s, float("-inf"))
        if V_FIRST:
            b_v = tl.load(p_v + v_offs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            b_m, b_l, b_acc = online_softmax_step(b_s, b_v, b_m, b_l, b_acc, DOT_PRECISION,
                                                  (ROW_KEYS != "all") | KEY_MASK)
        else:
            b_m, b_l, b_p, b_alpha = softmax_rescale(b_s, b_m, b_l, (ROW_KEYS != "all") | KEY_MASK)
            b_v = tl.load(p_v + v_offs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
        p_k += BLOCK_N * stride_kl
        p_v += BLOCK_N * stride_vl
    return b_m, b_l, b_acc


@triton.jit
def softmax_output(b_l, b_acc, MAY_BE_EMPTY: tl.constexpr):
    """The ending's output: the accumulator normalised (fp32). With ``MAY_BE_EMPTY`` a row that saw no key gets
    exactly 0 (its accumulator is 0; the rule of every family); without it every row saw a key (``l >= 1``)."""
    if MAY_BE_EMPTY:
        return b_acc / tl.where(b_l > 0.0, b_l, 1.0)[:, None]
    else:
        return b_acc / b_l[:, None]


@triton.jit
def softmax_lse(b_m, b_l, MAY_BE_EMPTY: tl.constexpr, NATURAL_LSE: tl.constexpr):
    """The ending's LSE. ``NATURAL_LSE``: the natural-log LSE a forward saves for its backward pass, ``+inf`` for a
    row that saw nothing (so the backward's ``exp2(s - lse)`` is 0 there); otherwise the log2-domain
    ``m + log2(l)`` a split writes for the combine, ``-inf`` for a split that saw nothing (it then weighs 0)."""
    if MAY_BE_EMPTY:
        seen = b_l > 0.0  # a row that saw at least one key has l >= 1
        b_lse2 = b_m + tl.log2(tl.where(seen, b_l, 1.0))
        if NATURAL_LSE:
            b_lse = tl.where(seen, b_lse2 * LN2, float("inf"))
        else:
            b_lse = tl.where(seen, b_lse2, float("-inf"))
    else:
        b_lse = b_m + tl.log2(b_l)
        if NATURAL_LSE:
            b_lse = b_lse * LN2
    return b_lse


# ----------------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def row_delta(b_o, b_do):
    """``delta = rowsum(o * do)`` in fp32: the softmax-Jacobian term of the dK/dV and dQ steps (elementwise math
    never runs in 16 bits: it would lose precision, and the interpreter gets bf16 arithmetic wrong)."""
    return tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), axis=1)


@triton.jit
def probabilities(b_s2, b_lse2, visible):
    """The forward's probabilities of a [rows, keys] tile of log2-domain scores, recomputed from the saved LSE
    (log2 domain); 0 where ``visible`` is false."""
    return tl.where(visible, tl.exp2(b_s2 - b_lse2[:, None]), 0.0)


@triton.jit
def score_grads(b_p, b_do, b_vt, b_delta, DOT_PRECISION: tl.constexpr):
    """``ds = p * (do v^T - delta)`` of a [rows, keys] tile (fp32)."""
    b_dp = tl.dot(b_do, b_vt, input_precision=DOT_PRECISION)
    return b_p * (b_dp - b_delta[:, None])


@triton.jit
def dq_keys(b_q, b_do, b_lse2, b_delta, p_k, p_v, b_dq, kt_offs, vt_offs, start, stop, b_lo, b_hi, d_ok,
            qk_scale, stride_kl, stride_vl, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
            ROW_KEYS: tl.constexpr, p_keep=None, KEY_MASK: tl.constexpr = False):
    """dQ of one query tile over the keys ``[start, stop)`` of one key source (unscaled: the caller multiplies by
    the softmax scale once): ``dq += ds k``. ``ROW_KEYS`` as in :func:`attend_keys` ("range" or "end");
    ``KEY_MASK`` / ``p_keep`` too (a hidden key has p = 0, so it adds nothing)."""
    cols = tl.arange(0, BLOCK_N)
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + cols
        dn_ok = d_ok[:, None] & (offs_n < stop)[None, :]
        b_kt = tl.load(p_k + kt_offs, mask=dn_ok, other=0.0)
        b_vt = tl.load(p_v + vt_offs, mask=dn_ok, other=0.0)
        b_s = tl.dot(b_q, b_kt, input_precision=DOT_PRECISION) * qk_scale  # [rows, BLOCK_N]
        visible = row_keys_visible(offs_n, b_lo, b_hi, ROW_KEYS, False)
        if KEY_MASK:
            visible = visible & key_kept(p_keep, offs_n, offs_n < stop)[None, :]
        b_p = probabilities(b_s, b_lse2, visible)
        b_ds = score_grads(b_p, b_do, b_vt, b_delta, DOT_PRECISION)
        b_dq += tl.dot(b_ds.to(b_kt.dtype), tl.trans(b_kt), input_precision=DOT_PRECISION)
        p_k += BLOCK_N * stride_kl
        p_v += BLOCK_N * stride_vl
    return b_dq


@triton.jit
def dkdv_step(b_k, b_v, b_q, b_do, b_lse2, b_delta, offs_n, b_lo, b_hi, b_dk, b_dv, qk_scale,
              DOT_PRECISION: tl.constexpr, ROW_KEYS: tl.constexpr, MASK_FIRST: tl.constexpr, b_keep=None,
              KEY_MASK: tl.constexpr = False):
    """One block of query rows' contribution to the gradients of the key tile ``offs_n``, computed transposed
    ([keys, rows]) so the accumulators need no transpose: ``dv += p^T do``, ``dk += ds^T q`` (unscaled) with
    ``ds = p * (do v^T - delta)``; the rows' bounds and ``ROW_KEYS`` as in :func:`attend_keys`.

    ``MASK_FIRST``: build the visibility mask before the score product rather than after it; like ``V_FIRST`` in
    :func:`attend_keys`, the order the compile check measured fewer registers and instructions with (mllama's GQA
    rows: first; media_xattn: after).

    ``KEY_MASK``: ``b_keep`` [BLOCK_N] is the key padding mask of the tile's keys (:func:`key_kept`), ANDed with the
    rule; the caller loads it once, since a dK/dV program keeps one key tile for all of its query rows."""
    if MASK_FIRST:
        visible_t = row_keys_visible(offs_n, b_lo, b_hi, ROW_KEYS, True)
        if KEY_MASK:
            visible_t = visible_t & b_keep[:, None]
    b_st = tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_N, rows]
    if not MASK_FIRST:
        visible_t = row_keys_visible(offs_n, b_lo, b_hi, ROW_KEYS, True)
        if KEY_MASK:
            visible_t = visible_t & b_keep[:, None]
    b_pt = tl.where(visible_t, tl.exp2(b_st - b_lse2[None, :]), 0.0)
    b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=DOT_PRECISION)
    b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PRECISION)  # [BLOCK_N, rows]
    b_dst = b_pt * (b_dpt - b_delta[None, :])
    b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=DOT_PRECISION)
    return b_dk, b_dv


@triton.jit(do_not_specialize=("stride_db", "stride_dh", "num_tokens"))
def attention_bwd_preprocess_kernel(
    O, DO, DELTA,
    stride_ob, stride_ot, stride_oh,
    stride_gb, stride_gt, stride_gh,
    stride_db, stride_dh,
    num_tokens, num_heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """The delta pre-pass of media_xattn and mllama_xattn, whose backward programs do not own all of a row's keys:
    ``delta[b, h, t] = rowsum(o * do)`` (fp32, (B, H, T)) for one ``BLOCK_M`` block of tokens of one (sample, head)
    (o, do: (B, T, H, D) with explicit strides). Not specialized: delta's strides and the token count change with
    the prompt."""
    pid_m = tl.program_id(0)
    b, h = sample_and_head(tl.program_id(1), num_heads)
    t0 = pid_m.to(tl.int64) * BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = pid_m * BLOCK_M + rows < num_tokens
    mask = m_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    p_o = O + b * stride_ob + h * stride_oh + t0 * stride_ot
    p_do = DO + b * stride_gb + h * stride_gh + t0 * stride_gt
    b_o = tl.load(p_o + rows[:, None] * stride_ot + offs_d[None, :], mask=mask, other=0.0)
    b_do = tl.load(p_do + rows[:, None] * stride_gt + offs_d[None, :], mask=mask, other=0.0)
    tl.store(DELTA + b * stride_db + h * stride_dh + t0 + rows, row_delta(b_o, b_do), mask=m_ok)



# One block of tokens per program, all of head_dim at once; no loop, so nothing to pipeline.
PREPROCESS_BLOCK_M = 64
PREPROCESS_CONFIG = triton.Config({}, num_warps=4, num_stages=1)


def row_deltas(o: torch.Tensor, do: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Launch the delta pre-pass: ``delta[b, h, t] = rowsum(o * do)`` for o, do (B, T, H, D) with any strides
    (unit stride along D) into ``delta`` (B, H, T), fp32, unit stride along T; returns ``delta``."""
    batch, num_tokens, heads, head_dim = o.shape
    attention_bwd_preprocess_kernel[(_utils.cdiv(num_tokens, PREPROCESS_BLOCK_M), batch * heads)](
        o, do, delta,
        o.stride(0), o.stride(1), o.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        delta.stride(0), delta.stride(1),
        num_tokens, heads,
        HEAD_DIM=head_dim, BLOCK_D=_utils.head_block(head_dim), BLOCK_M=PREPROCESS_BLOCK_M,
        num_warps=PREPROCESS_CONFIG.num_warps, num_stages=PREPROCESS_CONFIG.num_stages,
    )
    return delta


def row_deltas_aot_variant(dtype: torch.dtype, shape: tuple, label: str) -> _utils.AotVariant:
    """The pre-pass launch :func:`row_deltas` makes for o, do of this dtype and (B, T, H, D) shape."""
    batch, text, heads, head_dim = shape
    o = _utils.meta_tensor((batch, text, heads, head_dim), dtype)
    delta = _utils.meta_tensor((batch, heads, text), torch.float32)
    args = dict(O=o, DO=o, DELTA=delta, num_tokens=text, num_heads=heads, HEAD_DIM=head_dim,
                BLOCK_D=_utils.head_block(head_dim), BLOCK_M=PREPROCESS_BLOCK_M,
                **_utils.named_strides(("stride_ob", "stride_ot", "stride_oh"), o),
                **_utils.named_strides(("stride_gb", "stride_gt", "stride_gh"), o),
                **_utils.named_strides(("stride_db", "stride_dh"), delta))
    return _utils.aot_launch("attention_bwd_preprocess", attention_bwd_preprocess_kernel, args, PREPROCESS_CONFIG,
                             f"{label} {_utils.config_label(PREPROCESS_CONFIG)}")
