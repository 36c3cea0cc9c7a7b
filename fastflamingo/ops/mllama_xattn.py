"""mllama (Llama 3.2 Vision) cross-attention on the Triton kernels of ``kernels/mllama_xattn.py``: the launchers and
the ``fastflamingo::mllama_xattn_fwd`` / ``fastflamingo::mllama_xattn_bwd`` custom ops (closed-form, interval-masked
GQA prefill; fake implementations and an autograd registration). Decode steps that carry the additive mask take
``fastflamingo.ops.mllama_decode``; :func:`fastflamingo.models.mllama.mllama_xattn` decides.

Custom ops are opaque to torch.compile, so a compiled model calls the kernels as they are. Importing this module
needs torch only: triton and the kernels are imported on the first launch.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .. import _backend
from .._checks import SUPPORTED_DTYPES, unsupported_dtype_reasons
from ..cache import tensor_version
from ..masks import memoised
from ..kernels._launch import MAX_GRID_Y, MAX_HEAD_DIM, ConfigLike, addressable, check_out

MIN_HEAD_DIM = 16
MAX_GROUP = 16  # query heads per K/V head a program tile holds (a power of two)


def _kernels():
    """(the kernel module, kernels/_utils): imported on the first launch, since they import triton."""
    from ..kernels import _utils, mllama_xattn

    return mllama_xattn, _utils


@torch.library.custom_op("fastflamingo::mllama_xattn_fwd", mutates_args=())
def fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, img_start: torch.Tensor, img_end: torch.Tensor,
    image_keys: torch.Tensor, image_stride: int, max_runs: int, scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    # called by fastflamingo.models.mllama.mllama_xattn, which validated the arguments and built the closed mask:
    # the launcher checks nothing again
    return launch_fwd(q, k, v, img_start, img_end, image_keys, image_stride, max_runs, scale, validated=True)


@fwd_op.register_fake
def _(q, k, v, img_start, img_end, image_keys, image_stride, max_runs, scale):
    batch, num_text, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, num_text), dtype=torch.float32)


@torch.library.custom_op("fastflamingo::mllama_xattn_bwd", mutates_args=())
def bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    img_start: torch.Tensor, img_end: torch.Tensor, image_keys: torch.Tensor, image_stride: int, max_runs: int,
    scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return launch_bwd(do, q, k, v, o, lse, img_start, img_end, image_keys, image_stride, max_runs, scale,
                      validated=True)


@bwd_op.register_fake
def _(do, q, k, v, o, lse, img_start, img_end, image_keys, image_stride, max_runs, scale):
    # the launcher allocates contiguous gradients, whatever the strides of q, k, v
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, img_start, img_end, image_keys, image_stride, max_runs, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, img_start, img_end, image_keys)
    ctx.sizes = (image_stride, max_runs, scale)


def _backward(ctx, grad_o, grad_lse):
    # lse is an internal statistic: the public function never returns it, so its gradient is ignored
    q, k, v, o, lse, img_start, img_end, image_keys = ctx.saved_tensors
    if grad_o is None:
        return (None,) * 9
    dq, dk, dv = bwd_op(grad_o, q, k, v, o, lse, img_start, img_end, image_keys, *ctx.sizes)
    return dq, dk, dv, None, None, None, None, None, None


fwd_op.register_autograd(_backward, setup_context=_setup_context)


def mllama_xattn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float) -> torch.Tensor:
    """Closed-form attention (``mask`` a :class:`~fastflamingo.models.mllama.mask.MllamaMask`); differentiable w.r.t.
    q, k and v. Shapes: :func:`fastflamingo.models.mllama.mllama_xattn`."""
    o, _ = fwd_op(q, k, v, mask.img_start, mask.img_end, mask.image_keys, mask.image_stride, mask.max_runs,
                  float(scale))
    return o


def unsupported_reasons(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> List[str]:
    """What the kernels cannot serve about these inputs, which :func:`fastflamingo.models.mllama.mllama_xattn`
    validated (devices are checked by ``_backend``); empty: supported."""
    reasons = unsupported_dtype_reasons((("q", q), ("k", k), ("v", v)))
    head_dim = q.shape[-1]
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        reasons.append(f"head_dim {head_dim} is outside the supported {MIN_HEAD_DIM}..{MAX_HEAD_DIM}")
    group = q.shape[2] // max(k.shape[1], 1)
    if group > MAX_GROUP or group & (group - 1):
        reasons.append(f"{group} query heads per K/V head: the kernels take a power of two <= {MAX_GROUP}")
    if q.shape[0] * k.shape[1] > MAX_GRID_Y:  # the grid's second axis carries (sample, K/V head)
        reasons.append(f"batch * kv_heads = {q.shape[0] * k.shape[1]} > {MAX_GRID_Y} (the CUDA grid's limit)")
    reasons += _backend.interpreter_bf16_reasons((q, k, v))
    return reasons


# The dims a tile spans, whose strides the kernels' int32 in-tile offsets multiply (``_launch.addressable``): a
# query tile holds tokens x the query heads of a group (q, o, do, dq: (B, S, H, D)), a key tile keys of one K/V head
# (k, v, dk, dv: (B, Hkv, K, D)).
QUERY_TILE_DIMS, KEY_TILE_DIMS = (1, 2), (2,)


def _check_inputs(q, k, v, img_start, img_end, image_keys, image_stride):
    """What memory safety needs of a direct launcher call (ValueError / TypeError otherwise)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q must be (batch, text, heads, head_dim) and k, v (batch, kv_heads, keys, head_dim)")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q, k, v must share a dtype among fp32/fp16/bf16, got {q.dtype}, {k.dtype}, {v.dtype}")
    batch, num_tokens, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"q has {heads} heads, not a multiple of the {kv_heads} K/V heads")
    num_images = image_keys.shape[1]
    kv_shape = (batch, kv_heads, num_images * image_stride, head_dim)
    if tuple(k.shape) != kv_shape or v.shape != k.shape:
        raise ValueError(f"k, v must be {kv_shape}, got {tuple(k.shape)} and {tuple(v.shape)}")
    for name, t in (("img_start", img_start), ("img_end", img_end)):
        if tuple(t.shape) != (batch, num_tokens) or t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32 {(batch, num_tokens)}, got {t.dtype} {tuple(t.shape)}")
    if image_keys.dim() != 2 or image_keys.shape[0] != batch or image_keys.dtype != torch.int32:
        raise ValueError(f"image_keys must be int32 (batch, images), got {image_keys.dtype} {tuple(image_keys.shape)}")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} > {MAX_HEAD_DIM} is not supported")
    if batch * kv_heads > MAX_GRID_Y:
        raise ValueError(f"batch * kv_heads = {batch * kv_heads} > {MAX_GRID_Y} is not supported")


