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
into the cross-attention cache and attends with per-token image ranges (:mod:`.intervals`); decode steps attend on
the cache blocks holding the key range of the prompt's last token, all decode rows of the step together
(:mod:`.paged`). ``empty_rows``: :func:`empty_rows_option`. docs/vllm_notes.md has the design and
what was measured.

The multimodal processing is in :mod:`.processing`, the cross-attention decoder layers in :mod:`.cross_layers`.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.llama import LlamaDecoderLayer
from vllm.model_executor.models.utils import maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..models.mllama.mask import ALL_KEYS, MllamaMask
from .cross_layers import MllamaCrossAttentionDecoderLayer, RequestImages, StepPlan, empty_rows_option, interval_runs
from .intervals import prompt_image_ranges
from .paged import DecodeRows
from .vision import ATTENTION as VISION_ATTENTION, install as install_vision_attention, padding_only
from .processing import IMAGE_FIELDS, MllamaDummyInputsBuilder, MllamaMultiModalProcessor, MllamaProcessingInfo


# ------------------------------------------------------------------------------------------------------- text model

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
        install_vision_attention()
        vision_config._attn_implementation = VISION_ATTENTION  # the padding-split attention (.vision)
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
        fields = [kwargs[name] for name in IMAGE_FIELDS]
        fields = [list(f) if isinstance(f, (list, tuple)) else list(f.unbind(0)) for f in fields]
        vision = self.config.vision_config
        per_tile = (vision.image_size // vision.patch_size) ** 2 + 1
        dtype = self.multi_modal_projector.weight.dtype
        outputs = []
        for pixels, ratio_ids, ratio_mask, num_tiles in zip(*fields):
            with padding_only():
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
        decode_rows, decode_tables, decode_ranges, decode_cached = [], [], [], []
        for r, n in enumerate(enc_lens):
            a, b = qsl[r], qsl[r + 1]
            if n == 0 or a == b:
                continue
            first_block = int(metadata.block_table[r, 0])
            req = RequestImages(a, b, starts[r] == 0, n, metadata.block_table[r, :(n + block_size - 1) // block_size])
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
                                      has_all=ALL_KEYS in start, max_runs=interval_runs(start, end))
                sees[a:b] = torch.tensor(hi) > 0
                # decode tokens see what the last prompt token sees (transformers' generate repeats that mask row)
                offsets = [0]
                for k in keys:
                    offsets.append(offsets[-1] + k)
                if offsets[hi[-1]] <= offsets[lo[-1]]:  # the last token follows an image: it sees at least one
                    raise RuntimeError(f"fastflamingo.vllm: the last prompt token sees no image key "
                                       f"({lo[-1]}, {hi[-1]}); decode steps would have nothing to attend to")
                self._decode_ranges[first_block] = (offsets[lo[-1]], offsets[hi[-1]])
            else:
                if first_block not in self._decode_ranges:
                    raise RuntimeError(f"fastflamingo.vllm: a decode step for cross block {first_block} has no "
                                       f"image range from its prefill")
                req.key_range = self._decode_ranges[first_block]
                sees[a:b] = True
                for row in range(a, b):
                    decode_rows.append(row)
                    decode_tables.append(req.blocks)
                    decode_ranges.append(req.key_range)
                    decode_cached.append(n)
            attn_rows[a:b] = True
            requests.append(req)
        if next(outputs, None) is not None:
            raise RuntimeError("fastflamingo.vllm: more encoder outputs than prefill requests with images")
        if zero:
            attn_rows &= sees
        decode = DecodeRows.build(decode_rows, decode_tables, decode_ranges, decode_cached, block_size,
                                  input_ids.device) if decode_rows else None
        return StepPlan(requests, sees.to(input_ids.device), attn_rows.to(input_ids.device), metadata, decode)

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
