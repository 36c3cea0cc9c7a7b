"""fastflamingo: fused kernels and drop-in modules for Flamingo-style vision-language models.

``import fastflamingo`` needs only torch: triton, transformers and the upstream packages are imported lazily, when
a Triton kernel runs or a model is patched.
"""
from . import functional, masks
from ._backend import BACKENDS, BackendError, backend, requested_backend
from ._version import __version__
from .cache import cache_disabled, clear_media_cache
from .modules import FeedForward, GatedCrossAttentionBlock, MaskedCrossAttention, PerceiverAttention, PerceiverResampler
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
    "FeedForward",
    "GatedCrossAttentionBlock",
    "MaskedCrossAttention",
    "PerceiverAttention",
    "PerceiverResampler",
    "IdeficsGatedCrossAttentionLayer",
    "IdeficsPerceiverResampler",
    "PatchReport",
    "patch",
    "unpatch",
]


def __getattr__(name):
    # The IDEFICS drop-ins take a transformers config but do not need transformers to import.
    if name in ("IdeficsGatedCrossAttentionLayer", "IdeficsPerceiverResampler", "IdeficsPerceiverAttention"):
        from . import idefics

        return getattr(idefics, name)
    if name == "flamingo_pytorch":
        import importlib

        return importlib.import_module(".flamingo_pytorch", __name__)
    raise AttributeError(f"module 'fastflamingo' has no attribute {name!r}")
