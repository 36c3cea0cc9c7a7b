"""Drop-in for Evolla's gated cross-attention ``EvollaSequenceAlignerCrossAttention`` (transformers
``models/evolla``)::

    x = x + tanh(gate_attention) * out_proj(attention(query(RMSNorm(x)), sources))
    x = x + tanh(gate_ffw) * ff(x)

Text tokens attend to the concatenated sources (protein, structure, MSA: each with its own K/V projections with bias
and its own key padding mask) through ``media_xattn`` with one media every token sees and the sources' padding as its
key mask; the softmax scale is ``num_attention_heads ** -0.5`` as upstream (not ``head_dim ** -0.5``). Rows upstream
fills with ``finfo.min`` throughout (a masked query row, a sample with no visible key) get the uniform average of
every key's value, as upstream's softmax gives them (``mask.uniform_rows``). The gates ride in the epilogues of
``out_proj`` and ``ff.fc2`` (``gated_linear``).

In eval mode without autograd the K/V of the sources are projected once per sequence (``media_cache``): the
protein features a patched model's encoder returns are the same tensor at every decode step.
"""
from __future__ import annotations

import warnings
from typing import Any, List, Optional, Tuple

import torch
from torch import nn

from ... import functional
from ..._checks import check_tensor
from ...cache import ProjectionCache
from . import mask as evolla_mask
from ..mllama.layers import MllamaTextRMSNorm
from .resampler import EvollaFeedForward, _get

SOURCES = ("protein", "structure", "msa")


class EvollaRMSNorm(MllamaTextRMSNorm):
    """Upstream's ``EvollaRMSNorm``: the arithmetic of Llama's (variance and normalisation in fp32, cast back to the
    input dtype, then scaled), as mllama's drop-in computes it."""


