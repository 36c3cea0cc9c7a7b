"""The protein encoded once per sequence: a model-level hook on transformers' ``EvollaProteinEncoder``.

``EvollaModel.forward`` runs the protein encoder (SaProt, then the sequence compressor) whenever it is handed
``protein_input_ids`` and ``protein_attention_mask``, and ``generate`` hands them to every step: upstream re-encodes
the same protein at every decode step (tests/test_evolla.py counts it). ``fastflamingo.patch`` gives each
``EvollaProteinEncoder`` an instance ``forward`` (:class:`CachedProteinEncoding`) that returns the last output while
it is provably still valid (:class:`~fastflamingo.cache.ProjectionCache`: the same protein ids tensor, unchanged, the
same mask, every weight and buffer of the encoder unchanged; eval mode, no autograd graph;
``FASTFLAMINGO_MEDIA_CACHE=0`` turns it off). The encoder itself stays upstream's module (its compressor is
patched like any other), and the cached output, the same tensor at every step, keys each aligner's K/V cache.
``fastflamingo.unpatch`` removes the hook.

A forward that was already on the instance (accelerate's device hooks) is called by the hook and put back by
``unpatch``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ...cache import ProjectionCache
from .. import _instance_hooks as instance_hooks
from .._patching import class_named

CACHE_ATTR = "media_cache"  # fastflamingo.clear_media_cache empties it


class CachedProteinEncoding:
    """An ``EvollaProteinEncoder``'s instance ``forward``: upstream's forward (or the instance forward that was
    there), through a one-entry cache. Calls with further keyword arguments (``return_dict``) are not cached."""

    def __init__(self, encoder: nn.Module, previous=None):
        self.encoder = encoder
        self.previous = previous

    def run(self, *args, **kwargs):
        if self.previous is not None:
            return self.previous(*args, **kwargs)
        return type(self.encoder).forward(self.encoder, *args, **kwargs)

    def __call__(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs):
        encoder = self.encoder
        cache = encoder.__dict__.get(CACHE_ATTR)
        if kwargs or not isinstance(cache, ProjectionCache) or not isinstance(input_ids, torch.Tensor) or \
                not isinstance(attention_mask, torch.Tensor):
            return self.run(input_ids, attention_mask, **kwargs)
        weights = [attention_mask, *encoder.parameters(), *encoder.buffers()]
        return cache.get(encoder, input_ids, weights,
                         lambda: self.run(input_ids=input_ids, attention_mask=attention_mask))


def _is_protein_encoder(module: nn.Module) -> bool:
    return class_named(module, "EvollaProteinEncoder") and hasattr(module, "sequence_compressor_resampler")


def install(model: nn.Module) -> int:
    """Give every ``EvollaProteinEncoder`` in ``model`` the caching forward (once); returns how many it got."""
    return instance_hooks.install(model, "forward", _is_protein_encoder, CachedProteinEncoding,
                                  **{CACHE_ATTR: ProjectionCache})


def uninstall(model: nn.Module) -> int:
    """Remove what :func:`install` added, putting back a forward that was there before; returns how many."""
    return instance_hooks.uninstall(model, "forward", CachedProteinEncoding, CACHE_ATTR)


__all__ = ["CachedProteinEncoding", "install", "uninstall", "CACHE_ATTR"]
