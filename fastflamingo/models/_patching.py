"""Shared machinery of ``fastflamingo.patch``: swap modules in place, keeping the very same Parameter objects.

A *rule* recognises an upstream module (by class name and structure, not by importing the upstream package, which
may be loaded under another name or not importable at all) and builds the fastflamingo drop-in for it. The drop-in
is built on the meta device and then adopts the upstream module's Parameter objects and buffers, so optimizer
state, ``requires_grad`` flags, parametrizations and wrappers that hold those parameters keep working, and no
weight is copied. Every alias of a replaced module (OpenFlamingo holds each gated cross-attention block under three
names) is redirected to the one new module.

The rules are each family's (``models/<family>/rules.py``); ``fastflamingo/patching.py`` (``patch``, ``unpatch``)
applies every registered family's. This engine sits below the families, which import :class:`Rule` from it, so the
import graph runs one way: patching -> the registry -> a family's rules -> this module.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

ORIGINAL_ATTR = "_fastflamingo_original"
# A drop-in transformers built itself at load time (fastflamingo.hf.register_dropins) replaced no module: it holds
# instead a recipe that builds the upstream module it stands for, adopting its tensors (fastflamingo/hf/load.py).
RECIPE_ATTR = "_fastflamingo_upstream_recipe"


@dataclass(frozen=True)
class Rule:
    """``matches(module)`` recognises an upstream module; ``convert(module)`` returns its drop-in skeleton (on the
    meta device is fine: parameters and buffers are adopted afterwards)."""

    name: str
    matches: Callable[[nn.Module], bool]
    convert: Callable[[nn.Module], nn.Module]


def forward_takes(module: nn.Module, argument: str) -> bool:
    try:
        return argument in inspect.signature(type(module).forward).parameters
    except (TypeError, ValueError):
        return False


def class_named(module: nn.Module, *names: str) -> bool:
    return type(module).__name__ in names and not getattr(type(module), "_fastflamingo_dropin", False)


def _set_path(root: nn.Module, path: str, value, kind: str) -> None:
    *parents, leaf = path.split(".")
    owner = root
    for part in parents:
        owner = owner._modules[part]
    store = owner._parameters if kind == "param" else owner._buffers
    if leaf not in store and not hasattr(owner, leaf):
        raise KeyError(f"the drop-in has no {kind} {path!r}")
    if kind == "param":
        owner._parameters[leaf] = value
    else:
        persistent = leaf not in owner._non_persistent_buffers_set
        owner.register_buffer(leaf, value, persistent=persistent)


def adopt(new: nn.Module, old: nn.Module) -> nn.Module:
    """Give ``new`` the Parameter objects and buffers of ``old`` (same names) and what the surrounding code attached
    to ``old`` (:func:`carry_attachments`). Tensors may be on any device, the meta device included: a model built
    with ``init_empty_weights`` / ``torch.device("meta")`` gets drop-ins on meta that materialise with it
    (``to_empty``, ``load_state_dict(assign=True)``, FSDP's deferred init)."""
    adopted = set()
    for path, param in old.named_parameters(remove_duplicate=False):
        _set_path(new, path, param, "param")
        adopted.add(path)
    for path, buf in old.named_buffers(remove_duplicate=False):
        _set_path(new, path, buf, "buffer")
        adopted.add(path)
    # the skeleton was built on meta: a tensor nothing was adopted into would stay a meta placeholder
    missing = [n for n, _ in list(new.named_parameters(remove_duplicate=False)) + list(
        new.named_buffers(remove_duplicate=False)) if n not in adopted]
    if missing:
        raise RuntimeError(f"drop-in for {type(old).__name__} has tensors the upstream module lacks: {missing}")
    new.train(old.training)
    carry_attachments(new, old)
    object.__setattr__(new, ORIGINAL_ATTR, old)
    return new


# Per-module state that is not a parameter, buffer or child: markers other code set on the upstream module after
# building it (OpenFlamingo's ``_use_gradient_checkpointing``, which its training script selects modules by;
# transformers' ``gradient_checkpointing`` / ``_gradient_checkpointing_func`` and ``_is_hf_initialized``), forward and
# backward hooks, and accelerate's ``_hf_hook`` (device placement and CPU/disk offload of ``device_map`` loading).
# Entries that bind the old module's own code are not copied: accelerate's ``forward`` override (re-attached to the
# drop-in below) and ``nn.Module.compile()``'s compiled call.
_NOT_CARRIED = {"forward", "_old_forward", "_hf_hook", "_compiled_call_impl", ORIGINAL_ATTR}
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def carry_attachments(new: nn.Module, old: nn.Module) -> None:
    """Copy to each submodule of ``new`` what was attached to the submodule of ``old`` at the same path (the
    drop-ins keep upstream's module paths): plain attributes ``new`` does not define itself, hooks (the same hook
    dictionaries, so handles returned before patching still remove them) and accelerate's hook."""
    for path, old_sub in old.named_modules(remove_duplicate=False):
        try:
            new_sub = new.get_submodule(path)
        except AttributeError:
            continue  # a submodule the drop-in does not have (it runs that computation itself)
        state = new_sub.__dict__
        for name, value in old_sub.__dict__.items():
            if name in state or name in _NOT_CARRIED or isinstance(value, (nn.Module, torch.Tensor)):
                continue
            state[name] = value
        for name in _HOOK_DICTS:
            hooks = old_sub.__dict__.get(name)
            if hooks:
                if state.get(name):
                    state[name].update(hooks)
                else:
                    state[name] = hooks
        if old_sub.__dict__.get("_is_full_backward_hook") is not None:
            state["_is_full_backward_hook"] = old_sub._is_full_backward_hook
        hook = old_sub.__dict__.get("_hf_hook")
        if hook is not None:
            from accelerate.hooks import add_hook_to_module  # only reached for a model accelerate dispatched

            add_hook_to_module(new_sub, hook)


def build(convert: Callable[[nn.Module], nn.Module], old: nn.Module) -> nn.Module:
    with torch.device("meta"):
        new = convert(old)
    return adopt(new, old)


def redirect(root: nn.Module, replacements: Dict[int, nn.Module]) -> int:
    """Point every child slot that holds a replaced module (by identity) to its replacement. Returns the count."""
    count = 0
    parents = list(root.modules()) + [m for m in replacements.values()]
    seen = set()
    for parent in parents:
        if id(parent) in seen:
            continue
        seen.add(id(parent))
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements and replacements[id(child)] is not parent:
                parent._modules[name] = replacements[id(child)]
                count += 1
    return count


@dataclass
class PatchReport:
    """What ``fastflamingo.patch`` did: ``replaced`` maps a module path to the rule that replaced it."""

    model: str
    replaced: Dict[str, str] = field(default_factory=dict)
    aliases_redirected: int = 0

    def __str__(self) -> str:
        lines = [f"fastflamingo patched {self.model}: {len(self.replaced)} modules "
                 f"({self.aliases_redirected} references redirected)"]
        lines += [f"  {path}: {rule}" for path, rule in self.replaced.items()]
        return "\n".join(lines)

    def counts(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for rule in self.replaced.values():
            out[rule] = out.get(rule, 0) + 1
        return out


def apply_rules(root: nn.Module, rules: List[Rule], report: PatchReport) -> Dict[int, nn.Module]:
    """Replace the outermost modules matched by a rule (their children are handled by the drop-in)."""
    replacements: Dict[int, nn.Module] = {}

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module._modules.items():
            if child is None:
                continue
            path = f"{prefix}{name}"
            if id(child) in replacements:
                continue  # an alias of a module already replaced
            rule: Optional[Rule] = next((r for r in rules if r.matches(child)), None)
            if rule is not None:
                replacements[id(child)] = build(rule.convert, child)
                report.replaced[path] = rule.name
            else:
                visit(child, path + ".")

    visit(root, "")
    report.aliases_redirected = redirect(root, replacements)
    return replacements


def sync_original(dropin: nn.Module) -> nn.Module:
    """The upstream module behind ``dropin``, holding the drop-in's current tensors: ``to_empty`` (meta
    materialisation), ``.to()``/``.half()`` of buffers, or wrappers may have replaced tensor objects since patching."""
    original = getattr(dropin, ORIGINAL_ATTR)
    for path, param in dropin.named_parameters(remove_duplicate=False):
        if _has_path(original, path, "param"):
            _set_path(original, path, param, "param")
    for path, buf in dropin.named_buffers(remove_duplicate=False):
        if _has_path(original, path, "buffer"):
            _set_path(original, path, buf, "buffer")
    return original


def _has_path(root: nn.Module, path: str, kind: str) -> bool:
    *parents, leaf = path.split(".")
    try:
        owner = root.get_submodule(".".join(parents))
    except AttributeError:
        return False
    return leaf in (owner._parameters if kind == "param" else owner._buffers)


def _carry_accelerate_hooks_back(original: nn.Module, dropin: nn.Module) -> None:
    """A model dispatched by accelerate after ``patch`` has its hooks on the drop-ins (and their parameters on the
    meta device when offloaded): give each submodule of ``original`` that has none the hook of the drop-in's
    submodule at the same path, so that the restored module loads its weights before it runs, as the drop-in did.
    A module dispatched before ``patch`` kept its own hook and is left alone."""
    for path, sub in dropin.named_modules(remove_duplicate=False):
        hook = sub.__dict__.get("_hf_hook")
        if hook is None:
            continue
        try:
            target = original.get_submodule(path)
        except AttributeError:
            continue  # a submodule of the drop-in's own
        if "_hf_hook" not in target.__dict__:
            from accelerate.hooks import add_hook_to_module  # only reached for a model accelerate dispatched

            add_hook_to_module(target, hook)


def in_place(module: nn.Module) -> bool:
    """Whether ``module`` is a drop-in that :func:`restore` turns back into an upstream module."""
    return getattr(module, ORIGINAL_ATTR, None) is not None or RECIPE_ATTR in module.__dict__


def restore(root: nn.Module) -> int:
    """Undo ``apply_rules``: put each original module back, with the drop-in's current tensors and train mode (a
    load-time drop-in's is built first, from its recipe)."""
    replacements: Dict[int, nn.Module] = {}
    for module in root.modules():
        if id(module) in replacements:
            continue
        if getattr(module, ORIGINAL_ATTR, None) is None:
            if RECIPE_ATTR not in module.__dict__:
                continue
            object.__setattr__(module, ORIGINAL_ATTR, module.__dict__[RECIPE_ATTR](module))
        original = sync_original(module)
        original.train(module.training)
        _carry_accelerate_hooks_back(original, module)
        replacements[id(module)] = original
    redirect(root, replacements)
    return len(replacements)


class InitThroughOriginals:
    """Installed as ``_init_weights`` on every module of a patched model that has one (transformers'
    ``PreTrainedModel``): upstream's ``_init_weights(module)`` dispatches on the upstream classes
    (``isinstance(module, IdeficsGatedCrossAttentionLayer)`` initialises the alphas), which a drop-in is not. A
    drop-in is initialised through its original, which holds the very same tensors; every other module, the
    drop-ins' children included (plain torch layers, norms named as upstream's), goes to upstream's method as is."""

    def __init__(self, owner: nn.Module):
        self.owner = owner

    def __call__(self, module: nn.Module):
        if getattr(module, ORIGINAL_ATTR, None) is not None:
            module = sync_original(module)
        return type(self.owner)._init_weights(self.owner, module)


def route_init_weights(root: nn.Module) -> None:
    for module in root.modules():
        if callable(getattr(type(module), "_init_weights", None)) and "_init_weights" not in module.__dict__:
            module.__dict__["_init_weights"] = InitThroughOriginals(module)


def unroute_init_weights(root: nn.Module) -> None:
    for module in root.modules():
        if isinstance(module.__dict__.get("_init_weights"), InitThroughOriginals):
            del module.__dict__["_init_weights"]
