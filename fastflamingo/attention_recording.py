"""Attention maps of the cross-attention layers: which media keys each text token attends to, for every family.

fastflamingo's kernels never build the (text x media keys) probability matrix, and upstream OpenFlamingo,
flamingo-pytorch and IDEFICS never return it either. :func:`attention_maps` records it for the forward passes run
inside the ``with`` block, and only there::

    with fastflamingo.attention_maps(model) as maps:
        out = model(**inputs)
    for m in maps:                      # one AttentionMap per cross-attention call, in call order
        print(m.name, m.call, tuple(m.probs.shape), m.key_shape)   # probs: (batch, heads, text, keys)
    per_image = maps[0].grouped()       # (batch, heads, text, *key_shape), e.g. (..., num_media, latents)

Inside the block every recorded layer runs its attention densely, as transformers' eager attention does
(``softmax(q k^T * scale + mask)`` in fp32, cast to the query dtype, dropout, then ``@ v``), so the map is the very
tensor its output was computed from; outside it the kernels run as before and nothing is recorded. A row whose
attention output fastflamingo gives as exactly 0 has an all-zero map row: a token that sees no media (OpenFlamingo,
flamingo-pytorch, IDEFICS) and, with ``empty_rows="zero"``, an mllama token that sees no image. Upstream zeroes
some of those rows too and averages uniformly over every key in others (docs/attention_maps.md).

Memory: a map is batch x heads x queries x keys values in the query dtype, per layer and call (mllama 11B,
2048 tokens, 4 images of 4 tiles: 32 x 2048 x 25616 bf16 values, 3.4 GB per sample and layer). Record fewer
layers (``layers=``), move each map off the device as it is made (``device="cpu"``), or shorten the batch.

The drop-ins find their recorder with :func:`recorder_of` and call :func:`dense_attention`; this module imports
nothing above the functional API, so every family's package can import it.
"""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import functional

# the attribute a recording context sets on each module it records (a plain instance attribute: reading it is one
# attribute lookup, also under torch.compile, where setting it recompiles instead of going stale)
RECORDER_ATTR = "_fastflamingo_attention_maps"
# the class attribute a drop-in that can record its attention declares: its kind of attention
SITE_ATTR = "_fastflamingo_attention_site"
CROSS, PERCEIVER = "cross", "perceiver"


@dataclass(frozen=True)
class AttentionMap:
    """One recorded attention call.

    Attributes:
        name: the module's path in the model given to :func:`attention_maps` (``""`` for the model itself).
        call: how many calls of this module were recorded before this one in the same block (0 for a forward
            pass; 0, 1, 2, ... for the prefill and decode steps of ``generate``).
        kind: ``"cross"`` (text tokens attend to media) or ``"perceiver"`` (a resampler's latents attend to
            ``[media tokens; latents]``).
        probs: (batch, heads, queries, keys) probabilities in the query dtype. Cross: queries are the text tokens
            of that call, keys the media keys in the model's order. Perceiver: batch is samples x media (each media
            is resampled on its own), queries the latents, keys the media's tokens followed by the latents.
        key_shape: how the keys factor, ``probs.shape[-1] == prod(key_shape)``: (num_media, latents) for
            OpenFlamingo / flamingo-pytorch / IDEFICS, (images, tiles, tokens_per_tile) for mllama, (keys,) when
            nothing finer is known (perceivers, a key count the family's sizes do not divide).
    """

    name: str
    call: int
    kind: str
    probs: torch.Tensor
    key_shape: Tuple[int, ...]

    def grouped(self) -> torch.Tensor:
        """``probs`` with the keys unflattened to ``key_shape``: (batch, heads, queries, *key_shape)."""
        return self.probs.unflatten(-1, self.key_shape)


class AttentionMaps(Sequence):
    """The maps recorded by one :func:`attention_maps` block: a sequence of :class:`AttentionMap` in call order."""

    def __init__(self, names: List[str]):
        self._names = list(names)
        self._maps: List[AttentionMap] = []

    def __getitem__(self, index):
        return self._maps[index]

    def __len__(self) -> int:
        return len(self._maps)

    def __repr__(self) -> str:
        return f"AttentionMaps({len(self._maps)} maps of {len(self._names)} layers)"

    def names(self) -> List[str]:
        """The recorded layers' names, in model order (whether or not they ran)."""
        return list(self._names)

    def by_name(self, name: str) -> List[AttentionMap]:
        """The maps of one layer, in call order."""
        if name not in self._names:
            raise KeyError(f"{name!r} is not a recorded layer; recorded: {self._names}")
        return [m for m in self._maps if m.name == name]

    def clear(self) -> None:
        """Forget the maps recorded so far (the block keeps recording)."""
        self._maps.clear()


