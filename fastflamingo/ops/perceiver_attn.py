"""Perceiver-resampler attention on the Triton kernels of ``kernels/perceiver_attn.py``: the launchers and the
``torch.library`` custom ops around them.

Two custom ops, ``fastflamingo::perceiver_attn_fwd`` (returns ``o`` and the fp32 LSE) and
``fastflamingo::perceiver_attn_bwd`` (the five input gradients), with fake (meta) implementations and an autograd
registration. Custom ops are opaque to torch.compile, so a compiled model calls the kernels as they are (an
``autograd.Function`` launching the kernels would be traced into by Dynamo and break: docs/testing.md,
"torch.compile").

Importing this module needs torch only: triton and the kernels are imported on the first call.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .. import _backend
from .._checks import SUPPORTED_DTYPES, unsupported_dtype_reasons
from ..kernels._launch import MAX_HEAD_DIM, ConfigLike, addressable, check_out

_INPUTS = ("q", "k_media", "v_media", "k_latents", "v_latents")


def _kernels():
    """(the kernel module, kernels/_utils): imported on the first launch, since they import triton."""
    from ..kernels import _utils, perceiver_attn

    return perceiver_attn, _utils


@torch.library.custom_op("fastflamingo::perceiver_attn_fwd", mutates_args=())
def fwd_op(
    q: torch.Tensor, k_media: torch.Tensor, v_media: torch.Tensor, k_latents: torch.Tensor, v_latents: torch.Tensor,
    scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    # called by fastflamingo.functional.perceiver_attn, which validated the arguments: the launcher checks nothing
    # again
    return launch_fwd(q, k_media, v_media, k_latents, v_latents, scale, validated=True)


@fwd_op.register_fake
def _(q, k_media, v_media, k_latents, v_latents, scale):
    num, latents, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((num, heads, latents), dtype=torch.float32)


@torch.library.custom_op("fastflamingo::perceiver_attn_bwd", mutates_args=())
def bwd_op(
    do: torch.Tensor, q: torch.Tensor, k_media: torch.Tensor, v_media: torch.Tensor, k_latents: torch.Tensor,
    v_latents: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return launch_bwd(do, q, k_media, v_media, k_latents, v_latents, o, lse, scale, validated=True)


@bwd_op.register_fake
def _(do, q, k_media, v_media, k_latents, v_latents, o, lse, scale):
    # the kernels allocate contiguous gradients, whatever the strides of the inputs
    return tuple(t.new_empty(t.shape) for t in (q, k_media, v_media, k_latents, v_latents))


def _setup_context(ctx, inputs, output):
    q, k_media, v_media, k_latents, v_latents, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k_media, v_media, k_latents, v_latents, o, lse)
    ctx.scale = scale


def _backward(ctx, grad_o, grad_lse):
    # lse is an internal statistic: the public function never returns it, so its gradient is ignored.
    if grad_o is None:
        return None, None, None, None, None, None
    q, k_media, v_media, k_latents, v_latents, o, lse = ctx.saved_tensors
    grads = bwd_op(grad_o, q, k_media, v_media, k_latents, v_latents, o, lse, ctx.scale)
    return (*grads, None)


fwd_op.register_autograd(_backward, setup_context=_setup_context)


def perceiver_attn(
    q: torch.Tensor, k_media: torch.Tensor, v_media: torch.Tensor, k_latents: torch.Tensor, v_latents: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Perceiver attention through the Triton kernels: latents ``q`` (N, L, H, D) attend to
    ``[k_media; k_latents]`` / ``[v_media; v_latents]`` ((N, P, H, D) and (N, L, H, D)) without concatenating them.
    Returns (N, L, H, D) in q's dtype; differentiable w.r.t. all five inputs."""
    o, _ = fwd_op(q, k_media, v_media, k_latents, v_latents, float(scale))
    return o


