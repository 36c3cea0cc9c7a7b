"""fastflamingo: fused kernels and drop-in modules for Flamingo-style vision-language models.

``import fastflamingo`` needs only torch: triton, transformers and the upstream packages are imported lazily, when
a Triton kernel runs or a model is patched.
"""
from . import functional, masks, models
from ._backend import BACKENDS, BackendError, backend, requested_backend
from ._version import __version__
from ._warmup import WarmupReport, warmup
from .attention_recording import AttentionMap, AttentionMaps, attention_maps
from .cache import cache_disabled, clear_media_cache
from .hf import dropins, register, register_dropins, unregister_dropins
from .models.idefics import IdeficsGatedCrossAttentionLayer, IdeficsPerceiverAttention, IdeficsPerceiverResampler
from .models.openflamingo import (FeedForward, GatedCrossAttentionBlock, MaskedCrossAttention, PerceiverAttention,
                                  PerceiverResampler)
from .patching import PatchReport, patch, unpatch

__all__ = [
    "__version__",
    "BACKENDS",
    "BackendError",
    "backend",
    "requested_backend",
    "cache_disabled",
    "clear_media_cache",
    "functional",
    "masks",
    "models",
    "FeedForward",
    "GatedCrossAttentionBlock",
    "MaskedCrossAttention",
    "PerceiverAttention",
    "PerceiverResampler",
    "IdeficsGatedCrossAttentionLayer",
    "IdeficsPerceiverResampler",
    "IdeficsPerceiverAttention",
    "PatchReport",
    "patch",
    "unpatch",
    "warmup",
    "WarmupReport",
    "register",
    "register_dropins",
    "unregister_dropins",
    "dropins",
    "attention_maps",
    "AttentionMap",
    "AttentionMaps",
]

