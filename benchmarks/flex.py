"""FlexAttention as a baseline provider: whether this torch has it, and the callable to time (compiled once per
process on CUDA; on CPU the eager one, unfused and without a backward, so callers time its forward on detached
inputs).
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Tuple

import torch

_COMPILED = None


def unavailable(device, dtype) -> Optional[str]:
    """A provider's ``unavailable`` check: why FlexAttention cannot run here, or None."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError as exc:
        return f"FlexAttention unavailable in torch {torch.__version__}: {exc}"
    return None


def attention(device: str) -> Tuple[Callable, str]:
    """``flex_attention`` for ``device`` and a note for the result row."""
    global _COMPILED
    from torch.nn.attention.flex_attention import flex_attention

    if device == "cuda":
        if _COMPILED is None:
            _COMPILED = torch.compile(flex_attention, dynamic=False)
        return _COMPILED, "compiled"

    def eager(*args, **kwargs):
        with warnings.catch_warnings():  # eager on purpose: the CPU cells show the unfused cost
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            return flex_attention(*args, **kwargs)

    return eager, "eager (unfused; no backward on CPU)"