def unsupported_reasons(q: torch.Tensor, k_media: torch.Tensor, v_media: torch.Tensor, k_latents: torch.Tensor,
                        v_latents: torch.Tensor, *, key_mask: Optional[torch.Tensor] = None) -> List[str]:
    """What the kernels cannot serve about these inputs (devices are checked by ``_backend``); empty: supported."""
    named = (("q", q), ("k_media", k_media), ("v_media", v_media), ("k_latents", k_latents), ("v_latents", v_latents))
    reasons = unsupported_dtype_reasons(named)
    if key_mask is not None:
        reasons.append("key_mask is not supported by the perceiver_attn kernels yet")
    if q.dim() == 4 and k_media.dim() == 4 and k_media.shape[2] != q.shape[2]:
        reasons.append(f"grouped-query attention ({q.shape[2]} query heads, {k_media.shape[2]} KV heads) is not "
                       "supported by the perceiver_attn kernels yet")
        return reasons
    for name, t in named:
        if t.dim() != 4:
            reasons.append(f"{name} must be 4-D (N, tokens, heads, head_dim), got shape {tuple(t.shape)}")
    if reasons:
        return reasons
    num, latents, heads, head_dim = q.shape
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        reasons.append(f"head_dim {head_dim} is outside the supported 1..{MAX_HEAD_DIM}")
    media = (num, k_media.shape[1], heads, head_dim)
    if tuple(k_media.shape) != media or tuple(v_media.shape) != media:
        reasons.append(f"k_media {tuple(k_media.shape)} and v_media {tuple(v_media.shape)} must be (N, P, H, D) "
                       f"with q's N, H, D {(num, heads, head_dim)}")
    if tuple(k_latents.shape) != tuple(q.shape) or tuple(v_latents.shape) != tuple(q.shape):
        reasons.append(f"k_latents {tuple(k_latents.shape)} and v_latents {tuple(v_latents.shape)} must have q's "
                       f"shape {tuple(q.shape)}")
    reasons += _backend.interpreter_bf16_reasons(t for _, t in named)
    return reasons


def _check_inputs(q, k_media, v_media, k_latents, v_latents) -> None:
    """Shapes and dtypes the kernels need (ValueError / TypeError otherwise)."""
    tensors = (q, k_media, v_media, k_latents, v_latents)
    if any(t.dim() != 4 for t in tensors):
        raise ValueError("q, k_media, v_media, k_latents, v_latents must be (N, tokens, heads, head_dim)")
    if len({t.dtype for t in tensors}) != 1 or q.dtype not in SUPPORTED_DTYPES:
        raise TypeError("q, k_media, v_media, k_latents, v_latents must share a dtype among fp32/fp16/bf16, got "
                        + ", ".join(str(t.dtype) for t in tensors))
    num, latents, heads, head_dim = q.shape
    media_tokens = k_media.shape[1]
    if k_media.shape != (num, media_tokens, heads, head_dim) or v_media.shape != k_media.shape:
        raise ValueError(f"k_media, v_media must be {(num, media_tokens, heads, head_dim)}, "
                         f"got {tuple(k_media.shape)} and {tuple(v_media.shape)}")
    if k_latents.shape != q.shape or v_latents.shape != q.shape:
        raise ValueError(f"k_latents, v_latents must have q's shape {tuple(q.shape)}, "
                         f"got {tuple(k_latents.shape)} and {tuple(v_latents.shape)}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} is outside 1..{MAX_HEAD_DIM}")


