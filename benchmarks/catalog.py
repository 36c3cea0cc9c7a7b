"""Every benchmark op: the op modules (``ops_*.py``), imported on first use, in the order runs and ``--list`` show.

An op module registers its ops and providers with :mod:`benchmarks.registry` when imported. The listing lives here,
apart from the registry the op modules import, so that no op module imports back into what imports it
(tests/test_benchmark_layout.py keeps the benchmarks free of import circles and checks this list against the files).
"""
from __future__ import annotations

import importlib
from typing import Dict

from .registry import OPS, Op

# the order of the default runs and of --list; tests/test_benchmark_layout.py checks it names every ops_*.py
OP_MODULES = ("ops_media_xattn", "ops_media_decode", "ops_perceiver_attn", "ops_gated_linear", "ops_modules",
              "ops_resampler", "ops_e2e", "ops_mllama_xattn", "ops_mllama_decode", "ops_train")

# op module -> why it failed to import (its ops are then missing; the others stay usable)
LOAD_ERRORS: Dict[str, str] = {}
_loaded = False


def load_all() -> Dict[str, Op]:
    """Import every op module once and return the registered ops by name."""
    global _loaded
    if not _loaded:
        _loaded = True
        for name in OP_MODULES:
            try:
                importlib.import_module(f"{__package__}.{name}")
            except Exception as exc:  # an optional dependency missing in one op module must not hide the others
                LOAD_ERRORS[name] = f"{type(exc).__name__}: {exc}"
    return OPS
