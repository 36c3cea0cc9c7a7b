"""The mllama (Llama 3.2 Vision) cross-attention mask in closed form.

transformers builds, per forward pass, an additive (batch, 1, text, images * tiles * P) mask from the processor's
(batch, text, images, tiles) ``cross_attention_mask`` (``P = 1601`` vision tokens per tile for Llama 3.2): every
tile's 0/1 repeated P times, ``1 - mask`` scaled to ``finfo.min``, then every row multiplied by its any-visible flag
``F`` (so a row that sees no image gets an all-zero mask: ordinary softmax over every key, padding included).

The processor's masks have a closed form (every row sees one contiguous run of images, each image its real tiles
``[0, num_tiles)``), which :class:`MllamaMask` holds instead of the text x keys matrix:

- ``img_start, img_end`` (batch, text) int32: the images ``[start, end)`` a token sees; ``start == end``: none
  (``"zero"`` mode rows); ``start == -1`` (``ALL_KEYS``): every key, padding included (``"hf"`` rows that see no
  image, and rows whose mask is all zeros);
- ``image_keys`` (batch, images) int32: real keys per image slot (``num_tiles * P``);
- ``image_stride`` = ``max_tiles * P`` keys per image slot.

:func:`from_additive_mask` recovers it exactly from the mask a layer receives, or returns None when the mask has no
such form (soft biases, other collators): the caller then runs the dense path, with the same results.
:func:`from_cross_attention_mask` builds it from the processor's mask. Both read the mask once and synchronise with
the host once (to learn whether the form holds, and the sizes the kernels' grids need); :func:`cached` memoises the
result per mask tensor, so every cross-attention layer of a forward pass shares one derivation. Without the vision
sizes (``tokens_per_tile=None, max_tiles=None``: transformers' attention interface, ``fastflamingo.hf``) they are
inferred from the mask (:func:`_inferred`: one host read at Llama 3.2's sizes, else up to four), as exactly.

Decoding needs none of this: :func:`decode_units` lists, on the device and without any host synchronisation, the
tiles a sample's tokens can see; the decode kernel reads the mask itself for everything else.
"""
from __future__ import annotations

import operator
from typing import List, Optional, Tuple

import torch

from ... import masks as _masks
from ...masks import Run
from ..idefics.mask import _block_size, allowed_keys

ALL_KEYS = -1
EMPTY_ROWS = ("hf", "zero")
# Llama 3.2 Vision: (560 / 14) ** 2 + 1 tokens per tile, 4 tiles per image.
TOKENS_PER_TILE = 1601
MAX_TILES = 4