def launch_fwd(
    q: torch.Tensor, k_media: torch.Tensor, v_media: torch.Tensor, k_latents: torch.Tensor, v_latents: torch.Tensor,
    scale: float, config: Optional[ConfigLike] = None, *, out: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None, splits: Optional[int] = None, validated: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward pass.

    Args:
        q: (N, L, H, D) latent queries; k_media, v_media: (N, P, H, D); k_latents, v_latents: (N, L, H, D). Any
            strides (a tensor whose last stride is not 1 is copied); fp32, fp16 or bf16, all one dtype; D <= 128.
        scale: softmax scale. config: force a launch config (``{"BLOCK_M": 64, "BLOCK_N": 32}``), bypassing the
            autotuner. out, lse: optional preallocated outputs (unit last stride). splits: force the number of key
            splits (default: from the shapes and the SM count, so that a small grid still fills the GPU).
        validated: the caller checked the arguments (the custom ops, after ``fastflamingo.functional``'s checks);
            a direct call is checked here.

    Returns:
        o (N, L, H, D) in q's dtype, and lse (N, H, L) fp32: natural-log sum-exp of the scaled scores over all
        P + L keys.
    """
    K, U = _kernels()
    if not validated:
        _check_inputs(q, k_media, v_media, k_latents, v_latents)
    q, k_media, v_media, k_latents, v_latents = (
        addressable(t, name) for t, name in zip((q, k_media, v_media, k_latents, v_latents), _INPUTS))
    num, latents, heads, head_dim = q.shape
    media_tokens = k_media.shape[1]
    o = addressable(check_out("out", out, q.shape, q.dtype, q.device), "out", copy=False)
    lse = check_out("lse", lse, (num, heads, latents), torch.float32, q.device)
    if o.numel() == 0:
        return o, lse

    qk_scale = float(scale) * U.LOG2E
    block_d = U.head_block(head_dim)
    precision = U.dot_precision(q.dtype)

    def run(cfg) -> None:
        block_m, block_n = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
        grid = (num * heads, U.cdiv(latents, block_m))
        count = _splits(K, U, splits, grid, media_tokens, latents, block_n, q.device)
        if count == 1:  # the results themselves (split strides unused)
            o_part, lse_part = o.unsqueeze(0), lse.unsqueeze(0)
        else:  # normalised fp32 partials and their LSEs, merged below in split order
            o_part = torch.empty((count,) + tuple(o.shape), dtype=torch.float32, device=o.device)
            lse_part = torch.empty((count,) + tuple(lse.shape), dtype=torch.float32, device=o.device)
        K._perceiver_fwd_kernel[grid + (count,)](
            q, k_media, v_media, k_latents, v_latents, o_part, lse_part,
            q.stride(0), q.stride(1), q.stride(2),
            k_media.stride(0), k_media.stride(1), k_media.stride(2),
            v_media.stride(0), v_media.stride(1), v_media.stride(2),
            k_latents.stride(0), k_latents.stride(1), k_latents.stride(2),
            v_latents.stride(0), v_latents.stride(1), v_latents.stride(2),
            *o_part.stride()[:4], *lse_part.stride()[:3],
            heads, media_tokens, latents, count, qk_scale,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, DOT_PRECISION=precision,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if count > 1:
            _merge_splits(o_part, lse_part, o, lse)

    cfg = U.as_config(config) if config is not None else K.FWD_CHOOSER.choose(K.autotune_key(q, media_tokens), run, q.device)
    run(cfg)
    return o, lse


def _splits(K, U, forced: Optional[int], grid: Tuple[int, int], media_tokens: int, latents: int, block_n: int,
            device: torch.device) -> int:
    if forced is not None:
        forced = int(forced)
        tiles = U.cdiv(media_tokens, block_n) + U.cdiv(latents, block_n)
        if not 1 <= forced <= tiles:
            raise ValueError(f"splits must be in 1..{tiles} (the key tiles), got {forced}")
        return forced
    return K.key_splits(grid[0] * grid[1], media_tokens, latents, block_n, U.sm_count(device))


def _merge_splits(o_part: torch.Tensor, lse_part: torch.Tensor, o: torch.Tensor, lse: torch.Tensor) -> None:
    """o, lse from the splits' normalised partials (S, N, L, H, D) and LSEs (S, N, H, L), in split order:
    ``o = sum_s exp(lse_s - lse) o_s`` with ``lse = log sum_s exp(lse_s)`` (every split saw keys: finite)."""
    total = torch.logsumexp(lse_part, dim=0)  # (N, H, L)
    weights = torch.exp(lse_part - total).permute(0, 1, 3, 2).unsqueeze(-1)  # (S, N, L, H, 1)
    o.copy_((weights * o_part).sum(dim=0))
    lse.copy_(total)


def launch_bwd(
    do: torch.Tensor, q: torch.Tensor, k_media: torch.Tensor, v_media: torch.Tensor, k_latents: torch.Tensor,
    v_latents: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, scale: float,
    config: Optional[ConfigLike] = None, *, dq: Optional[torch.Tensor] = None,
    dk_media: Optional[torch.Tensor] = None, dv_media: Optional[torch.Tensor] = None,
    dk_latents: Optional[torch.Tensor] = None, dv_latents: Optional[torch.Tensor] = None,
    splits: Optional[int] = None, validated: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward pass: (dq, dk_media, dv_media, dk_latents, dv_latents), shapes and dtypes of the inputs.

    ``do`` may have any strides, including 0 (an expanded gradient). ``config`` forces a launch config; the d*
    arguments are optional preallocated outputs (unit last stride); ``splits`` forces the number of key splits;
    ``validated``: as for :func:`launch_fwd`.
    Deterministic: no atomics; with several query tiles (L > BLOCK_M) the per-tile fp32 dK/dV partials, and with
    several key splits the per-split fp32 dQ partials, are summed in a fixed order.
    """
    K, U = _kernels()
    if not validated:
        _check_inputs(q, k_media, v_media, k_latents, v_latents)
        if do.shape != q.shape or o.shape != q.shape:
            raise ValueError(f"do {tuple(do.shape)} and o {tuple(o.shape)} must have q's shape {tuple(q.shape)}")
    q, k_media, v_media, k_latents, v_latents, o, do = (addressable(t, name) for t, name in zip(
        (q, k_media, v_media, k_latents, v_latents, o, do.to(q.dtype)), _INPUTS + ("o", "do")))
    if lse.stride(-1) != 1:
        lse = lse.contiguous()
    num, latents, heads, head_dim = q.shape
    media_tokens = k_media.shape[1]
    # the fp32 partials below are contiguous with these shapes: addressable whenever the outputs are
    dq = addressable(check_out("dq", dq, q.shape, q.dtype, q.device), "dq", copy=False)
    grads = [addressable(check_out(name, buf, t.shape, t.dtype, t.device), name, copy=False) for name, buf, t in (
        ("dk_media", dk_media, k_media), ("dv_media", dv_media, v_media),
        ("dk_latents", dk_latents, k_latents), ("dv_latents", dv_latents, v_latents))]
    if latents == 0 or num * heads * head_dim == 0:  # no queries: nothing depends on the keys
        for g in (dq, *grads):
            g.zero_()
        return (dq, *grads)

    qk_scale = float(scale) * U.LOG2E
    block_d = U.head_block(head_dim)
    precision = U.dot_precision(q.dtype)

    def run(cfg) -> None:
        block_m, block_n = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
        tiles = U.cdiv(latents, block_m)
        count = _splits(K, U, splits, (num * heads, tiles), media_tokens, latents, block_n, q.device)
        if tiles == 1:  # one query tile: dK/dV are final where the kernel writes them (tile stride unused)
            targets = [g.unsqueeze(0) for g in grads]
        else:  # per-tile fp32 partials, summed below in a fixed order
            targets = [torch.empty((tiles,) + tuple(g.shape), dtype=torch.float32, device=g.device) for g in grads]
        # dQ: the gradient itself with one key split, else per-split fp32 partials summed below in split order
        dq_part = dq.unsqueeze(0) if count == 1 else torch.empty((count,) + tuple(dq.shape), dtype=torch.float32,
                                                                  device=dq.device)
        dkm, dvm, dkl, dvl = targets
        K._perceiver_bwd_kernel[(num * heads, tiles, count)](
            q, k_media, v_media, k_latents, v_latents, o, do, lse, dq_part, dkm, dvm, dkl, dvl,
            q.stride(0), q.stride(1), q.stride(2),
            k_media.stride(0), k_media.stride(1), k_media.stride(2),
            v_media.stride(0), v_media.stride(1), v_media.stride(2),
            k_latents.stride(0), k_latents.stride(1), k_latents.stride(2),
            v_latents.stride(0), v_latents.stride(1), v_latents.stride(2),
            o.stride(0), o.stride(1), o.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            lse.stride(0), lse.stride(1),
            *dq_part.stride()[:4],
            *dkm.stride()[:4], *dvm.stride()[:4], *dkl.stride()[:4], *dvl.stride()[:4],
            heads, media_tokens, latents, count, qk_scale, float(scale),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, DOT_PRECISION=precision,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if tiles > 1:
            for g, part in zip(grads, targets):
                g.copy_(part.sum(dim=0))
        if count > 1:
            dq.copy_(dq_part.sum(dim=0))

    cfg = U.as_config(config) if config is not None else K.BWD_CHOOSER.choose(K.autotune_key(q, media_tokens), run, q.device)
    run(cfg)
    return (dq, *grads)
