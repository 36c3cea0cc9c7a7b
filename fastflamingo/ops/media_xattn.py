"""Masked media cross-attention (prefill, forward and backward) on the Triton kernels of
``kernels/media_xattn.py``: the launchers and the ``torch.library`` custom ops around them.

Two custom ops, ``fastflamingo::media_xattn_fwd`` (returns ``o`` and the fp32 LSE) and
``fastflamingo::media_xattn_bwd``, with fake (meta) implementations and an autograd registration. Custom ops are
opaque to torch.compile, so a compiled model calls the kernels as they are; an ``autograd.Function`` that launches
the kernels itself would be traced into by Dynamo and break (docs/testing.md, "torch.compile"). Decode steps (a few
tokens, no gradient) go to ``fastflamingo.ops.media_decode`` instead; ``fastflamingo.functional`` decides.

The launchers (:func:`launch_fwd`, :func:`launch_bwd`) are the host side of the kernels: they check what memory
safety needs (shapes, int32 tile offsets, the CUDA grid limit), build the device-side schedules, pick a launch
config and launch. Importing this module needs torch only: triton and the kernels are imported on the first launch.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .. import _backend
from .._checks import SUPPORTED_DTYPES, unsupported_dtype_reasons
from ..masks import memoised, visible_media
from ..kernels._launch import MAX_GRID_Y, MAX_HEAD_DIM, ConfigLike, addressable, check_out

MIN_HEAD_DIM = 16


def _kernels():
    """(the kernel module, kernels/_utils): imported on the first launch, since they import triton."""
    from ..kernels import _utils, media_xattn

    return media_xattn, _utils


@torch.library.custom_op("fastflamingo::media_xattn_fwd", mutates_args=())
def fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_time: torch.Tensor,
    num_media: int, latents: int, immediate: bool, scale: float, kv_group: int = 1,
    key_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    # called by fastflamingo.functional.media_xattn, which validated the arguments: the launcher checks nothing again
    return launch_fwd(q, k, v, text_time, num_media, latents, immediate, scale, kv_group=kv_group, key_mask=key_mask,
                      validated=True)


@fwd_op.register_fake
def _(q, k, v, text_time, num_media, latents, immediate, scale, kv_group=1, key_mask=None):
    batch, num_text, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, num_text), dtype=torch.float32)


@torch.library.custom_op("fastflamingo::media_xattn_bwd", mutates_args=())
def bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    text_time: torch.Tensor, num_media: int, latents: int, immediate: bool, scale: float,
    key_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return launch_bwd(do, q, k, v, o, lse, text_time, num_media, latents, immediate, scale, key_mask=key_mask,
                      validated=True)


@bwd_op.register_fake
def _(do, q, k, v, o, lse, text_time, num_media, latents, immediate, scale, key_mask=None):
    # the kernels allocate contiguous gradients, whatever the strides of q, k, v
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, text_time, num_media, latents, immediate, scale, kv_group, key_mask = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, text_time, key_mask)
    ctx.mask_args = (num_media, latents, immediate, scale)
    ctx.kv_group = kv_group


def _backward(ctx, grad_o, grad_lse):
    # lse is an internal statistic: the public function never returns it, so its gradient is ignored.
    q, k, v, o, lse, text_time, key_mask = ctx.saved_tensors
    num_media, latents, immediate, scale = ctx.mask_args
    if grad_o is None:
        return None, None, None, None, None, None, None, None, None, None
    if ctx.kv_group != 1:
        # the backward kernels take one K/V row per sample; grouped K/V only ever comes from the inference cache
        raise ValueError("media_xattn_fwd with kv_group > 1 has no backward (inference only)")
    dq, dk, dv = bwd_op(grad_o, q, k, v, o, lse, text_time, num_media, latents, immediate, scale, key_mask)
    return dq, dk, dv, None, None, None, None, None, None, None


fwd_op.register_autograd(_backward, setup_context=_setup_context)


def media_xattn(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_time: torch.Tensor,
    num_media: int, latents: int, immediate: bool, scale: float, kv_group: int = 1,
    key_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Masked media cross-attention through the prefill kernels; differentiable w.r.t. q, k and v (with
    ``kv_group`` 1). Shapes and semantics: :func:`fastflamingo.functional.media_xattn` (q (B, T, H, D), k/v
    (B // kv_group, num_media * latents, H, D), ``text_time`` (B, T) 1-based media index, 0 for none; ``key_mask``
    None or bool (B // kv_group, num_media * latents), True = visible)."""
    o, _ = fwd_op(q, k, v, text_time, int(num_media), int(latents), bool(immediate), float(scale), int(kv_group),
                  key_mask)
    return o