class MllamaMask:
    """Which keys each text token sees, in closed form (see the module docstring).

    Attributes:
        img_start, img_end: int32 (batch, text) on the mask's device.
        image_keys: int32 (batch, images), real keys of each image slot.
        image_stride: keys per image slot; ``num_keys = images * image_stride``.
        has_all: some row sees every key (its K/V must include the padded tiles).
        max_runs: the most runs (stretches of tokens seeing the same images) in any sample.
    """

    __slots__ = ("img_start", "img_end", "image_keys", "image_stride", "has_all", "max_runs", "_host", "_runs",
                 "__weakref__")

    def __init__(self, img_start: torch.Tensor, img_end: torch.Tensor, image_keys: torch.Tensor, image_stride: int,
                 has_all: bool, max_runs: int):
        self.img_start = img_start.to(torch.int32).contiguous()
        self.img_end = img_end.to(torch.int32).contiguous()
        self.image_keys = image_keys.to(torch.int32).contiguous()
        self.image_stride = int(image_stride)
        self.has_all = bool(has_all)
        self.max_runs = int(max_runs)
        self._host = None
        self._runs = None

    @property
    def shape(self) -> Tuple[int, int]:
        return tuple(self.img_start.shape)

    @property
    def num_images(self) -> int:
        return self.image_keys.shape[1]

    @property
    def num_keys(self) -> int:
        return self.num_images * self.image_stride

    def __repr__(self) -> str:
        return (f"MllamaMask(shape={self.shape}, images={self.num_images}, image_stride={self.image_stride}, "
                f"has_all={self.has_all})")

    def to(self, device) -> "MllamaMask":
        """The same mask on ``device`` (itself when it is there already); what was read to the host is kept."""
        if self.img_start.device == torch.device(device):
            return self
        moved = MllamaMask(self.img_start.to(device), self.img_end.to(device), self.image_keys.to(device),
                           self.image_stride, self.has_all, self.max_runs)
        moved._host, moved._runs = self._host, self._runs
        return moved

    def host(self) -> Tuple[List[List[int]], List[List[int]], List[List[int]]]:
        """``img_start``, ``img_end``, ``image_keys`` as Python lists (one transfer, cached)."""
        if self._host is None:
            packed = torch.cat((self.img_start, self.img_end, self.image_keys), dim=1).cpu().tolist()
            s, i = self.img_start.shape[1], self.num_images
            self._host = ([row[:s] for row in packed], [row[s:2 * s] for row in packed],
                          [row[2 * s:2 * s + i] for row in packed])
        return self._host

    def runs(self) -> List[Run]:
        """Stretches of consecutive tokens that see the same images (host side, cached). When every sample has the
        same rows and the same image sizes, the runs cover all samples at once (batch index None)."""
        if self._runs is None:
            starts, ends, keys = self.host()
            batch = len(starts)
            shared = batch > 1 and all(starts[b] == starts[0] and ends[b] == ends[0] and keys[b] == keys[0]
                                       for b in range(1, batch))
            runs: List[Run] = []
            for b in ([None] if shared else range(batch)):
                s_row, e_row = starts[b or 0], ends[b or 0]
                t0 = 0
                for t in range(1, len(s_row) + 1):
                    if t == len(s_row) or s_row[t] != s_row[t0] or e_row[t] != e_row[t0]:
                        runs.append((b, t0, t, s_row[t0], e_row[t0]))
                        t0 = t
            self._runs = runs
        return self._runs

    def real_key_ranges(self) -> Optional[List[Tuple[int, int, int]]]:
        """``(sample, first key, end key)`` of the real (non-padded) keys, adjacent ranges merged, or None when
        every key has to be projected (a row sees every key, or no slot has padding)."""
        if self.has_all:
            return None
        _, _, keys = self.host()
        if all(n == self.image_stride for row in keys for n in row):
            return None
        ranges: List[Tuple[int, int, int]] = []
        for b, row in enumerate(keys):
            for j, n in enumerate(row):
                start = j * self.image_stride
                if not n:
                    continue
                if ranges and ranges[-1][0] == b and ranges[-1][2] == start:
                    ranges[-1] = (b, ranges[-1][1], start + n)
                else:
                    ranges.append((b, start, start + n))
        return ranges

    def visible(self) -> torch.Tensor:
        """Dense (batch, text, keys) boolean view: for tests and oracles."""
        key = torch.arange(self.num_keys, device=self.img_start.device)
        image, offset = key // self.image_stride, key % self.image_stride
        start, end = self.img_start[..., None], self.img_end[..., None]
        real = offset < self.image_keys.gather(1, image.expand(self.image_keys.shape[0], -1).long())[:, None, :]
        return (start == ALL_KEYS) | ((image >= start) & (image < end) & real)


def _check_empty_rows(empty_rows: str) -> str:
    if empty_rows not in EMPTY_ROWS:
        raise ValueError(f"empty_rows={empty_rows!r}; expected one of {EMPTY_ROWS}")
    return empty_rows


