"""Drop-in for transformers' ``IdeficsPerceiverResampler``: latents attend to ``[context; latents]`` without the
concatenation (the attention reads both sources)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..._checks import check_linear_input, check_tensor, promoted_as_concatenated
from ...attention_recording import PERCEIVER, perceiver_attention, recorder_of
from ...cache import ProjectionCache
from .config import PERCEIVER_DEFAULTS, get, vision_embed_dim


class IdeficsPerceiverAttention(nn.Module):
    """Latents attend to ``[context; latents]`` (upstream ``IdeficsPerceiverAttention``, same keys). K/V are
    projected per source instead of on the concatenated input, and the attention reads both."""

    _fastflamingo_dropin = True
    _fastflamingo_attention_site = PERCEIVER  # fastflamingo.attention_maps(..., perceiver=True) records it
    _fastflamingo_attention_maps = None

    def __init__(self, embed_dim: int, n_heads: int, head_dim: int, qk_layer_norms: bool) -> None:
        super().__init__()
        self.embed_dim, self.n_heads, self.head_dim = embed_dim, n_heads, head_dim
        self.qk_layer_norms = qk_layer_norms
        self.context_layer_norm = nn.LayerNorm(self.embed_dim)
        self.latents_layer_norm = nn.LayerNorm(self.embed_dim)
        if self.qk_layer_norms:
            self.q_layer_norm = nn.LayerNorm(self.head_dim)
            self.k_layer_norm = nn.LayerNorm(self.head_dim)
        self.qk_scale = self.head_dim**-0.5
        inner = self.n_heads * self.head_dim
        self.q_proj = nn.Linear(self.embed_dim, inner, bias=False)
        self.k_proj = nn.Linear(self.embed_dim, inner, bias=False)
        self.v_proj = nn.Linear(self.embed_dim, inner, bias=False)
        self.output_proj = nn.Linear(inner, embed_dim, bias=False)

    def forward(self, context: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """
        Args:
            context: (batch, seq, embed_dim) tokens to resample (batch = samples * images).
            latents: (batch, n_latents, embed_dim).
        Returns:
            (batch, n_latents, embed_dim).
        """
        check_tensor("context", context, 3, self.embed_dim, "(batch, seq, embed_dim)")
        check_tensor("latents", latents, 3, self.embed_dim, "(batch, n_latents, embed_dim)")
        if context.shape[0] != latents.shape[0]:
            raise ValueError(f"context {tuple(context.shape)} and latents {tuple(latents.shape)} must share the batch")
        context = self.context_layer_norm(context)
        latents = self.latents_layer_norm(latents)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(t.shape[0], t.shape[1], self.n_heads, self.head_dim)

        check_linear_input("latents", latents, self.q_proj, "q_proj")
        q = heads(self.q_proj(latents))
        # upstream projects cat([context, latents]), which promotes both to one dtype (half context, fp32 latents)
        context, latents = promoted_as_concatenated(context, latents)
        check_linear_input("context", context, self.k_proj, "k_proj")
        k_media, k_latents = heads(self.k_proj(context)), heads(self.k_proj(latents))
        v_media, v_latents = heads(self.v_proj(context)), heads(self.v_proj(latents))
        if self.qk_layer_norms:  # LayerNorm over head_dim is per row, so each key source can be normalized alone
            q = self.q_layer_norm(q)
            k_media, k_latents = self.k_layer_norm(k_media), self.k_layer_norm(k_latents)
        out = perceiver_attention(self, q, k_media, v_media, k_latents, v_latents, self.qk_scale)
        return self.output_proj(out.reshape(latents.shape[0], latents.shape[1], self.n_heads * self.head_dim))


class IdeficsPerceiverMLP(nn.Module):
    """The resampler's ``c_proj(relu(fc(ln(x))))`` (upstream ``perceiver.IdeficsMLP``; keys ``ln``, ``fc``,
    ``c_proj``). Like upstream, the width is the vision config's ``embed_dim``."""

    _fastflamingo_dropin = True

    def __init__(self, intermediate_size: int, config: Any):
        super().__init__()
        vision_dim = vision_embed_dim(config)
        if vision_dim is None:
            raise AttributeError("the IDEFICS perceiver MLP needs config.vision_config.embed_dim (as upstream)")
        self.embed_dim = int(vision_dim)
        self.ln = nn.LayerNorm(self.embed_dim)
        self.fc = nn.Linear(self.embed_dim, intermediate_size, bias=False)
        self.act = nn.ReLU()
        self.c_proj = nn.Linear(intermediate_size, self.embed_dim, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.fc(self.ln(hidden_states))))


class IdeficsPerceiverResampler(nn.Module):
    """Drop-in for transformers' ``IdeficsPerceiverResampler``: (batch, seq, embed_dim) context ->
    (batch, n_latents, embed_dim), batch = samples * images (each image is resampled on its own)."""

    _fastflamingo_dropin = True

    def __init__(self, config: Any, embed_dim: int, depth: int, n_heads: int, head_dim: int, n_latents: int) -> None:
        super().__init__()
        self.embed_dim, self.n_heads, self.head_dim, self.n_latents = embed_dim, n_heads, head_dim, n_latents
        perceiver_config = get(config, "perceiver_config", {"perceiver_config": {}})
        self.qk_layer_norms = bool(get(perceiver_config, "qk_layer_norms_perceiver", PERCEIVER_DEFAULTS))
        self.latents = nn.Parameter(torch.randn(self.n_latents, self.embed_dim), requires_grad=True)
        vision_dim = vision_embed_dim(config)
        self.intermediate_dim = self.embed_dim * 4 if vision_dim is None else int(vision_dim) * 4
        self.blocks = nn.ModuleList(
            nn.ModuleList(
                [
                    IdeficsPerceiverAttention(self.embed_dim, self.n_heads, self.head_dim, self.qk_layer_norms),
                    IdeficsPerceiverMLP(self.intermediate_dim, config),
                ]
            )
            for _ in range(depth)
        )
        self.layer_norm = nn.LayerNorm(self.embed_dim)
        # transformers 5 reruns the resampler on the same vision features at every decode step (docs/design.md, "Generation"):
        # in eval mode without autograd the last result is reused while the features and weights are unchanged
        self.media_cache = ProjectionCache()

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        check_tensor("context", context, 3, self.embed_dim, "(batch * images, seq, embed_dim)")
        if any(recorder_of(attn) is not None for attn, _ in self.blocks):  # recorded: run, never reuse
            return self._resample(context)
        return self.media_cache.get(self, context, self.parameters(), lambda: self._resample(context))

    def _resample(self, context: torch.Tensor) -> torch.Tensor:
        latents = self.latents.expand(context.shape[0], *self.latents.shape)
        for attn, ff in self.blocks:
            latents = attn(context, latents) + latents
            latents = ff(latents) + latents
        return self.layer_norm(latents)
