"""Selftest cases of the media_xattn prefill kernels (``kernels/media_xattn.py``): forward, dK/dV and dQ, against
the PyTorch path and the LSE of the reference."""
from __future__ import annotations

import functools

import torch

from ..masks import MediaMask
from ..ops import torch_path
from ..ops.media_xattn import launch_bwd, launch_fwd
from ..reference import media_xattn_lse
from ..testing import evenly_spaced_media_locations
from . import case as S


def cases(toy: bool) -> list:
    """Every shipped config of the forward, dK/dV and dQ kernels (this GPU's list; every list under the
    interpreter), forced: head sizes 64, 96 and 128 in bf16, the first config of each in fp16, every fp32 config;
    the two modes alternate across configs, and the dK/dV kernel alternates one token split (it writes the gradients)
    and three (fp32 partials summed by the launcher). A dK/dV case forces dQ to its first config and vice versa.
    ``toy``: interpreter-sized shapes."""
    # batch, text, heads, media, latents: ragged text, a prefix that sees no media, several tiles per run
    shape = (2, 40, 2, 3, 16) if toy else (2, 400, 4, 5, 64)
    plan = ((torch.bfloat16, S.HEAD_DIMS, False), (torch.float16, (64,), True), (torch.float32, (64, 128), False))
    return _config_cases(plan, shape, mode_period=32) + _key_mask_cases(toy)


def _key_mask_cases(toy: bool) -> list:
    """The key-mask specialization (``KEY_MASK``; Evolla's aligner) at head sizes 64 and 128: every config its
    lists ship in bf16, the first in fp16, both modes alternating; three samples, one partly padded (a media wholly
    hidden), one unpadded and one fully padded (every row exactly 0)."""
    shape = (3, 40, 2, 3, 16) if toy else (3, 400, 4, 5, 64)
    plan = ((torch.bfloat16, (64, 128), False), (torch.float16, (64, 128), True))
    return _config_cases(plan, shape, mode_period=64, masked=True)


def _config_cases(plan, shape, mode_period: int, masked: bool = False) -> list:
    """One case per shipped config of each kernel for every ``(dtype, head sizes, first config only)`` of ``plan``
    (the key-mask config lists when ``masked``). The mode alternates across configs (shifted by
    ``head_dim // mode_period``), dK/dV alternates one token split and three, and a dK/dV (dQ) case forces the
    other two kernels to their first configs."""
    from ..kernels import _utils as U
    from ..kernels import media_xattn as K

    out = []
    for dtype, head_dims, first_only in plan:
        for head_dim in head_dims:
            fwd, dkdv, dq = (S.shipped(functools.partial(K.shipped_configs, kind, dtype, head_dim,
                                                         specialized=masked))
                             for kind in ("fwd", "dkdv", "dq"))
            for kind, configs in (("fwd", fwd), ("dkdv", dkdv), ("dq", dq)):
                for i, config in enumerate(configs[:1] if first_only else configs):
                    immediate = (i + head_dim // mode_period) % 2 == 0
                    splits = 1 + 2 * (i % 2) if kind == "dkdv" else None
                    forced = {"dkdv": (fwd[0], config, dq[0]), "dq": (fwd[0], dkdv[0], config)}.get(kind)
                    run = functools.partial(_bwd, configs=forced, dkdv_splits=splits) if forced else \
                        functools.partial(_fwd, config=config)
                    run = functools.partial(run, dtype=dtype, head_dim=head_dim, immediate=immediate, shape=shape,
                                            masked=masked)
                    name = "media_xattn_fwd" if kind == "fwd" else f"media_xattn_bwd_{kind}"
                    detail = (f"{S.dtype_name(dtype)} d{head_dim} {'imm' if immediate else 'prev'}"
                              f"{' key_mask' if masked else ''} "
                              f"B{shape[0]} T{shape[1]} H{shape[2]} M{shape[3]}x{shape[4]}"
                              f"{f' splits{splits}' if splits else ''}")
                    out.append(S.Case(name, U.config_label(config), detail, run,
                                      S.tolerance(dtype, grad=kind != "fwd")))
    return out


def _inputs(device, dtype, head_dim, immediate, shape, masked=False):
    """q, the K/V views of a fused projection, text_time, the MediaMask, the scale and the key mask: None, or
    (B, M*n) bool with sample 0's second media hidden and every third key of the rest, sample 1 unpadded and
    sample 2 (when there is one) fully padded."""
    batch, text, heads, media, latents = shape
    q = S.randn(batch, text, heads, head_dim, dtype=dtype, device=device)
    kv = S.randn(batch, media * latents, 2, heads, head_dim, dtype=dtype, device=device)  # a fused K/V projection
    k, v = kv[:, :, 0], kv[:, :, 1]
    locations = evenly_spaced_media_locations(batch, text, media, first=text // 10, device=device)
    text_time = locations.cumsum(-1).to(torch.int32)
    mask = MediaMask(text_time, media, "immediate" if immediate else "all_previous")
    key_mask = None
    if masked:
        key_mask = torch.arange(media * latents, device=device).expand(batch, -1) % 3 != 0
        key_mask[0, latents:2 * latents] = False
        key_mask[1:2] = True
        key_mask[2:3] = False
    return q, k, v, text_time, mask, head_dim ** -0.5, key_mask


def _fwd(device, *, config, dtype, head_dim, immediate, shape, masked=False):
    q, k, v, text_time, mask, scale, key_mask = _inputs(device, dtype, head_dim, immediate, shape, masked)
    media, latents = shape[3], shape[4]
    out = torch.full_like(q, float("nan"))
    lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("nan"), device=device)
    launch_fwd(q, k, v, text_time, media, latents, immediate, scale, config, out=out, lse=lse, key_mask=key_mask)
    ref = torch_path.media_xattn(q.float(), k.float(), v.float(), mask, latents, scale, key_mask=key_mask)
    # a token that sees nothing: +inf from the kernel, -inf from the reference; both compared as 0
    lse, lse_ref = (torch.where(torch.isinf(t), 0.0, t)
                    for t in (lse, media_xattn_lse(q, k, text_time, media, immediate, scale, key_mask=key_mask)))
    return [("o", out, ref), ("lse", lse, lse_ref)]


def _bwd(device, *, configs, dtype, head_dim, immediate, shape, dkdv_splits=None, masked=False):
    q, k, v, text_time, mask, scale, key_mask = _inputs(device, dtype, head_dim, immediate, shape, masked)
    media, latents = shape[3], shape[4]
    fwd_config, dkdv_config, dq_config = configs
    o, lse = launch_fwd(q, k, v, text_time, media, latents, immediate, scale, fwd_config, key_mask=key_mask)
    do = S.randn(*q.shape, dtype=dtype, device=device)
    dq, dk, dv = (S.nan_like(t) for t in (q, k, v))
    launch_bwd(do, q, k, v, o, lse, text_time, media, latents, immediate, scale, dkdv_config, dq_config=dq_config,
               dq=dq, dk=dk, dv=dv, dkdv_splits=dkdv_splits, key_mask=key_mask)
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    torch_path.media_xattn(*leaves, mask, latents, scale, key_mask=key_mask).backward(do.float())
    return [(name, got, ref.grad) for name, got, ref in zip(("dq", "dk", "dv"), (dq, dk, dv), leaves)]