def _closed_form(tile_vis: torch.Tensor, all_rows: torch.Tensor, none_rows: torch.Tensor, tokens_per_tile: int,
                 valid: torch.Tensor) -> Optional[MllamaMask]:
    """The closed form of a per-tile mask ``tile_vis`` (batch, text, images, tiles), or None when it has none.
    ``all_rows`` see every key, ``none_rows`` nothing; the other rows must see one contiguous run of images, each
    with tiles ``[0, n)`` where ``n`` is the same for every row that sees that image. ``valid`` (a bool tensor) is
    AND-ed into the verdict, which is read with the sizes in one host transfer."""
    batch, num_text, num_images, max_tiles = tile_vis.shape
    device = tile_vis.device
    regular = ~(all_rows | none_rows)
    seen = tile_vis.any(-1) & regular[..., None]  # (B, S, I)
    slot = torch.arange(num_images, device=device, dtype=torch.int32)
    start = torch.where(seen, slot, num_images).amin(-1) if num_images else all_rows.new_zeros(all_rows.shape, dtype=torch.int32)
    end = torch.where(seen, slot + 1, 0).amax(-1) if num_images else start
    count = seen.sum(-1, dtype=torch.int32)
    contiguous = ~regular | ((count >= 1) & (count == end - start))
    tiles = torch.where(seen, tile_vis.sum(-1, dtype=torch.int32), 0)
    num_tiles = tiles.amax(1) if num_text else tiles.new_zeros(batch, num_images)  # (B, I)
    tile = torch.arange(max_tiles, device=device)
    expected = (tile < num_tiles[:, None, :, None]) & seen[..., None]
    prefix = (tile_vis == expected) | ~regular[..., None, None]
    img_start = torch.where(regular, start, torch.where(all_rows, ALL_KEYS, 0))
    img_end = torch.where(regular, end, torch.where(all_rows, num_images, 0))
    if num_text:
        change = (img_start[:, 1:] != img_start[:, :-1]) | (img_end[:, 1:] != img_end[:, :-1])
        runs = 1 + change.sum(1)
    else:
        runs = torch.zeros(batch, dtype=torch.int64, device=device)
    verdict = valid & contiguous.all() & prefix.all()
    summary = torch.stack((verdict.long(), all_rows.any().long(), runs.max() if batch else runs.new_zeros(())))
    ok, has_all, max_runs = summary.tolist()  # the one host synchronisation
    if not ok:
        return None
    return MllamaMask(img_start, img_end, num_tiles * tokens_per_tile, max_tiles * tokens_per_tile, bool(has_all),
                      max_runs)


def from_cross_attention_mask(cross_attention_mask: torch.Tensor, tokens_per_tile: int = TOKENS_PER_TILE,
                              empty_rows: str = "hf") -> Optional[MllamaMask]:
    """The processor's (batch, text, images, tiles) 0/1 mask in closed form, or None when it has none.

    ``empty_rows="hf"``: rows that see no image see every key (transformers 5); ``"zero"``: they see nothing.
    """
    _check_empty_rows(empty_rows)
    if cross_attention_mask.dim() != 4:
        raise ValueError("cross_attention_mask must have shape (batch, text, images, tiles), got "
                         f"{tuple(cross_attention_mask.shape)}")
    tile_vis = cross_attention_mask != 0
    flat = tile_vis.flatten(2)
    row_any, row_all = flat.any(-1), flat.all(-1)
    if empty_rows == "hf":
        all_rows, none_rows = row_all | ~row_any, torch.zeros_like(row_any)
    else:
        all_rows, none_rows = row_all & row_any, ~row_any
    valid = torch.ones((), dtype=torch.bool, device=tile_vis.device)
    return _closed_form(tile_vis, all_rows, none_rows, tokens_per_tile, valid)


def check_tile_sizes(tokens_per_tile: Optional[int], max_tiles: Optional[int]) -> None:
    """Both sizes given (positive ints), or both None: infer them from the mask (:func:`from_additive_mask`)."""
    if (tokens_per_tile is None) != (max_tiles is None):
        given = "tokens_per_tile" if max_tiles is None else "max_tiles"
        raise ValueError(f"{given} is given but the other vision size is None: pass tokens_per_tile and max_tiles "
                         "together, or both None to infer them from the mask")
    for name, value in (("tokens_per_tile", tokens_per_tile), ("max_tiles", max_tiles)):
        if value is None:
            continue
        try:  # an integer-like (a numpy int) passes, a float or a bool does not
            valid = not isinstance(value, bool) and operator.index(value) > 0
        except TypeError:
            valid = False
        if not valid:
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def _row_kinds(tile_vis: torch.Tensor, row_flag: Optional[torch.Tensor], empty_rows: str):
    """``(all_rows, none_rows)`` (batch, text) of a per-tile mask: rows that see every key, rows that see nothing
    (``"zero"`` mode with a row flag: the rows whose flag is 0)."""
    batch, num_text = tile_vis.shape[:2]
    row_all = tile_vis.flatten(2).all(-1)
    if empty_rows == "zero" and row_flag is not None:
        flag = row_flag.reshape(row_flag.shape[0], num_text).to(tile_vis.device)
        none_rows = (flag == 0).expand(batch, num_text)
        return row_all & ~none_rows, none_rows
    return row_all, torch.zeros_like(row_all)