def _common_constexprs(K, U, q: torch.Tensor, group: int, config) -> dict:
    return dict(GROUP=group, HEAD_DIM=q.shape[-1], BLOCK_D=U.head_block(q.shape[-1]),
                BLOCK_M=K.block_m_of(config, group), BLOCK_N=config.kwargs["BLOCK_N"],
                DOT_PRECISION=U.dot_precision(q.dtype), num_warps=config.num_warps, num_stages=config.num_stages)


def _schedule_key(name: str, img_end: torch.Tensor, *sizes) -> tuple:
    # img_start is the memo's source; img_end, from the same closed mask, must match too
    return (name, img_end.data_ptr(), tuple(img_end.shape), tensor_version(img_end), *sizes)


def query_tiles(img_start: torch.Tensor, img_end: torch.Tensor, max_runs: int, block_m: int):
    """The run-aligned query tiles of the forward and dQ kernels (``kernels/mllama_xattn.py``), built once per closed
    mask (the identity and version of its tensors) and reused: every cross-attention layer of a forward receives the
    same memoised closed mask, so the first layer builds the schedule and the other layers, the backward pass and
    the autotune timings reuse it (device tensors: no host read either way)."""
    K, _ = _kernels()
    return memoised(img_start, _schedule_key("mllama_xattn.query_tiles", img_end, max_runs, block_m),
                    lambda: K.query_tiles(img_start, img_end, max_runs, block_m))


