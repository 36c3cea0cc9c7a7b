"""Decode-step cross-attention straight on vLLM's paged cross-attention KV cache.

A decode row attends to one contiguous key range ``[lo, hi)`` of its request's cached image keys (the images of the
prompt's last token, :mod:`.intervals`). This module reads those keys where vLLM keeps them: the blocks covering
the range are gathered once per layer for all decode rows of the step together (one copy of the keys each row
needs, nothing more), and the attention runs batched over rows and blocks, with the keys outside ``[lo, hi)``
masked. No mask over keys is built per row beyond those partial edge blocks. A step whose decode rows all see
every key their request cached (one image, or a last prompt token that sees every image) needs no range at all:
:class:`DecodeRows` says so (``whole``) and the layer hands those rows to vLLM's own cross-attention, which computes
exactly that from the cache in place.

Where a block keeps its K and V elements depends on the attention backend and its ISA (vLLM's CPU backend stores K
transposed per block and head for ``vec``, packs it differently for AMX, ...). :func:`cache_layout` does not assume
one: it writes known values with the layer's own cache update into a scratch block and reads back where each
element went. A layout that is a strided view (every CPU layout seen so far) is read through a view; any other
permutation through an index map; a quantised cache (fp8) is refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

# the digits a probe value carries: exact in bf16 (8 significant bits), so any coordinate reads back exactly
_DIGIT = 128


@dataclass(frozen=True)
class Placement:
    """Where one block's K (or V) elements sit within the block: ``offsets[t, h, d]`` is the element offset of
    token ``t``, head ``h``, dim ``d``; ``strides`` (token, head, dim) and ``base`` when those offsets are a strided
    view, else None."""

    offsets: torch.Tensor
    strides: Optional[Tuple[int, int, int]]
    base: int

    def read(self, cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """The elements of ``blocks`` (any shape of block ids) as (*blocks.shape, block_size, heads, dim): one
        gathered copy, laid out in the cache's own element order (the result may be a permuted view of it)."""
        block_elems = cache[0].numel()
        if self.strides is None:
            flat = cache.reshape(cache.shape[0], block_elems)
            return flat[blocks][..., self.offsets]
        bs, heads, dim = self.offsets.shape
        view = cache.as_strided((cache.shape[0], bs, heads, dim), (block_elems, *self.strides),
                                cache.storage_offset() + self.base)
        # gather in memory order (largest stride first), then permute back: the copy reads the cache sequentially
        order = sorted(range(3), key=lambda i: -self.strides[i])
        gathered = view.permute(0, *(1 + i for i in order))[blocks]
        lead = blocks.dim()
        back = [order.index(i) for i in range(3)]
        return gathered.permute(*range(lead), *(lead + i for i in back))


@dataclass(frozen=True)
class CacheLayout:
    key: Placement
    value: Placement


_LAYOUTS: Dict[tuple, CacheLayout] = {}


def _placement(values, written: torch.Tensor, block_size: int, heads: int, dim: int) -> Placement:
    offsets = torch.full((block_size, heads, dim), -1, dtype=torch.long)
    t, h, d = values
    offsets[t, h, d] = written
    if bool((offsets < 0).any()) or written.numel() != block_size * heads * dim:
        raise NotImplementedError("fastflamingo.vllm: the cross-attention cache update did not write each element "
                                  "of a block exactly once; this cache layout is not supported")
    base = int(offsets[0, 0, 0])
    strides = tuple(int(offsets[tuple(1 if j == i else 0 for j in range(3))]) - base if n > 1 else 0
                    for i, n in enumerate((block_size, heads, dim)))
    grid = torch.meshgrid(torch.arange(block_size), torch.arange(heads), torch.arange(dim), indexing="ij")
    strided = bool((offsets == base + sum(s * g for s, g in zip(strides, grid))).all())
    return Placement(offsets, strides if strided else None, base)


