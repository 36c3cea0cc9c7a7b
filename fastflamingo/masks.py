"""The Flamingo media mask in closed form.

Upstream builds a (batch, heads, text, media * latents) boolean mask and fills a score matrix of the same size.
Every Flamingo mask is instead described by one small integer per text token, ``text_time`` (1-based index of the
media the token is conditioned on, 0 for none), and a mode:

- ``immediate``: a token with ``text_time == j`` sees the latents of media ``j`` only;
- ``all_previous``: it sees the latents of media ``1 .. j``.

So token ``t`` sees the contiguous key range ``[lo * n, hi * n)`` of the flattened media latents, with
``[lo, hi) = [j - 1, j)`` (immediate) or ``[0, j)`` (all previous), clipped to the media that exist. A token whose
range is empty (text before the first media, or more ``<image>`` tokens than images in immediate mode) gets an
attention output of exactly zero: see the README's semantics note for where upstream differs.

A :class:`MediaMask` is derived once per forward pass and shared by every cross-attention layer: the builders
below are memoised on the identity and version of the tensor they read.
"""
from __future__ import annotations

import threading
import weakref
from typing import List, Optional, Tuple

import torch

IMMEDIATE = "immediate"
ALL_PREVIOUS = "all_previous"
MODES = (IMMEDIATE, ALL_PREVIOUS)

# A run is a stretch of consecutive text tokens of one sample (or of every sample, when all samples share one
# mask) that see the same media range: (batch index or None for "all samples", t0, t1, lo, hi).
Run = Tuple[Optional[int], int, int, int, int]


