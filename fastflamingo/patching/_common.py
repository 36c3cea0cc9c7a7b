"""Shared machinery of ``fastflamingo.patch``: swap modules in place, keeping the very same Parameter objects.

A *rule* recognises an upstream module (by class name and structure, not by importing the upstream package, which
may be loaded under another name or not importable at all) and builds the fastflamingo drop-in for it. The drop-in
is built on the meta device and then adopts the upstream module's Parameter objects and buffers, so optimizer
state, ``requires_grad`` flags, parametrizations and wrappers that hold those parameters keep working, and no
weight is copied. Every alias of a replaced module (OpenFlamingo holds each gated cross-attention block under three
names) is redirected to the one new module.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

ORIGINAL_ATTR = "_fastflamingo_original"


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
    """Give ``new`` the Parameter objects and buffers of ``old`` (same names); check nothing is left on meta."""
    for path, param in old.named_parameters(remove_duplicate=False):
        _set_path(new, path, param, "param")
    for path, buf in old.named_buffers(remove_duplicate=False):
        _set_path(new, path, buf, "buffer")
    leftover = [n for n, t in list(new.named_parameters()) + list(new.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"drop-in for {type(old).__name__} has tensors the upstream module lacks: {leftover}")
    new.train(old.training)
    object.__setattr__(new, ORIGINAL_ATTR, old)
    return new


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


def restore(root: nn.Module) -> int:
    """Undo ``apply_rules``: put each original module back, with the drop-in's current buffers and train mode."""
    replacements: Dict[int, nn.Module] = {}
    for module in root.modules():
        original = getattr(module, ORIGINAL_ATTR, None)
        if original is None or id(module) in replacements:
            continue
        for path, buf in module.named_buffers(remove_duplicate=False):
            _set_path(original, path, buf, "buffer")  # .to()/.half() after patching replaced buffer tensors
        original.train(module.training)
        replacements[id(module)] = original
    redirect(root, replacements)
    return len(replacements)
