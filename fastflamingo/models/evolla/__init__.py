"""The Evolla family (transformers 5.x ``EvollaForProteinText2Text``, ``EvollaModel``: SaProt protein encoder, a
Flamingo sequence compressor, a Llama decoder with gated cross-attention "aligner" layers): drop-ins for the
compressor (``resampler.py``) and the aligner (``aligner.py``), their masks (``mask.py``) and patch rules
(``rules.py``), and the model-level hooks that encode a protein once per sequence (``protein_cache.py``) and turn
on the KV cache in ``generate`` (``decoding.py``)."""
from .aligner import EvollaRMSNorm, EvollaSequenceAlignerCrossAttention
from .family import FAMILY
from .resampler import EvollaFeedForward, EvollaSequenceCompressorAttention, EvollaSequenceCompressorResampler

__all__ = ["EvollaFeedForward", "EvollaRMSNorm", "EvollaSequenceAlignerCrossAttention",
           "EvollaSequenceCompressorAttention", "EvollaSequenceCompressorResampler", "FAMILY"]
