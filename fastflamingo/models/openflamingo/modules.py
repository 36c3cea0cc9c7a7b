"""Drop-in modules for OpenFlamingo (open-flamingo 2.0.1 ``open_flamingo/src/helpers.py``).

Constructor arguments, parameter names and state_dict keys are those of upstream, so
``load_state_dict(upstream.state_dict(), strict=True)`` works in both directions. The forward passes call
:mod:`fastflamingo.functional`, which picks the Triton kernels or the optimized PyTorch path.

flamingo-pytorch's variants (no ``dim_visual``, ``media_pos_emb``, no ``use_cached_media``) are in
:mod:`fastflamingo.models.flamingo_pytorch`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ... import functional, masks
from ..._checks import check_linear_input, check_tensor, promoted_as_concatenated
from ...attention_recording import CROSS, PERCEIVER, dense_attention, key_shape, perceiver_attention, recorder_of
from ...cache import ProjectionCache


class FeedForward(nn.Sequential):
    """``LayerNorm -> Linear(dim, dim*mult) -> GELU -> Linear(dim*mult, dim)``, no biases (keys ``0``, ``1``, ``3``).

    Upstream's ``FeedForward`` is a function returning this ``nn.Sequential``; this class has the same children.
    """

    _fastflamingo_dropin = True  # patch() must not mistake a drop-in for the upstream class of the same name

    def __init__(self, dim: int, mult: float = 4):
        inner_dim = int(dim * mult)
        super().__init__(
            nn.LayerNorm(dim),
            nn.Linear(dim, inner_dim, bias=False),
            nn.GELU(),
            nn.Linear(inner_dim, dim, bias=False),
        )

    def gelu_and_out_fusable(self) -> bool:
        """Whether ``self[2:]`` is still upstream's exact GELU + bias-free Linear, called plainly, so that
        :func:`fastflamingo.functional.gelu_linear` may run the two: a user's replacement, a hook or a wrapped
        ``forward`` (accelerate's offloading loads the weight in one) runs as written."""
        act, out = self[2], self[3]
        return (type(act) is nn.GELU and act.approximate == "none" and type(out) is nn.Linear and out.bias is None
                and out.weight.device.type != "meta"
                and not any(m._forward_hooks or m._forward_pre_hooks or "forward" in vars(m) or hasattr(m, "_hf_hook")
                            for m in (act, out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self) == 4 and self.gelu_and_out_fusable():
            # the GELU output (dim * mult per token) is recomputed in the backward pass instead of kept
            return functional.gelu_linear(self[1](self[0](x)), self[3].weight)
        return super().forward(x)


def flatten_media(media: torch.Tensor) -> torch.Tensor:
    """(batch, num_media, latents, dim) -> (batch, num_media * latents, dim): the media-major key order."""
    return media.reshape(media.shape[0], media.shape[1] * media.shape[2], media.shape[-1])


def kv_projection(media: torch.Tensor, weights, options=()):
    """``MaskedCrossAttention.to_kv`` of the flattened media as a pure function of its parameters (the media cache's
    projector, see cache.py; no options): ``[kv]``, kv of shape (batch, num_media * latents, 2 * heads * dim_head)."""
    return [nn.functional.linear(flatten_media(media), *weights)]


class MaskedCrossAttention(nn.Module):
    """Text tokens attend to the Perceiver latents of the media they may see (OpenFlamingo semantics).

    Only the keys a token may see are visited and no text x media mask is built. One documented difference from
    upstream: a token that sees no media (text before the first image in all-previous mode, or more ``<image>``
    tokens than images) gets an attention output of exactly zero, where upstream averages over all media.
    """

    _fastflamingo_dropin = True  # patch() must not mistake a drop-in for the upstream class of the same name
    _fastflamingo_attention_site = CROSS  # fastflamingo.attention_maps records it
    _fastflamingo_attention_maps = None  # the recorder of an attention_maps block, while one records this module

    def __init__(
        self,
        *,
        dim: int,
        dim_visual: Optional[int] = None,
        dim_head: int = 64,
        heads: int = 8,
        only_attend_immediate_media: bool = True,
    ):
        super().__init__()
        dim_visual = dim if dim_visual is None else dim_visual
        self.scale = dim_head**-0.5
        self.heads = heads
        self.dim_head = dim_head
        inner_dim = dim_head * heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim_visual, inner_dim * 2, bias=False)  # fused: rows [0, inner) K, [inner, 2 inner) V
        self.to_out = nn.Linear(inner_dim, dim, bias=False)
        self.only_attend_immediate_media = only_attend_immediate_media
        # K/V of the last media, reused across decode steps, compiled or not (see cache.py)
        self.media_cache = ProjectionCache(kv_projection)

    def media_mask(self, x, media, media_locations, use_cached_media):
        """The closed-form mask for this call (memoised per ``media_locations`` tensor, shared across layers)."""
        batch, num_text = x.shape[:2]
        num_media = media.shape[1]
        if media_locations is None:
            return masks.all_media(batch, num_text, num_media, x.device)
        if not isinstance(media_locations, torch.Tensor) or media_locations.dim() != 2:
            shape = tuple(media_locations.shape) if isinstance(media_locations, torch.Tensor) else type(media_locations)
            raise ValueError(f"media_locations must be a boolean (batch, text) tensor, got {shape}")
        if media_locations.shape[0] != batch:
            raise ValueError(
                f"media_locations has batch size {media_locations.shape[0]} but x has batch size {batch}"
            )
        if not use_cached_media and media_locations.shape[1] != num_text:
            raise ValueError(
                f"media_locations has {media_locations.shape[1]} positions but x has {num_text} tokens "
                f"(x {tuple(x.shape)}, media_locations {tuple(media_locations.shape)}); they must match unless "
                "use_cached_media=True"
            )
        return masks.from_media_locations(
            media_locations,
            num_media,
            only_attend_immediate_media=self.only_attend_immediate_media,
            use_cached_media=use_cached_media,
            num_text=num_text,
        )

    def project_media(self, media: torch.Tensor):
        """K and V of the flattened media latents as (batch, media * latents, heads, dim_head), one row per row
        of ``media``. :meth:`attend` uses :meth:`project_media_grouped` instead (no per-beam copies)."""
        k, v, r = self.project_media_grouped(media)
        if r > 1:  # expand the shared rows back for a caller that expects one per media row (not the hot path)
            k, v = k.repeat_interleave(r, dim=0), v.repeat_interleave(r, dim=0)
        return k, v

    def project_media_grouped(self, media: torch.Tensor):
        """``(k, v, r)``: K and V as (batch // r, media * latents, heads, dim_head) views of one fused projection
        (no split copy), where media row b uses K/V row b // r. In eval mode without autograd the result is reused
        while ``media`` and the weights are unchanged (decode steps), and media whose rows repeat in groups of r
        (beam search) are projected once per group; otherwise r is 1."""
        if torch.compiler.is_compiling() and type(self.to_kv) is nn.Linear:
            # compiled: the cache is read through a custom op (no beam grouping); a replaced to_kv (an adapter) is
            # not the projector's plain linear map, so it is called in the graph below, uncached
            (kv,) = self.media_cache.traced(self, media, self.to_kv.parameters())
            return (*self._split_kv(kv), 1)
        (k, v), r = self.media_cache.get_grouped(self, media, self.to_kv.parameters(), self._project_media)
        return k, v, r

    def _project_media(self, media: torch.Tensor):
        return self._split_kv(self.to_kv(flatten_media(media)))

    def _split_kv(self, kv: torch.Tensor):
        """Views of the fused projection (batch, keys, 2 * inner) as K and V of shape (batch, keys, heads, dim_head)."""
        inner = self.heads * self.dim_head
        shape = kv.shape[:2] + (self.heads, self.dim_head)
        return kv[..., :inner].view(shape), kv[..., inner:].view(shape)

    def forward(self, x, media, media_locations=None, use_cached_media=False):
        return self.to_out(self.attend(x, media, media_locations, use_cached_media))

    def attend(self, x, media, media_locations=None, use_cached_media=False):
        """The attention output before ``to_out``: (B, T_txt, heads * dim_head).

        Args:
            x: text features (B, T_txt, dim).
            media: media latents (B, T_img, n, dim_visual).
            media_locations: boolean (B, T_txt), True at ``<image>`` tokens; None attends to every media.
            use_cached_media: every token comes after the prompt's last media (decoding); ``media_locations`` then
                describes the prompt and may be longer or shorter than ``x``.
        """
        check_tensor("x", x, 3, self.norm.normalized_shape[0], "(batch, text, dim)")
        check_tensor("media", media, 4, self.to_kv.in_features, "(batch, num_media, latents, dim_visual)")
        if media.shape[0] != x.shape[0]:
            raise ValueError(f"media has batch size {media.shape[0]} but x has batch size {x.shape[0]}")
        check_linear_input("x", x, self.to_q, "to_q")  # LayerNorm keeps x's dtype
        check_linear_input("media", media, self.to_kv, "to_kv")
        mask = self.media_mask(x, media, media_locations, use_cached_media)
        batch, num_text = x.shape[:2]
        q = self.to_q(self.norm(x)).view(batch, num_text, self.heads, self.dim_head)
        k, v, r = self.project_media_grouped(media)
        recorder = recorder_of(self)
        if recorder is None:
            out = functional.media_xattn(q, k, v, mask, scale=self.scale, kv_group=r)
        else:  # an attention_maps block: this call attends densely and hands over its probabilities
            out, probs = dense_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.scale,
                                         visible=visible_keys(mask, media.shape[2]), kv_group=r)
            recorder.record(self, probs, key_shape(k.shape[1], media.shape[2]))
        return out.reshape(batch, num_text, self.heads * self.dim_head)


def visible_keys(mask: masks.MediaMask, latents: int) -> torch.Tensor:
    """(batch, text, media * latents) boolean: the keys each token sees under ``mask`` (media-major keys)."""
    return mask.visible().repeat_interleave(latents, dim=-1)


class GatedCrossAttentionBlock(nn.Module):
    """``x = x + tanh(attn_gate) * attn(x, media)``; ``x = x + tanh(ff_gate) * ff(x)`` (OpenFlamingo)."""

    _fastflamingo_dropin = True  # patch() must not mistake a drop-in for the upstream class of the same name

    def __init__(
        self,
        *,
        dim: int,
        dim_visual: Optional[int] = None,
        dim_head: int = 64,
        heads: int = 8,
        ff_mult: float = 4,
        only_attend_immediate_media: bool = True,
    ):
        super().__init__()
        self.attn = MaskedCrossAttention(
            dim=dim,
            dim_visual=dim_visual,
            dim_head=dim_head,
            heads=heads,
            only_attend_immediate_media=only_attend_immediate_media,
        )
        self.attn_gate = nn.Parameter(torch.tensor([0.0]))
        self.ff = FeedForward(dim, mult=ff_mult)
        self.ff_gate = nn.Parameter(torch.tensor([0.0]))

    def forward(self, x, media, media_locations=None, use_cached_media=False):
        # each branch's last projection carries the gated residual in its epilogue (fused on the Triton backend)
        if isinstance(self.attn, MaskedCrossAttention):
            attended = self.attn.attend(x, media, media_locations, use_cached_media)
            x = functional.gated_linear(x, attended, self.attn.to_out, self.attn_gate)
        else:  # a user-replaced attention module
            x = functional.gated_residual(x, self.attn(x, media, media_locations, use_cached_media), self.attn_gate)
        if isinstance(self.ff, FeedForward):
            hidden = self.ff[1](self.ff[0](x))
            if len(self.ff) == 4 and self.ff.gelu_and_out_fusable():  # the GELU output is not kept for backward
                return functional.gated_linear(x, hidden, self.ff[3], self.ff_gate, activation="gelu")
            return functional.gated_linear(x, self.ff[2](hidden), self.ff[3], self.ff_gate)
        return functional.gated_residual(x, self.ff(x), self.ff_gate)


class PerceiverAttention(nn.Module):
    """Latents attend to ``[media tokens; latents]`` (OpenFlamingo / flamingo-pytorch), without concatenating the
    normalized inputs: the fused ``to_kv`` runs on each source and the attention reads both."""

    _fastflamingo_dropin = True  # patch() must not mistake a drop-in for the upstream class of the same name
    _fastflamingo_attention_site = PERCEIVER  # fastflamingo.attention_maps(..., perceiver=True) records it
    _fastflamingo_attention_maps = None

    def __init__(self, *, dim: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        self.scale = dim_head**-0.5
        self.heads = heads
        self.dim_head = dim_head
        inner_dim = dim_head * heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, inner_dim * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

    def _split_heads(self, t: torch.Tensor, rows: int) -> torch.Tensor:
        return t.reshape(rows, t.shape[-2], self.heads, self.dim_head)

    def forward(self, x, latents):
        """
        Args:
            x: media features (b, T, n1, dim).
            latents: (b, T, n2, dim).
        Returns:
            (b, T, n2, dim).
        """
        dim = self.norm_media.normalized_shape[0]
        check_tensor("x", x, 4, dim, "(batch, num_media, tokens, dim)")
        check_tensor("latents", latents, 4, dim, "(batch, num_media, latents, dim)")
        if x.shape[:2] != latents.shape[:2]:
            raise ValueError(f"x {tuple(x.shape)} and latents {tuple(latents.shape)} must agree on (batch, num_media)")
        inner = self.heads * self.dim_head
        rows = x.shape[0] * x.shape[1]
        x = self.norm_media(x)
        latents = self.norm_latents(latents)
        check_linear_input("latents", latents, self.to_q, "to_q")
        q = self._split_heads(self.to_q(latents), rows)
        # upstream projects cat((x, latents)), which promotes both to one dtype (half media, fp32 latents: fp32)
        x, latents = promoted_as_concatenated(x, latents)
        check_linear_input("x", x, self.to_kv, "to_kv")
        kv_media = self.to_kv(x)
        kv_latents = self.to_kv(latents)
        out = perceiver_attention(
            self,
            q,
            self._split_heads(kv_media[..., :inner], rows),
            self._split_heads(kv_media[..., inner:], rows),
            self._split_heads(kv_latents[..., :inner], rows),
            self._split_heads(kv_latents[..., inner:], rows),
            self.scale,
        )
        return self.to_out(out.reshape(latents.shape[:3] + (inner,)))


class PerceiverResampler(nn.Module):
    """OpenFlamingo's resampler: media features (b, T, F, v, dim) -> (b, T, num_latents, dim).

    ``max_num_media`` / ``max_num_frames`` add time / frame embeddings (``media_time_embs``, ``frame_embs``); more
    media or frames than embeddings raise a ValueError instead of upstream's broadcast error.
    """

    _fastflamingo_dropin = True  # patch() must not mistake a drop-in for the upstream class of the same name

    def __init__(
        self,
        *,
        dim: int,
        depth: int = 6,
        dim_head: int = 64,
        heads: int = 8,
        num_latents: int = 64,
        max_num_media: Optional[int] = None,
        max_num_frames: Optional[int] = None,
        ff_mult: float = 4,
    ):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.frame_embs = nn.Parameter(torch.randn(max_num_frames, dim)) if max_num_frames is not None else None
        self.media_time_embs = (
            nn.Parameter(torch.randn(max_num_media, 1, dim)) if max_num_media is not None else None
        )
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads), FeedForward(dim, ff_mult)])
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def resample(self, x: torch.Tensor) -> torch.Tensor:
        """The attention + feed-forward stack on flattened media tokens x (b, T, tokens, dim)."""
        latents = self.latents.expand(x.shape[0], x.shape[1], *self.latents.shape)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents)

    def forward(self, x):
        """
        Args:
            x: (b, T, F, v, dim): T media per sample, F frames per media, v tokens per frame.
        Returns:
            (b, T, num_latents, dim).
        """
        dim = self.latents.shape[-1]
        check_tensor("x", x, 5, dim, "(batch, num_media, frames, tokens, dim)")
        batch, num_media, frames, tokens = x.shape[:4]
        if self.frame_embs is not None:
            if frames > self.frame_embs.shape[0]:
                raise ValueError(
                    f"x has {frames} frames per media but the resampler has {self.frame_embs.shape[0]} frame "
                    "embeddings (max_num_frames)"
                )
            x = x + self.frame_embs[:frames, None, :]
        x = x.reshape(batch, num_media, frames * tokens, dim)
        if self.media_time_embs is not None:
            if num_media > self.media_time_embs.shape[0]:
                raise ValueError(
                    f"x has {num_media} media per sample but the resampler has {self.media_time_embs.shape[0]} "
                    "time embeddings (max_num_media)"
                )
            x = x + self.media_time_embs[:num_media]
        return self.resample(x)
