"""The patched ``Idefics2PerceiverResampler`` forward: the padding mask converted once per forward.

Upstream's resampler is a ``PreTrainedModel`` (its own config, ``_from_config``, weight init), built by the
connector and sometimes used on its own, so ``patch`` keeps the module and replaces its layers; :func:`install`
gives each resampler whose layers are drop-ins the forward below as an instance attribute (``unpatch`` removes
it). Upstream appends ones for the latents to the (images, patches) mask and expands it into a 4D mask over
``[context; latents]`` for every layer; here the layers get the (images, patches) boolean key mask itself, or None
when no patch is padded.

The forward is a :class:`ResamplerForward` object, not a bound function: ``torch.save`` of a whole patched model
pickles the instance attribute, and a bound method pickles as ``getattr(module, "resample")``, which fails on load.
A resampler accelerate dispatched (``device_map`` with CPU or disk offload) has accelerate's forward on the
instance, which moves the resampler's own tensors (``latents``) in, then calls ``_old_forward``: the patched forward
goes there, so accelerate's hook keeps running, and ``unpatch`` puts back what was there.
"""
from __future__ import annotations

import types

import torch
from torch import nn

from .mask import padding_mask

MARK = "_fastflamingo_idefics2_forward"


def resample(self: nn.Module, context: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
    """``Idefics2PerceiverResampler.forward`` (same arguments and result): (images, patches, hidden) context and
    (images, patches) patch mask -> (images, n_latents, hidden)."""
    latents = self.latents.unsqueeze(0).expand((context.shape[0], *self.latents.size()))
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(context.shape[:2]):
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must be the (images, patches) mask of "
                         f"context {tuple(context.shape)}")
    key_mask = padding_mask(attention_mask)
    for layer in self.layers:
        latents = layer(latents, context, attention_mask=key_mask, position_ids=None, **kwargs)
    return self.norm(latents)


class ResamplerForward:
    """A resampler's instance forward (or accelerate's ``_old_forward``): :func:`resample` on ``module``. Holds what
    was in that slot before (``previous``), which ``unpatch`` puts back."""

    def __init__(self, module: nn.Module, slot: str, previous=None):
        self.module = module
        self.slot = slot
        self.previous = previous

    def __call__(self, context: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
        return resample(self.module, context, attention_mask, **kwargs)


def _upstream_resampler(module: nn.Module) -> bool:
    layers = getattr(module, "layers", None)
    return (type(module).__name__ == "Idefics2PerceiverResampler" and isinstance(layers, nn.ModuleList)
            and len(layers) > 0 and all(getattr(type(layer), "_fastflamingo_dropin", False) for layer in layers))


def _slot(module: nn.Module) -> str:
    """Where the patched forward goes: accelerate's hooked forward calls ``_old_forward``."""
    state = module.__dict__
    return "_old_forward" if "_hf_hook" in state and "_old_forward" in state else "forward"


def install(model: nn.Module) -> int:
    """Give every upstream resampler in ``model`` (``model`` itself included) whose layers are drop-ins the
    patched forward; returns how many got it."""
    count = 0
    for module in model.modules():
        if _upstream_resampler(module) and MARK not in module.__dict__:
            slot = _slot(module)
            module.__dict__[slot] = ResamplerForward(module, slot, module.__dict__.get(slot))
            module.__dict__[MARK] = True
            count += 1
    return count


def uninstall(model: nn.Module) -> int:
    """Remove what :func:`install` added, putting back what was there; returns how many resamplers lost it."""
    count = 0
    for module in model.modules():
        if module.__dict__.pop(MARK, None):
            for slot in ("forward", "_old_forward"):
                hook = module.__dict__.get(slot)
                if not isinstance(hook, ResamplerForward):
                    continue
                if hook.previous is not None:
                    module.__dict__[slot] = hook.previous
                elif slot == "forward":
                    del module.__dict__[slot]
                else:  # accelerate dispatched after patch and calls _old_forward: upstream's forward again
                    module.__dict__[slot] = types.MethodType(type(module).forward, module)
            count += 1
    return count


__all__ = ["ResamplerForward", "resample", "install", "uninstall"]
