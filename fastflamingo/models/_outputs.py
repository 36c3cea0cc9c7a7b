"""Whether the caller asked transformers for attention maps during the forward pass now running.

transformers 5 no longer hands ``output_attentions`` down to the attention modules: the model's ``capture_outputs``
decorator opens a collector (a context variable) naming what it records, and forward hooks on the upstream
attention classes append their second output to it. A drop-in or an attention function that normally skips the
probabilities (they are never materialised by the kernels) must therefore ask the collector whether ``attentions``
are being recorded, and compute them for that call only.

The collector is transformers' private ``transformers.utils.output_capturing._active_collector``; it is read only
when transformers is already imported (never imported here), and any other layout of that module reads as "not
requested" (tests/test_output_attentions.py fails when a release moves it, before a user notices).
"""
from __future__ import annotations

import sys
from typing import Optional


def _collector() -> Optional[dict]:
    module = sys.modules.get("transformers.utils.output_capturing")
    active = getattr(module, "_active_collector", None)
    if active is None:
        return None
    try:
        collected = active.get()
    except Exception:  # a release that changed the collector's interface: nothing is recorded through it
        return None
    return collected if isinstance(collected, dict) else None


def attentions_requested(explicit: Optional[bool] = None) -> bool:
    """True when this forward pass records attention maps: ``explicit`` (an ``output_attentions`` argument passed
    down by older code paths) when given, else transformers' active output collector lists ``attentions``."""
    if explicit is not None:
        return bool(explicit)
    collected = _collector()
    return collected is not None and "attentions" in collected


__all__ = ["attentions_requested"]
