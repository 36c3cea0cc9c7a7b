"""Media projection cache: project each media tensor once per ``generate``, not once per decode step.

During generation the media (Perceiver latents) of a model stay the same while text tokens are produced one at a
time, yet OpenFlamingo and IDEFICS recompute every cross-attention layer's K/V projection of all media at every
step, and IDEFICS on transformers 5 even reruns the whole resampler (docs/design.md, "Generation"). A
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

Beam search: OpenFlamingo's ``generate`` repeat_interleaves the images per beam and IDEFICS expands its inputs the
same way, so the media of a batch of B samples with r beams holds r identical consecutive rows per sample.
:meth:`ProjectionCache.get_grouped` finds that repeat factor once per media tensor (an exact comparison, shared by
every layer: :func:`shared_repeat_factor`, so it runs in the first forward of a ``generate`` and never in a decode
step) and projects only the unique rows, so the cached K/V holds one row per sample instead of r copies; attention then reads
K/V row ``b // r`` for query row ``b`` (``kv_group`` of :func:`fastflamingo.functional.media_xattn`).

Under ``torch.compile`` the lookup cannot be traced (it keys on object identities and version counters), so a
cache that has a *projector* (a pure function ``projector(source, weights, options) -> list of tensors``) is read
through the ``fastflamingo::cached_projection`` custom op instead (:meth:`ProjectionCache.traced`): the compiled
graph calls the op, and the op runs the same lookup eagerly when the graph runs, so decode steps of a compiled model
reuse the K/V projected at the first step (docs/compile.md). The same validity rule decides, at trace time, whether the op is used (eval mode,
no autograd graph, caching on: all guarded by the compiled code, so changing one recompiles). The op holds one
entry per layer without beam grouping (its output shape must be known when tracing). ``torch.export`` never uses
it: an exported program projects the media itself.
"""
from __future__ import annotations

import contextlib
import itertools
import threading
import weakref
from typing import Callable, Hashable, Iterable, List, Optional, Tuple

import torch
from torch import nn

from ._backend import environ

# A projector: ``projector(source, weights, options) -> list of tensors``, pure: it reads nothing but its arguments
# (``options``: the projection's float settings that may change after construction, e.g. a norm's epsilon).
Projector = Callable[[torch.Tensor, List[torch.Tensor], List[float]], List[torch.Tensor]]


# ``active`` is set inside a cache_disabled() block of the thread: per thread, read like the backend override in
# _backend.py (a form Dynamo traces and guards on)
_disabled = threading.local()


def caching_enabled() -> bool:
    if getattr(_disabled, "active", False):
        return False
    return (environ("FASTFLAMINGO_MEDIA_CACHE") or "1").strip().lower() not in ("0", "false", "off", "no")


@contextlib.contextmanager
def cache_disabled():
    """Project media afresh on every call inside the block (neither read nor fill the caches)."""
    previous, _disabled.active = getattr(_disabled, "active", False), True
    try:
        yield
    finally:
        if previous:
            _disabled.active = previous
        else:  # back to "no block" exactly (see fastflamingo.backend)
            del _disabled.active


def _root(t: torch.Tensor) -> torch.Tensor:
    """The tensor that owns ``t``'s storage: a fresh view of the same data each step (IdeficsModel reshapes the
    resampler output with ``.view`` in every forward) is recognised by its base, with which it shares the version
    counter."""
    return t._base if t._base is not None else t


def tensor_version(t: torch.Tensor) -> Optional[int]:
    """``t``'s version counter (every in-place write bumps it), or None for a tensor that has none: tensors made
    under ``torch.inference_mode()`` can be written in place unseen, so nothing derived from them may be reused."""
    try:
        return t._version
    except RuntimeError:  # "Inference tensors do not track version counter"
        return None


def _tensor_key(t: torch.Tensor) -> Optional[Tuple]:
    version = tensor_version(t)
    if version is None:
        return None
    return (id(_root(t)), version, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device)


