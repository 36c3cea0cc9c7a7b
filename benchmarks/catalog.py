"""Every benchmark op: the op modules (``ops_*.py``), imported on first use, in the order runs and ``--list`` show.

An op module registers its ops and providers with :mod:`benchmarks.registry` when imported. The listing lives here,
apart from the registry the op modules import, so that no op module imports back into what imports it
(tests/test_benchmark_layout.py keeps the benchmarks free of import circles and checks this list against the files).
"""
from __future__ import annotations

from typing import Dict

from .registry import OPS, Op


def _loaders():
    """One loader per op module, in the order of the default runs and of --list. Plain imports, not importlib, so
    that the import graph (tests/test_benchmark_layout.py) sees every edge."""

    def ops_media_xattn():
        from . import ops_media_xattn  # noqa: F401

    def ops_media_decode():
        from . import ops_media_decode  # noqa: F401

    def ops_perceiver_attn():
        from . import ops_perceiver_attn  # noqa: F401

    def ops_gated_linear():
        from . import ops_gated_linear  # noqa: F401

    def ops_modules():
        from . import ops_modules  # noqa: F401

    def ops_resampler():
        from . import ops_resampler  # noqa: F401

    def ops_idefics2_resampler():
        from . import ops_idefics2_resampler  # noqa: F401

    def ops_e2e():
        from . import ops_e2e  # noqa: F401

    def ops_mllama_xattn():
        from . import ops_mllama_xattn  # noqa: F401

    def ops_mllama_decode():
        from . import ops_mllama_decode  # noqa: F401

    def ops_train():
        from . import ops_train  # noqa: F401

    def ops_evolla():
        from . import ops_evolla  # noqa: F401

    return (ops_media_xattn, ops_media_decode, ops_perceiver_attn, ops_gated_linear, ops_modules, ops_resampler,
            ops_idefics2_resampler, ops_e2e, ops_mllama_xattn, ops_mllama_decode, ops_train, ops_evolla)


# tests/test_benchmark_layout.py checks that this names every ops_*.py
OP_MODULES = tuple(load.__name__ for load in _loaders())
# op module -> why it failed to import (its ops are then missing; the others stay usable)
LOAD_ERRORS: Dict[str, str] = {}
_loaded = False


def load_all() -> Dict[str, Op]:
    """Import every op module once and return the registered ops by name."""
    global _loaded
    if not _loaded:
        _loaded = True
        for load in _loaders():
            try:
                load()
            except Exception as exc:  # an optional dependency missing in one op module must not hide the others
                LOAD_ERRORS[load.__name__] = f"{type(exc).__name__}: {exc}"
    return OPS
