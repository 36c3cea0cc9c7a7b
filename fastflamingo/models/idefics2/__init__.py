"""The Idefics2 family: drop-ins for the perceiver resampler of transformers' Idefics2
(``models/idefics2/modeling_idefics2.py``: ``Idefics2PerceiverLayer``, ``Idefics2PerceiverAttention``), the padding
mask as a key mask (``mask.py``), the patched resampler forward (``resampler.py``) and the patch rules.

Constructor arguments ``(config, layer_idx)``, attribute names and state_dict keys are upstream's, so
``load_state_dict(upstream.state_dict(), strict=True)`` works in both directions; the config is any object (or
dict) with ``Idefics2PerceiverConfig``'s attributes. transformers is not imported (but for rare activation names).

What the drop-ins change (docs/design.md): the context's RMSNorm is folded into the K/V projection (no normalised
context, no ``[context; latents]``), the attention is ``functional.perceiver_attn`` with GQA and a key mask over the
patches (the mask converted once per resampler forward, not expanded to 4D), and the residual adds are the
epilogue of the GEMM that makes each branch. Divergences from upstream, deliberate:

- the attention keeps no K/V cache (upstream's resampler never passes one): a cache raises a ValueError;
- ``attn_weights`` are returned only while transformers records attention maps (under ``eager`` or
  ``"fastflamingo"``); upstream's eager function returns them on every call, and nothing upstream reads them.
"""
from .family import FAMILY
from .mask import key_mask_of, padding_mask
from .modules import Idefics2MLP, Idefics2PerceiverAttention, Idefics2PerceiverLayer, Idefics2RMSNorm

__all__ = ["Idefics2PerceiverLayer", "Idefics2PerceiverAttention", "Idefics2MLP", "Idefics2RMSNorm",
           "key_mask_of", "padding_mask", "FAMILY"]
