"""Masked media cross-attention for decode steps on the split-key kernels of ``kernels/media_decode.py``: the
launcher and the ``fastflamingo::media_decode`` custom op (inference only: no autograd; calls that need gradients
take the prefill op of ``fastflamingo.ops.media_xattn``, ``fastflamingo.functional`` decides).

Importing this module needs torch only: triton and the kernels are imported on the first launch.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..kernels._launch import ConfigLike, addressable, check_out
from .media_xattn import _check_inputs, _text_time_int32, key_mask_args


def _kernels():
    """(the kernel module, kernels/_utils): imported on the first launch, since they import triton."""
    from ..kernels import _utils, media_decode

    return media_decode, _utils


@torch.library.custom_op("fastflamingo::media_decode", mutates_args=())
def decode_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_time: torch.Tensor,
    num_media: int, latents: int, immediate: bool, scale: float, kv_group: int = 1,
    key_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    # called by fastflamingo.functional.media_xattn, which validated the arguments: the launcher checks nothing again
    return launch(q, k, v, text_time, num_media, latents, immediate, scale, kv_group=kv_group, key_mask=key_mask,
                  validated=True)


@decode_op.register_fake
def _(q, k, v, text_time, num_media, latents, immediate, scale, kv_group=1, key_mask=None):
    return q.new_empty(q.shape)  # the launcher allocates a contiguous output, like new_empty


def media_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_time: torch.Tensor,
    num_media: int, latents: int, immediate: bool, scale: float, kv_group: int = 1,
    key_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """A decode step (at most ``DECODE_MAX_TOKENS`` query tokens per sample, no gradient): no host synchronisation
    and no data-dependent host decision, so it can be captured in a CUDA graph after the first call. Shapes and
    semantics: :func:`fastflamingo.functional.media_xattn`."""
    return decode_op(q, k, v, text_time, int(num_media), int(latents), bool(immediate), float(scale), int(kv_group),
                     key_mask)


def launch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_time: torch.Tensor,
    num_media: int, latents: int, immediate: bool, scale: float,
    config: Optional[ConfigLike] = None, num_splits: Optional[int] = None, *, out: Optional[torch.Tensor] = None,
    kv_group: int = 1, key_mask: Optional[torch.Tensor] = None, validated: bool = False,
) -> torch.Tensor:
    """Decode-step forward: o (B, Tq, H, D) in q's dtype.

    Args:
        q: (B, Tq, H, D) new query tokens, Tq <= 16. k, v: (B, M*n, H, D) cached media keys/values, media-major,
            any strides (views of a fused K/V projection are fine; a tensor whose last stride is not 1 is copied).
            fp32, fp16 or bf16, all the same dtype; D <= 128.
        text_time: (B, Tq) 1-based media index per token (0: none); any integer dtype, any strides.
        num_media, latents: M and n. immediate: immediate (True) or all-previous (False) mode. scale: softmax scale.
        config: force the split kernel's config (``{"BLOCK_N": 16}``). num_splits: force the split count (>= 1);
            splits beyond the visible key tiles are allowed (they write empty partials).
        out: optional preallocated output (unit last stride).
        kv_group: k, v have batch ``B // kv_group`` and query sample ``b`` reads K/V row ``b // kv_group`` (beam
            search: the beams of a sample share one cached media projection).
        key_mask: None or bool (B // kv_group, M*n), True = visible key, ANDed with the media rule; sample ``b``
            reads row ``b // kv_group``. A token left with no visible key gets 0. Not read on the host.
        validated: the caller checked the arguments (the custom op, after ``fastflamingo.functional``'s checks); a
            direct call is checked here.

    No host synchronisation and no data-dependent host decision: capturable in a CUDA graph after the first call.
    """
    K, U = _kernels()
    kv_group = int(kv_group)
    if not validated:
        _check_inputs(q, k, v, text_time, num_media, latents, kv_group, key_mask)
        if q.shape[1] > K.MAX_TOKENS:
            raise ValueError(f"decode serves at most {K.MAX_TOKENS} query tokens per sample, got {q.shape[1]}")
    batch, num_tokens, heads, head_dim = q.shape
    q, k, v = (addressable(t, name) for t, name in ((q, "q"), (k, "k"), (v, "v")))
    text_time = _text_time_int32(text_time)
    o = addressable(check_out("out", out, q.shape, q.dtype, q.device), "out", copy=False)
    if o.numel() == 0:
        return o
    if num_media * latents == 0:
        return o.zero_()

    cfg = U.as_config(config) if config is not None else K.default_config(q.dtype, head_dim, q.device)
    block_n = cfg.kwargs["BLOCK_N"]
    if num_splits is None:
        visible = latents if immediate else num_media * latents
        num_splits = K.choose_splits(batch, heads, visible, block_n, K.sm_count(q.device))
    num_splits = int(num_splits)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    block_d = U.head_block(head_dim)
    common = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=K.BLOCK_M, BLOCK_N=block_n,
                  IMMEDIATE=bool(immediate), DOT_PRECISION=U.dot_precision(q.dtype),
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages, **key_mask_args(key_mask))
    grid = (num_splits, batch // kv_group * heads, kv_group)  # axis 1: (K/V row, head); axis 2: its samples
    if num_splits == 1:
        # the only split sees every visible key: its normalised output is final
        K._media_decode_split_kernel[grid](
            q, k, v, o, o, o, text_time,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            o.stride(0), o.stride(1), o.stride(2),
            0, 0, 0, 0, 0,
            text_time.stride(0), text_time.stride(1),
            heads, num_tokens, num_media, latents, 1, kv_group, float(scale) * U.LOG2E,
            DIRECT=True, **common,
        )
        return o

    o_part, lse_part = split_workspace(batch * heads, num_tokens, num_splits, head_dim, q.device)
    K._media_decode_split_kernel[grid](
        q, k, v, o, o_part, lse_part, text_time,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse_part.stride(0), lse_part.stride(1),
        text_time.stride(0), text_time.stride(1),
        heads, num_tokens, num_media, latents, num_splits, kv_group, float(scale) * U.LOG2E,
        DIRECT=False, **common,
    )
    combine(o_part, lse_part, o, num_splits)
    return o


def split_workspace(rows: int, num_tokens: int, num_splits: int, head_dim: int,
                    device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Empty fp32 partials ``[(sample, head), token, split, :]`` and their LSEs for ``rows`` (sample, head) pairs,
    laid out for :func:`combine` (one token's splits contiguous). The head axis is padded to BLOCK_D and the LSEs'
    split axis to a multiple of 16, so every workspace stride is a multiple of 16 whatever the token and split
    counts: one compiled variant for every decode step (mllama_decode's split kernel writes the same layout)."""
    _, U = _kernels()
    o_part = torch.empty((rows, num_tokens, num_splits, U.head_block(head_dim)), dtype=torch.float32, device=device)
    lse_part = torch.empty((rows, num_tokens, U.cdiv(num_splits, 16) * 16), dtype=torch.float32, device=device)
    return o_part, lse_part


def combine(o_part: torch.Tensor, lse_part: torch.Tensor, o: torch.Tensor, num_splits: int) -> None:
    """``o`` (B, T, H, D) from the splits' partials of :func:`split_workspace`, merged in split order."""
    K, U = _kernels()
    batch, num_tokens, heads, head_dim = o.shape
    K._media_decode_combine_kernel[(num_tokens, batch * heads)](
        o_part, lse_part, o,
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse_part.stride(0), lse_part.stride(1),
        o.stride(0), o.stride(1), o.stride(2),
        heads, num_splits,
        HEAD_DIM=head_dim, BLOCK_D=U.head_block(head_dim), BLOCK_S=K.COMBINE_BLOCK_S,
        num_warps=K.COMBINE_CONFIG.num_warps, num_stages=K.COMBINE_CONFIG.num_stages,
    )