def unsupported_reasons(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> List[str]:
    """What the kernels cannot serve about these inputs, which ``fastflamingo.functional.media_xattn`` validated
    (4-D, one dtype, matching shapes; devices are checked by ``_backend``); empty: supported."""
    reasons = unsupported_dtype_reasons((("q", q), ("k", k), ("v", v)))
    head_dims = {q.shape[-1], k.shape[-1], v.shape[-1]}
    if len(head_dims) > 1:
        reasons.append(f"q, k, v head_dims differ: {sorted(head_dims)}")
    for head_dim in sorted(head_dims):
        if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
            reasons.append(f"head_dim {head_dim} is outside the supported {MIN_HEAD_DIM}..{MAX_HEAD_DIM}")
    if q.shape[0] * q.shape[2] > MAX_GRID_Y:  # the grid's second axis carries (sample, head)
        reasons.append(f"batch * heads = {q.shape[0] * q.shape[2]} > {MAX_GRID_Y} (the CUDA grid's limit)")
    reasons += _backend.interpreter_bf16_reasons((q, k, v))
    return reasons


def _check_inputs(q, k, v, text_time, num_media, latents, kv_group=1, key_mask=None):
    """What memory safety needs of a direct launcher call (ValueError / TypeError otherwise)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be (batch, tokens, heads, head_dim)")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q, k, v must share a dtype among fp32/fp16/bf16, got {q.dtype}, {k.dtype}, {v.dtype}")
    batch, _, heads, head_dim = q.shape
    if kv_group < 1 or batch % kv_group:
        raise ValueError(f"kv_group must be >= 1 and divide the batch {batch}, got {kv_group}")
    kv_shape = (batch // kv_group, num_media * latents, heads, head_dim)
    if k.shape != kv_shape or v.shape != k.shape:
        raise ValueError(f"k, v must be {kv_shape}, got {tuple(k.shape)} and {tuple(v.shape)}")
    if tuple(text_time.shape) != (batch, q.shape[1]):
        raise ValueError(f"text_time must be {(batch, q.shape[1])}, got {tuple(text_time.shape)}")
    if key_mask is not None and (key_mask.dtype != torch.bool or tuple(key_mask.shape) != kv_shape[:2]):
        raise ValueError(f"key_mask must be bool {kv_shape[:2]} (K/V rows, keys), got {key_mask.dtype} "
                         f"{tuple(key_mask.shape)}")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} > {MAX_HEAD_DIM} is not supported")
    if batch * heads > MAX_GRID_Y:  # the grid's second axis carries (sample, head)
        raise ValueError(f"batch * heads = {batch * heads} > {MAX_GRID_Y} is not supported")


def _text_time_int32(text_time: torch.Tensor) -> torch.Tensor:
    return text_time if text_time.dtype == torch.int32 else text_time.to(torch.int32)


def key_mask_args(key_mask: Optional[torch.Tensor]) -> dict:
    """The kernels' key-mask arguments: ``KEEP``, the mask's bytes as a contiguous (K/V rows, keys) uint8 tensor
    (made once per launch, shared by every kernel of the launch; bool is one byte, so a contiguous mask is only
    reinterpreted), and ``KEY_MASK``. Without a mask they are the kernels' defaults (None, False), with which the
    kernels compile exactly as before the feature; they are passed explicitly all the same, as the AOT variants
    name them."""
    if key_mask is None:
        return dict(KEEP=None, KEY_MASK=False)
    return dict(KEEP=key_mask.contiguous().view(torch.uint8), KEY_MASK=True)


def query_tiles(text_time: torch.Tensor, num_media: int, immediate: bool, block_m: int):
    """The run-aligned query-tile schedule (``kernels/media_xattn.py``) of this ``text_time`` for ``block_m``-row
    tiles, built once per ``text_time`` tensor (its identity and version) and reused: every layer of a forward
    receives the one ``text_time`` of the shared :class:`~fastflamingo.masks.MediaMask`, so the forward of the first
    layer builds it, and the other layers, the backward pass and every autotune timing reuse it (device tensors:
    no host read either way)."""
    K, _ = _kernels()

    def build():
        lo, hi = visible_media(text_time, num_media, immediate)
        return K.query_tile_schedule(lo, hi, num_media, block_m)

    return memoised(text_time, ("media_xattn.query_tiles", num_media, bool(immediate), block_m), build)


def media_tokens(text_time: torch.Tensor, num_media: int, immediate: bool):
    """Per (sample, media) token range of the dK/dV kernel, built once per ``text_time`` tensor like
    :func:`query_tiles`."""
    K, _ = _kernels()

    def build():
        lo, hi = visible_media(text_time, num_media, immediate)
        return K.media_token_ranges(lo, hi, num_media, immediate)

    return memoised(text_time, ("media_xattn.media_tokens", num_media, bool(immediate)), build)


def launch_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_time: torch.Tensor,
    num_media: int, latents: int, immediate: bool, scale: float,
    config: Optional[ConfigLike] = None, *, out: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None,
    kv_group: int = 1, key_mask: Optional[torch.Tensor] = None, validated: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward pass.

    Args:
        q: (B, T, H, D) text queries; k, v: (B, M*n, H, D) media keys/values, media-major. Any strides (a tensor
            whose last stride is not 1 is copied). fp32, fp16 or bf16, all the same dtype; D <= 128.
        text_time: (B, T) 1-based media index per token (0: none); any integer dtype, any strides.
        num_media, latents: M and n. immediate: immediate (True) or all-previous (False) mode.
        scale: softmax scale. config: force a launch config (``{"BLOCK_M": 16, "BLOCK_N": 32}``), bypassing the
            autotuner. out, lse: optional preallocated outputs (unit last stride).
        kv_group: k, v have batch ``B // kv_group`` and query sample ``b`` reads K/V row ``b // kv_group`` (beams
            sharing one media projection). Forward only: :func:`launch_bwd` needs one K/V row per sample.
        key_mask: None or bool (B // kv_group, M*n), True = visible key (a key padding mask), ANDed with the media
            rule; query sample ``b`` reads row ``b // kv_group``. A token left with no visible key gets 0.
        validated: the caller checked the arguments (the custom ops, after ``fastflamingo.functional``'s checks);
            a direct call is checked here.

    Returns:
        o (B, T, H, D) in q's dtype, and lse (B, H, T) fp32 natural-log sum-exp of the scaled visible scores
        (``+inf`` for tokens that see nothing).
    """
    K, U = _kernels()
    kv_group = int(kv_group)
    if not validated:
        _check_inputs(q, k, v, text_time, num_media, latents, kv_group, key_mask)
    q, k, v = (addressable(t, name) for t, name in ((q, "q"), (k, "k"), (v, "v")))
    text_time = _text_time_int32(text_time)
    batch, num_tokens, heads, head_dim = q.shape
    o = addressable(check_out("out", out, q.shape, q.dtype, q.device), "out", copy=False)
    lse = check_out("lse", lse, (batch, heads, num_tokens), torch.float32, q.device)
    if o.numel() == 0:
        return o, lse
    if num_media * latents == 0:
        o.zero_()
        lse.fill_(float("inf"))
        return o, lse

    qk_scale = float(scale) * U.LOG2E
    block_d = U.head_block(head_dim)
    precision = U.dot_precision(q.dtype)
    mask_args = key_mask_args(key_mask)

    def run(cfg) -> None:
        block_m = cfg.kwargs["BLOCK_M"]
        tile_start, tile_end = query_tiles(text_time, num_media, immediate, block_m)
        grid = (tile_start.shape[1], batch // kv_group * heads, kv_group)  # axis 1: (K/V row, head); 2: its samples
        K._media_xattn_fwd_kernel[grid](
            q, k, v, o, lse, text_time, tile_start, tile_end,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            o.stride(0), o.stride(1), o.stride(2),
            lse.stride(0), lse.stride(1),
            text_time.stride(0), text_time.stride(1),
            tile_start.stride(0),
            heads, num_media, latents, kv_group, qk_scale,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=cfg.kwargs["BLOCK_N"],
            IMMEDIATE=bool(immediate), DOT_PRECISION=precision,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **mask_args,
        )

    cfg = U.as_config(config) if config is not None else K.FWD_CHOOSER.choose(
        K.autotune_key(q, num_media, latents, immediate, key_mask is not None), run, q.device)
    run(cfg)
    return o, lse


def launch_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    text_time: torch.Tensor, num_media: int, latents: int, immediate: bool, scale: float,
    config: Optional[ConfigLike] = None, *, dq_config: Optional[ConfigLike] = None, dq: Optional[torch.Tensor] = None,
    dk: Optional[torch.Tensor] = None, dv: Optional[torch.Tensor] = None, dkdv_splits: Optional[int] = None,
    key_mask: Optional[torch.Tensor] = None, validated: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward pass: (dq, dk, dv) with the shapes and dtypes of (q, k, v).

    ``do`` may have any strides, including 0 (an expanded gradient). ``config`` forces the launch config of the
    dK/dV kernel and, unless ``dq_config`` forces another, of the dQ kernel; dq/dk/dv are optional preallocated
    outputs. ``dkdv_splits`` forces the number of token splits of the dK/dV kernel (default: from the shapes and the
    SM count, so that a small grid still fills the GPU). Deterministic: no atomics; split partials are summed in a
    fixed order. ``key_mask``: the forward's (a hidden key gets zero dK/dV); ``validated``: as for
    :func:`launch_fwd`.
    """
    K, U = _kernels()
    if not validated:
        _check_inputs(q, k, v, text_time, num_media, latents, key_mask=key_mask)
        if do.shape != q.shape or o.shape != q.shape:
            raise ValueError(f"do {tuple(do.shape)} and o {tuple(o.shape)} must have q's shape {tuple(q.shape)}")
        if tuple(lse.shape) != (q.shape[0], q.shape[2], q.shape[1]) or lse.dtype != torch.float32:
            raise ValueError(f"lse must be fp32 (batch, heads, text) = {(q.shape[0], q.shape[2], q.shape[1])}, "
                             f"got {lse.dtype} {tuple(lse.shape)}")
    q, k, v, o = (addressable(t, name) for t, name in ((q, "q"), (k, "k"), (v, "v"), (o, "o")))
    do = addressable(do.to(q.dtype), "do")
    text_time = _text_time_int32(text_time)
    batch, num_tokens, heads, head_dim = q.shape
    dq = addressable(check_out("dq", dq, q.shape, q.dtype, q.device), "dq", copy=False)
    dk = addressable(check_out("dk", dk, k.shape, k.dtype, k.device), "dk", copy=False)
    dv = addressable(check_out("dv", dv, v.shape, v.dtype, v.device), "dv", copy=False)
    if num_tokens == 0 or num_media * latents == 0 or batch * heads * head_dim == 0:
        dq.zero_()
        dk.zero_()
        dv.zero_()
        return dq, dk, dv
    if lse.stride(-1) != 1:
        lse = lse.contiguous()

    qk_scale = float(scale) * U.LOG2E
    block_d = U.head_block(head_dim)
    precision = U.dot_precision(q.dtype)
    from ..kernels import _attention  # the delta pre-pass, shared with mllama_xattn

    delta = _attention.row_deltas(o, do, torch.empty_like(lse, memory_format=torch.contiguous_format))
    if lse.stride() != delta.stride():  # the backward kernels share one set of (B, H) strides for lse and delta
        lse = lse.contiguous()
    token_first, token_end = media_tokens(text_time, num_media, immediate)
    mask_args = key_mask_args(key_mask)

    def run_dkdv(cfg) -> None:
        block_n = cfg.kwargs["BLOCK_N"]
        programs = num_media * U.cdiv(latents, block_n) * batch * heads
        splits = int(dkdv_splits) if dkdv_splits is not None else K.dkdv_splits(
            programs, num_tokens, num_media, immediate, cfg.kwargs["BLOCK_M"], U.sm_count(q.device))
        if splits == 1:
            gk, gv = dk.unsqueeze(0), dv.unsqueeze(0)  # the gradients themselves (split stride unused)
        else:  # fp32 partials, summed below in split order
            gk = torch.empty((splits,) + tuple(k.shape), dtype=torch.float32, device=k.device)
            gv = torch.empty((splits,) + tuple(v.shape), dtype=torch.float32, device=v.device)
        grid = (num_media * U.cdiv(latents, block_n), batch * heads, splits)
        K._media_xattn_bwd_dkdv_kernel[grid](
            q, k, v, do, lse, delta, text_time, token_first, token_end, gk, gv,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            lse.stride(0), lse.stride(1),
            text_time.stride(0), text_time.stride(1),
            token_first.stride(0),
            *gk.stride()[:4], *gv.stride()[:4],
            heads, num_media, latents, splits, qk_scale, float(scale),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=cfg.kwargs["BLOCK_M"], BLOCK_N=block_n,
            IMMEDIATE=bool(immediate), DOT_PRECISION=precision,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **mask_args,
        )
        if splits > 1:
            torch.sum(gk, dim=0, out=dk) if dk.dtype == torch.float32 else dk.copy_(gk.sum(dim=0))
            torch.sum(gv, dim=0, out=dv) if dv.dtype == torch.float32 else dv.copy_(gv.sum(dim=0))

    def run_dq(cfg) -> None:
        block_m = cfg.kwargs["BLOCK_M"]
        tile_start, tile_end = query_tiles(text_time, num_media, immediate, block_m)
        grid = (tile_start.shape[1], batch * heads)
        K._media_xattn_bwd_dq_kernel[grid](
            q, k, v, do, lse, delta, text_time, tile_start, tile_end, dq,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            lse.stride(0), lse.stride(1),
            text_time.stride(0), text_time.stride(1),
            tile_start.stride(0),
            dq.stride(0), dq.stride(1), dq.stride(2),
            heads, num_media, latents, qk_scale, float(scale),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=cfg.kwargs["BLOCK_N"],
            IMMEDIATE=bool(immediate), DOT_PRECISION=precision,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **mask_args,
        )

    key = K.autotune_key(q, num_media, latents, immediate, key_mask is not None)
    dkdv_cfg = U.as_config(config) if config is not None else K.DKDV_CHOOSER.choose(key, run_dkdv, q.device)
    run_dkdv(dkdv_cfg)
    dq_config = dq_config if dq_config is not None else config
    dq_cfg = U.as_config(dq_config) if dq_config is not None else K.DQ_CHOOSER.choose(key, run_dq, q.device)
    run_dq(dq_cfg)
    return dq, dk, dv
