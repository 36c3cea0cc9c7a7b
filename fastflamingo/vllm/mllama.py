"""Llama 3.2 Vision (``MllamaForConditionalGeneration``) for vLLM's V1 engine, as an encoder-decoder model.

Layout follows transformers' checkpoints (``vision_model``, ``multi_modal_projector``, ``language_model.model``,
``language_model.lm_head``), so a Hugging Face mllama checkpoint loads by name; newer checkpoints that spell the
prefixes ``model.language_model.`` etc. are mapped back (:func:`_checkpoint_name`).

- Self-attention decoder layers: vLLM's ``LlamaDecoderLayer`` (paged KV cache, the platform's attention backend).
- Cross-attention decoder layers: ``q_proj`` / ``kv_proj`` / ``o_proj`` as vLLM parallel linears, ``q_norm`` /
  ``k_norm``, the tanh gates, and a ``CrossAttention`` module, which gives the layer its share of vLLM's
  cross-attention KV cache (``CrossAttentionSpec``): docs/vllm_notes.md explains why the images' K/V are to live
  there and how the per-token image intervals are to be computed.

Phase 1 (this module): text-only prompts. The processor refuses a prompt with images (a per-request ValueError);
a prompt without images leaves the request's cross-attention KV cache empty, and transformers then skips the
cross-attention layers, which :meth:`MllamaForConditionalGeneration.forward` does too. vLLM's GPU start-up profiles
the encoder with dummy images through the same processor, so phase 1 starts on the CPU backend only (which does not
profile).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Optional

import torch
from torch import nn
from transformers import MllamaConfig
from vllm.config import VllmConfig
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
from vllm.multimodal.processing import BaseDummyInputsBuilder, BaseProcessingInfo, EncDecMultiModalProcessor
from vllm.v1.attention.backend import AttentionType


# ----------------------------------------------------------------------------------------------- multimodal processing

class MllamaProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self) -> MllamaConfig:
        return self.ctx.get_hf_config(MllamaConfig)

    def get_supported_mm_limits(self) -> Mapping[str, Optional[int]]:
        # any number of images per prompt. (A limit of 0 would size vLLM's encoder cache to 0, and vLLM then refuses
        # even text-only prompts of an encoder-decoder model: "encoder prompt (length 0) ... maximum model length of
        # 0".)
        return {"image": None}

    def get_tokens_per_tile(self) -> int:
        vision = self.get_hf_config().vision_config
        return (vision.image_size // vision.patch_size) ** 2 + 1

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        # one image's encoder tokens when all its tiles are real; answered here so that vLLM does not run the HF
        # processor on a dummy image to find out
        return {"image": self.get_hf_config().vision_config.max_num_tiles * self.get_tokens_per_tile()}


class MllamaDummyInputsBuilder(BaseDummyInputsBuilder[MllamaProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return "<|image|>" * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        vision = self.info.get_hf_config().vision_config
        # a 1 x max_tiles canvas: the largest number of tiles an image can have
        return {"image": self._get_dummy_images(width=vision.image_size,
                                                height=vision.image_size * vision.max_num_tiles,
                                                num_images=mm_counts.get("image", 0))}


class MllamaMultiModalProcessor(EncDecMultiModalProcessor[MllamaProcessingInfo]):
    # the decoder prompt is the user's prompt, BOS included, exactly as transformers' processor tokenizes it
    skip_decoder_start_token = True

    def apply(self, inputs, timing_ctx):
        num_images = inputs.mm_data_items.get_count("image", strict=False)
        if num_images:
            # a per-request error (HTTP 400 from the server); the engine goes on serving other requests
            raise ValueError(f"fastflamingo.vllm does not serve images yet (phase 1: text-only); the prompt has "
                             f"{num_images} image(s)")
        return super().apply(inputs, timing_ctx)

    def create_encoder_prompt(self, prompt, mm_items):
        # text-only prompts (phase 1, see apply) have an empty encoder prompt
        return []

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        return {}

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        return []


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


class MllamaCrossAttentionDecoderLayer(nn.Module):
    """A cross-attention decoder layer's parameters, named as in transformers. Phase 1 never runs it: with no image
    in any request, transformers skips the layer (the model's ``forward`` does the same)."""

    def __init__(self, config, *, cache_config=None, quant_config=None, prefix: str = ""):
        super().__init__()
        self.cross_attn = MllamaCrossAttention(config, cache_config=cache_config, quant_config=quant_config,
                                               prefix=f"{prefix}.cross_attn")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                            quant_config=quant_config, prefix=f"{prefix}.mlp")
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))


class MllamaTextModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config.text_config
        cache_config, quant_config = vllm_config.cache_config, vllm_config.quant_config
        # 8 embedding rows past the vocabulary: the image token and spares (transformers' layout)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size + 8, config.hidden_size)
        self.cross_attention_layers = set(config.cross_attention_layers)
        layers = []
        for idx in range(config.num_hidden_layers):
            layer_prefix = f"{prefix}.layers.{idx}"
            if idx in self.cross_attention_layers:
                layers.append(MllamaCrossAttentionDecoderLayer(config, cache_config=cache_config,
                                                               quant_config=quant_config, prefix=layer_prefix))
            else:
                layers.append(LlamaDecoderLayer(vllm_config, prefix=layer_prefix, config=config))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        residual = None
        for idx, layer in enumerate(self.layers):
            if idx in self.cross_attention_layers:
                continue  # no request has images (phase 1): transformers skips these layers too
            hidden_states, residual = layer(positions, hidden_states, residual)
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
        # transformers' vision tower (replicated on every tensor-parallel rank); the images' path is phase 2
        vision_config = config.vision_config
        vision_config._attn_implementation = "sdpa"
        self.vision_model = MllamaVisionModel(vision_config)
        self.multi_modal_projector = nn.Linear(vision_config.vision_output_dim, config.text_config.hidden_size)
        self.language_model = MllamaForCausalLM(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "language_model"))
        self.logits_processor = LogitsProcessor(config.text_config.vocab_size)

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
        raise RuntimeError("fastflamingo.vllm: image inputs are not served yet (phase 1: the processor refuses "
                           "prompts with images, so vLLM should never ask for image embeddings)")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: Optional[torch.Tensor] = None, encoder_outputs: Optional[list] = None,
                **kwargs: object) -> torch.Tensor:
        if encoder_outputs:
            raise RuntimeError("fastflamingo.vllm: encoder outputs reached a phase-1 model, which takes no images")
        return self.language_model.model(input_ids, positions, inputs_embeds)

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
