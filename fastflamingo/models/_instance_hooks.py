"""Model-level hooks that ``patch`` sets as instance attributes (a method such as ``forward`` or ``generate`` on one
module object), each keeping the attribute that was there before (accelerate's device hooks put a ``forward``
there), which ``unpatch`` puts back."""
from __future__ import annotations

from typing import Callable

from torch import nn


def install(model: nn.Module, attr: str, matches: Callable[[nn.Module], bool], hook_type: type, **extra) -> int:
    """Set ``hook_type(module, previous)`` as ``module.<attr>`` on every module of ``model`` that ``matches`` and has
    no such hook yet (plus the ``extra`` attributes, each made by calling its factory); returns how many."""
    count = 0
    for module in model.modules():
        if matches(module) and not isinstance(module.__dict__.get(attr), hook_type):
            module.__dict__[attr] = hook_type(module, module.__dict__.get(attr))
            for name, factory in extra.items():
                module.__dict__[name] = factory()
            count += 1
    return count


def uninstall(model: nn.Module, attr: str, hook_type: type, *extra: str) -> int:
    """Remove what :func:`install` set (the hook, and the ``extra`` attributes), putting back the attribute that was
    there before; returns how many."""
    count = 0
    for module in model.modules():
        hook = module.__dict__.get(attr)
        if isinstance(hook, hook_type):
            if hook.previous is None:
                del module.__dict__[attr]
            else:
                module.__dict__[attr] = hook.previous
            for name in extra:
                module.__dict__.pop(name, None)
            count += 1
    return count
