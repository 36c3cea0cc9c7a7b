"""The closed-form image mask of a whole ``IdeficsModel`` forward, handed to its gated layers.

``IdeficsModel.forward`` receives the image mask as (batch, text, num_images) and expands it, before calling the
gated layers, to an additive (batch, 1, text, images * latents) bias. Recovering the closed form from that expanded
bias costs host reads in every step (``mask.idefics_media_mask``). ``fastflamingo.patch`` therefore
installs a forward pre-hook on every ``IdeficsModel``: it derives the :class:`~fastflamingo.masks.MediaMask` from the
(batch, text, num_images) argument itself (:func:`mask.from_image_attention_mask`: the mode is decided
once per prompt mask, and a decode step, whose mask is a view of the prompt's, computes ``text_time`` on the device
only) and publishes it for the duration of the forward; the gated layers read it from there
(:func:`model_mask`) and never read the expanded bias. A forward hook (``always_call``: also when the forward
raises) withdraws it. ``fastflamingo.unpatch`` removes both hooks.

Outside such a forward (a layer called on its own, the recomputation of a checkpointed layer during backward, a
model traced by torch.compile) nothing is published and the layers recover the mask from the bias as before.
"""
from __future__ import annotations

import contextvars
import inspect
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from ... import masks
from . import mask as idefics_mask

# (mask, num_images) per active IdeficsModel forward, innermost last
_ACTIVE: contextvars.ContextVar[Tuple[tuple, ...]] = contextvars.ContextVar("fastflamingo_idefics_mask", default=())
_MASK_ARG = "image_attention_mask"
HOOKS_ATTR = "_fastflamingo_hooks"


def _mask_argument(module: nn.Module, args: tuple, kwargs: Dict[str, Any]) -> Optional[torch.Tensor]:
    if _MASK_ARG in kwargs:
        return kwargs[_MASK_ARG]
    try:
        names = list(inspect.signature(type(module).forward).parameters)[1:]  # without self
    except (TypeError, ValueError):
        return None
    index = names.index(_MASK_ARG) if _MASK_ARG in names else -1
    return args[index] if 0 <= index < len(args) else None


def _publish(module: nn.Module, args: tuple, kwargs: Dict[str, Any]):
    if torch.compiler.is_compiling():  # traced code finds the closed form on device itself (and Dynamo cannot
        return None                    # trace a ContextVar); _withdraw skips alike, so the stack stays balanced
    entry = None
    image_mask = _mask_argument(module, args, kwargs)
    if isinstance(image_mask, torch.Tensor) and image_mask.dim() == 3:
        entry = (idefics_mask.from_image_attention_mask(image_mask), image_mask.shape[-1])
    _ACTIVE.set(_ACTIVE.get() + (entry,))  # None keeps the stack balanced: the layers then fall back
    return None


def _withdraw(module: nn.Module, args: tuple, kwargs: Dict[str, Any], output: Any):
    if torch.compiler.is_compiling():
        return None
    stack = _ACTIVE.get()
    if stack:
        _ACTIVE.set(stack[:-1])
    return None


def install(model: nn.Module) -> int:
    """Add the publishing hooks to every ``IdeficsModel`` inside ``model`` (once); returns how many got them."""
    count = 0
    for module in model.modules():
        if type(module).__name__ != "IdeficsModel" or getattr(module, HOOKS_ATTR, None):
            continue
        handles = (module.register_forward_pre_hook(_publish, with_kwargs=True),
                   module.register_forward_hook(_withdraw, with_kwargs=True, always_call=True))
        object.__setattr__(module, HOOKS_ATTR, handles)
        count += 1
    return count


def uninstall(model: nn.Module) -> int:
    """Remove what :func:`install` added; returns how many models lost their hooks."""
    count = 0
    for module in model.modules():
        handles = module.__dict__.pop(HOOKS_ATTR, None)
        if handles:
            for handle in handles:
                handle.remove()
            count += 1
    return count


def model_mask(batch: int, num_text: int, num_keys: int):
    """The mask published by the enclosing ``IdeficsModel`` forward when it fits a layer call with this many
    samples, text tokens and image keys (a :class:`~fastflamingo.masks.MediaMask` or a boolean (batch, text,
    images) tensor); None when there is none (the layer then reads the expanded bias)."""
    if torch.compiler.is_compiling():
        return None
    stack = _ACTIVE.get()
    if not stack or stack[-1] is None:
        return None
    mask, num_images = stack[-1]
    shape = mask.shape if isinstance(mask, masks.MediaMask) else tuple(mask.shape[:2])
    if tuple(shape) != (batch, num_text):
        return None
    if num_images == 0:
        return mask if num_keys == 0 else None
    return mask if num_keys % num_images == 0 else None
