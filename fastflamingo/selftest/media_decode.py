"""Selftest cases of the media_xattn decode kernels (``kernels/media_decode.py``): the split kernel with one split
and with several (split kernel + combine), against the PyTorch path."""
from __future__ import annotations

import functools

import torch

from ..masks import MediaMask
from ..ops import torch_path
from ..ops.media_decode import launch
from . import case as S


def cases(toy: bool) -> list:
    """The split kernel at the shipped config of every dtype and head size (this GPU's; every architecture's under the
    interpreter), forced, with one split (the direct path) and with several (split kernel + combine), both modes;
    bf16 at head sizes 64, 96 and 128, fp16 and fp32 once each. ``toy``: interpreter-sized shapes."""
    from ..kernels import media_decode as K

    # batch, new tokens, heads, media, latents (all-previous: 5 media x 32 keys = 3 tiles of 64; 8 splits: some empty)
    shape = (2, 2, 2, 5, 32) if toy else (3, 2, 4, 9, 64)
    variants = [(splits, mode, {"immediate": mode == "imm"}) for splits in (1, 8) for mode in ("imm", "prev")]
    # the key-mask specialization (KEY_MASK; Evolla's aligner decoding): once per mode, direct and split
    variants += [(1, "imm key_mask", {"immediate": True, "masked": True}),
                 (8, "prev key_mask", {"immediate": False, "masked": True})]
    label = f"B{shape[0]} Tq{shape[1]} M{shape[3]}x{shape[4]}"
    return S.decode_cases("media_decode_split", K.shipped_config, variants, functools.partial(_decode, shape=shape),
                          label)


def _decode(device, *, config, splits, dtype, head_dim, immediate, shape, masked=False):
    batch, tokens, heads, media, latents = shape
    q = S.randn(batch, tokens, heads, head_dim, dtype=dtype, device=device)
    kv = S.randn(batch, media * latents, 2, heads, head_dim, dtype=dtype, device=device)
    k, v = kv[:, :, 0], kv[:, :, 1]
    # per sample: the last image, an earlier one, and (sample 0) a token past every image (sees nothing, immediate)
    text_time = torch.randint(1, media + 1, (batch, tokens), device=device, dtype=torch.int32)
    text_time[:, -1] = media
    text_time[0, 0] = media + 1 if immediate else 0
    scale = head_dim ** -0.5
    key_mask = None
    if masked:  # every third key hidden, and sample 1 fully padded (its tokens get exactly 0)
        key_mask = torch.arange(media * latents, device=device).expand(batch, -1) % 3 != 0
        key_mask[1:2] = False
    out = S.nan_like(q)
    launch(q, k, v, text_time, media, latents, immediate, scale, config, splits, out=out, key_mask=key_mask)
    mask = MediaMask(text_time, media, "immediate" if immediate else "all_previous")
    return [("o", out, torch_path.media_xattn(q.float(), k.float(), v.float(), mask, latents, scale,
                                              key_mask=key_mask))]
