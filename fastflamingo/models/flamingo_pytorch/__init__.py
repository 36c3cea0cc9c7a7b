"""The flamingo-pytorch family (lucidrains' flamingo-pytorch 0.1.2): OpenFlamingo's drop-ins with flamingo-pytorch's
signatures (``modules.py``) and patch rules (``rules.py``); the mask is OpenFlamingo's (``media_locations``).
"""
from .family import FAMILY
from .modules import FeedForward, GatedCrossAttentionBlock, MaskedCrossAttention, PerceiverAttention, PerceiverResampler

__all__ = ["FeedForward", "GatedCrossAttentionBlock", "MaskedCrossAttention", "PerceiverAttention",
           "PerceiverResampler", "FAMILY"]
