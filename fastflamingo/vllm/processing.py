"""vLLM multimodal processing for Llama 3.2 Vision: all images of a prompt as one multimodal item
(:class:`MllamaImageSet`; vLLM 0.32 schedules no encoder item whose encoder-prompt position lies past the decoder
prompt, so a second item would never be encoded), transformers' image processor, and an encoder prompt of the real
tiles only (the size of each request's cross-attention cache). docs/vllm_notes.md says what was measured."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

from transformers import BatchFeature, MllamaConfig
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import MultiModalDataParser, ProcessorBatchItems
from vllm.multimodal.processing import (BaseDummyInputsBuilder, BaseProcessingInfo, EncDecMultiModalProcessor,
                                        PromptReplacement)


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


IMAGE_FIELDS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "num_tiles")


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
        feats = {k: out[k] for k in IMAGE_FIELDS[:3]}
        feats["num_tiles"] = feats["aspect_ratio_mask"].sum(-1)
        return BatchFeature(feats)

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        return {k: MultiModalFieldConfig.batched("image") for k in IMAGE_FIELDS}

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        image_token = self.info.get_hf_config().image_token_index
        per_tile = self.info.get_tokens_per_tile()

        def replacement(item_idx: int) -> list:
            num_tiles = out_mm_kwargs["image"][item_idx]["num_tiles"].data
            return [image_token] * (int(num_tiles.sum()) * per_tile)

        return [PromptReplacement(modality="image", target=[image_token], replacement=replacement)]
