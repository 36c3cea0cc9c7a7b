"""Llama 3.2 Vision (``MllamaForConditionalGeneration``) for vLLM's V1 engine, as an encoder-decoder model.

Layout follows transformers' checkpoints (``vision_model``, ``multi_modal_projector``, ``language_model.model``,
``language_model.lm_head``), so a Hugging Face mllama checkpoint loads by name; newer checkpoints that spell the
prefixes ``model.language_model.`` etc. are mapped back (:func:`_checkpoint_name`).

- Self-attention decoder layers: vLLM's ``LlamaDecoderLayer`` (paged KV cache, the platform's attention backend).
- Cross-attention decoder layers: ``q_proj`` / ``kv_proj`` / ``o_proj`` as vLLM parallel linears, ``q_norm`` /
  ``k_norm``, the tanh gates, and a ``CrossAttention`` module, which gives the layer its share of vLLM's
  cross-attention KV cache (``CrossAttentionSpec``); the attention itself is fastflamingo's ``mllama_xattn``.

Images: all images of a prompt travel as one multimodal item (:class:`MllamaImageSet`); ``embed_multimodal`` runs
transformers' vision tower and the projector once per request and returns the real tiles' rows; on the request's
prefill step every cross layer projects K/V from the padded output (transformers' key layout), writes the real rows
into the cross-attention cache and attends with per-token image ranges (:mod:`.intervals`); decode steps gather
the cached rows through the block table (vLLM's CPU backend layout, :func:`read_cross_kv`) and attend to the key
range of the prompt's last token. ``empty_rows``: :func:`empty_rows_option`. docs/vllm_notes.md has the design and
what was measured.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Optional

import torch
from torch import nn
from transformers import BatchFeature, MllamaConfig
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention.cross_attention import CrossAttention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaMLP
from vllm.model_executor.models.utils import maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import MultiModalDataParser, ProcessorBatchItems
from vllm.multimodal.processing import (BaseDummyInputsBuilder, BaseProcessingInfo, EncDecMultiModalProcessor,
                                        PromptReplacement)
from vllm.v1.attention.backend import AttentionType

from .. import functional as FF
from ..models.mllama.functional import mllama_xattn
from ..models.mllama.mask import ALL_KEYS, MllamaMask
from .intervals import prompt_image_ranges


# ----------------------------------------------------------------------------------------------- multimodal processing

class MllamaImageSet(ProcessorBatchItems):
    """All images of one prompt as ONE multimodal item.

    vLLM 0.32 schedules, for an encoder-decoder model, only the encoder items whose offset in the *encoder* prompt
    lies below the end of the step's *decoder* window; with one item per image, every image after the first sits
    past a short decoder prompt and is never encoded (docs/vllm_notes.md, the runtime probe). One item at offset 0
    holding every image of the prompt is always scheduled on the request's first step."""

    def __init__(self, images):
        super().__init__([tuple(images)], "image")

    def images(self, index: int = 0) -> list:
        return [self._unwrap(image) for image in self.data[index]]

    def get_processor_data(self) -> Mapping[str, object]:
        # one HF sample of N images: the image processor pads them to (1, N, max_tiles, ...)
        return {"images": [self.images(i) for i in range(len(self.data))]}


class MllamaDataParser(MultiModalDataParser):
    def _parse_image_data(self, data):
        items = super()._parse_image_data(data)
        if items is None or isinstance(items, MllamaImageSet):
            return items
        if not isinstance(items, ProcessorBatchItems):
            raise ValueError("fastflamingo.vllm takes images (PIL images or arrays), not precomputed embeddings")
        return MllamaImageSet(items.get_all())


def image_count(items) -> int:
    """The number of images in a prompt's multimodal items (all in one :class:`MllamaImageSet`)."""
    if "image" not in items:
        return 0
    return sum(len(items["image"].data[i]) for i in range(items["image"].get_count()))


class MllamaProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self) -> MllamaConfig:
        return self.ctx.get_hf_config(MllamaConfig)

    def get_data_parser(self) -> MultiModalDataParser:
        return MllamaDataParser(expected_hidden_size=self._get_expected_hidden_size())

    def get_supported_mm_limits(self) -> Mapping[str, Optional[int]]:
        # open: the chat front end counts images against min(this, limit_mm_per_prompt) before the data parser makes
        # them one item (MllamaImageSet), so 1 would refuse every multi-image chat; the processor enforces the
        # user's limit itself. (A limit of 0 would size vLLM's encoder cache to 0, and vLLM then refuses even
        # text-only prompts of an encoder-decoder model.)
        return {"image": None}

    def get_tokens_per_tile(self) -> int:
        vision = self.get_hf_config().vision_config
        return (vision.image_size // vision.patch_size) ** 2 + 1

    def get_tokens_per_image(self) -> int:
        return self.get_hf_config().vision_config.max_num_tiles * self.get_tokens_per_tile()

    def get_max_images(self, seq_len: int) -> int:
        """Images per prompt: the user's ``limit_mm_per_prompt={"image": n}`` (vLLM's default 999 when unset), and at
        most what fits ``max_model_len`` encoder tokens with every tile real (vLLM refuses an encoder prompt longer
        than ``max_model_len``)."""
        user = self.ctx.get_mm_config().get_limit_per_prompt("image")
        return max(1, min(user, seq_len // self.get_tokens_per_image()))

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        # the one item of a prompt holds all of its images; answered here so that vLLM does not run the processor
        # on dummy images to find out
        return {"image": self.get_max_images(seq_len) * self.get_tokens_per_image()}


class MllamaDummyInputsBuilder(BaseDummyInputsBuilder[MllamaProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return "<|image|>" * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        vision = self.info.get_hf_config().vision_config
        # a 1 x max_tiles canvas: the largest number of tiles an image can have
        return {"image": self._get_dummy_images(width=vision.image_size,
                                                height=vision.image_size * vision.max_num_tiles,
                                                num_images=mm_counts.get("image", 0))}


_IMAGE_FIELDS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "num_tiles")


class MllamaMultiModalProcessor(EncDecMultiModalProcessor[MllamaProcessingInfo]):
    """Decoder prompt: the user's prompt, BOS included, with its ``<|image|>`` tokens as single tokens (positions and
    self-attention as in transformers). Encoder prompt: one placeholder for the prompt's image set, expanded to the
    sum over its images of ``num_tiles x tokens_per_tile`` (real tiles only: that is what the cross-attention KV
    cache holds). Item fields: the HF image processor's ``pixel_values`` (N, max_tiles, 3, H, W),
    ``aspect_ratio_ids`` (N,), ``aspect_ratio_mask`` (N, max_tiles) and ``num_tiles`` (N,)."""

    skip_decoder_start_token = True

    def apply(self, inputs, timing_ctx):
        num_images = image_count(inputs.mm_data_items)
        if num_images:
            limit = self.info.get_max_images(self.info.ctx.model_config.max_model_len)
            if num_images > limit:
                raise ValueError(f"the prompt has {num_images} images; at most {limit} fit (limit_mm_per_prompt and "
                                 f"max_model_len)")
        out = super().apply(inputs, timing_ctx)
        image_token = self.info.get_hf_config().image_token_index
        num_tokens = sum(1 for t in out["prompt_token_ids"] if t == image_token)
        if num_tokens != num_images:
            # transformers' MllamaProcessor refuses the same mismatch; a per-request error (HTTP 400 from the server)
            raise ValueError(f"the prompt has {num_tokens} <|image|> token(s) but {num_images} image(s); each image "
                             f"needs its own <|image|> token where it belongs in the text")
        return out

    def create_encoder_prompt(self, prompt, mm_items):
        return [self.info.get_hf_config().image_token_index] if image_count(mm_items) else []

    def _call_hf_processor(self, hf_data, hf_kwargs):
        # the image processor alone: the encoder prompt is placeholders, the decoder prompt vLLM's tokenization
        images = hf_data.get("images")
        if not images:
            return BatchFeature({})
        image_processor = self.info.get_hf_processor().image_processor
        out = image_processor(images=images, return_tensors="pt")
        feats = {k: out[k] for k in _IMAGE_FIELDS[:3]}
        feats["num_tiles"] = feats["aspect_ratio_mask"].sum(-1)
        return BatchFeature(feats)

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        return {k: MultiModalFieldConfig.batched("image") for k in _IMAGE_FIELDS}

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        image_token = self.info.get_hf_config().image_token_index
        per_tile = self.info.get_tokens_per_tile()

        def replacement(item_idx: int) -> list:
            num_tiles = out_mm_kwargs["image"][item_idx]["num_tiles"].data
            return [image_token] * (int(num_tiles.sum()) * per_tile)

        return [PromptReplacement(modality="image", target=[image_token], replacement=replacement)]


# ------------------------------------------------------------------------------------------------------- text model

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


class _Request:
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
    - ``sees`` (tokens,) bool: the row sees an image (transformers' ``full_text_row_masked_out_mask``);
    - ``attn_rows`` (tokens,) bool: the rows whose attention branch is added (every row of a request with images
      under ``empty_rows="hf"``; ``sees`` under ``"zero"``).
    Rows of requests without images get neither branch: the layer is the identity for them, as transformers skips
    cross-attention layers without ``cross_attention_states``.
    """

    def __init__(self, requests, sees, attn_rows, cross_metadata):
        self.requests, self.sees, self.attn_rows, self.metadata = requests, sees, attn_rows, cross_metadata

    @property
    def prefills(self):
        return [r for r in self.requests if r.prefill]


def _runs(start, end) -> int:
    return 1 + sum(1 for t in range(1, len(start)) if start[t] != start[t - 1] or end[t] != end[t - 1])


def read_cross_kv(kv_cache: torch.Tensor, blocks: torch.Tensor, n: int, num_kv_heads: int, head_dim: int):
    """A request's first ``n`` cross-attention K/V rows, (n, kv_heads, head_dim) each, gathered through its block
    ids from the CPU attention backend's cache: (num_blocks, kv_heads, block_size, 2 * head_dim), which viewed as
    (num_blocks, kv_heads, 2 * block_size, head_dim) holds K transposed ((head_dim, block_size) per block and head)
    in the first half and V plain in the second (checked by writing with the backend's own cache update and
    reading back)."""
    if kv_cache.dim() != 4 or kv_cache.shape[1] != num_kv_heads or kv_cache.shape[3] != 2 * head_dim:
        raise NotImplementedError(f"fastflamingo.vllm reads the cross-attention cache of vLLM's CPU backend only "
                                  f"(num_blocks, kv_heads, block_size, 2 * head_dim); got {tuple(kv_cache.shape)}")
    num_blocks, heads, block_size, _ = kv_cache.shape
    view = kv_cache.view(num_blocks, heads, 2 * block_size, head_dim)
    k = view[blocks, :, :block_size].reshape(-1, heads, head_dim, block_size)
    k = k.permute(0, 3, 1, 2).reshape(-1, heads, head_dim)[:n]
    v = view[blocks, :, block_size:].permute(0, 2, 1, 3).reshape(-1, heads, head_dim)[:n]
    return k, v


class MllamaCrossAttentionDecoderLayer(nn.Module):
    """transformers' ``MllamaCrossAttentionDecoderLayer`` on vLLM's batch::

        x = x + tanh(attn_gate) * o_proj(attn(RMSNorm(x)))      (rows of requests without images keep x;
                                                               "zero": rows that see no image keep x)
        x = x + tanh(mlp_gate) * F * mlp(RMSNorm(x))            (F: the row sees an image)

    The attention is fastflamingo's interval-masked GQA op (``mllama_xattn``: per run of tokens seeing the same
    images, only those images' keys, K/V never repeated); the gated residuals are ``fastflamingo.functional``'s
    (``gated_residual``: ``o_proj`` and ``down_proj`` are vLLM parallel linears, whose tensor-parallel reduction
    the fused ``gated_linear`` epilogue would skip). K/V are projected once per request, on its prefill step, and
    their real-tile rows written to vLLM's cross-attention KV cache; decode steps read them back."""

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
        for req in plan.requests:
            rows = slice(req.a, req.b)
            if req.prefill:
                k, v = self._project_kv(req.padded)
                new_k.append(k[req.real_index])
                new_v.append(v[req.real_index])
                attn[rows] = self._attend(q[rows], k, v, req.mask)
            else:
                k, v = read_cross_kv(kv_cache, req.blocks, req.enc_len, xa.num_kv_heads, xa.head_dim)
                lo, hi = req.key_range
                attn[rows] = self._attend(q[rows], k[lo:hi], v[lo:hi], None)
        if new_k:
            # the step's first-step requests, in batch order: the order of the cross slot mapping
            metadata = get_forward_context().attn_metadata[xa.attn.layer_name]
            xa.attn.impl.do_kv_cache_update(xa.attn, torch.cat(new_k), torch.cat(new_v), kv_cache,
                                            metadata.slot_mapping)
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


class MllamaTextModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config.text_config
        cache_config, quant_config = vllm_config.cache_config, vllm_config.quant_config
        self.empty_rows = empty_rows_option(vllm_config.model_config.hf_config)
        # 8 embedding rows past the vocabulary: the image token and spares (transformers' layout)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size + 8, config.hidden_size)
        self.cross_attention_layers = set(config.cross_attention_layers)
        layers = []
        for idx in range(config.num_hidden_layers):
            layer_prefix = f"{prefix}.layers.{idx}"
            if idx in self.cross_attention_layers:
                layers.append(MllamaCrossAttentionDecoderLayer(config, cache_config=cache_config,
                                                               quant_config=quant_config, prefix=layer_prefix,
                                                               empty_rows=self.empty_rows))
            else:
                layers.append(LlamaDecoderLayer(vllm_config, prefix=layer_prefix, config=config))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                inputs_embeds: Optional[torch.Tensor] = None, plan: Optional[StepPlan] = None) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        residual = None
        for idx, layer in enumerate(self.layers):
            if idx in self.cross_attention_layers:
                if plan is None:
                    continue  # no request of the step has images: transformers skips these layers too
                if residual is not None:  # vLLM's layers carry the residual stream unadded
                    hidden_states = hidden_states + residual
                    residual = None
                hidden_states = layer(hidden_states, plan)
                continue
            hidden_states, residual = layer(positions, hidden_states, residual)
        if residual is None:  # the last layer was a cross-attention layer
            return self.norm(hidden_states)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class MllamaForCausalLM(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config.text_config
        self.model = MllamaTextModel(vllm_config=vllm_config, prefix=f"{prefix}.model")
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
                                      prefix=f"{prefix}.lm_head")


# ------------------------------------------------------------------------------------------------------------ model

# checkpoint names -> this module's names: transformers >= 4.52 saves some checkpoints with these prefixes
_NEW_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_model.", "vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
)
# stacked parameters: (checkpoint piece, parameter piece, shard id, where)
_STACKED = (
    (".cross_attn.k_proj.", ".cross_attn.kv_proj.", "k", "language_model."),
    (".cross_attn.v_proj.", ".cross_attn.kv_proj.", "v", "language_model."),
    (".self_attn.q_proj.", ".self_attn.qkv_proj.", "q", "language_model."),
    (".self_attn.k_proj.", ".self_attn.qkv_proj.", "k", "language_model."),
    (".self_attn.v_proj.", ".self_attn.qkv_proj.", "v", "language_model."),
    (".mlp.gate_proj.", ".mlp.gate_up_proj.", 0, "language_model."),
    (".mlp.up_proj.", ".mlp.gate_up_proj.", 1, "language_model."),
)


def _checkpoint_name(name: str) -> str:
    for old, new in _NEW_PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


@MULTIMODAL_REGISTRY.register_processor(MllamaMultiModalProcessor, info=MllamaProcessingInfo,
                                        dummy_inputs=MllamaDummyInputsBuilder)
class MllamaForConditionalGeneration(nn.Module, SupportsMultiModal):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        from transformers.models.mllama.modeling_mllama import MllamaVisionModel

        config = vllm_config.model_config.hf_config
        self.config = config
        self.image_token_id = config.image_token_index
        # transformers' vision tower (replicated on every tensor-parallel rank)
        vision_config = config.vision_config
        vision_config._attn_implementation = "sdpa"
        self.vision_model = MllamaVisionModel(vision_config)
        self.multi_modal_projector = nn.Linear(vision_config.vision_output_dim, config.text_config.hidden_size)
        self.language_model = MllamaForCausalLM(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "language_model"))
        self.logits_processor = LogitsProcessor(config.text_config.vocab_size)
        # first cross-attention block id -> the decode key range [lo, hi) of the request holding that block: unique
        # among live requests and fixed over a request's life; the next owner's prefill overwrites the entry
        self._decode_ranges: dict = {}

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> Optional[str]:
        if modality.startswith("image"):
            return "<|image|>"
        raise ValueError(f"mllama takes images only, not {modality}")

    def get_language_model(self) -> nn.Module:
        return self.language_model

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings: Optional[MultiModalEmbeddings] = None,
                        *, is_multimodal: Optional[torch.Tensor] = None) -> torch.Tensor:
        # mllama's image tokens keep their own embedding: the images enter through cross-attention only
        return self.language_model.model.embed_tokens(input_ids)

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """One tensor per item (a prompt's image set): the projector output of the images' real tiles, the rows
        vLLM sizes the request's cross-attention cache for. The whole padded output (every tile, transformers' key
        layout) rides along as an attribute of that tensor for the request's prefill step, which needs it: under
        ``empty_rows="hf"`` the rows before the first image attend to every key, padded tiles included, and the
        cross layers project the cached K/V from it (vLLM hands ``forward`` the very tensors returned here)."""
        fields = [kwargs[name] for name in _IMAGE_FIELDS]
        fields = [list(f) if isinstance(f, (list, tuple)) else list(f.unbind(0)) for f in fields]
        vision = self.config.vision_config
        per_tile = (vision.image_size // vision.patch_size) ** 2 + 1
        dtype = self.multi_modal_projector.weight.dtype
        outputs = []
        for pixels, ratio_ids, ratio_mask, num_tiles in zip(*fields):
            states = self.vision_model(pixel_values=pixels[None].to(dtype), aspect_ratio_ids=ratio_ids[None],
                                       aspect_ratio_mask=ratio_mask[None]).last_hidden_state
            padded = self.multi_modal_projector(states).reshape(-1, self.config.text_config.hidden_size)
            num_tiles = [int(n) for n in num_tiles.flatten().tolist()]
            stride = vision.max_num_tiles * per_tile
            real_index = torch.cat([torch.arange(i * stride, i * stride + n * per_tile, device=padded.device)
                                    for i, n in enumerate(num_tiles)])
            real = padded[real_index]
            real._fastflamingo_images = (num_tiles, padded, real_index)
            outputs.append(real)
        return outputs

    def _plan(self, input_ids: torch.Tensor, positions: torch.Tensor, encoder_outputs) -> Optional[StepPlan]:
        """The step's :class:`StepPlan`, or None when no request of the step has images."""
        text = self.language_model.model
        first = text.layers[min(text.cross_attention_layers)].cross_attn.attn
        metadata = get_forward_context().attn_metadata
        if isinstance(metadata, list):
            raise NotImplementedError("fastflamingo.vllm does not support speculative decoding")
        metadata = None if metadata is None else metadata.get(first.layer_name)
        if metadata is None:
            return None
        enc_lens = metadata.seq_lens.tolist()
        if not any(enc_lens):
            return None
        qsl = metadata.query_start_loc.tolist()
        tokens = input_ids.shape[0]
        step_positions = positions[torch.tensor(qsl[:-1], device=positions.device).clamp(max=max(tokens - 1, 0))]
        starts = step_positions.tolist()
        img_start, img_end = prompt_image_ranges(input_ids[:qsl[-1]], metadata.query_start_loc, self.image_token_id)
        img_start, img_end = img_start.tolist(), img_end.tolist()
        vision = self.config.vision_config
        per_tile = (vision.image_size // vision.patch_size) ** 2 + 1
        stride = vision.max_num_tiles * per_tile
        block_size = first.kv_cache[0].shape[2] if isinstance(first.kv_cache, (list, tuple)) else \
            first.kv_cache.shape[2]
        zero = text.empty_rows == "zero"
        sees = torch.zeros(tokens, dtype=torch.bool)
        attn_rows = torch.zeros(tokens, dtype=torch.bool)
        outputs = iter(encoder_outputs or [])
        requests = []
        for r, n in enumerate(enc_lens):
            a, b = qsl[r], qsl[r + 1]
            if n == 0 or a == b:
                continue
            first_block = int(metadata.block_table[r, 0])
            req = _Request(a, b, starts[r] == 0, n, metadata.block_table[r, :(n + block_size - 1) // block_size].long())
            if req.prefill:
                out = next(outputs, None)
                images = getattr(out, "_fastflamingo_images", None)
                if images is None:
                    raise RuntimeError("fastflamingo.vllm: a prefill step's encoder output lacks its padded "
                                       "projector output (it did not come from this model's embed_multimodal)")
                num_tiles, req.padded, req.real_index = images
                keys = [t * per_tile for t in num_tiles]
                if sum(keys) != n or out.shape[0] != n:
                    raise RuntimeError(f"fastflamingo.vllm: encoder output of {out.shape[0]} rows for "
                                       f"{sum(keys)} real image tokens; the cross cache holds {n}")
                lo, hi = img_start[a:b], img_end[a:b]
                if zero:
                    start, end = lo, hi
                else:  # transformers: a row that sees no image attends to every key, padded tiles included
                    # (MllamaMask's form of such a row: start ALL_KEYS, end the image count)
                    start = [s if e else ALL_KEYS for s, e in zip(lo, hi)]
                    end = [e if e else len(keys) for e in hi]
                req.mask = MllamaMask(torch.tensor([start]), torch.tensor([end]), torch.tensor([keys]), stride,
                                      has_all=ALL_KEYS in start, max_runs=_runs(start, end))
                sees[a:b] = torch.tensor(hi) > 0
                # decode tokens see what the last prompt token sees (transformers' generate repeats that mask row)
                offsets = [0]
                for k in keys:
                    offsets.append(offsets[-1] + k)
                self._decode_ranges[first_block] = (offsets[lo[-1]], offsets[hi[-1]])
            else:
                if first_block not in self._decode_ranges:
                    raise RuntimeError(f"fastflamingo.vllm: a decode step for cross block {first_block} has no "
                                       f"image range from its prefill")
                req.key_range = self._decode_ranges[first_block]
                sees[a:b] = True
            attn_rows[a:b] = True
            requests.append(req)
        if next(outputs, None) is not None:
            raise RuntimeError("fastflamingo.vllm: more encoder outputs than prefill requests with images")
        if zero:
            attn_rows &= sees
        return StepPlan(requests, sees.to(input_ids.device), attn_rows.to(input_ids.device), metadata)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: Optional[torch.Tensor] = None, encoder_outputs: Optional[list] = None,
                **kwargs: object) -> torch.Tensor:
        plan = self._plan(input_ids, positions, encoder_outputs)
        return self.language_model.model(input_ids, positions, inputs_embeds, plan)

    def compute_logits(self, hidden_states: torch.Tensor) -> Optional[torch.Tensor]:
        return self.logits_processor(self.language_model.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            name = _checkpoint_name(name)
            for piece, stacked, shard, where in _STACKED:
                if piece in name and name.startswith(where):
                    target = name.replace(piece, stacked)
                    param = params[target]
                    param.weight_loader(param, tensor, shard)
                    loaded.add(target)
                    break
            else:
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                loaded.add(name)
        return loaded
