"""The op shapes a family's drop-ins launch, each able to warm its op: what ``Family.warmup_shapes`` returns and
``fastflamingo.warmup`` runs (``fastflamingo/_warmup.py``).

A shape is a frozen record of the sizes that decide which kernels compile and which launch configs are chosen, so
equal shapes found in several layers (or by two families whose drop-ins share a class) are warmed once. ``warm``
calls the op through ``fastflamingo.functional`` on random inputs, once per size class of the op's autotune keys
(``kernels/*.py``, ``*_CLASSES``) up to the limits in :class:`WarmSettings`, plus one decode step where the op has
one. Nothing of the model is read or written: a gate is warmed on a stand-in projection of the same shapes.
mllama's shape lives with its family (``models/mllama/warm.py``).
"""
from __future__ import annotations

import dataclasses
from typing import List, Sequence

import torch
from torch import nn

from .. import functional
from ..masks import ALL_PREVIOUS, IMMEDIATE, MediaMask


@dataclasses.dataclass(frozen=True)
class WarmSettings:
    """The limits and inputs ``fastflamingo.warmup`` was given (see there)."""

    device: torch.device
    dtype: torch.dtype
    batch: int
    max_text: int
    max_media: int
    latents: int
    media_tokens: int
    backward: bool
    decode: bool

    def rand(self, *shape, grad: bool) -> torch.Tensor:
        return torch.randn(*shape, device=self.device, dtype=self.dtype).requires_grad_(grad)


def class_sizes(limit: int, bounds: Sequence[int], per: int = 1) -> List[int]:
    """One size per autotune size class (``kernels._utils.size_class`` with ``bounds``) that sizes up to ``limit``
    reach, where the keyed quantity is ``size * per``: the largest size within each class bound below
    ``limit * per``, then ``limit`` itself (the largest class reached)."""
    limit = max(int(limit), 1)
    sizes = {int(bound) // per for bound in bounds if bound < limit * per}
    return sorted({s for s in sizes if 1 <= s < limit} | {limit})


def backward(out: torch.Tensor, settings: WarmSettings) -> None:
    if settings.backward and out.requires_grad:
        out.backward(torch.randn_like(out))


def evenly_spaced_text_time(batch: int, text: int, media: int, device) -> torch.Tensor:
    """``cumsum`` of ``media`` ``<image>`` flags spread evenly from the first token: every run length a prompt of
    this size can have."""
    flags = torch.zeros(batch, text, dtype=torch.int32, device=device)
    flags[:, torch.linspace(0, text - 1, media + 1)[:-1].long()] = 1
    return flags.cumsum(-1, dtype=torch.int32)


@dataclasses.dataclass(frozen=True)
class Latents:
    """Latents per media of a resampler: the key count per media the cross-attention shapes are warmed with (not
    an op of its own)."""

    count: int
    ops = ()

    def warm(self, settings: WarmSettings) -> int:
        return 0


@dataclasses.dataclass(frozen=True)
class MediaXattn:
    """``functional.media_xattn``: heads, head size and mode of one cross-attention."""

    heads: int
    head_dim: int
    immediate: bool
    ops = ("media_xattn", "media_decode")  # the kernel families warm() reaches (fastflamingo.ops.KERNEL_FAMILIES)

    def warm(self, settings: WarmSettings) -> int:
        from ..kernels import media_xattn as kernels
        from ..kernels._utils import TEXT_CLASSES

        s, calls = settings, 0
        for media in class_sizes(s.max_media, kernels.MEDIA_CLASSES):
            kv = s.rand(s.batch, media * s.latents, 2, self.heads, self.head_dim, grad=s.backward)
            k, v = kv[:, :, 0], kv[:, :, 1]  # views of one fused projection, like the modules' to_kv
            texts = [t for t in class_sizes(s.max_text, TEXT_CLASSES) if t >= min(media, s.max_text)]
            for text in texts + ([1] if s.decode else []):
                q = s.rand(s.batch, text, self.heads, self.head_dim, grad=s.backward and text > 1)
                if text == 1:  # a decode step: the token after the whole prompt
                    text_time = torch.full((s.batch, 1), media, dtype=torch.int32, device=s.device)
                else:
                    text_time = evenly_spaced_text_time(s.batch, text, media, s.device)
                mode = IMMEDIATE if self.immediate else ALL_PREVIOUS
                backward(functional.media_xattn(q, k, v, MediaMask(text_time, media, mode)), s)
                calls += 1
        return calls


@dataclasses.dataclass(frozen=True, eq=False)
class GatedLinear:
    """``functional.gated_linear``: one gated projection (compared by identity: the projection's shapes and
    dtypes are read when warming)."""

    linear: nn.Linear
    alpha: torch.Tensor
    row_gate: bool
    ops = ("gated_linear",)

    def __eq__(self, other) -> bool:
        return isinstance(other, GatedLinear) and (other.linear, other.alpha) == (self.linear, self.alpha)

    def __hash__(self) -> int:
        return hash((id(self.linear), id(self.alpha)))

    def warm(self, settings: WarmSettings) -> int:
        if type(self.linear) is not nn.Linear:  # a wrapped or replaced projection runs as written: no kernel
            return 0
        from ..kernels import gated_linear as kernels

        s, model_linear = settings, self.linear
        # a stand-in projection and gate of the same shapes and dtypes: the model's parameters (and their .grad)
        # are never touched
        linear = nn.Linear(model_linear.in_features, model_linear.out_features, bias=model_linear.bias is not None,
                           device=s.device, dtype=model_linear.weight.dtype).requires_grad_(s.backward)
        alpha = torch.zeros_like(self.alpha, device=s.device).requires_grad_(s.backward)
        calls = 0
        for rows in ([1] if s.decode else []) + class_sizes(s.max_text, kernels.ROW_CLASSES, per=s.batch):
            x = s.rand(s.batch, rows, linear.out_features, grad=s.backward)
            inp = s.rand(s.batch, rows, linear.in_features, grad=s.backward)
            row_gate = torch.ones(s.batch, rows, device=s.device, dtype=s.dtype) if self.row_gate else None
            backward(functional.gated_linear(x, inp, linear, alpha, row_gate), s)
            calls += 1
        return calls


@dataclasses.dataclass(frozen=True)
class PerceiverAttn:
    """``functional.perceiver_attn``: heads and head size of one perceiver attention (warmed only when
    ``warmup`` is given ``media_tokens``)."""

    heads: int
    head_dim: int
    ops = ("perceiver_attn",)

    def warm(self, settings: WarmSettings) -> int:
        s = settings
        if not s.media_tokens:
            return 0
        from ..kernels import perceiver_attn as kernels

        calls = 0
        for media in class_sizes(s.max_media, kernels.ROW_CLASSES, per=s.batch * self.heads):
            num = s.batch * media
            q = s.rand(num, s.latents, self.heads, self.head_dim, grad=s.backward)
            kv_media = s.rand(num, s.media_tokens, 2, self.heads, self.head_dim, grad=s.backward)
            kv_latents = s.rand(num, s.latents, 2, self.heads, self.head_dim, grad=s.backward)
            out = functional.perceiver_attn(q, kv_media[:, :, 0], kv_media[:, :, 1], kv_latents[:, :, 0],
                                            kv_latents[:, :, 1])
            backward(out, s)
            calls += 1
        return calls


__all__ = ["WarmSettings", "class_sizes", "evenly_spaced_text_time", "backward", "Latents", "MediaXattn", "GatedLinear",
           "PerceiverAttn"]
