"""Drop-ins for Evolla's sequence compressor (transformers ``models/evolla``): flamingo-pytorch's Perceiver
resampler with a key padding mask over the protein tokens.

The compressor's latents attend to ``[protein tokens; latents]`` through ``perceiver_attn`` with the protein padding
as its key mask (the latents are always visible), without concatenating the two. Upstream subtracts each row's
maximum score and then writes -1e4 into the masked scores (not -inf): the masked keys get weight exp(-1e4 - ...) = 0
unless a visible key's shifted score falls below -1e4, so the hard mask here is the same softmax.
"""
from __future__ import annotations

import types
from typing import Any, Optional

import torch
from torch import nn

from ... import functional
from ..._checks import check_linear_input, check_tensor, promoted_as_concatenated
from ..openflamingo import modules as openflamingo_modules
from . import mask as evolla_mask


def _get(config: Any, name: str):
    return config[name] if isinstance(config, dict) else getattr(config, name)


class EvollaFeedForward(nn.Module):
    """``fc2(GELU(fc1(LayerNorm(x))))`` without bias (upstream keys ``norm``, ``fc1``, ``activation``, ``fc2``).

    The GELU output is not kept for the backward pass (``functional.gelu_linear``) when ``activation`` is exact
    GELU, as upstream builds it."""

    _fastflamingo_dropin = True

    def __init__(self, dim, mult=4):
        super().__init__()
        inner_dim = int(dim * mult)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, inner_dim, bias=False)
        self.activation = nn.GELU()
        self.fc2 = nn.Linear(inner_dim, dim, bias=False)

    def exact_gelu(self) -> bool:
        """True when ``fc2(activation(h))`` is ``functional.gelu_linear(h, fc2.weight)``: nothing was swapped, and
        calling ``fc2`` does no more than its math (accelerate's hook on an offloaded ``fc2`` loads its weight in
        its forward; read outside it, the weight is still on the meta device, and a CPU ``F.linear`` with a meta
        weight returns uninitialised memory)."""
        return (type(self.activation) is nn.GELU and self.activation.approximate == "none"
                and functional._plain_linear(self.fc2) and self.fc2.bias is None)

    def forward(self, x):
        h = self.fc1(self.norm(x))
        if self.exact_gelu():
            return functional.gelu_linear(h, self.fc2.weight)
        return self.fc2(self.activation(h))


