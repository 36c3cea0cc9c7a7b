"""Media projection cache: project each media tensor once per ``generate``, not once per decode step.

During generation the media (Perceiver latents) of a model stay the same while text tokens are produced one at a
time, yet OpenFlamingo and IDEFICS recompute every cross-attention layer's K/V projection of all media at every
step, and IDEFICS on transformers 5 even reruns the whole resampler (SEMANTICS.md section 5). A
:class:`ProjectionCache` on each layer remembers the last result and returns it while it is provably still valid.

The entry is keyed on:

- the source tensor's identity (of the tensor owning its storage, held by a weak reference: the entry never keeps
  the media alive) and its version counter, which every in-place write bumps, plus its data pointer, shape,
  strides, dtype and device;
- the identity and version counter of every weight the projection reads (an optimizer step, ``load_state_dict`` or
  ``.to()`` all change one of them);

and it is only consulted when the module is in eval mode and the projection records no autograd graph (no_grad, or
neither the media nor the weights require grad): a training step, or any call that records a graph, always projects
afresh, so the cache never holds a graph. Each layer keeps one entry, so memory stays bounded by one projection per layer (the size of the K/V
the layer already computes). ``FASTFLAMINGO_MEDIA_CACHE=0`` turns caching off; :func:`clear_media_cache` empties it.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import weakref
from typing import Callable, Iterable, Optional, Tuple

import torch
from torch import nn


_disabled = contextvars.ContextVar("fastflamingo_media_cache_disabled", default=False)


def caching_enabled() -> bool:
    if _disabled.get():
        return False
    return os.environ.get("FASTFLAMINGO_MEDIA_CACHE", "1").strip().lower() not in ("0", "false", "off", "no")


@contextlib.contextmanager
def cache_disabled():
    """Project media afresh on every call inside the block (neither read nor fill the caches)."""
    token = _disabled.set(True)
    try:
        yield
    finally:
        _disabled.reset(token)


def _root(t: torch.Tensor) -> torch.Tensor:
    """The tensor that owns ``t``'s storage: a fresh view of the same data each step (IdeficsModel reshapes the
    resampler output with ``.view`` in every forward) is recognised by its base, with which it shares the version
    counter."""
    return t._base if t._base is not None else t


def _tensor_key(t: torch.Tensor) -> Optional[Tuple]:
    try:
        version = t._version
    except RuntimeError:  # inference tensors have no version counter: an in-place edit would go unseen
        return None
    return (id(_root(t)), version, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device)


class ProjectionCache:
    """One remembered ``compute(source)`` result for one module; see the module docstring for the validity rule."""

    __slots__ = ("_source", "_key", "_value", "hits", "misses")

    def __init__(self):
        self.clear()
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        self._source: Optional[weakref.ref] = None
        self._key = None
        self._value = None

    def __deepcopy__(self, memo):  # a copied module starts with an empty cache
        return ProjectionCache()

    def get(self, module: nn.Module, source: torch.Tensor, weights: Iterable[torch.Tensor], compute: Callable):
        weights = list(weights)
        records_graph = torch.is_grad_enabled() and (source.requires_grad or any(w.requires_grad for w in weights))
        if module.training or records_graph or not caching_enabled() or torch.compiler.is_compiling():
            return compute()
        keys = [_tensor_key(source)] + [_tensor_key(w) for w in weights]
        if any(k is None for k in keys):
            return compute()
        key = tuple(keys)
        root = _root(source)
        if self._key == key and self._source is not None and self._source() is root:
            self.hits += 1
            return self._value
        self.misses += 1
        value = compute()
        self._source, self._key, self._value = weakref.ref(root), key, value
        return value


def clear_media_cache(model: nn.Module) -> int:
    """Drop every cached media projection held by fastflamingo modules inside ``model``; returns how many."""
    count = 0
    for module in model.modules():
        cache = getattr(module, "media_cache", None)
        if isinstance(cache, ProjectionCache):
            cache.clear()
            count += 1
    return count
