"""The cross-attention decoder layers of Llama 3.2 Vision inside vLLM: parallel linears for the projections, a
``CrossAttention`` module for the layer's share of vLLM's cross-attention KV cache, fastflamingo's interval-masked
``mllama_xattn`` for the attention and the tanh-gated residuals; the per-step plan every layer reads
(:class:`StepPlan`) and the ``empty_rows`` option (:func:`empty_rows_option`)."""
from __future__ import annotations

import torch
from torch import nn
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention.cross_attention import CrossAttention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.models.llama import LlamaMLP
from vllm.v1.attention.backend import AttentionType

from .. import functional as FF
from ..models.mllama.functional import mllama_xattn
from ..models.mllama.mask import MllamaMask
from .paged import cache_layout, decode_attention


class MllamaTextRMSNorm(nn.Module):
    """transformers' RMSNorm, computed in fp32 (``q_norm`` / ``k_norm`` over each head)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class MllamaCrossAttention(nn.Module):
    """Grouped-query cross-attention onto the image tokens: projections split over tensor-parallel ranks as vLLM's
    self-attention splits them, and a ``CrossAttention`` module that owns the layer's cross-attention KV cache."""

    def __init__(self, config, *, cache_config=None, quant_config=None, prefix: str = ""):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        self.total_num_heads = config.num_attention_heads
        self.total_num_kv_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // self.total_num_heads
        if self.total_num_heads % tp:
            raise ValueError(f"{self.total_num_heads} attention heads do not split over {tp} tensor-parallel ranks")
        self.num_heads = self.total_num_heads // tp
        # fewer K/V heads than ranks: QKVParallelLinear replicates them, one per rank
        self.num_kv_heads = max(1, self.total_num_kv_heads // tp)
        self.q_proj = ColumnParallelLinear(config.hidden_size, self.total_num_heads * self.head_dim, bias=False,
                                           quant_config=quant_config, prefix=f"{prefix}.q_proj")
        # K and V only: QKVParallelLinear with no query heads (a stacked k/v weight, split per rank like
        # self-attention's)
        self.kv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, total_num_heads=0,
                                         total_num_kv_heads=self.total_num_kv_heads, bias=False,
                                         quant_config=quant_config, prefix=f"{prefix}.kv_proj")
        self.o_proj = RowParallelLinear(self.total_num_heads * self.head_dim, config.hidden_size, bias=False,
                                        input_is_parallel=True, quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.q_norm = MllamaTextRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = MllamaTextRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.scaling = self.head_dim ** -0.5
        self.attn = CrossAttention(self.num_heads, self.head_dim, self.scaling, num_kv_heads=self.num_kv_heads,
                                   cache_config=cache_config, quant_config=quant_config, prefix=f"{prefix}.attn",
                                   attn_type=AttentionType.ENCODER_DECODER)


class RequestImages:
    """One request of the step that has images (``enc_len`` real encoder tokens in its cross-attention cache)."""

    __slots__ = ("a", "b", "prefill", "enc_len", "blocks", "padded", "real_index", "mask", "key_range")

    def __init__(self, a, b, prefill, enc_len, blocks):
        self.a, self.b, self.prefill, self.enc_len, self.blocks = a, b, prefill, enc_len, blocks
        self.padded = self.real_index = self.mask = self.key_range = None


class StepPlan:
    """What every cross-attention layer of one engine step needs, derived once per step (host side: the CPU
    backend needs no graph safety; docs/vllm_notes.md has the device-side design for GPUs).

    - ``requests``: the step's requests that have images; a prefill one carries its projector output with padded
      tiles (``padded``, image-major, ``max_tiles x P`` rows per image, as transformers lays its keys out), the rows
      of its real tiles (``real_index``, what the cache holds) and its :class:`MllamaMask` over the padded layout;
      a decode one carries its visible key range ``[lo, hi)`` in the cache (the last prompt token's images, which
      transformers' ``generate`` repeats for every new token);
    - ``decode``: the decode rows of all those requests together (:class:`~.paged.DecodeRows`: the cache blocks
      each reads and which of their keys it sees), or None;
    - ``sees`` (tokens,) bool: the row sees an image (transformers' ``full_text_row_masked_out_mask``);
    - ``attn_rows`` (tokens,) bool: the rows whose attention branch is added (every row of a request with images
      under ``empty_rows="hf"``; ``sees`` under ``"zero"``).
    Rows of requests without images get neither branch: the layer is the identity for them, as transformers skips
    cross-attention layers without ``cross_attention_states``.
    """

    def __init__(self, requests, sees, attn_rows, cross_metadata, decode=None):
        self.requests, self.sees, self.attn_rows, self.metadata = requests, sees, attn_rows, cross_metadata
        self.decode = decode

    @property
    def prefills(self):
        return [r for r in self.requests if r.prefill]


def interval_runs(start, end) -> int:
    return 1 + sum(1 for t in range(1, len(start)) if start[t] != start[t - 1] or end[t] != end[t - 1])


class MllamaCrossAttentionDecoderLayer(nn.Module):
    """transformers' ``MllamaCrossAttentionDecoderLayer`` on vLLM's batch::

        x = x + tanh(attn_gate) * o_proj(attn(RMSNorm(x)))      (rows of requests without images keep x;
                                                               "zero": rows that see no image keep x)
        x = x + tanh(mlp_gate) * F * mlp(RMSNorm(x))            (F: the row sees an image)

    The attention is fastflamingo's interval-masked GQA op (``mllama_xattn``: per run of tokens seeing the same
    images, only those images' keys, K/V never repeated); the gated residuals are ``fastflamingo.functional``'s
    (``gated_residual``: ``o_proj`` and ``down_proj`` are vLLM parallel linears, whose tensor-parallel reduction
    the fused ``gated_linear`` epilogue would skip). K/V are projected once per request, on its prefill step, and
    their real-tile rows written to vLLM's cross-attention KV cache; decode steps attend on the cache's blocks
    (:mod:`.paged`)."""

    def __init__(self, config, *, cache_config=None, quant_config=None, prefix: str = "", empty_rows: str = "hf"):
        super().__init__()
        self.empty_rows = empty_rows
        self.cross_attn = MllamaCrossAttention(config, cache_config=cache_config, quant_config=quant_config,
                                               prefix=f"{prefix}.cross_attn")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                            quant_config=quant_config, prefix=f"{prefix}.mlp")
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    def _project_kv(self, states: torch.Tensor):
        xa = self.cross_attn
        kv, _ = xa.kv_proj(states)
        k, v = kv.split([xa.num_kv_heads * xa.head_dim] * 2, dim=-1)
        k = xa.k_norm(k.reshape(-1, xa.num_kv_heads, xa.head_dim))
        return k, v.reshape(-1, xa.num_kv_heads, xa.head_dim)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
        # q (tokens, heads, D), k/v (keys, kv_heads, D) -> (tokens, heads, D)
        out = mllama_xattn(q[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], mask,
                           scale=self.cross_attn.scaling, empty_rows=self.empty_rows)
        return out[0]

    def forward(self, hidden_states: torch.Tensor, plan: StepPlan) -> torch.Tensor:
        xa = self.cross_attn
        tokens = hidden_states.shape[0]
        normed = self.input_layernorm(hidden_states)
        q, _ = xa.q_proj(normed)
        q = xa.q_norm(q.view(tokens, xa.num_heads, xa.head_dim))
        attn = q.new_zeros(tokens, xa.num_heads, xa.head_dim)
        kv_cache = xa.attn.kv_cache
        kv_cache = kv_cache[0] if isinstance(kv_cache, (list, tuple)) else kv_cache
        new_k, new_v = [], []
        for req in plan.prefills:
            rows = slice(req.a, req.b)
            k, v = self._project_kv(req.padded)
            new_k.append(k[req.real_index])
            new_v.append(v[req.real_index])
            attn[rows] = self._attend(q[rows], k, v, req.mask)
        if new_k:
            # the step's first-step requests, in batch order: the order of the cross slot mapping
            metadata = get_forward_context().attn_metadata[xa.attn.layer_name]
            xa.attn.impl.do_kv_cache_update(xa.attn, torch.cat(new_k), torch.cat(new_v), kv_cache,
                                            metadata.slot_mapping)
        decode = plan.decode
        if decode is not None and decode.whole:
            # every decode row sees all of its request's cached keys, which is what vLLM's own cross-attention
            # computes for every row of the step from the cache in place (the prefill rows' keys are written above;
            # rows of requests without images get garbage there and are not taken)
            out = xa.attn(q.reshape(tokens, -1), None, None).view(tokens, xa.num_heads, xa.head_dim)
            attn[decode.rows] = out[decode.rows]
        elif decode is not None:
            layout = cache_layout(xa.attn, kv_cache, xa.num_kv_heads, xa.head_dim)
            attn[decode.rows] = decode_attention(q[decode.rows], kv_cache, layout, decode, xa.scaling)
        out, _ = xa.o_proj(attn.view(tokens, -1))
        hidden_states = FF.gated_residual(hidden_states, out, self.cross_attn_attn_gate, row_gate=plan.attn_rows)
        branch = self.mlp(self.post_attention_layernorm(hidden_states))
        return FF.gated_residual(hidden_states, branch, self.cross_attn_mlp_gate, row_gate=plan.sees)


EMPTY_ROWS_ENV = "FASTFLAMINGO_VLLM_EMPTY_ROWS"


def empty_rows_option(hf_config) -> str:
    """``empty_rows`` for rows before a prompt's first image: ``hf_overrides={"fastflamingo_empty_rows": "zero"}``
    (the engine's own option), else the environment variable ``FASTFLAMINGO_VLLM_EMPTY_ROWS``, else ``"hf"``."""
    import os

    value = getattr(hf_config, "fastflamingo_empty_rows", None) or os.environ.get(EMPTY_ROWS_ENV) or "hf"
    if value not in ("hf", "zero"):
        raise ValueError(f"empty_rows={value!r} (hf_overrides 'fastflamingo_empty_rows' or {EMPTY_ROWS_ENV}); "
                         f"expected 'hf' (transformers) or 'zero' (Meta's reference)")
    return value
