"""Rules that recognise OpenFlamingo 2.0.1 modules and build their drop-ins.

flamingo-pytorch 0.1.2 defines classes of the same names and structure (its rules, ``models/flamingo_pytorch/
rules.py``, reuse the recognisers below): OpenFlamingo's take ``use_cached_media`` in ``forward`` and its resampler
has ``media_time_embs`` / ``frame_embs`` where flamingo-pytorch's has ``media_pos_emb``. Both packages' stand-alone
``PerceiverAttention`` have the same signature and become this family's drop-in.
"""
from __future__ import annotations

from torch import nn

from .._patching import Rule, class_named, forward_takes
from . import modules as of


def is_open_flamingo(module: nn.Module) -> bool:
    return forward_takes(module, "use_cached_media")


def attention_args(attn: nn.Module) -> dict:
    heads = attn.heads
    return dict(
        dim=attn.norm.normalized_shape[0],
        dim_head=attn.to_q.out_features // heads,
        heads=heads,
        only_attend_immediate_media=attn.only_attend_immediate_media,
    )


def is_masked_cross_attention(m: nn.Module) -> bool:
    return class_named(m, "MaskedCrossAttention") and all(hasattr(m, a) for a in ("to_q", "to_kv", "to_out", "norm"))


def is_gated_block(m: nn.Module) -> bool:
    return (
        class_named(m, "GatedCrossAttentionBlock")
        and hasattr(m, "attn_gate")
        and hasattr(m, "ff_gate")
        and is_masked_cross_attention(getattr(m, "attn", None) or nn.Module())
    )


def ff_mult(ff: nn.Module, dim: int) -> float:
    return ff[1].out_features / dim


def _convert_masked_cross_attention(m):
    return of.MaskedCrossAttention(dim_visual=m.to_kv.in_features, **attention_args(m))


def _convert_gated_block(m):
    args = attention_args(m.attn)
    return of.GatedCrossAttentionBlock(dim_visual=m.attn.to_kv.in_features, ff_mult=ff_mult(m.ff, args["dim"]), **args)


def _is_perceiver_attention(m):
    return class_named(m, "PerceiverAttention") and all(
        hasattr(m, a) for a in ("norm_media", "norm_latents", "to_q", "to_kv", "to_out")
    )


def _convert_perceiver_attention(m):
    return of.PerceiverAttention(
        dim=m.norm_media.normalized_shape[0], dim_head=m.to_q.out_features // m.heads, heads=m.heads
    )


def is_resampler(m):
    return (
        class_named(m, "PerceiverResampler")
        and isinstance(getattr(m, "layers", None), nn.ModuleList)
        and hasattr(m, "latents")
        and (hasattr(m, "media_pos_emb") or hasattr(m, "media_time_embs"))
    )


def resampler_args(m) -> dict:
    num_latents, dim = m.latents.shape
    attn, ff = m.layers[0]
    return dict(
        dim=dim,
        depth=len(m.layers),
        dim_head=attn.to_q.out_features // attn.heads,
        heads=attn.heads,
        num_latents=num_latents,
        ff_mult=ff_mult(ff, dim),
    )


def _convert_resampler(m):
    args = resampler_args(m)
    return of.PerceiverResampler(
        max_num_media=None if m.media_time_embs is None else m.media_time_embs.shape[0],
        max_num_frames=None if m.frame_embs is None else m.frame_embs.shape[0],
        **args,
    )


RULES = (
    Rule("GatedCrossAttentionBlock", lambda m: is_gated_block(m) and is_open_flamingo(m), _convert_gated_block),
    Rule("MaskedCrossAttention", lambda m: is_masked_cross_attention(m) and is_open_flamingo(m),
         _convert_masked_cross_attention),
    Rule("PerceiverResampler", lambda m: is_resampler(m) and not hasattr(m, "media_pos_emb"), _convert_resampler),
    Rule("PerceiverAttention", _is_perceiver_attention, _convert_perceiver_attention),
)


def rules(model: nn.Module, empty_rows: str) -> tuple:
    """OpenFlamingo's rules do not depend on the model or on ``patch``'s options."""
    return RULES