class MediaMask:
    """Which media each text token may attend to, in closed form (never a text x media matrix).

    Attributes:
        text_time: int32 tensor (batch, text): 1-based media index per token, 0 for a token with no media. In
            immediate mode a token with ``text_time > num_media`` sees nothing.
        num_media: number of media per sample (``T_img``).
        mode: ``"immediate"`` or ``"all_previous"``.
    """

    __slots__ = ("text_time", "num_media", "mode", "_runs", "_range", "_chunks", "__weakref__")

    def __init__(self, text_time: torch.Tensor, num_media: int, mode: str):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; expected one of {MODES}")
        if text_time.dim() != 2:
            raise ValueError(f"text_time must be (batch, text), got shape {tuple(text_time.shape)}")
        self.text_time = text_time.to(torch.int32)
        self.num_media = int(num_media)
        self.mode = mode
        self._runs: Optional[List[Run]] = None
        self._range: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self._chunks = None

    @property
    def immediate(self) -> bool:
        return self.mode == IMMEDIATE

    @property
    def shape(self) -> Tuple[int, int]:
        return tuple(self.text_time.shape)

    def __repr__(self) -> str:
        return f"MediaMask(shape={self.shape}, num_media={self.num_media}, mode={self.mode!r})"

    def to(self, device) -> "MediaMask":
        if self.text_time.device == torch.device(device):
            return self
        return MediaMask(self.text_time.to(device), self.num_media, self.mode)

    def media_range(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-token visible media ``[lo, hi)`` (int32 tensors of shape (batch, text)); ``lo >= hi`` means none."""
        if self._range is None:
            tt = self.text_time
            if self.immediate:
                valid = (tt >= 1) & (tt <= self.num_media)
                lo = torch.where(valid, tt - 1, torch.zeros_like(tt))
                hi = torch.where(valid, tt, torch.zeros_like(tt))
            else:
                lo = torch.zeros_like(tt)
                hi = tt.clamp(max=self.num_media)
            self._range = (lo, hi)
        return self._range

    def visible(self) -> torch.Tensor:
        """Dense (batch, text, num_media) boolean view of the mask: for tests and the rare general fallback."""
        lo, hi = self.media_range()
        media = torch.arange(self.num_media, device=lo.device)
        return (media >= lo[..., None]) & (media < hi[..., None])

    def runs(self) -> List[Run]:
        """Stretches of consecutive tokens that see the same media range (host-side; one sync, then cached).

        When every sample has the same mask the runs cover all samples at once (batch index ``None``).
        """
        if self._runs is None:
            lo, hi = (x.cpu() for x in self.media_range())
            batch, length = lo.shape
            if batch > 1 and bool((lo == lo[:1]).all()) and bool((hi == hi[:1]).all()):
                rows = [(None, lo[0], hi[0])]
            else:
                rows = [(b, lo[b], hi[b]) for b in range(batch)]
            runs: List[Run] = []
            for b, lo_row, hi_row in rows:
                if length == 0:
                    continue
                change = ((lo_row[1:] != lo_row[:-1]) | (hi_row[1:] != hi_row[:-1])).nonzero().flatten() + 1
                starts = [0] + change.tolist()
                ends = starts[1:] + [length]
                lo_list, hi_list = lo_row.tolist(), hi_row.tolist()
                runs += [(b, s, e, lo_list[s], hi_list[s]) for s, e in zip(starts, ends)]
            self._runs = runs
        return self._runs


    def chunks(self, batch: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """Immediate mode as one batched attention: the tokens of each run, cut into chunks of at most ``size``
        tokens, each chunk paired with the one media its tokens see.

        Returns ``(token_index, media_index, size)``: ``token_index`` (chunks, size) holds flat token indices
        ``b * text + t`` (padding slots point at ``batch * text``, one past the end), ``media_index`` (chunks,)
        holds flat media indices ``b * num_media + m``. Tokens that see nothing are in no chunk. Cached.
        """
        if not self.immediate:
            raise ValueError("chunks() describes the immediate mode only")
        if self._chunks is None:
            runs = [r for r in self.runs() if r[4] > r[3]]
            num_text = self.text_time.shape[1]
            longest = max((t1 - t0 for _, t0, t1, _, _ in runs), default=1)
            # chunks as long as the longest run (rounded up to a power of two), at most 64 tokens: one chunk per
            # image at Flamingo's usual spacing, and little padding for decode steps (runs of one token)
            size = min(64, 1 << (longest - 1).bit_length())
            tokens, media = [], []
            for b, t0, t1, lo, _ in runs:
                for sample in (range(batch) if b is None else (b,)):
                    for start in range(t0, t1, size):
                        stop = min(start + size, t1)
                        row = list(range(sample * num_text + start, sample * num_text + stop))
                        tokens.append(row + [batch * num_text] * (size - len(row)))
                        media.append(sample * self.num_media + lo)
            device = self.text_time.device
            token_index = torch.tensor(tokens, dtype=torch.long).reshape(-1, size).to(device)
            media_index = torch.tensor(media, dtype=torch.long).to(device)
            self._chunks = (token_index, media_index, size)
        return self._chunks


# --------------------------------------------------------------------------------------------------------------
# Builders (memoised per source tensor, so the layers of one forward pass share one MediaMask)
# --------------------------------------------------------------------------------------------------------------

_CACHE_LOCK = threading.Lock()
_CACHE: "List[tuple]" = []  # (weakref to source, version, key, mask); a handful of entries, most recent last
_CACHE_SIZE = 8


def memoised(source: torch.Tensor, key: tuple, build):
    """``build()``, cached per (identity and version of ``source``, ``key``): derive a mask once per forward pass
    and share it across layers. Not cached while compiling or when ``source`` requires grad."""
    if torch.compiler.is_compiling() or source.requires_grad:
        return build()
    version = source._version
    with _CACHE_LOCK:
        for ref, ver, k, mask in _CACHE:
            if ref() is source and ver == version and k == key:
                return mask
    mask = build()
    with _CACHE_LOCK:
        _CACHE.append((weakref.ref(source), version, key, mask))
        del _CACHE[:-_CACHE_SIZE]
    return mask


def _check_bool_mask(name: str, mask: torch.Tensor, batch: Optional[int]) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a boolean tensor (True at media tokens), got dtype {mask.dtype}")
    if mask.dim() != 2:
        raise ValueError(f"{name} must have shape (batch, text), got {tuple(mask.shape)}")
    if batch is not None and mask.shape[0] != batch:
        raise ValueError(f"{name} has batch size {mask.shape[0]} but the text has batch size {batch}")


def from_media_locations(
    media_locations: torch.Tensor,
    num_media: int,
    *,
    only_attend_immediate_media: bool = True,
    use_cached_media: bool = False,
    num_text: Optional[int] = None,
) -> MediaMask:
    """OpenFlamingo / flamingo-pytorch: ``media_locations`` is True at each ``<image>`` token.

    ``text_time = cumsum(media_locations)`` (inclusive: the ``<image>`` token sees its own media). With
    ``use_cached_media`` (OpenFlamingo decoding) all ``num_text`` query tokens come after the prompt and get
    ``text_time = count_nonzero(media_locations)``.
    """
    _check_bool_mask("media_locations", media_locations, None)
    mode = IMMEDIATE if only_attend_immediate_media else ALL_PREVIOUS
    if use_cached_media:
        if num_text is None:
            raise ValueError("num_text is required with use_cached_media=True")

        def build():
            last = media_locations.sum(dim=-1, dtype=torch.int32)
            return MediaMask(last[:, None].expand(-1, num_text), num_media, mode)

        return memoised(media_locations, ("cached", num_media, mode, num_text), build)

    def build():
        return MediaMask(media_locations.cumsum(dim=-1, dtype=torch.int32), num_media, mode)

    return memoised(media_locations, ("cumsum", num_media, mode), build)


def all_media(batch: int, num_text: int, num_media: int, device) -> MediaMask:
    """No ``media_locations``: every token attends to every media (upstream applies no mask at all)."""
    text_time = torch.full((batch, num_text), num_media, dtype=torch.int32, device=device)
    return MediaMask(text_time, num_media, ALL_PREVIOUS)


def from_image_attention_mask(image_attention_mask: torch.Tensor) -> "MediaMask | torch.Tensor":
    """IDEFICS: ``image_attention_mask`` (batch, text, num_images), nonzero where a token may see an image.

    The IDEFICS processor produces one-hot rows (the current image) and all-zero rows (before the first image and
    after an end-of-sequence token): that is the immediate mode. Rows that are prefixes ``1..j`` of the images
    give the all-previous mode. Any other pattern is returned as a boolean (batch, text, num_images) tensor,
    which only the PyTorch path serves (with a dense mask).
    """
    if image_attention_mask.dim() != 3:
        raise ValueError(
            f"image_attention_mask must have shape (batch, text, num_images), got {tuple(image_attention_mask.shape)}"
        )

    return memoised(image_attention_mask, ("idefics",), lambda: _classify_allowed(image_attention_mask != 0))


def _classify_allowed(allowed: torch.Tensor) -> "MediaMask | torch.Tensor":
    """Closed form of a (batch, text, num_media) boolean mask when there is one, else the mask itself."""
    num_media = allowed.shape[-1]
    count = allowed.sum(-1, dtype=torch.int32)
    index = torch.arange(1, num_media + 1, device=allowed.device, dtype=torch.int32)
    last = torch.where(allowed, index, torch.zeros_like(index)).amax(-1) if num_media else count
    if bool((count <= 1).all()):
        return MediaMask(last, num_media, IMMEDIATE)
    if bool((count == last).all()):  # every row is a prefix 1..j (or empty)
        return MediaMask(last, num_media, ALL_PREVIOUS)
    return allowed


def from_idefics_additive_mask(mask: torch.Tensor, num_images: int, latents_per_image: int) -> "MediaMask | torch.Tensor":
    """IDEFICS layers receive the mask already expanded to an additive (batch, 1, text, images * latents) bias
    (0 where allowed, ``finfo.min`` elsewhere). Read one column per image, then as :func:`from_image_attention_mask`.
    """
    expected_keys = num_images * latents_per_image
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-1] != expected_keys:
        raise ValueError(
            "image_attention_mask must have shape (batch, 1, text, num_images * latents) = "
            f"(B, 1, T, {expected_keys}), got {tuple(mask.shape)}"
        )

    def build():
        per_image = mask[:, 0, :, ::latents_per_image] if latents_per_image else mask[:, 0, :, :0]
        allowed = per_image == 0 if mask.is_floating_point() else per_image != 0
        return _classify_allowed(allowed)

    return memoised(mask, ("idefics-additive", num_images, latents_per_image), build)
