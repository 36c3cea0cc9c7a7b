"""``fastflamingo.vllm``: a vLLM general plugin that serves Llama 3.2 Vision (``MllamaForConditionalGeneration``) on
vLLM's V1 engine (issue 21; vLLM dropped the model after 0.10.2).

vLLM finds :func:`register` through the ``vllm.general_plugins`` entry point and calls it in every process that
builds or runs models (the front end, the engine core, each worker), possibly more than once, so it is idempotent and
imports vLLM only when called: ``import fastflamingo`` and ``import fastflamingo.vllm`` need only torch.

Status (phase 2): text-only prompts and prompts with images generate through ``vllm.LLM`` on vLLM's CPU backend
(docs/vllm_notes.md says what is built and measured).
"""
from __future__ import annotations

MODEL_ARCH = "MllamaForConditionalGeneration"
MODEL_REF = "fastflamingo.vllm.mllama:MllamaForConditionalGeneration"

_registered = False


def register() -> None:
    """Register the mllama model with vLLM's model registry and make mllama configs encoder-decoder configs."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.models import ModelRegistry

    from .config import register_config

    register_config()
    _refuse_image_tokens_without_images()
    _one_uuid_per_image_set()
    # the string form imports the model module lazily (in vLLM's inspection subprocess and in the workers)
    ModelRegistry.register_model(MODEL_ARCH, MODEL_REF)
    _registered = True


def _refuse_image_tokens_without_images() -> None:
    """A prompt with ``<|image|>`` tokens and no image never reaches the multimodal processor (vLLM renders prompts
    without multimodal data as plain tokens), which is where mismatched counts are refused; vLLM 0.32 has no model
    hook for plain prompts, so the renderer's token step is wrapped (sync and async) to refuse them for mllama
    models with the processor's message. transformers' processor refuses the same prompts."""
    from vllm.renderers.base import BaseRenderer

    if getattr(BaseRenderer._process_tokens, "_fastflamingo", False):
        return

    def check(renderer, prompt) -> None:
        hf_config = renderer.model_config.hf_config
        if getattr(hf_config, "model_type", None) != "mllama" or prompt.get("multi_modal_data"):
            return
        image_token = hf_config.image_token_index
        count = sum(1 for t in prompt["prompt_token_ids"] if t == image_token)
        if count:
            raise ValueError(f"the prompt has {count} <|image|> token(s) but 0 image(s); each image needs its own "
                             f"<|image|> token where it belongs in the text")

    sync, async_ = BaseRenderer._process_tokens, BaseRenderer._process_tokens_async

    def _process_tokens(self, prompt, **kwargs):
        check(self, prompt)
        return sync(self, prompt, **kwargs)

    async def _process_tokens_async(self, prompt, **kwargs):
        check(self, prompt)
        return await async_(self, prompt, **kwargs)

    _process_tokens._fastflamingo = _process_tokens_async._fastflamingo = True
    BaseRenderer._process_tokens, BaseRenderer._process_tokens_async = _process_tokens, _process_tokens_async


def _one_uuid_per_image_set() -> None:
    """The chat front end sends one multimodal UUID per image (None where the client gave none), while the plugin's
    data parser makes all of a prompt's images one item, and vLLM's renderer then refuses the request ("multi_modal_uuids
    ... must have same length"). For mllama configs the renderer's UUID step is wrapped to give the image set one
    UUID: the client's UUIDs joined when it gave one for every image, else None (vLLM hashes the content)."""
    from vllm.renderers.base import BaseRenderer

    if getattr(BaseRenderer._process_mm_uuids, "_fastflamingo", False):
        return
    original = BaseRenderer._process_mm_uuids

    def _process_mm_uuids(self, mm_data, mm_data_items, mm_uuid_items, mm_req_id):
        uuids = mm_uuid_items.get("image") if mm_uuid_items else None
        if (getattr(self.model_config.hf_config, "model_type", None) == "mllama" and uuids is not None
                and not isinstance(uuids, str) and len(uuids) != 1 and "image" in mm_data_items
                and mm_data_items["image"].get_count() == 1):
            joined = None if any(u is None for u in uuids) else "+".join(uuids)
            mm_uuid_items = {**mm_uuid_items, "image": [joined]}
        return original(self, mm_data, mm_data_items, mm_uuid_items, mm_req_id)

    _process_mm_uuids._fastflamingo = True
    BaseRenderer._process_mm_uuids = _process_mm_uuids


__all__ = ["register", "MODEL_ARCH", "MODEL_REF"]
