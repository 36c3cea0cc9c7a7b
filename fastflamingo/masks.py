"""The op-level media mask in closed form, shared by every model family.

Upstream builds a (batch, heads, text, media * latents) boolean mask and fills a score matrix of the same size.
Every Flamingo mask is instead described by one small integer per text token, ``text_time`` (1-based index of the
media the token is conditioned on, 0 for none), and a mode:

- ``immediate``: a token with ``text_time == j`` sees the latents of media ``j`` only;
- ``all_previous``: it sees the latents of media ``1 .. j``.

So token ``t`` sees the contiguous key range ``[lo * n, hi * n)`` of the flattened media latents, with
``[lo, hi) = [j - 1, j)`` (immediate) or ``[0, j)`` (all previous), clipped to the media that exist. A token whose
range is empty (text before the first media, or more ``<image>`` tokens than images in immediate mode) gets an
attention output of exactly zero (:func:`zero_unseen`): see the README's semantics note for where upstream differs.

A :class:`MediaMask` is derived once per forward pass and shared by every cross-attention layer: the builders
below are memoised on the identity and version of the tensor they read (:func:`memoised`, which the families' mask
recovery uses too). ``text_time`` comes from ``media_locations`` here (OpenFlamingo and flamingo-pytorch pass the
``<image>`` flags themselves, :func:`from_media_locations`); a family whose model hands its layers another mask
recovers the closed form in its own package (``fastflamingo/models/idefics/mask.py``,
``fastflamingo/models/mllama/mask.py``).
"""
from __future__ import annotations

import threading
import weakref
from typing import Any, Callable, Dict, Hashable, List, Optional, Tuple

import torch

from .cache import tensor_version

IMMEDIATE = "immediate"
ALL_PREVIOUS = "all_previous"
MODES = (IMMEDIATE, ALL_PREVIOUS)

# A run: a stretch of consecutive text tokens of one sample (or of every sample, when all samples share their rows)
# that see the same range, (batch index or None for "all samples", t0, t1, start, end). The PyTorch paths attend run
# by run: media_xattn's over ranges of media, mllama's over ranges of images.
Run = Tuple[Optional[int], int, int, int, int]


def zero_unseen(out: torch.Tensor, sees: torch.Tensor) -> torch.Tensor:
    """The rule every path keeps: a token that sees nothing gets exactly 0. ``out`` (batch, text, ...) is an
    attention output, ``sees`` (batch, text) bool; a select, not a multiply, so NaN or inf in a dropped row cannot
    leak, and the dropped rows pass no gradient back."""
    return torch.where(sees.reshape(*sees.shape, *(1,) * (out.dim() - sees.dim())), out, out.new_zeros(()))


def visible_media(text_time: torch.Tensor, num_media: int, immediate: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The visibility rule: per-token visible media ``[lo, hi)`` (int32, same shape as ``text_time``), ``(0, 0)``
    for a token that sees nothing. Keys are ``latents *`` these. Every backend, the schedules and the reference use
    this one definition (the kernels evaluate the same rule on device: ``text_time_keys`` in kernels/_attention.py).
    """
    tt = text_time
    if immediate:
        seen = (tt >= 1) & (tt <= num_media)
        zero = torch.zeros_like(tt)
        return torch.where(seen, tt - 1, zero), torch.where(seen, tt, zero)
    hi = tt.clamp(min=0, max=num_media)
    return torch.zeros_like(hi), hi


class MediaMask:
    """Which media each text token may attend to, in closed form (never a text x media matrix).

    Plain data plus the visibility rule (:func:`visible_media`). A backend that derives a schedule from it (the
    PyTorch path's runs and chunks) keeps it on the mask with :meth:`cached`, so the layers of one forward pass,
    which share one mask, build it once.

    Attributes:
        text_time: int32 tensor (batch, text): 1-based media index per token, 0 for a token with no media. In
            immediate mode a token with ``text_time > num_media`` sees nothing.
        num_media: number of media per sample (``T_img``).
        mode: ``"immediate"`` or ``"all_previous"``.
    """

    __slots__ = ("text_time", "num_media", "mode", "_cache", "__weakref__")

    def __init__(self, text_time: torch.Tensor, num_media: int, mode: str):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; expected one of {MODES}")
        if text_time.dim() != 2:
            raise ValueError(f"text_time must be (batch, text), got shape {tuple(text_time.shape)}")
        if text_time.is_floating_point() or text_time.is_complex() or text_time.dtype == torch.bool:
            raise TypeError(f"text_time must be an integer tensor (1-based media index per token), got dtype "
                            f"{text_time.dtype}")
        if text_time.dtype != torch.int32:
            # a saturating cast: every index above num_media + 1 sees what num_media + 1 sees (nothing in immediate
            # mode, every media in all-previous mode), every index below 0 what 0 sees (nothing), so the int32 copy
            # means the same for any value (a plain cast would wrap 2**32 + 1 to 1); no host read
            text_time = text_time.clamp(0, int(num_media) + 1)
        self.text_time = text_time.to(torch.int32)
        self.num_media = int(num_media)
        self.mode = mode
        self._cache: Dict[Hashable, Any] = {}

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

    def cached(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """``build()``, computed once per mask and ``key`` (a backend's schedule for this mask)."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def media_range(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-token visible media ``[lo, hi)`` (int32 tensors of shape (batch, text)); ``lo >= hi`` means none."""
        return self.cached("media_range", lambda: visible_media(self.text_time, self.num_media, self.immediate))

    def visible(self) -> torch.Tensor:
        """Dense (batch, text, num_media) boolean view of the mask: for tests and the rare general fallback."""
        lo, hi = self.media_range()
        media = torch.arange(self.num_media, device=lo.device)
        return (media >= lo[..., None]) & (media < hi[..., None])


# --------------------------------------------------------------------------------------------------------------
# Builders (memoised per source tensor, so the layers of one forward pass share one MediaMask)
# --------------------------------------------------------------------------------------------------------------

_CACHE_LOCK = threading.Lock()
_CACHE: "List[tuple]" = []  # (weakref to source, version, key, mask); a handful of entries, most recent last
_CACHE_SIZE = 16  # masks and the launchers' schedules of a few forwards


def memoised(source: torch.Tensor, key: tuple, build):
    """``build()``, cached per (identity and version of ``source``, ``key``): derive a mask once per forward pass
    and share it across layers. Not cached while compiling, when ``source`` requires grad, or when it has no
    version counter (an inference tensor: ``torch.inference_mode()``), where a stale entry could not be detected:
    each layer then derives the mask itself."""
    if torch.compiler.is_compiling() or source.requires_grad:
        return build()
    version = tensor_version(source)
    if version is None:
        return build()
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
