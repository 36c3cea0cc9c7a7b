"""Masked media cross-attention for decoding: a few new query tokens per sample attend to cached media K/V.

Math: exactly that of ``media_xattn`` (see its module docstring). Token ``t`` of sample ``b`` with
``j = text_time[b, t]`` sees keys ``[(j-1)*n, j*n)`` (immediate, 1 <= j <= M) or ``[0, min(j, M)*n)``
(all-previous); a token that sees nothing gets exactly 0. Inference only: no LSE is returned and there is no
backward (the dispatcher sends calls that need gradients to the prefill kernels). ``KEY_MASK``: a key padding mask
ANDed with the rule, as in ``media_xattn``.

Flash-decoding layout. A decode step has ``Tq`` = 1..16 query tokens per sample, far too few rows to fill a GPU
with one program per query tile, and in all-previous mode each token may see thousands of keys. So:

* One program owns all ``Tq`` rows of one (sample, head) as a single 16-row tile (rows past ``Tq`` are masked; the
  K/V tile it loads serves every row, so K/V is read once per (sample, head), not once per token), and one *split*
  of the key axis. Grid: ``(splits, batch // kv_group * heads, kv_group)``.
* The key range a program scans is the union of its rows' visible ranges, computed in-kernel from ``text_time``
  (no host read). That range is cut into ``splits`` nearly equal runs of whole ``BLOCK_N`` key tiles; split ``s``
  takes tiles ``[s * tiles // splits, (s + 1) * tiles // splits)``. Cutting the *visible* range rather than the
  whole key axis keeps every split busy when tokens see only a few of the media. Splits past the visible tiles
  write an empty partial.
* Each split writes a normalised partial output and its log2-domain LSE (``-inf`` when it saw no key) to an fp32
  workspace; a combine kernel merges the partials of each (sample, head, token) with the LSE trick and writes ``o``
  in q's dtype, exactly 0 where no split saw a key.
* With one split (immediate mode with 64 latents: a token's range is one 64-key tile) the split kernel writes the
  final output itself (``DIRECT``): one launch, no workspace.

Host side (``launch`` in ``fastflamingo/ops/media_decode.py``): the number of splits and the tile sizes come from the shapes only (batch, heads,
key count, head_dim, dtype, the device's SM count), never from tensor values and never from timing, and the
launcher performs no ``.item()``/``.tolist()``/``.cpu()`` or branch on tensor values. Once the kernels are compiled
(the first call), a decode step can therefore be captured in a CUDA graph and replayed with new inputs.

Offsets: sample/head/key-start/workspace bases are int64 scalars; offsets inside a tile are int32 (the launcher
keeps ``BLOCK_N * token stride`` below 2**31). fp32 statistics and fp32 ``tl.dot`` accumulation throughout.
"""
from __future__ import annotations

from itertools import product
from typing import List, Optional

import torch
import triton
import triton.language as tl

# sm_count is part of this module's interface for the launcher
from ._utils import (ARCHS, INTERPRET, LOG2E, SM80, SM90, TORCH_TO_TRITON_DTYPE, AotVariant, aot_dot_precisions,
                     aot_launch, cdiv, config_label, device_arch, head_block, meta_tensor, named_strides, per_arch,
                     sm_count, table_key)  # noqa: F401
from ._launch import DECODE_SPLITS, split_count
from ._attention import (attend_keys, key_span, sample_and_head, softmax_lse, softmax_output, softmax_state,
                         text_time_keys)

# Rows of the query tile: every token of a decode step sits in one tile, and tl.dot needs at least 16 rows.
BLOCK_M = 16
MAX_TOKENS = BLOCK_M
# Splits merged per iteration of the combine kernel.
COMBINE_BLOCK_S = 16


# ================================================================================================================
# Kernels
# ================================================================================================================


# Not specialized (they change with the step's token count, the batch and the prompt; see kernels/media_xattn.py):
# text_time's strides, the token / media / split counts and the beam group. The fp32 workspace is laid out with its
# split and head axes padded to multiples of 16 (launcher), so its strides never change class; text_time may be a
# view at any offset (the last column of a prompt's), so its alignment is not specialized either.
@triton.jit(do_not_specialize=("stride_tb", "stride_tt", "num_tokens", "num_media", "num_splits", "kv_group"),
            do_not_specialize_on_alignment=("TEXT_TIME",))