def cache_layout(layer, kv_cache: torch.Tensor, heads: int, dim: int) -> CacheLayout:
    """The :class:`CacheLayout` of ``layer``'s cache (a vLLM attention layer whose ``impl`` has
    ``do_kv_cache_update``; the CPU backend's block-major cache, (num_blocks, heads, block_size, 2 * dim)), found
    once per backend, ISA, dtype and block shape by writing coordinates as values into a scratch block with the
    layer's own cache update and reading back where they landed."""
    if kv_cache.dim() != 4 or kv_cache.shape[1] != heads or kv_cache.shape[3] != 2 * dim:
        # the GPU backends keep K and V in separate halves of the whole cache, not block by block
        raise NotImplementedError(f"fastflamingo.vllm reads the cross-attention cache of vLLM's CPU backend only "
                                  f"(num_blocks, kv_heads, block_size, 2 * head_dim); got {tuple(kv_cache.shape)}")
    impl = layer.impl
    cache_dtype = str(getattr(impl, "kv_cache_dtype", "auto"))
    if cache_dtype not in ("auto", str(kv_cache.dtype).replace("torch.", "")):
        raise NotImplementedError(f"fastflamingo.vllm reads unquantised cross-attention caches only; this one is "
                                  f"kv_cache_dtype={cache_dtype}")
    key = (type(impl).__qualname__, getattr(layer, "isa", None), kv_cache.dtype, tuple(kv_cache.shape[1:]),
           kv_cache.device.type)
    if key in _LAYOUTS:
        return _LAYOUTS[key]
    block_size = kv_cache.shape[2]
    scratch = torch.zeros((1, *kv_cache.shape[1:]), dtype=kv_cache.dtype, device=kv_cache.device)
    slots = torch.arange(block_size, device=kv_cache.device)
    grid = torch.meshgrid(torch.arange(block_size), torch.arange(heads), torch.arange(dim), indexing="ij")
    placements = []
    for half in (0, 1):  # K, then V
        coords, written = [], None
        for coord in grid:
            value = torch.zeros(scratch.numel(), dtype=torch.long)
            for digit in range(2):
                part = (coord // _DIGIT ** digit) % _DIGIT + 1  # 1.._DIGIT: a written element is never 0
                scratch.zero_()
                probe = part.to(kv_cache.dtype).to(kv_cache.device)
                zero = torch.zeros_like(probe)
                impl.do_kv_cache_update(layer, *((probe, zero) if half == 0 else (zero, probe)), scratch, slots)
                flat = scratch.reshape(-1).float().cpu()
                where = flat.nonzero().flatten()
                if written is None:
                    written = where
                elif not torch.equal(where, written):
                    raise NotImplementedError("fastflamingo.vllm: the cross-attention cache update writes values "
                                              "it does not keep exactly; this cache layout is not supported")
                value[where] += (flat[where].long() - 1) * _DIGIT ** digit
            coords.append(value[written])
        placements.append(_placement(coords, written, block_size, heads, dim))
    layout = _LAYOUTS[key] = CacheLayout(*placements)
    return layout


@dataclass
class DecodeRows:
    """The step's decode rows and the cache blocks they read, built once per step on the host.

    - ``rows`` (R,): token indices of the decode rows in the step's batch;
    - ``blocks`` (R, nb): per row, the block ids covering its key range, from the block holding ``lo`` on (a row
      that needs fewer blocks repeats its last one; those keys are masked);
    - ``visible`` (R, nb * block_size) bool: the gathered keys inside ``[lo, hi)``;
    - ``whole``: every row's range is all of its request's cached keys (then ``blocks`` and ``visible`` are None:
      vLLM's own paged attention computes exactly that, reading the cache in place).
    """

    rows: torch.Tensor
    blocks: Optional[torch.Tensor]
    visible: Optional[torch.Tensor]
    whole: bool = False

    @classmethod
    def build(cls, rows, block_tables, ranges, cached, block_size: int, device) -> "DecodeRows":
        """``rows``: token indices; ``block_tables``: per row, its request's block ids (a 1D tensor); ``ranges``:
        per row, ``(lo, hi)`` with ``lo < hi``; ``cached``: per row, its request's number of cached keys."""
        if all(lo == 0 and hi == n for (lo, hi), n in zip(ranges, cached)):
            return cls(torch.tensor(rows, device=device), None, None, whole=True)
        first = [lo // block_size for lo, _ in ranges]
        count = [(hi - 1) // block_size - f + 1 for (_, hi), f in zip(ranges, first)]
        nb = max(count)
        # a row that needs fewer blocks repeats its last one (masked below)
        blocks = torch.stack([torch.cat([table[f:f + n], table[f + n - 1:f + n].expand(nb - n)]).to(torch.long).cpu()
                              for table, f, n in zip(block_tables, first, count)])
        position = torch.tensor(first)[:, None] * block_size + torch.arange(nb * block_size)
        lo = torch.tensor([r[0] for r in ranges])[:, None]
        hi = torch.tensor([r[1] for r in ranges])[:, None]
        visible = (position >= lo) & (position < hi)
        return cls(torch.tensor(rows, device=device), blocks.to(device), visible.to(device))


def decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, layout: CacheLayout, decode: DecodeRows,
                     scale: float) -> torch.Tensor:
    """Attention of the decode rows ``q`` (R, heads, dim) onto their key ranges in ``kv_cache``; query head ``h``
    reads K/V head ``h // (heads // kv_heads)`` (Llama's grouping). Returns (R, heads, dim) in ``q``'s dtype,
    computed in fp32."""
    keys = layout.key.read(kv_cache, decode.blocks)  # (R, nb, bs, kv_heads, dim)
    values = layout.value.read(kv_cache, decode.blocks)
    rows, nb, bs, kv_heads, dim = keys.shape
    heads = q.shape[1]
    qg = q.float().reshape(rows, 1, kv_heads, heads // kv_heads, dim)
    # (R, nb, kv_heads, group, bs): one small GEMM per row, block and K/V head against the block's keys
    scores = torch.matmul(qg, keys.float().permute(0, 1, 3, 4, 2)) * scale
    hidden = ~decode.visible.view(rows, nb, 1, 1, bs)
    scores = scores.masked_fill(hidden, float("-inf"))
    top = scores.amax(dim=(1, 4), keepdim=True)
    weights = torch.exp(scores - top)
    total = weights.sum(dim=(1, 4), keepdim=True)
    # slots outside the range may hold anything (a stale or never written slot can be NaN): weight 0 is not enough,
    # so the blocks that hold such slots (at most the first and the last of a row) get them zeroed, in the copy
    values = values.float()
    hidden_slots = hidden.view(rows, nb, bs)
    edge = hidden_slots.any(-1).nonzero(as_tuple=True)
    if edge[0].numel():
        values[edge] = values[edge].masked_fill_(hidden_slots[edge].view(-1, bs, 1, 1), 0)
    out = torch.matmul(weights, values.permute(0, 1, 3, 2, 4)).sum(dim=1)  # (R, kv_heads, group, dim)
    out = out / total.squeeze(1)
    return out.reshape(rows, heads, dim).to(q.dtype)


__all__ = ["CacheLayout", "Placement", "cache_layout", "DecodeRows", "decode_attention"]
