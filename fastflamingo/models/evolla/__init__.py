"""The Evolla family (transformers 5.x ``EvollaForProteinText2Text``, ``EvollaModel``: SaProt protein encoder, a
Flamingo sequence compressor, a Llama decoder with gated cross-attention "aligner" layers): drop-ins for the
compressor (``resampler.py``), the protein encoder that caches its result across decode steps, the aligner
(``aligner.py``), their masks (``mask.py``) and patch rules (``rules.py``)."""
from .aligner import EvollaRMSNorm, EvollaSequenceAlignerCrossAttention
from .family import FAMILY
from .resampler import (EvollaFeedForward, EvollaProteinEncoder, EvollaSequenceCompressorAttention,
                        EvollaSequenceCompressorResampler)

__all__ = ["EvollaFeedForward", "EvollaProteinEncoder", "EvollaRMSNorm", "EvollaSequenceAlignerCrossAttention",
           "EvollaSequenceCompressorAttention", "EvollaSequenceCompressorResampler", "FAMILY"]
