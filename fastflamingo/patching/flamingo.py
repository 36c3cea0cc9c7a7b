"""Rules that recognise OpenFlamingo 2.0.1 and flamingo-pytorch 0.1.2 modules and build their drop-ins.

Both packages define classes of the same names; OpenFlamingo's take ``use_cached_media`` in ``forward`` and its
resampler has ``media_time_embs`` / ``frame_embs`` where flamingo-pytorch's has ``media_pos_emb``.
"""
from __future__ import annotations

from torch import nn

from .. import flamingo_pytorch as fp
from .. import modules as of
from ._common import Rule, class_named, forward_takes


def _is_open_flamingo(module: nn.Module) -> bool:
    return forward_takes(module, "use_cached_media")


def _attention_args(attn: nn.Module) -> dict:
    heads = attn.heads
    return dict(
        dim=attn.norm.normalized_shape[0],
        dim_head=attn.to_q.out_features // heads,
        heads=heads,
        only_attend_immediate_media=attn.only_attend_immediate_media,
    )


def _is_masked_cross_attention(m: nn.Module) -> bool:
    return class_named(m, "MaskedCrossAttention") and all(hasattr(m, a) for a in ("to_q", "to_kv", "to_out", "norm"))


def _is_gated_block(m: nn.Module) -> bool:
    return (
        class_named(m, "GatedCrossAttentionBlock")
        and hasattr(m, "attn_gate")
        and hasattr(m, "ff_gate")
        and _is_masked_cross_attention(getattr(m, "attn", None) or nn.Module())
    )


def _ff_mult(ff: nn.Module, dim: int) -> float:
    return ff[1].out_features / dim


def _convert_masked_cross_attention(m):
    args = _attention_args(m)
    if _is_open_flamingo(m):
        return of.MaskedCrossAttention(dim_visual=m.to_kv.in_features, **args)
    return fp.MaskedCrossAttention(**args)


def _convert_gated_block(m):
    args = _attention_args(m.attn)
    ff_mult = _ff_mult(m.ff, args["dim"])
    if _is_open_flamingo(m):
        return of.GatedCrossAttentionBlock(dim_visual=m.attn.to_kv.in_features, ff_mult=ff_mult, **args)
    return fp.GatedCrossAttentionBlock(ff_mult=ff_mult, **args)


def _is_perceiver_attention(m):
    return class_named(m, "PerceiverAttention") and all(
        hasattr(m, a) for a in ("norm_media", "norm_latents", "to_q", "to_kv", "to_out")
    )


def _convert_perceiver_attention(m):
    return of.PerceiverAttention(
        dim=m.norm_media.normalized_shape[0], dim_head=m.to_q.out_features // m.heads, heads=m.heads
    )


def _is_resampler(m):
    return (
        class_named(m, "PerceiverResampler")
        and isinstance(getattr(m, "layers", None), nn.ModuleList)
        and hasattr(m, "latents")
        and (hasattr(m, "media_pos_emb") or hasattr(m, "media_time_embs"))
    )


def _convert_resampler(m):
    num_latents, dim = m.latents.shape
    attn, ff = m.layers[0]
    args = dict(
        dim=dim,
        depth=len(m.layers),
        dim_head=attn.to_q.out_features // attn.heads,
        heads=attn.heads,
        num_latents=num_latents,
        ff_mult=_ff_mult(ff, dim),
    )
    if hasattr(m, "media_pos_emb"):
        return fp.PerceiverResampler(num_media_embeds=m.media_pos_emb.shape[0], **args)
    return of.PerceiverResampler(
        max_num_media=None if m.media_time_embs is None else m.media_time_embs.shape[0],
        max_num_frames=None if m.frame_embs is None else m.frame_embs.shape[0],
        **args,
    )


RULES = [
    Rule("GatedCrossAttentionBlock", _is_gated_block, _convert_gated_block),
    Rule("MaskedCrossAttention", _is_masked_cross_attention, _convert_masked_cross_attention),
    Rule("PerceiverResampler", _is_resampler, _convert_resampler),
    Rule("PerceiverAttention", _is_perceiver_attention, _convert_perceiver_attention),
]
