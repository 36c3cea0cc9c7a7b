"""Selftest cases of the mllama decode kernel (``kernels/mllama_decode.py``): the split kernel with one split and
with several, with the layer's additive mask and without, against the family's dense PyTorch path."""
from __future__ import annotations

import functools

import torch

from ..ops.mllama_decode import launch
from . import case as S
from .mllama_xattn import image_mask


def cases(toy: bool) -> list:
    """The split kernel at the config of every dtype and head size (this GPU's; every architecture's under the
    interpreter), forced, with one split and several, with the additive mask and without: bf16 at head sizes 64, 96
    and 128 (4 query heads per K/V head, 2 new tokens), fp16 and fp32 once each. ``toy``: interpreter-sized shapes."""
    from ..kernels import mllama_decode as K

    shape = (2, 2, 1, 4, 8, 4) if toy else (2, 2, 2, 4, 40, 4)  # batch, tokens, K/V heads, group, keys/tile, tiles
    variants = [(splits, label, {"has_mask": label == "mask"}) for splits in (1, 5) for label in ("mask", "nomask")]
    return S.decode_cases("mllama_decode_split", K.shipped_config, variants, functools.partial(_run, shape=shape),
                          f"g{shape[3]} Tq{shape[1]}")


def _run(device, *, config, splits, has_mask, dtype, head_dim, shape):
    from ..models.mllama import mask as M
    from ..models.mllama import reference, torch_path

    batch, tokens, kv_heads, group, per_tile, tiles = shape
    cam = image_mask(batch, 16, tiles, device)[:, -tokens:]
    keys = cam.shape[2] * tiles * per_tile
    additive = None
    if has_mask:  # the layer's additive mask: 0 on visible keys, finfo.min elsewhere, (B, 1, Tq, K)
        visible = reference.visible_keys(cam, per_tile, "hf")
        additive = torch.where(visible, 0.0, torch.finfo(dtype).min).to(dtype)[:, None]
    q = S.randn(batch, tokens, kv_heads * group, head_dim, dtype=dtype, device=device)
    kv = S.randn(batch, keys, 2, kv_heads, head_dim, dtype=dtype, device=device)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    units, count, unit_len = M.decode_units(additive, keys, per_tile, batch, device)
    scale = head_dim ** -0.5
    out = S.nan_like(q)
    launch(q, k, v, None if additive is None else additive[:, 0], units, count, unit_len, scale, config, splits,
           out=out)
    ref = torch_path.dense(q.float(), k.float(), v.float(), None if additive is None else additive.float(), scale)
    return [("o", out, ref)]
