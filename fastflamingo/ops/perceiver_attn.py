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
    scale: float, key_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    # called by fastflamingo.functional.perceiver_attn, which validated the arguments: the launcher checks nothing
    # again
    return launch_fwd(q, k_media, v_media, k_latents, v_latents, scale, key_mask=key_mask, validated=True)


@fwd_op.register_fake
def _(q, k_media, v_media, k_latents, v_latents, scale, key_mask=None):
    num, latents, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((num, heads, latents), dtype=torch.float32)


@torch.library.custom_op("fastflamingo::perceiver_attn_bwd", mutates_args=())
def bwd_op(
    do: torch.Tensor, q: torch.Tensor, k_media: torch.Tensor, v_media: torch.Tensor, k_latents: torch.Tensor,
    v_latents: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, scale: float, key_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return launch_bwd(do, q, k_media, v_media, k_latents, v_latents, o, lse, scale, key_mask=key_mask, validated=True)


@bwd_op.register_fake
def _(do, q, k_media, v_media, k_latents, v_latents, o, lse, scale, key_mask=None):
    # the kernels allocate contiguous gradients, whatever the strides of the inputs
    return tuple(t.new_empty(t.shape) for t in (q, k_media, v_media, k_latents, v_latents))


def _setup_context(ctx, inputs, output):
    q, k_media, v_media, k_latents, v_latents, scale, key_mask = inputs
    o, lse = output
    ctx.save_for_backward(q, k_media, v_media, k_latents, v_latents, o, lse, key_mask)
    ctx.scale = scale


def _backward(ctx, grad_o, grad_lse):
    # lse is an internal statistic: the public function never returns it, so its gradient is ignored.
    if grad_o is None:
        return None, None, None, None, None, None, None
    q, k_media, v_media, k_latents, v_latents, o, lse, key_mask = ctx.saved_tensors
    grads = bwd_op(grad_o, q, k_media, v_media, k_latents, v_latents, o, lse, ctx.scale, key_mask)
    return (*grads, None, None)


fwd_op.register_autograd(_backward, setup_context=_setup_context)


def perceiver_attn(
    q: torch.Tensor, k_media: torch.Tensor, v_media: torch.Tensor, k_latents: torch.Tensor, v_latents: torch.Tensor,
    scale: float, key_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Perceiver attention through the Triton kernels: latents ``q`` (N, L, H, D) attend to
    ``[k_media; k_latents]`` / ``[v_media; v_latents]`` ((N, P, Hkv, D) and (N, L, Hkv, D), H a multiple of Hkv)
    without concatenating them; ``key_mask`` None or bool (N, P), True = visible. Returns (N, L, H, D) in q's
    dtype; differentiable w.r.t. all five inputs."""
    o, _ = fwd_op(q, k_media, v_media, k_latents, v_latents, float(scale), key_mask)
    return o


def unsupported_reasons(q: torch.Tensor, k_media: torch.Tensor, v_media: torch.Tensor, k_latents: torch.Tensor,
                        v_latents: torch.Tensor, *, key_mask: Optional[torch.Tensor] = None) -> List[str]:
    """What the kernels cannot serve about these inputs (devices are checked by ``_backend``); empty: supported."""
    named = (("q", q), ("k_media", k_media), ("v_media", v_media), ("k_latents", k_latents), ("v_latents", v_latents))
    reasons = unsupported_dtype_reasons(named)
    for name, t in named:
        if t.dim() != 4:
            reasons.append(f"{name} must be 4-D (N, tokens, heads, head_dim), got shape {tuple(t.shape)}")
    if reasons:
        return reasons
    num, latents, heads, head_dim = q.shape
    kv_heads = k_media.shape[2]
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        reasons.append(f"head_dim {head_dim} is outside the supported 1..{MAX_HEAD_DIM}")
    media = (num, k_media.shape[1], kv_heads, head_dim)
    if tuple(v_media.shape) != media or k_media.shape[0] != num or k_media.shape[3] != head_dim:
        reasons.append(f"k_media {tuple(k_media.shape)} and v_media {tuple(v_media.shape)} must be (N, P, Hkv, D) "
                       f"with q's N, D {(num, head_dim)}")
    if kv_heads == 0 or heads % kv_heads:
        reasons.append(f"q's {heads} heads are not a multiple of the {kv_heads} KV heads")
    own = (num, latents, kv_heads, head_dim)
    if tuple(k_latents.shape) != own or tuple(v_latents.shape) != own:
        reasons.append(f"k_latents {tuple(k_latents.shape)} and v_latents {tuple(v_latents.shape)} must be "
                       f"(N, L, Hkv, D) = {own}")
    if key_mask is not None and (key_mask.dtype != torch.bool or tuple(key_mask.shape) != tuple(k_media.shape[:2])):
        reasons.append(f"key_mask must be bool (N, P) = {tuple(k_media.shape[:2])}, got {key_mask.dtype} "
                       f"{tuple(key_mask.shape)}")
    reasons += _backend.interpreter_bf16_reasons(t for _, t in named)
    return reasons


def _check_inputs(q, k_media, v_media, k_latents, v_latents, key_mask=None) -> None:
    """Shapes and dtypes the kernels need (ValueError / TypeError otherwise)."""
    tensors = (q, k_media, v_media, k_latents, v_latents)
    if any(t.dim() != 4 for t in tensors):
        raise ValueError("q, k_media, v_media, k_latents, v_latents must be (N, tokens, heads, head_dim)")
    if len({t.dtype for t in tensors}) != 1 or q.dtype not in SUPPORTED_DTYPES:
        raise TypeError("q, k_media, v_media, k_latents, v_latents must share a dtype among fp32/fp16/bf16, got "
                        + ", ".join(str(t.dtype) for t in tensors))
    num, latents, heads, head_dim = q.shape
    media_tokens, kv_heads = k_media.shape[1], k_media.shape[2]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"q's {heads} heads are not a multiple of k_media's {kv_heads} KV heads")
    if k_media.shape != (num, media_tokens, kv_heads, head_dim) or v_media.shape != k_media.shape:
        raise ValueError(f"k_media, v_media must be {(num, media_tokens, kv_heads, head_dim)}, "
                         f"got {tuple(k_media.shape)} and {tuple(v_media.shape)}")
    if k_latents.shape != (num, latents, kv_heads, head_dim) or v_latents.shape != k_latents.shape:
        raise ValueError(f"k_latents, v_latents must be {(num, latents, kv_heads, head_dim)}, "
                         f"got {tuple(k_latents.shape)} and {tuple(v_latents.shape)}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} is outside 1..{MAX_HEAD_DIM}")
    if key_mask is not None and (key_mask.dtype != torch.bool or key_mask.shape != (num, media_tokens)):
        raise ValueError(f"key_mask must be bool {(num, media_tokens)}, got {key_mask.dtype} {tuple(key_mask.shape)}")


def launch_fwd(
    q: torch.Tensor, k_media: torch.Tensor, v_media: torch.Tensor, k_latents: torch.Tensor, v_latents: torch.Tensor,
    scale: float, config: Optional[ConfigLike] = None, *, out: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None, splits: Optional[int] = None, key_mask: Optional[torch.Tensor] = None,
    validated: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward pass.

    Args:
        q: (N, L, H, D) latent queries; k_media, v_media: (N, P, Hkv, D); k_latents, v_latents: (N, L, Hkv, D),
            H a multiple of Hkv (query head h reads KV head h // (H // Hkv)). Any strides (a tensor whose last
            stride is not 1 is copied); fp32, fp16 or bf16, all one dtype; D <= 128.
        key_mask: None or bool (N, P), True = visible media token (the latents are always visible).
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
        _check_inputs(q, k_media, v_media, k_latents, v_latents, key_mask)
    q, k_media, v_media, k_latents, v_latents = (
        addressable(t, name) for t, name in zip((q, k_media, v_media, k_latents, v_latents), _INPUTS))
    num, latents, heads, head_dim = q.shape
    media_tokens = k_media.shape[1]
    mask_args = _mask_args(q, k_media, key_mask)
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
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **mask_args,
        )
        if count > 1:
            _merge_splits(o_part, lse_part, o, lse)

    key = K.autotune_key(q, media_tokens, *_specialization(q, k_media, key_mask))
    cfg = U.as_config(config) if config is not None else K.FWD_CHOOSER.choose(key, run, q.device)
    run(cfg)
    return o, lse


def _specialization(q: torch.Tensor, k_media: torch.Tensor, key_mask: Optional[torch.Tensor]) -> Tuple[int, bool]:
    """(query heads per KV head, key mask given): the part of the autotune key that picks the compiled variant."""
    return q.shape[2] // k_media.shape[2], key_mask is not None


def _mask_args(q: torch.Tensor, k_media: torch.Tensor, key_mask: Optional[torch.Tensor]) -> dict:
    """The kernels' grouped-query and key-mask arguments: ``KV_GROUP`` (query heads per KV head), ``KEEP`` (the
    mask's bytes, contiguous (N, P), or None) and ``KEY_MASK``. Without either feature they are the kernels'
    defaults (1, None, False), with which the kernels compile exactly as before these features; they are passed
    explicitly all the same, as the AOT variants name them."""
    group, masked = _specialization(q, k_media, key_mask)
    keep = key_mask.contiguous().view(torch.uint8) if masked else None
    return dict(KEEP=keep, KV_GROUP=group, KEY_MASK=masked)


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
    splits: Optional[int] = None, key_mask: Optional[torch.Tensor] = None, validated: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward pass: (dq, dk_media, dv_media, dk_latents, dv_latents), shapes and dtypes of the inputs.

    ``do`` may have any strides, including 0 (an expanded gradient). ``config`` forces a launch config; the d*
    arguments are optional preallocated outputs (unit last stride); ``splits`` forces the number of key splits;
    ``validated``: as for :func:`launch_fwd`.
    Deterministic: no atomics; with several query tiles (L > BLOCK_M) or grouped-query K/V (each query head of a
    KV head writes its own slot) the per-slot fp32 dK/dV partials, and with several key splits the per-split fp32
    dQ partials, are summed in a fixed order. ``key_mask``: as in :func:`launch_fwd`.
    """
    K, U = _kernels()
    if not validated:
        _check_inputs(q, k_media, v_media, k_latents, v_latents, key_mask)
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
    mask_args = _mask_args(q, k_media, key_mask)
    group = q.shape[2] // k_media.shape[2]

    def run(cfg) -> None:
        block_m, block_n = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
        tiles = U.cdiv(latents, block_m)
        count = _splits(K, U, splits, (num * heads, tiles), media_tokens, latents, block_n, q.device)
        slots = tiles * group  # query tile x query head of a KV head: the writers of one dK/dV element
        if slots == 1:  # one writer: dK/dV are final where the kernel writes them (slot stride unused)
            targets = [g.unsqueeze(0) for g in grads]
        else:  # per-slot fp32 partials, summed below in a fixed order
            targets = [torch.empty((slots,) + tuple(g.shape), dtype=torch.float32, device=g.device) for g in grads]
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
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **mask_args,
        )
        if slots > 1:
            for g, part in zip(grads, targets):
                g.copy_(part.sum(dim=0))
        if count > 1:
            dq.copy_(dq_part.sum(dim=0))

    key = K.autotune_key(q, media_tokens, *_specialization(q, k_media, key_mask))
    cfg = U.as_config(config) if config is not None else K.BWD_CHOOSER.choose(key, run, q.device)
    run(cfg)
    return (dq, *grads)