def image_tokens(img_start: torch.Tensor, img_end: torch.Tensor, num_images: int):
    """Per (sample, image slot) token range of the dK/dV kernel and whether a sample has rows that see every key,
    built once per closed mask like :func:`query_tiles`."""
    K, _ = _kernels()

    def build():
        first, end = K.image_token_ranges(img_start, img_end, num_images)
        return first, end, (img_start < 0).any(dim=1).to(torch.int32)

    return memoised(img_start, _schedule_key("mllama_xattn.image_tokens", img_end, num_images), build)


def launch_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, img_start: torch.Tensor, img_end: torch.Tensor,
    image_keys: torch.Tensor, image_stride: int, max_runs: int, scale: float,
    config: Optional[ConfigLike] = None, *, out: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None,
    validated: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward pass.

    Args:
        q: (B, S, H, D) queries, any strides with unit last stride. k, v: (B, Hkv, I * image_stride, D) (the
            transformers cache layout, or any strided view of it); H a multiple of Hkv. fp32/fp16/bf16, D <= 128.
        img_start, img_end: int32 (B, S) image range per token (``img_start == -1``: every key).
        image_keys: int32 (B, I) real keys per image slot (``num_tiles * tokens_per_tile``).
        image_stride: keys per image slot (``max_tiles * tokens_per_tile``). max_runs: the most runs of tokens
            seeing the same images in any sample (sizes the query-tile grid).
        config: force a launch config (``{"ROWS": 32, "BLOCK_N": 16}``). out, lse: optional preallocated outputs.
        validated: the caller checked the arguments (the custom ops, after the mllama entry's checks); a direct
            call is checked here.

    Returns:
        o (B, S, H, D) in q's dtype and lse (B, H, S) fp32 (``+inf`` for tokens that see nothing).
    """
    K, U = _kernels()
    if not validated:
        _check_inputs(q, k, v, img_start, img_end, image_keys, image_stride)
    q = addressable(q, "q", dims=QUERY_TILE_DIMS)
    k, v = (addressable(t, name, dims=KEY_TILE_DIMS) for t, name in ((k, "k"), (v, "v")))
    batch, num_tokens, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    o = addressable(check_out("out", out, q.shape, q.dtype, q.device), "out", dims=QUERY_TILE_DIMS, copy=False)
    lse = check_out("lse", lse, (batch, heads, num_tokens), torch.float32, q.device)
    if o.numel() == 0:
        return o, lse
    if k.shape[2] == 0:
        o.zero_()
        lse.fill_(float("inf"))
        return o, lse
    qk_scale = float(scale) * U.LOG2E

    def run(cfg) -> None:
        consts = _common_constexprs(K, U, q, group, cfg)
        tile_start, tile_end = query_tiles(img_start, img_end, max_runs, consts["BLOCK_M"])
        K._mllama_xattn_fwd_kernel[(tile_start.shape[1], batch * kv_heads)](
            q, k, v, o, lse, img_start, img_end, image_keys, tile_start, tile_end,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            o.stride(0), o.stride(1), o.stride(2),
            lse.stride(0), lse.stride(1),
            img_start.stride(0), img_start.stride(1),
            image_keys.stride(0),
            tile_start.stride(0),
            kv_heads, image_keys.shape[1], image_stride, qk_scale,
            **consts,
        )

    cfg = U.as_config(config) if config is not None else K.FWD_CHOOSER.choose(
        K.autotune_key(q, group, image_stride), run, q.device)
    run(cfg)
    return o, lse


def launch_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    img_start: torch.Tensor, img_end: torch.Tensor, image_keys: torch.Tensor, image_stride: int, max_runs: int,
    scale: float, config: Optional[ConfigLike] = None, *, dq_config: Optional[ConfigLike] = None,
    dq: Optional[torch.Tensor] = None, dk: Optional[torch.Tensor] = None, dv: Optional[torch.Tensor] = None,
    validated: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward pass: (dq, dk, dv) with the shapes and dtypes of (q, k, v); dk/dv are exactly 0 on keys no row
    sees. ``do`` may have any strides, including 0. Deterministic: every output element is written by exactly one
    program, with no atomics. ``config`` forces the launch config of the dK/dV kernel and, unless ``dq_config``
    forces another, of the dQ kernel. ``validated``: as for :func:`launch_fwd`."""
    K, U = _kernels()
    if not validated:
        _check_inputs(q, k, v, img_start, img_end, image_keys, image_stride)
        if do.shape != q.shape or o.shape != q.shape:
            raise ValueError(f"do {tuple(do.shape)} and o {tuple(o.shape)} must have q's shape {tuple(q.shape)}")
        expected = (q.shape[0], q.shape[2], q.shape[1])
        if tuple(lse.shape) != expected or lse.dtype != torch.float32:
            raise ValueError(f"lse must be fp32 {expected}, got {lse.dtype} {tuple(lse.shape)}")
    batch, num_tokens, heads, head_dim = q.shape
    q, o, do = (addressable(t, name, dims=QUERY_TILE_DIMS) for t, name in ((q, "q"), (o, "o"), (do.to(q.dtype), "do")))
    k, v = (addressable(t, name, dims=KEY_TILE_DIMS) for t, name in ((k, "k"), (v, "v")))
    kv_heads = k.shape[1]
    group = heads // kv_heads
    num_images = image_keys.shape[1]
    dq = addressable(check_out("dq", dq, q.shape, q.dtype, q.device), "dq", dims=QUERY_TILE_DIMS, copy=False)
    dk, dv = (addressable(check_out(name, buf, t.shape, t.dtype, t.device), name, dims=KEY_TILE_DIMS, copy=False)
              for name, buf, t in (("dk", dk, k), ("dv", dv, v)))
    if num_tokens == 0 or k.shape[2] == 0 or batch * heads * head_dim == 0:
        for t in (dq, dk, dv):
            t.zero_()
        return dq, dk, dv
    lse = lse.contiguous()
    qk_scale = float(scale) * U.LOG2E
    from ..kernels import _attention  # the delta pre-pass, shared with media_xattn

    delta = _attention.row_deltas(o, do, torch.empty_like(lse))
    token_first, token_end, has_all = image_tokens(img_start, img_end, num_images)

    def run_dkdv(cfg) -> None:
        consts = _common_constexprs(K, U, q, group, cfg)
        grid = (num_images * U.cdiv(image_stride, consts["BLOCK_N"]), batch * kv_heads)
        K._mllama_xattn_bwd_dkdv_kernel[grid](
            q, k, v, do, lse, delta, img_start, img_end, image_keys, has_all, token_first, token_end, dk, dv,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            lse.stride(0), lse.stride(1),
            img_start.stride(0), img_start.stride(1),
            image_keys.stride(0),
            dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2),
            kv_heads, num_images, image_stride, qk_scale, float(scale),
            **consts,
        )

    def run_dq(cfg) -> None:
        consts = _common_constexprs(K, U, q, group, cfg)
        tile_start, tile_end = query_tiles(img_start, img_end, max_runs, consts["BLOCK_M"])
        K._mllama_xattn_bwd_dq_kernel[(tile_start.shape[1], batch * kv_heads)](
            q, k, v, do, lse, delta, img_start, img_end, image_keys, tile_start, tile_end, dq,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            lse.stride(0), lse.stride(1),
            img_start.stride(0), img_start.stride(1),
            image_keys.stride(0),
            tile_start.stride(0),
            dq.stride(0), dq.stride(1), dq.stride(2),
            kv_heads, num_images, image_stride, qk_scale, float(scale),
            **consts,
        )

    key = K.autotune_key(q, group, image_stride)
    dkdv_cfg = U.as_config(config) if config is not None else K.DKDV_CHOOSER.choose(key, run_dkdv, q.device)
    run_dkdv(dkdv_cfg)
    dq_config = dq_config if dq_config is not None else config
    dq_cfg = U.as_config(dq_config) if dq_config is not None else K.DQ_CHOOSER.choose(key, run_dq, q.device)
    run_dq(dq_cfg)
    return dq, dk, dv


__all__ = ["mllama_xattn", "unsupported_reasons", "launch_fwd", "launch_bwd", "fwd_op", "bwd_op"]
