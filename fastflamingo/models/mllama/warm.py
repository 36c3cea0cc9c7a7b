"""The mllama cross-attention's warm-up shape: what ``fastflamingo.warmup`` runs for a Llama 3.2 Vision model.

The attention core is warmed through the family's front end (:func:`~fastflamingo.models.mllama.functional.
mllama_xattn`) with the additive mask transformers hands a layer, so the calls take the paths the model's take:
the prefill kernels (closed form recovered from the mask) for every text-length class of their autotune key
(``kernels._utils.TEXT_CLASSES``, one scheme for every attention family), and the decode kernel for one new token,
which reads the mask row in place.
"""
from __future__ import annotations

import dataclasses

import torch

from .._warm import WarmSettings, backward, class_sizes, evenly_spaced_text_time
from .functional import mllama_xattn

def additive_mask(text_time: torch.Tensor, num_images: int, max_tiles: int, tokens_per_tile: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """The (batch, 1, text, keys) mask transformers gives a cross-attention layer when token t sees image
    ``text_time[t]`` (1-based) with all its tiles: 0 = attend, ``finfo.min`` = blocked."""
    image = torch.arange(1, num_images + 1, device=text_time.device)
    sees = (text_time[..., None] == image).repeat_interleave(max_tiles * tokens_per_tile, dim=-1)
    blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=text_time.device)
    return torch.where(sees, torch.zeros((), dtype=dtype, device=text_time.device), blocked)[:, None]


@dataclasses.dataclass(frozen=True)
class MllamaXattn:
    """``mllama_xattn``: heads, K/V heads, head size and vision tile sizes of one cross-attention."""

    heads: int
    kv_heads: int
    head_dim: int
    tokens_per_tile: int
    max_tiles: int
    ops = ("mllama_xattn", "mllama_decode")  # the kernel families warm() reaches

    def warm(self, settings: WarmSettings) -> int:
        from ...kernels._utils import TEXT_CLASSES  # imports triton: only when warming

        s, calls = settings, 0
        # the image count is not in the autotune key; one image and several are the two specialisations a count
        # gets (Triton specialises integer arguments equal to 1)
        for images in sorted({1, min(s.max_media, 2)}):
            num_keys = images * self.max_tiles * self.tokens_per_tile
            k = s.rand(s.batch, self.kv_heads, num_keys, self.head_dim, grad=s.backward)
            v = s.rand(s.batch, self.kv_heads, num_keys, self.head_dim, grad=s.backward)
            for text in class_sizes(s.max_text, TEXT_CLASSES) + ([1] if s.decode else []):
                q = s.rand(s.batch, text, self.heads, self.head_dim, grad=s.backward and text > 1)
                if text == 1:  # a decode step: the token after the whole prompt sees the last image
                    text_time = torch.full((s.batch, 1), images, dtype=torch.int32, device=s.device)
                else:
                    text_time = evenly_spaced_text_time(s.batch, text, images, s.device)
                mask = additive_mask(text_time, images, self.max_tiles, self.tokens_per_tile, s.dtype)
                out = mllama_xattn(q, k, v, mask, tokens_per_tile=self.tokens_per_tile, max_tiles=self.max_tiles)
                backward(out, s)
                calls += 1
        return calls


__all__ = ["MllamaXattn", "additive_mask"]
