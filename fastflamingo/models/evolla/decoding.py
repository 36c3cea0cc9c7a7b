"""KV-cached decoding by default on a patched Evolla: a model-level hook on ``EvollaForProteinText2Text.generate``.

``EvollaConfig.use_cache`` is False, so transformers' ``generate`` runs the whole prompt and every generated token
through the decoder again at each step. Turning the KV cache on upstream fails whenever an aligner is not the last
decoder layer (every released Evolla): upstream's aligner multiplies the (batch, past + new) text mask into the
scores of the new tokens, and the next layer raises on the shape. The drop-in aligner reads the mask's last columns,
so the cache works on a patched model and gives upstream's tokens (tests/test_evolla.py compares them step by step).

``fastflamingo.patch`` gives the model an instance ``generate`` (:class:`KvCachedGenerate`) that passes
``use_cache=True`` unless the caller decides: an explicit ``use_cache=...`` or a ``generation_config`` is left as it
is. The model's configs are not touched, so ``save_pretrained`` writes what upstream wrote (a saved
``use_cache=True`` would make the checkpoint fail in upstream's ``generate``). ``fastflamingo.unpatch`` removes the
hook and puts back an instance ``generate`` that was there before.
"""
from __future__ import annotations

from torch import nn

from .. import _instance_hooks as instance_hooks
from .._patching import class_named


class KvCachedGenerate:
    """An ``EvollaForProteinText2Text``'s instance ``generate``: the one that was there (upstream's otherwise), with
    ``use_cache=True`` unless the call says otherwise."""

    def __init__(self, model: nn.Module, previous=None):
        self.model = model
        self.previous = previous

    def __call__(self, *args, **kwargs):
        if "use_cache" not in kwargs and kwargs.get("generation_config") is None:
            kwargs["use_cache"] = True
        if self.previous is not None:
            return self.previous(*args, **kwargs)
        return type(self.model).generate(self.model, *args, **kwargs)


def _generates(module: nn.Module) -> bool:
    return class_named(module, "EvollaForProteinText2Text") and callable(getattr(module, "generate", None))


def install(model: nn.Module) -> int:
    """Give every ``EvollaForProteinText2Text`` in ``model`` the KV-cached ``generate`` (once); returns how many."""
    return instance_hooks.install(model, "generate", _generates, KvCachedGenerate)


def uninstall(model: nn.Module) -> int:
    """Remove what :func:`install` added; returns how many."""
    return instance_hooks.uninstall(model, "generate", KvCachedGenerate)


__all__ = ["KvCachedGenerate", "install", "uninstall"]