class _Recorder:
    """What a recording block attaches to each of its modules: where a drop-in hands its probabilities."""

    def __init__(self, maps: AttentionMaps, names: Dict[int, str], detach: bool, device):
        self.maps, self.names, self.detach, self.device = maps, names, detach, device
        self.calls: Dict[int, int] = {}

    def record(self, module: nn.Module, probs: torch.Tensor, key_shape: Tuple[int, ...]) -> None:
        key = id(module)
        call = self.calls.get(key, 0)
        self.calls[key] = call + 1
        if self.detach:
            probs = probs.detach()
        if self.device is not None:
            probs = probs.to(self.device)
        kind = getattr(type(module), SITE_ATTR)
        self.maps._maps.append(AttentionMap(self.names[key], call, kind, probs, tuple(int(s) for s in key_shape)))


def recorder_of(module: nn.Module) -> Optional[_Recorder]:
    """The recorder of an :func:`attention_maps` block that records ``module`` now, else None (the fast path)."""
    return getattr(module, RECORDER_ATTR, None)


def key_shape(num_keys: int, *factors: int) -> Tuple[int, ...]:
    """``(num_keys // prod(factors), *factors)`` when the factors divide ``num_keys``, else ``(num_keys,)``."""
    inner = 1
    for f in factors:
        inner *= int(f)
    if inner > 0 and factors and num_keys % inner == 0:
        return (num_keys // inner, *(int(f) for f in factors))
    return (num_keys,)


def _either(a: Optional[torch.Tensor], b: torch.Tensor) -> torch.Tensor:
    return b if a is None else a | b


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *,
                    mask: Optional[torch.Tensor] = None, visible: Optional[torch.Tensor] = None,
                    zero_rows: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                    kv_group: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention, returning its probabilities: the path a call takes when its map is wanted.

    Args:
        q: (batch, heads, queries, head_dim).
        k, v: (batch // kv_group, kv_heads, keys, head_dim); query head h reads K/V head ``h // (heads / kv_heads)``
            (GQA without repeating K/V), query row b reads K/V row ``b // kv_group`` (beam search).
        scale: the softmax scale.
        mask: an additive float mask added to the scaled scores, or a boolean one (True = attend; a query with no
            True gets an all-zero row), broadcastable to (batch, heads, queries, keys), as upstream's attention
            receives it.
        visible: (batch, queries, keys) boolean: the keys each query may see (the closed-form masks, densified).
            A query that sees none gets an all-zero row.
        zero_rows: (batch, queries) boolean: queries whose probabilities and output are exactly 0.
        dropout_p: attention dropout on the probabilities (pass 0 in eval mode), as upstream's eager path.

    Returns:
        ``(out, probs)``: out (batch, queries, heads, head_dim) = ``probs @ v`` and probs (batch, heads, queries,
        keys), both in q's dtype; ``probs`` is what multiplied v (after dropout).
    """
    batch, heads, queries, _ = q.shape
    kv_heads, num_keys = k.shape[1], k.shape[2]
    group = heads // kv_heads
    if kv_group > 1:  # the maps' own call only: K/V rows expanded back to one per query row
        k, v = k.repeat_interleave(kv_group, 0), v.repeat_interleave(kv_group, 0)
    # (batch, kv_heads, group * queries, head_dim): the query heads of one K/V head stacked, K/V read once
    stacked = q.reshape(batch, kv_heads, group * queries, q.shape[-1])
    scores = torch.matmul(stacked, k.transpose(-1, -2)).view(batch, heads, queries, num_keys) * scale
    # rows that see no key, broadcastable to (batch, heads, queries, 1): probability and output exactly 0
    empty = None if zero_rows is None else zero_rows[:, None, :, None]
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
            empty = _either(empty, ~mask.any(-1, keepdim=True))
        else:
            scores = scores + mask
    if visible is not None:
        scores = scores.masked_fill(~visible[:, None], float("-inf"))
        empty = _either(empty, ~visible.any(-1)[:, None, :, None])
    if empty is not None:  # finite scores first, so no NaN forward or backward; the rows are zeroed after
        scores = scores.masked_fill(empty, 0.0)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if empty is not None:
        probs = probs.masked_fill(empty, 0.0)
    if dropout_p:
        probs = F.dropout(probs, p=dropout_p)
    out = torch.matmul(probs.view(batch, kv_heads, group * queries, num_keys), v)
    return out.view(batch, heads, queries, -1).transpose(1, 2), probs


def perceiver_attention(module: nn.Module, q, k_media, v_media, k_latents, v_latents, scale: float) -> torch.Tensor:
    """A perceiver drop-in's attention of latents q over ``[media; latents]`` (every tensor (rows, tokens, heads,
    head_dim)): ``functional.perceiver_attn`` (no concatenation), or, while a block records ``module``, the dense
    attention over the concatenated keys, whose probabilities it records."""
    recorder = recorder_of(module)
    if recorder is None:
        return functional.perceiver_attn(q, k_media, v_media, k_latents, v_latents, scale=scale)
    k, v = torch.cat((k_media, k_latents), 1), torch.cat((v_media, v_latents), 1)
    out, probs = dense_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale)
    recorder.record(module, probs, (k.shape[1],))
    return out


def _sites(model: nn.Module, perceiver: bool) -> List[Tuple[str, nn.Module]]:
    kinds = (CROSS, PERCEIVER) if perceiver else (CROSS,)
    return [(name, m) for name, m in model.named_modules() if getattr(type(m), SITE_ATTR, None) in kinds]


def _select(sites: List[Tuple[str, nn.Module]], layers) -> List[Tuple[str, nn.Module]]:
    if layers is None:
        return sites
    if isinstance(layers, (str, int)):
        layers = [layers]
    names = [name for name, _ in sites]
    chosen = []
    for entry in layers:
        if isinstance(entry, bool) or not isinstance(entry, (str, int)):
            raise TypeError(f"layers must hold module names (str) or indices (int), got {type(entry).__name__}")
        if isinstance(entry, int):
            if not -len(sites) <= entry < len(sites):
                raise ValueError(f"layers index {entry} is out of range for the {len(sites)} layers {names}")
            chosen.append(sites[entry])
        elif entry in names:
            chosen.append(sites[names.index(entry)])
        else:
            raise ValueError(f"layers names {entry!r}, which is not a recordable layer; recordable: {names}")
    return [site for site in sites if any(site[1] is c[1] for c in chosen)]  # model order, no repeats


@contextmanager
def attention_maps(model: nn.Module, *, layers: Union[None, str, int, Iterable[Union[str, int]]] = None,
                   perceiver: bool = False, detach: bool = True,
                   device: Union[None, str, torch.device] = None) -> Iterator[AttentionMaps]:
    """Record the attention probabilities of ``model``'s cross-attention layers for the calls made in the block.

    Args:
        model: a model patched by ``fastflamingo.patch``, or fastflamingo drop-in modules used directly (a
            ``GatedCrossAttentionBlock``, an ``IdeficsGatedCrossAttentionLayer``, an mllama decoder layer, ...).
        layers: which layers to record, by name (``AttentionMaps.names()`` lists them) or index among the
            recordable layers in model order; default every one.
        perceiver: also record the Perceiver resamplers' latent attention (OpenFlamingo, flamingo-pytorch,
            IDEFICS; the IDEFICS resampler then runs instead of reusing its cached result).
        detach: store detached maps (default). ``detach=False`` keeps them in the autograd graph: the output was
            computed from them, so gradients of the maps (attention x gradient attributions) are available.
        device: move each map there as it is recorded (``"cpu"`` keeps long-sequence maps off the accelerator).

    Yields:
        :class:`AttentionMaps`, filled as the calls run.

    Raises:
        TypeError: ``model`` is not a module, or holds no fastflamingo attention to record (patch it first).
        ValueError: ``layers`` names a layer that is not there.
        RuntimeError: another block records one of these layers already.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    sites = _sites(model, perceiver)
    if not sites:
        raise TypeError(f"attention_maps found no fastflamingo attention layer in {type(model).__name__}: patch the "
                        "model with fastflamingo.patch(model) first, or pass fastflamingo drop-in modules")
    sites = _select(sites, layers)
    busy = [name for name, m in sites if recorder_of(m) is not None]
    if busy:
        raise RuntimeError(f"the layers {busy} are recorded by another attention_maps block already")
    maps = AttentionMaps([name for name, _ in sites])
    recorder = _Recorder(maps, {id(m): name for name, m in sites}, detach, device)
    for _, m in sites:
        setattr(m, RECORDER_ATTR, recorder)
    try:
        yield maps
    finally:
        for _, m in sites:
            if m.__dict__.get(RECORDER_ATTR) is recorder:
                delattr(m, RECORDER_ATTR)


__all__ = ["AttentionMap", "AttentionMaps", "attention_maps", "dense_attention", "recorder_of", "key_shape"]
