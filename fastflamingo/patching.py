"""``fastflamingo.patch(model)``: swap fastflamingo's drop-ins into an existing model, in place.

Supported: every family of the registry (``fastflamingo.models.FAMILIES``: OpenFlamingo, flamingo-pytorch,
IDEFICS, mllama / Llama 3.2 Vision), and any module that contains their gated cross-attention layers, masked
cross-attention, perceiver resamplers or perceiver attention layers. Each family brings its rules and model-level
hooks; the swap itself is the shared engine in ``fastflamingo/models/_patching.py``.
"""
from __future__ import annotations

from typing import List

from torch import nn

from .models import FAMILIES
from .models._patching import (PatchReport, Rule, apply_rules, in_place, restore, route_init_weights,
                               unroute_init_weights)

SUPPORTED = tuple(family.supported() for family in FAMILIES)


def _rules(model: nn.Module, empty_rows: str) -> List[Rule]:
    return [rule for family in FAMILIES for rule in family.rules(model, empty_rows)]


def patch(model: nn.Module, *, empty_rows: str = "hf") -> PatchReport:
    """Replace, in place, every supported Flamingo module inside ``model`` with its fastflamingo drop-in.

    The drop-ins keep the very same Parameter objects (optimizer state and wrappers survive) and state_dict keys;
    every alias of a replaced module points to the one new module. Returns a :class:`PatchReport`; undo with
    :func:`unpatch`. Raises TypeError for a model with nothing to patch.

    ``empty_rows`` (mllama only): what a text token that sees no image gets from the cross-attention. ``"hf"``
    (default) is transformers 5 exactly: attention over every vision key, padding included, added through the gate
    (only the MLP is masked). ``"zero"`` is Meta's reference and vLLM: no attention output (transformers #39379).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastflamingo.patch expects an nn.Module, got {type(model).__name__}")
    rules = _rules(model, empty_rows)
    if any(rule.matches(model) for rule in rules):
        raise TypeError(
            f"fastflamingo.patch replaces modules inside a model, and {type(model).__name__} is itself a patchable "
            "layer: build the drop-in directly (e.g. fastflamingo.GatedCrossAttentionBlock(...) and "
            "load_state_dict(layer.state_dict())), or patch the model that holds it"
        )
    report = PatchReport(model=type(model).__name__)
    apply_rules(model, rules, report)
    already = any(in_place(m) for m in model.modules())  # patched, or drop-ins built at load time
    if not report.replaced and not already:
        raise TypeError(
            f"fastflamingo.patch found nothing to patch in {type(model).__name__}. Supported models:\n  - "
            + "\n  - ".join(SUPPORTED)
        )
    if report.replaced:
        route_init_weights(model)  # transformers' init_weights() reaches the drop-ins through their originals
    _install_model_hooks(model)
    return report


def unpatch(model: nn.Module) -> int:
    """Put back the original upstream modules replaced by :func:`patch` and remove the model-level hooks it added;
    returns how many modules were restored."""
    for family in FAMILIES:
        family.remove_hooks(model)
    unroute_init_weights(model)
    return restore(model)


def _install_model_hooks(model: nn.Module) -> None:
    """Model-level hooks beside the module swaps (e.g. an ``IdeficsModel`` hands its gated layers the closed-form
    image mask: ``fastflamingo/models/idefics/model_mask.py``)."""
    for family in FAMILIES:
        family.install_hooks(model)


__all__ = ["patch", "unpatch", "PatchReport", "SUPPORTED"]
