"""Rules that recognise flamingo-pytorch 0.1.2 modules and build their drop-ins.

flamingo-pytorch's classes have OpenFlamingo's names and structure, so the recognisers are OpenFlamingo's
(``models/openflamingo/rules.py``); these rules take the modules whose ``forward`` has no ``use_cached_media`` and
the resampler with ``media_pos_emb``. A stand-alone ``PerceiverAttention`` is OpenFlamingo's rule's (one drop-in
serves both).
"""
from __future__ import annotations

from torch import nn

from .._patching import Rule
from ..openflamingo.rules import attention_args, ff_mult, is_gated_block, is_masked_cross_attention, \
    is_open_flamingo, is_resampler, resampler_args
from . import modules as fp


def _convert_masked_cross_attention(m):
    return fp.MaskedCrossAttention(**attention_args(m))


def _convert_gated_block(m):
    args = attention_args(m.attn)
    return fp.GatedCrossAttentionBlock(ff_mult=ff_mult(m.ff, args["dim"]), **args)


def _convert_resampler(m):
    return fp.PerceiverResampler(num_media_embeds=m.media_pos_emb.shape[0], **resampler_args(m))


RULES = (
    Rule("GatedCrossAttentionBlock", lambda m: is_gated_block(m) and not is_open_flamingo(m), _convert_gated_block),
    Rule("MaskedCrossAttention", lambda m: is_masked_cross_attention(m) and not is_open_flamingo(m),
         _convert_masked_cross_attention),
    Rule("PerceiverResampler", lambda m: is_resampler(m) and hasattr(m, "media_pos_emb"), _convert_resampler),
)


def rules(model: nn.Module, empty_rows: str) -> tuple:
    """flamingo-pytorch's rules do not depend on the model or on ``patch``'s options."""
    return RULES
