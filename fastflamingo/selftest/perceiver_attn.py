"""Selftest cases of the perceiver-resampler attention kernels (``kernels/perceiver_attn.py``), forward and
backward, against the PyTorch path."""
from __future__ import annotations

import functools

import torch

from ..ops import torch_path
from ..ops.perceiver_attn import launch_bwd, launch_fwd
from . import case as S


def cases(toy: bool) -> list:
    """Every shipped forward and backward config of this GPU's architecture, forced: head sizes 64, 96 and 128 in
    bf16, the first config of each kernel in fp16, every fp32 config. Configs with BLOCK_M below the latent count run
    several query tiles (the backward's dK/dV partials). ``toy``: interpreter-sized shapes."""
    from ..kernels import _utils as U
    from ..kernels import perceiver_attn as K

    shape = (2, 24, 2, 20) if toy else (6, 64, 4, 257)  # (samples x media, latents, heads, media tokens)
    out = []
    for dtype, head_dims, first_only in ((torch.bfloat16, S.HEAD_DIMS, False), (torch.float16, (64,), True),
                                         (torch.float32, (64, 128), False)):
        for head_dim in head_dims:
            fwd, bwd = (S.shipped(functools.partial(K.shipped_configs, kind, dtype, head_dim))
                        for kind in ("fwd", "bwd"))
            for kind, configs in (("fwd", fwd), ("bwd", bwd)):
                for i, config in enumerate(configs[:1] if first_only else configs):
                    # one key split and two (media keys | latent keys: fp32 partials merged by the launcher)
                    # alternate, whatever the SM count would choose
                    splits = 1 + i % 2
                    run = functools.partial(_fwd if kind == "fwd" else _bwd, configs=(fwd[0], config),
                                            dtype=dtype, head_dim=head_dim, shape=shape, splits=splits)
                    detail = (f"{S.dtype_name(dtype)} d{head_dim} N{shape[0]} L{shape[1]} H{shape[2]} P{shape[3]} "
                              f"splits{splits}")
                    out.append(S.Case(f"perceiver_{kind}", U.config_label(config), detail, run,
                                      S.tolerance(dtype, grad=kind == "bwd")))
    return out + _padded_gqa_cases(toy)


def _padded_gqa_cases(toy: bool) -> list:
    """IDEFICS2's resampler attention: a key padding mask (samples fully padded, unpadded and partly padded) and
    4 query heads per KV head at head_dim 96; every shipped config in bf16, the first in fp16."""
    from ..kernels import _utils as U
    from ..kernels import perceiver_attn as K

    shape = (3, 24, 4, 20) if toy else (6, 64, 16, 257)
    kv_heads = shape[2] // 4
    out = []
    for dtype, first_only in ((torch.bfloat16, False), (torch.float16, True)):
        fwd, bwd = (S.shipped(functools.partial(K.shipped_configs, kind, dtype, 96, specialized=True))
                    for kind in ("fwd", "bwd"))
        for kind, configs in (("fwd", fwd), ("bwd", bwd)):
            for i, config in enumerate(configs[:1] if first_only else configs):
                splits = 1 + i % 2
                run = functools.partial(_fwd if kind == "fwd" else _bwd, configs=(fwd[0], config), dtype=dtype,
                                        head_dim=96, shape=shape, splits=splits, kv_heads=kv_heads, masked=True)
                detail = (f"{S.dtype_name(dtype)} d96 N{shape[0]} L{shape[1]} H{shape[2]}/{kv_heads}kv P{shape[3]} "
                          f"key_mask splits{splits}")
                out.append(S.Case(f"perceiver_{kind}", U.config_label(config), detail, run,
                                  S.tolerance(dtype, grad=kind == "bwd")))
    return out


def _inputs(device, dtype, head_dim, shape, kv_heads=None, masked=False):
    """q, the four K/V views of fused projections (``kv_heads`` heads, default q's), the scale and the key mask
    (None, or bool (N, P): sample 0 fully padded, sample 1 unpadded, the others right-padded by a third)."""
    num, latents, heads, tokens = shape
    kv_heads = kv_heads or heads
    q = S.randn(num, latents, heads, head_dim, dtype=dtype, device=device)
    kv_media = S.randn(num, tokens, 2, kv_heads, head_dim, dtype=dtype, device=device)  # fused K/V projections
    kv_latents = S.randn(num, latents, 2, kv_heads, head_dim, dtype=dtype, device=device)
    key_mask = None
    if masked:
        key_mask = (torch.arange(tokens, device=device) < tokens - tokens // 3).expand(num, tokens).clone()
        key_mask[0] = False
        key_mask[1] = True
    return (q, kv_media[:, :, 0], kv_media[:, :, 1], kv_latents[:, :, 0], kv_latents[:, :, 1], head_dim ** -0.5,
            key_mask)


def _fwd(device, *, configs, dtype, head_dim, shape, splits, kv_heads=None, masked=False):
    q, km, vm, kl, vl, scale, key_mask = _inputs(device, dtype, head_dim, shape, kv_heads, masked)
    out = S.nan_like(q)
    lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("nan"), device=device)
    launch_fwd(q, km, vm, kl, vl, scale, configs[1], out=out, lse=lse, splits=splits, key_mask=key_mask)
    ref = torch_path.perceiver_attn(*(t.float() for t in (q, km, vm, kl, vl)), scale, key_mask)
    k = torch.cat((km, kl), dim=1).float()
    grouped = q.float().unflatten(2, (k.shape[2], -1))  # query head h reads KV head h // group
    scores = torch.einsum("nlhgd,nkhd->nhglk", grouped, k).flatten(1, 2) * scale
    if key_mask is not None:
        visible = torch.cat((key_mask, key_mask.new_ones(q.shape[:2])), dim=1)
        scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    return [("o", out, ref), ("lse", lse, scores.logsumexp(-1))]


def _bwd(device, *, configs, dtype, head_dim, shape, splits, kv_heads=None, masked=False):
    inputs = _inputs(device, dtype, head_dim, shape, kv_heads, masked)
    scale, key_mask = inputs[-2:]
    q, km, vm, kl, vl = inputs[:-2]
    o, lse = launch_fwd(q, km, vm, kl, vl, scale, configs[0], key_mask=key_mask)
    do = S.randn(*q.shape, dtype=dtype, device=device)
    grads = [S.nan_like(t) for t in (q, km, vm, kl, vl)]
    launch_bwd(do, q, km, vm, kl, vl, o, lse, scale, configs[1], dq=grads[0], dk_media=grads[1], dv_media=grads[2],
               dk_latents=grads[3], dv_latents=grads[4], splits=splits, key_mask=key_mask)
    leaves = [t.detach().float().requires_grad_() for t in (q, km, vm, kl, vl)]
    torch_path.perceiver_attn(*leaves, scale, key_mask).backward(do.float())
    names = ("dq", "dk_media", "dv_media", "dk_latents", "dv_latents")
    return [(name, got, ref.grad) for name, got, ref in zip(names, grads, leaves)]