def repeat_factor(t: torch.Tensor) -> int:
    """The largest r dividing ``t.shape[0]`` such that every group of r consecutive rows of ``t`` equals the
    group's first row exactly (beam search's ``repeat_interleave``); 1 when there is none. A factor r is valid only
    if each of its divisors is, so the divisors are tried from the largest down and the first match is the answer.
    Compares the whole tensor at most once per candidate (one host sync each on GPU): done once per cached media."""
    batch = t.shape[0] if t.dim() else 0
    if batch < 2 or t.numel() == 0:
        return 1
    probe = t.reshape(batch, -1)[:, :1]  # one element per row: rejects distinct samples without a full read
    for r in sorted((d for d in range(2, batch + 1) if batch % d == 0), reverse=True):
        heads = probe.unflatten(0, (batch // r, r))
        if not torch.equal(heads, heads[:, :1].expand_as(heads)):
            continue
        groups = t.unflatten(0, (batch // r, r))
        if torch.equal(groups, groups[:, :1].expand_as(groups)):
            return r
    return 1


# Every cache gets a slot number, by which the cached_projection op (whose arguments are tensors and numbers) finds
# it; the registry holds the caches weakly.
_SLOTS = itertools.count()
_BY_SLOT: "weakref.WeakValueDictionary[int, ProjectionCache]" = weakref.WeakValueDictionary()


_LAST_REPEAT: list = [None, None, 1]  # [weak reference to the source's root, key of the source, its factor]


def shared_repeat_factor(t: torch.Tensor) -> int:
    """:func:`repeat_factor` of ``t``, computed once per media tensor and shared by every layer: the layers of a
    model all cache projections of the same media, so ``generate`` compares the media once (in its first forward),
    not once per layer, and no decode step compares anything. Keyed like the cache itself (identity of the tensor
    owning the storage, version, data pointer, shape, strides)."""
    key = _tensor_key(t)
    ref, last_key, factor = _LAST_REPEAT
    if key is not None and last_key == key and ref is not None and ref() is _root(t):
        return factor
    factor = repeat_factor(t)
    if key is not None:
        _LAST_REPEAT[:] = [weakref.ref(_root(t)), key, factor]
    return factor


class ProjectionCache:
    """One remembered ``compute(source)`` result for one module; see the module docstring for the validity rule.

    ``projector``: the module's projection as a pure function of the source and the weights, which enables the
    cache under ``torch.compile`` (:meth:`traced`); None: compiled code projects afresh.
    """

    __slots__ = ("_source", "_key", "_value", "hits", "misses", "projector", "slot", "__weakref__")

    def __init__(self, projector: Optional[Projector] = None):
        self.clear()
        self.hits = 0
        self.misses = 0
        self.projector = projector
        self.slot = next(_SLOTS)
        _BY_SLOT[self.slot] = self

    def clear(self) -> None:
        self._source: Optional[weakref.ref] = None
        self._key = None
        self._value = None

    def __reduce__(self):
        # A cache is not state: a copied, deep-copied or unpickled module (torch.save of a whole model, DDP/FSDP
        # spawning, multiprocessing) starts with an empty cache (and a slot of its own) but keeps its projector.
        # The weak reference it holds could not be pickled anyway.
        return (ProjectionCache, (self.projector,))

    @property
    def value(self):
        """The remembered result (``(value, r)`` when filled by :meth:`get_grouped`), or None."""
        return self._value

    def _bypassed(self, module: nn.Module, source: torch.Tensor, weights: List[torch.Tensor]) -> bool:
        """True when the validity rule forbids caching this call (training, a recorded graph, caching off)."""
        records_graph = torch.is_grad_enabled() and (source.requires_grad or any(w.requires_grad for w in weights))
        return module.training or records_graph or not caching_enabled()

    def _lookup(self, tag: Hashable, source: torch.Tensor, weights: List[torch.Tensor], compute: Callable):
        """``compute()``, or the remembered value while ``source`` and ``weights`` are unchanged (eager code only:
        it reads identities and version counters). ``tag`` keeps differently shaped values apart."""
        keys = [_tensor_key(source)] + [_tensor_key(w) for w in weights]
        if any(k is None for k in keys):
            return compute()
        key = (tag, *keys)
        root = _root(source)
        if self._key == key and self._source is not None and self._source() is root:
            self.hits += 1
            return self._value
        self.misses += 1
        value = compute()
        self._source, self._key, self._value = weakref.ref(root), key, value
        return value

    def _cached(self, module: nn.Module, source: torch.Tensor, weights: Iterable[torch.Tensor], compute: Callable,
                uncached: Callable):
        """``compute()`` through the cache where the validity rule allows it, else ``uncached()``."""
        weights = list(weights)
        if torch.compiler.is_compiling() or self._bypassed(module, source, weights):
            return uncached()
        return self._lookup("eager", source, weights, compute)

    def traced(self, module: nn.Module, source: torch.Tensor, weights: Iterable[torch.Tensor],
               options: Iterable[float] = ()) -> List[torch.Tensor]:
        """``self.projector(source, weights, options)`` for code being compiled: through the ``cached_projection``
        op (the lookup runs when the compiled graph runs) where the validity rule allows caching, inline otherwise
        (and always under ``torch.export``). Also correct in eager mode (then the op runs the lookup directly)."""
        weights, options = list(weights), [float(o) for o in options]
        if self._bypassed(module, source, weights) or torch.compiler.is_exporting():
            return list(self.projector(source, weights, options))
        return torch.ops.fastflamingo.cached_projection(source, weights, options, self.slot)

    def get(self, module: nn.Module, source: torch.Tensor, weights: Iterable[torch.Tensor], compute: Callable):
        """``compute()`` (a projection of ``source``), reused while valid."""
        return self._cached(module, source, weights, compute, compute)

    def get_grouped(self, module: nn.Module, source: torch.Tensor, weights: Iterable[torch.Tensor],
                    compute: Callable[[torch.Tensor], object]) -> Tuple[object, int]:
        """``(compute(unique rows of source), r)``, reused while valid: ``source``'s batch is r groups of identical
        consecutive rows (:func:`repeat_factor`, checked only when the result is cached) and ``compute`` projects
        only the first row of each group. Uncached calls (training, a recorded graph, caching off) return
        ``(compute(source), 1)``: the gradient of a shared row is never needed there."""

        def grouped():
            r = shared_repeat_factor(source)
            return compute(source[::r] if r > 1 else source), r

        return self._cached(module, source, weights, grouped, lambda: (compute(source), 1))


def _registered(slot: int) -> ProjectionCache:
    cache = _BY_SLOT.get(slot)
    if cache is None or cache.projector is None:
        raise RuntimeError(f"fastflamingo::cached_projection: media cache {slot} no longer exists (its module was "
                           "deleted while compiled code that reads it is still in use)")
    return cache


# Returns tensors the cache keeps (nothing mutates them: the callers only take views), so a CUDA-graph replay, which
# would skip the lookup and keep reading the first entry, must not capture it (cudagraph_unsafe).
@torch.library.custom_op("fastflamingo::cached_projection", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def cached_projection(source: torch.Tensor, weights: List[torch.Tensor], options: List[float],
                      slot: int) -> List[torch.Tensor]:
    """``projector(source, weights, options)`` of the cache ``slot``, reused while the source, the weights and the
    options are unchanged (inference only: no autograd formula)."""
    cache = _registered(slot)
    return cache._lookup(("op", *options), source, weights, lambda: list(cache.projector(source, weights, options)))


@cached_projection.register_fake
def _(source, weights, options, slot):
    return list(_registered(slot).projector(source, weights, options))


def clear_media_cache(model: nn.Module) -> int:
    """Drop every cached media projection held by fastflamingo modules inside ``model``; returns how many."""
    count = 0
    for module in model.modules():
        cache = getattr(module, "media_cache", None)
        if isinstance(cache, ProjectionCache):
            cache.clear()
            count += 1
    return count