def _media_decode_split_kernel(
    Q, K, V, O, O_PART, LSE_PART, TEXT_TIME,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kl, stride_kh, stride_vb, stride_vl, stride_vh,
    stride_ob, stride_ot, stride_oh, stride_wbh, stride_wt, stride_ws, stride_lbh, stride_lt, stride_tb, stride_tt,
    num_heads, num_tokens, num_media, latents, num_splits, kv_group, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IMMEDIATE: tl.constexpr, DIRECT: tl.constexpr, DOT_PRECISION: tl.constexpr, KEEP=None,
    KEY_MASK: tl.constexpr = False,
):
    """One program: every query token of one (sample, head), one split of their visible key range.

    ``kv_group``: sample ``b`` reads K/V row ``b // kv_group`` (the beams of one sample share its cached media
    projection); 1 for ordinary calls. Grid axis 1 runs over (K/V row, head) and axis 2 over the ``kv_group``
    samples of a K/V row, so no program divides by ``kv_group`` (a runtime integer division costs registers).

    ``DIRECT`` (one split): write the normalised output to ``O`` in its dtype. Otherwise write the fp32 partial
    ``acc / l`` to ``O_PART[b*H + h, t, split, :]`` and ``m + log2(l)`` (log2 domain, ``-inf`` if no key) to
    ``LSE_PART[b*H + h, t, split]``.

    ``KEY_MASK``: ``KEEP`` is a contiguous (K/V rows, num_media * latents) byte mask, nonzero = visible key, ANDed
    with the media rule; the sample reads the row of its K/V row. The splits still cut the rows' visible range (the
    mask is not read on the host), so a split, or every split of a row, may see no key: 0 and LSE -inf, as above.
    """
    pid_split = tl.program_id(0)
    pid_gh = tl.program_id(1)
    b_kv, h = sample_and_head(pid_gh, num_heads)  # the K/V row (shared by the kv_group samples of a beam group)
    b = b_kv * kv_group + tl.program_id(2)  # the query sample

    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = rows < num_tokens
    d_ok = offs_d < HEAD_DIM
    md_ok = m_ok[:, None] & d_ok[None, :]

    b_tt = tl.load(TEXT_TIME + b * stride_tb + rows * stride_tt, mask=m_ok, other=0)
    b_lo, b_hi = text_time_keys(b_tt, num_media, latents, IMMEDIATE)  # rows past num_tokens see nothing
    key_lo, key_hi = key_span(b_lo, b_hi, True)  # (0, 0) when no row sees a key: no tiles to split

    # This split's share of the visible key tiles (int64: tiles * splits may pass 2**31 for huge key counts).
    num_tiles = tl.cdiv(key_hi - key_lo, BLOCK_N).to(tl.int64)
    tile_first = (pid_split * num_tiles // num_splits).to(tl.int32)
    tile_end = ((pid_split + 1) * num_tiles // num_splits).to(tl.int32)
    start = key_lo + tile_first * BLOCK_N
    stop = tl.minimum(key_lo + tile_end * BLOCK_N, key_hi)

    p_q = Q + b * stride_qb + h * stride_qh
    b_q = tl.load(p_q + rows[:, None] * stride_qt + offs_d[None, :], mask=md_ok, other=0.0)  # [BLOCK_M, BLOCK_D]
    # scalar base pointers of the current key tile, advanced by BLOCK_N keys per step
    p_k = K + b_kv * stride_kb + h * stride_kh + start.to(tl.int64) * stride_kl
    p_v = V + b_kv * stride_vb + h * stride_vh + start.to(tl.int64) * stride_vl
    kt_offs = offs_d[:, None] + cols[None, :] * stride_kl  # [BLOCK_D, BLOCK_N]
    v_offs = cols[:, None] * stride_vl + offs_d[None, :]  # [BLOCK_N, BLOCK_D]

    p_keep = KEEP
    if KEY_MASK:
        p_keep = KEEP + b_kv * (num_media * latents)  # this K/V row's keys (int64: b_kv is)

    b_m, b_l, b_acc = softmax_state(BLOCK_M, BLOCK_D)
    b_m, b_l, b_acc = attend_keys(b_q, p_k, p_v, b_m, b_l, b_acc, kt_offs, v_offs, start, stop, b_lo, b_hi, d_ok,
                                  qk_scale, stride_kl, stride_vl, BLOCK_N, DOT_PRECISION, "range", False, p_keep,
                                  KEY_MASK)
    b_o = softmax_output(b_l, b_acc, True)  # exactly 0 for rows that saw nothing here
    if DIRECT:
        p_o = O + b * stride_ob + h * stride_oh
        tl.store(p_o + rows[:, None] * stride_ot + offs_d[None, :], b_o.to(O.dtype.element_ty), mask=md_ok)
    else:
        split = pid_split.to(tl.int64)
        bh = b * num_heads + h  # the combine kernel's (sample, head) row
        p_w = O_PART + bh * stride_wbh + split * stride_ws
        tl.store(p_w + rows[:, None] * stride_wt + offs_d[None, :], b_o, mask=md_ok)
        b_lse = softmax_lse(b_m, b_l, True, False)  # -inf for rows that saw nothing: they weigh 0 in the combine
        tl.store(LSE_PART + bh * stride_lbh + split + rows * stride_lt, b_lse, mask=m_ok)


@triton.jit(do_not_specialize=("num_splits",))
def _media_decode_combine_kernel(
    O_PART, LSE_PART, O,
    stride_wbh, stride_wt, stride_ws, stride_lbh, stride_lt, stride_ob, stride_ot, stride_oh,
    num_heads, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One program: one (token, sample, head). ``o = sum_s 2^(lse_s - m) o_s / sum_s 2^(lse_s - m)`` over the
    splits, merged ``BLOCK_S`` at a time with a running max; 0 when every split saw nothing."""
    t = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1)
    b, h = sample_and_head(pid_bh, num_heads)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    p_w = O_PART + pid_bh.to(tl.int64) * stride_wbh + t * stride_wt
    p_l = LSE_PART + pid_bh.to(tl.int64) * stride_lbh + t * stride_lt
    w_offs = offs_s[:, None] * stride_ws + offs_d[None, :]  # [BLOCK_S, BLOCK_D]
    m = tl.full([], float("-inf"), dtype=tl.float32)
    l = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        s_ok = s0 + offs_s < num_splits
        lse = tl.load(p_l + s0 + offs_s, mask=s_ok, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(lse, axis=0))
        pivot = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - pivot)
        w = tl.exp2(lse - pivot)  # 0 for empty splits and padding lanes
        part = tl.load(p_w + s0 * stride_ws + w_offs, mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        # where(): an empty split contributes exactly nothing, whatever its partial holds
        acc = acc * alpha + tl.sum(tl.where(w[:, None] > 0.0, w[:, None] * part, 0.0), axis=0)
        l = l * alpha + tl.sum(w, axis=0)
        m = m_new
    out = acc / tl.where(l > 0.0, l, 1.0)
    p_o = O + b * stride_ob + h * stride_oh + t * stride_ot
    tl.store(p_o + offs_d, out.to(O.dtype.element_ty), mask=d_ok)


# ================================================================================================================
# Launch configurations and the split count (shapes only: nothing here reads a tensor value or times anything)
# ================================================================================================================

# Under the interpreter the cost is per (program x tile), not per FLOP: big key tiles.
INTERPRETER_CONFIG = triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=1)

# GPU config per (precision, head tile): (BLOCK_N keys per tile, num_warps, num_stages[, architectures]), the first
# row that ships on the device's architecture (a row without architectures ships on sm_80 and sm_90). Decode is
# bandwidth-bound, so the key tile is sized for bytes in flight (2-3 stages of 64 keys x 2 tensors per program)
# rather than for MMA shape; 64 also matches Flamingo's 64 latents, so an immediate-mode token reads exactly one tile.
# fp32 runs IEEE or TF32 products (torch's matmul precision) whose operands live in registers, and the two compile
# differently: the fp32 rows are those that compile cleanly both ways under both Triton releases (on sm_90 at
# head_dim 128 only 16-key tiles with 8 warps or 32-key tiles with 8 warps and 3 stages do). Every entry compiles for
# its architectures without a spill, within 240 registers and within shared memory under the pinned and the newest
# Triton (python -m fastflamingo.aot).
_GPU_CONFIG_TABLE = {
    ("lowp", 64): [(64, 4, 3)],
    ("lowp", 128): [(64, 4, 3)],
    ("fp32", 64): [(64, 4, 2, SM80), (64, 8, 1, SM90)],
    ("fp32", 128): [(32, 8, 1, SM80), (32, 8, 3, SM90)],
}
_GPU_CONFIGS = per_arch(_GPU_CONFIG_TABLE, lambda n, w, s: triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s))
COMBINE_CONFIG = triton.Config({}, num_warps=4, num_stages=1)


def shipped_config(dtype: torch.dtype, head_dim: int, arch: Optional[int] = None) -> triton.Config:
    """The GPU config of the split kernel for this dtype and head size on ``arch`` (default: this device's)."""
    return _GPU_CONFIGS[(table_key(dtype, head_dim), arch or device_arch())][0]


def default_config(dtype: torch.dtype, head_dim: int, device: Optional[torch.device] = None) -> triton.Config:
    return INTERPRETER_CONFIG if INTERPRET else shipped_config(dtype, head_dim, device_arch(device))


def choose_splits(batch: int, heads: int, visible_keys: int, block_n: int, sms: int) -> int:
    """Splits of the key axis for a launch, by ``_launch``'s rule for decode.

    ``visible_keys`` is the most keys one token can see (``latents`` in immediate mode, ``num_media * latents`` in
    all-previous mode). One split when a token's keys fit one tile (immediate mode with 64 latents) or when the
    (sample, head) programs alone already fill the GPU.
    """
    return split_count(batch * heads, cdiv(max(visible_keys, 0), block_n), sms, DECODE_SPLITS)


# ================================================================================================================
# Ahead-of-time compile variants (python -m fastflamingo.aot)
# ================================================================================================================

# Representative decode steps (head_dim, batch, heads, media), one new token per sample, 64 latents per media:
# OpenFlamingo-9B at batch 1 (8 x 64), 16 heads of 96 at batch 4, IDEFICS-80B at batch 16 (64 x 128); the split
# variants use the split count an H100/H200 gets at OpenFlamingo's shape in all-previous mode (17).
_AOT_STEPS = ((64, 1, 8, 33), (96, 4, 16, 17), (128, 16, 64, 33))
_AOT_LATENTS, _AOT_SPLITS = 64, 17


def _aot_args(dtype: torch.dtype, step: tuple, splits: int, precision: str, key_mask: bool = False) -> dict:
    """What ``fastflamingo/ops/media_decode.py`` passes: q (B, 1, H, D) from a contiguous projection, k and v views
    of one fused cached (B, M*n, 2*H*D) projection, int32 text_time (B, 1); several splits: fp32 partials with the
    head axis padded to BLOCK_D and the LSEs' split axis to a multiple of 16; one split: o as the unused workspace.
    ``key_mask``: a (B, M*n) byte mask (``KEY_MASK``)."""
    head_dim, batch, heads, media = step
    q = meta_tensor((batch, 1, heads, head_dim), dtype)
    k = meta_tensor((batch, media * _AOT_LATENTS, 2, heads, head_dim), dtype)[:, :, 0]
    text_time = meta_tensor((batch, 1), torch.int32)
    padded = cdiv(splits, 16) * 16
    part = meta_tensor((batch * heads, 1, splits, head_block(head_dim)), torch.float32) if splits > 1 else q
    lse = meta_tensor((batch * heads, 1, padded), torch.float32) if splits > 1 else q
    args = dict(Q=q, K=k, V=k, O=q, O_PART=part, LSE_PART=lse, TEXT_TIME=text_time, num_heads=heads, num_tokens=1,
                num_media=media, latents=_AOT_LATENTS, num_splits=splits, kv_group=1,
                qk_scale=head_dim ** -0.5 * LOG2E, HEAD_DIM=head_dim, BLOCK_D=head_block(head_dim), BLOCK_M=BLOCK_M,
                DOT_PRECISION=precision, DIRECT=splits == 1, KEY_MASK=key_mask,
                KEEP=meta_tensor((batch, media * _AOT_LATENTS), torch.uint8) if key_mask else None,
                stride_wbh=0, stride_wt=0, stride_ws=0, stride_lbh=0, stride_lt=0)  # DIRECT: no workspace
    for names, t in ((("stride_qb", "stride_qt", "stride_qh"), q), (("stride_kb", "stride_kl", "stride_kh"), k),
                     (("stride_vb", "stride_vl", "stride_vh"), k), (("stride_ob", "stride_ot", "stride_oh"), q),
                     (("stride_tb", "stride_tt"), text_time)):
        args.update(named_strides(names, t))
    if splits > 1:
        args.update(named_strides(("stride_wbh", "stride_wt", "stride_ws"), part),
                    **named_strides(("stride_lbh", "stride_lt"), lse))
    return args


def aot_variants(quick: bool = False) -> List[AotVariant]:
    """The split kernel (one split, writing the output, and several, writing partials; both modes) at the config
    each architecture ships for every dtype and head size, and the combine kernel per head size; the key-mask
    specialization at head sizes 64 and 128 (immediate with one split, all-previous with several). ``quick``: bf16,
    head_dim 128."""
    dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16, torch.float32)
    steps = [s for s in _AOT_STEPS if not quick or s[0] == 128]
    variants = []
    for dtype, step, arch in ((d, s, a) for d in dtypes for s in steps for a in ARCHS):
        io, head_dim = TORCH_TO_TRITON_DTYPE[dtype], step[0]
        config = shipped_config(dtype, head_dim, arch)
        for immediate, splits, precision in product((True, False), (1, _AOT_SPLITS), aot_dot_precisions(dtype)):
            label = (f"{io}{'/tf32' if precision == 'tf32' and dtype == torch.float32 else ''} d{head_dim} "
                     f"{'imm' if immediate else 'prev'} {'direct' if splits == 1 else 'split'} {config_label(config)}")
            variants.append(aot_launch("media_decode_split", _media_decode_split_kernel,
                                       dict(_aot_args(dtype, step, splits, precision), IMMEDIATE=immediate), config,
                                       label, archs=(arch,)))
        for (immediate, splits), precision in product(((True, 1), (False, _AOT_SPLITS)) if not quick and
                                                      head_dim in (64, 128) else (), aot_dot_precisions(dtype)):
            label = (f"{io}{'/tf32' if precision == 'tf32' and dtype == torch.float32 else ''} d{head_dim} "
                     f"{'imm' if immediate else 'prev'} key_mask {'direct' if splits == 1 else 'split'} "
                     f"{config_label(config)}")
            variants.append(aot_launch("media_decode_split", _media_decode_split_kernel,
                                       dict(_aot_args(dtype, step, splits, precision, key_mask=True),
                                            IMMEDIATE=immediate), config, label, archs=(arch,)))
        part = meta_tensor((step[1] * step[2], 1, _AOT_SPLITS, head_block(head_dim)), torch.float32)
        lse = meta_tensor((step[1] * step[2], 1, cdiv(_AOT_SPLITS, 16) * 16), torch.float32)
        o = meta_tensor((step[1], 1, step[2], head_dim), dtype)
        args = dict(O_PART=part, LSE_PART=lse, O=o, num_heads=step[2], num_splits=_AOT_SPLITS, HEAD_DIM=head_dim,
                    BLOCK_D=head_block(head_dim), BLOCK_S=COMBINE_BLOCK_S,
                    **named_strides(("stride_wbh", "stride_wt", "stride_ws"), part),
                    **named_strides(("stride_lbh", "stride_lt"), lse),
                    **named_strides(("stride_ob", "stride_ot", "stride_oh"), o))
        variants.append(aot_launch("media_decode_combine", _media_decode_combine_kernel, args, COMBINE_CONFIG,
                                   f"{io} d{head_dim} {config_label(COMBINE_CONFIG)}", archs=(arch,)))
    return variants