def from_additive_mask(mask: torch.Tensor, tokens_per_tile: Optional[int] = TOKENS_PER_TILE,
                       max_tiles: Optional[int] = MAX_TILES, row_flag: Optional[torch.Tensor] = None,
                       empty_rows: str = "hf") -> Optional[MllamaMask]:
    """The closed form of the (batch, 1, text, keys) mask a cross-attention layer receives (additive: 0 = attend,
    ``<= finfo.min`` = blocked; or boolean, True = attend), or None when it has none (a soft bias, a key count that
    is not ``images * max_tiles * tokens_per_tile``, tiles that are not constant, rows that are not runs of images
    with tile prefixes, a row that sees nothing at all).

    ``tokens_per_tile=None, max_tiles=None``: the vision sizes are unknown (transformers' attention interface hands
    the layer no vision config) and are inferred from the mask itself (:func:`_inferred`); the result is as exact.

    The attention follows the mask exactly (a row whose mask is all zeros sees every key). ``empty_rows="zero"``
    with ``row_flag`` (transformers' ``full_text_row_masked_out_mask``, (batch, 1, text, 1) or (batch, text)):
    rows whose flag is 0 see nothing instead (their attention output is dropped anyway).
    """
    _check_empty_rows(empty_rows)
    check_tile_sizes(tokens_per_tile, max_tiles)
    if tokens_per_tile is None:
        return _inferred(mask, row_flag, empty_rows)
    batch, _, num_text, num_keys = mask.shape
    image_stride = max_tiles * tokens_per_tile
    if num_keys % image_stride:
        return None
    num_images = num_keys // image_stride
    m = mask[:, 0].unflatten(-1, (num_images, max_tiles, tokens_per_tile))
    first = m[..., 0]  # (B, S, I, T): one key per tile
    # the tile is constant along its P keys: one pass over the mask (the only full read)
    constant = (m == first[..., None]).all()
    if mask.dtype == torch.bool:
        tile_vis, hard = first, torch.ones((), dtype=torch.bool, device=mask.device)
    else:
        blocked = first <= torch.finfo(mask.dtype).min  # finfo.min and -inf
        tile_vis = first == 0
        hard = (tile_vis | blocked).all()
    all_rows, none_rows = _row_kinds(tile_vis, row_flag, empty_rows)
    return _closed_form(tile_vis, all_rows, none_rows, tokens_per_tile, constant & hard)


