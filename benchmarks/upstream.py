"""OpenFlamingo's own modules (open_flamingo/src/helpers.py), loaded once and without open_clip
(``fastflamingo.testing.load_open_flamingo``), for the ops whose ``upstream`` provider is OpenFlamingo's code.
"""
from __future__ import annotations

from typing import Optional

_HELPERS = None


def openflamingo_helpers():
    """The ``helpers`` module of OpenFlamingo (``MaskedCrossAttention``, ``GatedCrossAttentionBlock``, ...)."""
    global _HELPERS
    if _HELPERS is None:
        from fastflamingo.testing import load_open_flamingo

        _HELPERS = load_open_flamingo().helpers
    return _HELPERS


def openflamingo_unavailable(device, dtype) -> Optional[str]:
    """A provider's ``unavailable`` check: why OpenFlamingo's modules cannot be loaded here, or None."""
    try:
        openflamingo_helpers()
    except Exception as exc:
        return f"OpenFlamingo helpers do not load ({type(exc).__name__}: {exc})"
    return None
