"""Selftest cases of the mllama (Llama 3.2 Vision) prefill kernels (``kernels/mllama_xattn.py``): forward, dK/dV
and dQ on a processor-style image mask, against the family's PyTorch path."""
from __future__ import annotations

import functools

import torch

from ..ops.mllama_xattn import launch_bwd, launch_fwd
from . import case as S


def cases(toy: bool) -> list:
    """Every shipped config of the forward, dK/dV and dQ kernels (this GPU's list; every list under the interpreter),
    forced: 4 query heads per K/V head (Llama 3.2 11B) at head sizes 64, 96 and 128 in bf16, the first config of each
    in fp16, every fp32 config; "hf" and "zero" empty rows alternate. ``toy``: interpreter-sized shapes."""
    from ..kernels import _utils as U
    from ..kernels import mllama_xattn as K

    # batch, text, K/V heads, group, keys per tile, tiles per image: text before the images, a 1-tile image then a
    # 3-tile one in sample 0, two consecutive images in sample 1, partial key tiles at every image end
    shape = (2, 24, 1, 4, 8, 4) if toy else (2, 160, 2, 4, 40, 4)
    out = []
    for dtype, head_dims, first_only in ((torch.bfloat16, S.HEAD_DIMS, False), (torch.float16, (64,), True),
                                         (torch.float32, (64, 128), False)):
        for head_dim in head_dims:
            fwd, dkdv, dq = (S.shipped(lambda arch, kind=kind: [
                c for c in K.shipped_configs(kind, dtype, head_dim, arch) if c.kwargs["ROWS"] >= shape[3]])
                for kind in ("fwd", "dkdv", "dq"))
            for kind, configs in (("fwd", fwd), ("dkdv", dkdv), ("dq", dq)):
                for i, config in enumerate(configs[:1] if first_only else configs):
                    forced = (fwd[0], config, dq[0]) if kind == "dkdv" else (fwd[0], dkdv[0], config)
                    empty_rows = ("hf", "zero")[(i + head_dim // 32) % 2]
                    run = functools.partial(_run, configs=(config,) if kind == "fwd" else forced,
                                            dtype=dtype, head_dim=head_dim, empty_rows=empty_rows, shape=shape)
                    detail = (f"{S.dtype_name(dtype)} d{head_dim} g{shape[3]} {empty_rows} B{shape[0]} S{shape[1]} "
                              f"I2x{shape[5]}x{shape[4]}")
                    name = "mllama_xattn_fwd" if kind == "fwd" else f"mllama_xattn_bwd_{kind}"
                    out.append(S.Case(name, U.config_label(config), detail, run, S.tolerance(dtype, kind != "fwd")))
    return out


def image_mask(batch: int, text: int, tiles: int, device) -> torch.Tensor:
    """A processor-style (batch, text, 2 images, tiles) 0/1 mask: sample 0 has text before its first image, a 1-tile
    image, then a 3-tile one; sample 1 two consecutive images (2 and 3 tiles) after two padding tokens."""
    cam = torch.zeros(batch, text, 2, tiles, dtype=torch.long, device=device)
    cam[0, text // 8: text // 2, 0, :1] = 1
    cam[0, text // 2:, 1, :3] = 1
    cam[1:, 2:, 0, :2] = 1
    cam[1:, 2:, 1, :3] = 1
    return cam


def _run(device, *, configs, dtype, head_dim, empty_rows, shape):
    from ..models.mllama import mask as M
    from ..models.mllama import torch_path

    batch, text, kv_heads, group, per_tile, tiles = shape
    closed = M.from_cross_attention_mask(image_mask(batch, text, tiles, device), per_tile, empty_rows)
    keys = 2 * closed.image_stride
    q = S.randn(batch, text, kv_heads * group, head_dim, dtype=dtype, device=device)
    kv = S.randn(batch, keys, 2, kv_heads, head_dim, dtype=dtype, device=device)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # (B, Hkv, K, D) views, as a cache holds them
    ranges = (closed.img_start, closed.img_end, closed.image_keys, closed.image_stride, closed.max_runs)
    scale = head_dim ** -0.5
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = torch_path.runs(*leaves, closed, scale)
    if len(configs) == 1:
        out = S.nan_like(q)
        launch_fwd(q, k, v, *ranges, scale, configs[0], out=out)
        return [("o", out, ref)]
    o, lse = launch_fwd(q, k, v, *ranges, scale, configs[0])
    do = S.randn(*q.shape, dtype=dtype, device=device)
    grads = [S.nan_like(t) for t in (q, k, v)]
    launch_bwd(do, q, k, v, o, lse, *ranges, scale, configs[1], dq_config=configs[2], dq=grads[0], dk=grads[1],
               dv=grads[2])
    ref.backward(do.float())
    return [(name, got, leaf.grad) for name, got, leaf in zip(("dq", "dk", "dv"), grads, leaves)]
