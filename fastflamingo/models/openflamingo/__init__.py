"""The OpenFlamingo family (open-flamingo 2.0.1): drop-in modules (``modules.py``: upstream's constructor
arguments, parameter names and state_dict keys) and patch rules (``rules.py``). Its mask is the op-level one:
``media_locations`` gives ``text_time`` directly (:func:`fastflamingo.masks.from_media_locations`).
"""
from .family import FAMILY
from .modules import FeedForward, GatedCrossAttentionBlock, MaskedCrossAttention, PerceiverAttention, PerceiverResampler

__all__ = ["FeedForward", "GatedCrossAttentionBlock", "MaskedCrossAttention", "PerceiverAttention",
           "PerceiverResampler", "FAMILY"]