# Inferring the vision sizes. Llama 3.2's sizes are tried first when the key count allows them (one pass and one
# host read, as with known sizes; a closed form that holds at any sizes is exact, whatever model made the mask).
# Otherwise: every processor mask is constant on each tile of P keys, so every column where some row changes value
# lies on a tile boundary, and the gcd g of those columns and of the key count is a multiple of P: every row is
# constant on each block of g keys, and one key per block reads the whole mask losslessly (blocks only merge tiles
# no row tells apart). The image stride is not known either; any split of the blocks into equal image slots whose
# closed form holds (:func:`_closed_form` checks every row against it) describes the mask exactly, so the candidates
# are tried from the fewest, widest slots (the true stride when g divides it: each image's real tiles one prefix, a
# run of consecutive images one slice) to one block per slot. The blocks are read to the host once, the candidates
# are checked there (a few small tensors each), and the winner goes back to the device: three host reads in all.


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _inferred(mask: torch.Tensor, row_flag: Optional[torch.Tensor], empty_rows: str) -> Optional[MllamaMask]:
    """:func:`from_additive_mask` with the tile size and the image stride read from the mask (see above)."""
    num_keys = mask.shape[-1]
    if num_keys and num_keys % (TOKENS_PER_TILE * MAX_TILES) == 0:
        closed = from_additive_mask(mask, TOKENS_PER_TILE, MAX_TILES, row_flag, empty_rows)
        if closed is not None:
            return closed
    block = _block_size(mask)  # None: a soft bias; 0: no keys at all
    if block is None:
        return None
    if block == 0:
        return from_additive_mask(mask, 1, 1, row_flag, empty_rows)
    blocks = allowed_keys(mask)[..., ::block].cpu()  # (B, S, keys / g), exact (see above)
    flag = None if row_flag is None else row_flag.detach().cpu()
    valid = torch.ones((), dtype=torch.bool)
    num_blocks = num_keys // block
    for slots in _divisors(num_blocks):
        tile_vis = blocks.unflatten(-1, (slots, num_blocks // slots))
        all_rows, none_rows = _row_kinds(tile_vis, flag, empty_rows)
        closed = _closed_form(tile_vis, all_rows, none_rows, block, valid)
        if closed is not None:
            return closed.to(mask.device)
    return None


def full(batch: int, num_text: int, num_keys: int, device) -> MllamaMask:
    """No mask: every token sees every key (one "image" of all the keys, nothing padded)."""
    zeros = torch.zeros(batch, num_text, dtype=torch.int32, device=device)
    keys = torch.full((batch, 1), num_keys, dtype=torch.int32, device=device)
    return MllamaMask(zeros, zeros + 1, keys, num_keys, False, 1 if num_text else 0)


class _Same:
    """A memo-key component equal only to itself for one version of one tensor (None matches None)."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: Optional[torch.Tensor]):
        self.tensor = tensor
        self.version = None if tensor is None else tensor._version

    def __eq__(self, other) -> bool:
        return isinstance(other, _Same) and other.tensor is self.tensor and other.version == self.version

    __hash__ = None


def cached(mask: torch.Tensor, tokens_per_tile: Optional[int], max_tiles: Optional[int],
           row_flag: Optional[torch.Tensor], empty_rows: str) -> Optional[MllamaMask]:
    """:func:`from_additive_mask`, derived once per mask tensor (and row flag) and shared by every layer (sizes
    None: inferred from the mask, once too)."""
    flag = row_flag if empty_rows == "zero" else None
    key = ("mllama", tokens_per_tile, max_tiles, empty_rows, _Same(flag))
    return _masks.memoised(mask, key, lambda: from_additive_mask(mask, tokens_per_tile, max_tiles, flag, empty_rows))


def decode_units(mask: Optional[torch.Tensor], num_keys: int, unit_len: int, batch: int, device,
                 row_flag: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """The key units (tiles) the tokens of each sample can see, on the device, no host synchronisation.

    Returns ``(units, count, unit_len)``: int32 (batch, U) unit indices with the visited ones first (in order),
    int32 (batch,) how many are visited. A unit is visited when some token's mask is above ``finfo.min`` on one
    of its keys, and every unit of a sample with a token whose mask blocks every key (upstream then averages all
    keys). ``row_flag``: tokens whose flag is 0 are ignored ("zero" mode: their output is dropped). When
    ``num_keys`` is not a multiple of ``unit_len`` the keys form one unit.
    """
    if unit_len <= 0 or num_keys % unit_len:
        unit_len = max(num_keys, 1)
    num_units = num_keys // unit_len
    if mask is None:
        units = torch.arange(num_units, dtype=torch.int32, device=device).expand(batch, -1)
        return units, torch.full((batch,), num_units, dtype=torch.int32, device=device), unit_len

    def build():
        m = mask[:, 0].expand(batch, -1, -1)
        seen = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min
        unit_seen = seen.unflatten(-1, (num_units, unit_len)).any(-1)  # (B, S, U)
        use = unit_seen | ~unit_seen.any(-1, keepdim=True)
        if row_flag is not None:
            use = use & (row_flag.reshape(row_flag.shape[0], -1) != 0)[..., None]
        visit = use.any(1)  # (B, U)
        order = torch.argsort((~visit).to(torch.int8), dim=1, stable=True).to(torch.int32)
        return order, visit.sum(1, dtype=torch.int32)

    units, count = _masks.memoised(mask, ("mllama-units", unit_len, batch, _Same(row_flag)), build)
    return units, count, unit_len


__all__ = ["MllamaMask", "ALL_KEYS", "EMPTY_ROWS", "TOKENS_PER_TILE", "MAX_TILES", "from_cross_attention_mask",
           "from_additive_mask", "check_tile_sizes", "full", "cached", "decode_units"]