class EvollaSequenceAlignerCrossAttention(nn.Module):
    """Same constructor, parameter names and ``forward`` as upstream."""

    _fastflamingo_dropin = True

    def __init__(self, config: Any, protein_encoder_dim: Optional[int] = None,
                 structure_encoder_dim: Optional[int] = None, msa_encoder_dim: Optional[int] = None):
        super().__init__()
        self.hidden_size = _get(config, "hidden_size")
        self.num_attention_heads = _get(config, "num_attention_heads")
        self.scale = self.num_attention_heads**-0.5
        self.attention_head_size = int(self.hidden_size / self.num_attention_heads)
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.query = nn.Linear(self.hidden_size, self.all_head_size)
        dims = dict(protein=protein_encoder_dim, structure=structure_encoder_dim, msa=msa_encoder_dim)
        for source, dim in dims.items():
            setattr(self, f"key_{source}", None if dim is None else nn.Linear(dim, self.all_head_size))
            setattr(self, f"value_{source}", None if dim is None else nn.Linear(dim, self.all_head_size))
        self.attention_norm = EvollaRMSNorm(self.hidden_size)
        self.dropout = nn.Dropout(_get(config, "aligner_attention_probs_dropout_prob"))  # unused, as upstream
        self.out_proj = nn.Linear(self.hidden_size, self.hidden_size, bias=_get(config, "aligner_enable_bias"))
        self.ff = EvollaFeedForward(self.hidden_size, _get(config, "aligner_ffn_mult"))
        self.gate_attention = nn.Parameter(torch.tensor([0.0]))
        self.gate_ffw = nn.Parameter(torch.tensor([0.0]))
        # K, V (and V's mean over the keys) of the last sources, reused across decode steps (see cache.py)
        self.media_cache = ProjectionCache()

    def _projections(self, source: str) -> Tuple[Optional[nn.Module], Optional[nn.Module]]:
        return getattr(self, f"key_{source}"), getattr(self, f"value_{source}")

    def project_sources(self, states: List[Optional[torch.Tensor]], dtype_of: torch.Tensor):
        """``(k, v, v_mean)``: K and V (batch, keys, heads, head_dim) of the present sources, concatenated in
        upstream's order (protein, structure, MSA), and V averaged over every key (batch, heads, head_dim), which the
        rows upstream averages uniformly get. Reused while the sources and the projections' weights are unchanged
        (eval mode, no autograd graph)."""
        used = [(name, s.to(dtype_of)) for name, s in zip(SOURCES, states)
                if s is not None and all(p is not None for p in self._projections(name))]
        if not used:
            raise ValueError("At least one modality should be provided for cross attention.")
        weights = [s for _, s in used[1:]] + [p for name, _ in used for m in self._projections(name)
                                               for p in m.parameters()]

        def project():
            shape = (self.num_attention_heads, self.attention_head_size)
            ks, vs = [], []
            for name, s in used:
                key, value = self._projections(name)
                ks.append(key(s))
                vs.append(value(s))
            k = torch.cat(ks, dim=1).unflatten(-1, shape)
            v = torch.cat(vs, dim=1).unflatten(-1, shape)
            return k, v, v.mean(dim=1)

        return self.media_cache.get(self, used[0][1], weights, project)

    def cross_attention(self, query_states, protein_key_value_states, structure_key_value_states,
                        msa_key_value_states, query_attn_mask, protein_kv_attn_mask, structure_kv_attn_mask,
                        msa_kv_attn_mask):
        """Upstream's method: the attention output after ``out_proj`` (no gate), (batch, text, hidden_size)."""
        return self.out_proj(self.attend(query_states, protein_key_value_states, structure_key_value_states,
                                         msa_key_value_states, query_attn_mask, protein_kv_attn_mask,
                                         structure_kv_attn_mask, msa_kv_attn_mask))

    def attend(self, query_states, protein_states, structure_states, msa_states, query_attn_mask, protein_mask,
               structure_mask, msa_mask) -> torch.Tensor:
        """The attention output before ``out_proj``: (batch, text, hidden_size)."""
        masks = [protein_mask, structure_mask, msa_mask]
        if all(m is None for m in masks):
            raise ValueError("At least one modality should be provided for cross attention.")
        batch, text = query_states.shape[:2]
        q = self.query(self.attention_norm(query_states)).unflatten(
            -1, (self.num_attention_heads, self.attention_head_size))
        k, v, v_mean = self.project_sources([protein_states, structure_states, msa_states], query_states)
        keys = evolla_mask.key_mask(masks).to(q.device)
        if keys.shape != k.shape[:2]:
            raise ValueError(f"the sources' masks cover {tuple(keys.shape)} (batch, keys) but their states "
                             f"{tuple(k.shape[:2])}")
        out = functional.media_xattn(q, k, v, evolla_mask.every_token_sees_one_media(batch, text, q.device),
                                     scale=self.scale, key_mask=keys)
        rows = evolla_mask.uniform_rows(evolla_mask.query_mask(query_attn_mask, batch, text, q.device), keys)
        out = torch.where(rows[:, :, None, None], v_mean[:, None].to(out.dtype), out)
        return out.flatten(-2)

    def forward(self, query_states, protein_kv_states, structure_kv_states, msa_kv_states, query_attn_mask,
                protein_kv_attn_mask=None, structure_kv_attn_mask=None, msa_kv_attn_mask=None,
                protein_batch_mask=None, structure_batch_mask=None, msa_batch_mask=None, cache=None, **kwargs):
        """Upstream's arguments (``cache`` is accepted and unused, as upstream; ``past_key_values`` is its
        deprecated name). Returns the new hidden states (batch, text, hidden_size)."""
        if "past_key_values" in kwargs:  # upstream's deprecate_kwarg("past_key_values", new_name="cache")
            old = kwargs.pop("past_key_values")
            name = f"{type(self).__name__}.forward"
            if cache is None:
                warnings.warn(f"`past_key_values` is deprecated and will be removed in version 5.40.0 for "
                              f"`{name}`. Use `cache` instead.", FutureWarning, stacklevel=2)
            else:
                warnings.warn(f"Both `past_key_values` and `cache` are set for `{name}`. Using `cache` and "
                              "ignoring deprecated `past_key_values`.", FutureWarning, stacklevel=2)
        if kwargs:
            raise TypeError(f"{type(self).__name__}.forward() got unexpected keyword arguments {sorted(kwargs)}")
        check_tensor("query_states", query_states, 3, self.hidden_size, "(batch, text, hidden_size)")
        protein = evolla_mask.source_mask(protein_kv_states, protein_kv_attn_mask, protein_batch_mask, "protein")
        structure = evolla_mask.source_mask(structure_kv_states, structure_kv_attn_mask, structure_batch_mask,
                                            "structure")
        msa = evolla_mask.source_mask(msa_kv_states, msa_kv_attn_mask, msa_batch_mask, "msa")
        # only when some key of the batch is visible does upstream run the layer
        if not any(m is not None and bool(m.any()) for m in (protein, structure, msa)):
            return query_states
        attended = self.attend(query_states, protein_kv_states, structure_kv_states, msa_kv_states,
                               query_attn_mask, protein, structure, msa)
        hidden_states = functional.gated_linear(query_states, attended, self.out_proj, self.gate_attention)
        if isinstance(self.ff, EvollaFeedForward) and self.ff.exact_gelu():
            inner = self.ff.fc1(self.ff.norm(hidden_states))
            return functional.gated_linear(hidden_states, inner, self.ff.fc2, self.gate_ffw, activation="gelu")
        return functional.gated_residual(hidden_states, self.ff(hidden_states), self.gate_ffw)


__all__ = ["EvollaRMSNorm", "EvollaSequenceAlignerCrossAttention", "SOURCES"]