class EvollaSequenceCompressorAttention(openflamingo_modules.PerceiverAttention):
    """Latents attend to ``[media; latents]``: flamingo-pytorch's Perceiver attention (OpenFlamingo's drop-in, same
    keys ``norm_media``, ``norm_latents``, ``to_q``, ``to_kv`` (K and V fused), ``to_out``; scale ``dim_head **
    -0.5``) on (batch, tokens, dim) inputs, with the protein padding as a key mask."""

    # the attention-map recorder (fastflamingo.attention_maps) has no key mask: not a recorded site
    _fastflamingo_attention_site = None

    def __init__(self, dim, dim_head=64, heads=8):
        super().__init__(dim=dim, dim_head=dim_head, heads=heads)

    def forward(self, x, latents, mask):
        """Upstream's arguments: ``x`` (batch, tokens, dim) protein features, ``latents`` (batch, latents, dim),
        ``mask`` (batch, tokens + latents), 1 where a key is visible (the resampler appends ones for the latents)."""
        dim = self.norm_media.normalized_shape[0]
        check_tensor("x", x, 3, dim, "(batch, tokens, dim)")
        check_tensor("latents", latents, 3, dim, "(batch, latents, dim)")
        batch, tokens = x.shape[:2]
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (batch, tokens + latents.shape[1]):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask must have shape {(batch, tokens + latents.shape[1])} (batch, tokens + latents), "
                             f"got {shape}")
        visible = evolla_mask.visible(mask)
        if not bool(visible[:, tokens:].all()):
            raise ValueError("mask hides some latents: the compressor's latents must stay visible (the resampler "
                             "appends ones for them)")
        return self.attend(x, latents, visible[:, :tokens])

    def attend(self, x: torch.Tensor, latents: torch.Tensor, key_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """The attention with the protein tokens' boolean (batch, tokens) key mask (None: all visible)."""
        x = self.norm_media(x)
        latents = self.norm_latents(latents)
        check_linear_input("latents", latents, self.to_q, "to_q")
        q = self._split_heads(self.to_q(latents), latents.shape[0])
        # upstream projects cat((x, latents)), which promotes both to one dtype
        x, latents = promoted_as_concatenated(x, latents)
        check_linear_input("x", x, self.to_kv, "to_kv")
        k_media, v_media = (self._split_heads(t, x.shape[0]) for t in self.to_kv(x).chunk(2, dim=-1))
        k_latents, v_latents = (self._split_heads(t, x.shape[0]) for t in self.to_kv(latents).chunk(2, dim=-1))
        out = functional.perceiver_attn(q, k_media, v_media, k_latents, v_latents, scale=self.scale,
                                        key_mask=key_mask)
        return self.to_out(out.flatten(-2))


class EvollaSequenceCompressorResampler(nn.Module):
    """Drop-in for ``EvollaSequenceCompressorResampler``: (batch, tokens, protein dim) features and their (batch,
    tokens) mask -> (batch, latents, hidden_size) (keys ``latents``, ``layers``, ``norm``, ``protein_projector``)."""

    _fastflamingo_dropin = True

    def __init__(self, config: Any):
        super().__init__()
        protein_repr_dim = _get(_get(config, "protein_encoder_config"), "hidden_size")
        self.num_latents = _get(config, "resampler_num_latents")
        self.latents = nn.Parameter(torch.randn(self.num_latents, protein_repr_dim), requires_grad=True)
        self.layers = nn.ModuleList([])
        for _ in range(_get(config, "resampler_depth")):
            self.layers.append(nn.ModuleList([
                EvollaSequenceCompressorAttention(dim=protein_repr_dim, dim_head=_get(config, "resampler_dim_head"),
                                                  heads=_get(config, "resampler_heads")),
                EvollaFeedForward(dim=protein_repr_dim, mult=_get(config, "resampler_ff_mult")),
            ]))
        self.norm = nn.LayerNorm(_get(config, "hidden_size"))
        self.protein_projector = nn.Linear(protein_repr_dim, _get(config, "hidden_size"))

    def forward(self, embeds, mask):
        check_tensor("embeds", embeds, 3, self.latents.shape[-1], "(batch, tokens, protein hidden_size)")
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(embeds.shape[:2]):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask must have shape {tuple(embeds.shape[:2])} (batch, tokens), got {shape}")
        key_mask = evolla_mask.visible(mask).to(embeds.device)
        # upstream: latents[None] * ones(batch), cast to the features' dtype
        latents = self.latents.to(embeds.dtype).expand(embeds.shape[0], *self.latents.shape)
        for attn, ff in self.layers:
            if isinstance(attn, EvollaSequenceCompressorAttention):
                latents = attn.attend(embeds, latents, key_mask) + latents
            else:  # a replaced layer gets upstream's mask (the latents appended as visible)
                ones = torch.ones(mask.shape[0], self.num_latents, device=mask.device)
                latents = attn(embeds, latents, torch.cat((mask, ones), dim=1)) + latents
            latents = ff(latents) + latents
        return self.norm(self.protein_projector(latents))


def resampler_config(m: nn.Module) -> types.SimpleNamespace:
    """The config fields an ``EvollaSequenceCompressorResampler`` is built from, read from the module itself."""
    attn, ff = m.layers[0] if len(m.layers) else (None, None)
    dim = m.latents.shape[-1]
    return types.SimpleNamespace(
        protein_encoder_config=types.SimpleNamespace(hidden_size=dim),
        resampler_num_latents=m.latents.shape[0],
        resampler_depth=len(m.layers),
        resampler_dim_head=attn.to_q.out_features // attn.heads if attn is not None else 64,
        resampler_heads=attn.heads if attn is not None else 8,
        resampler_ff_mult=ff.fc1.out_features / dim if ff is not None else 4,
        hidden_size=m.protein_projector.out_features,
    )


__all__ = ["EvollaFeedForward", "EvollaSequenceCompressorAttention", "EvollaSequenceCompressorResampler",
           "resampler_config"]
