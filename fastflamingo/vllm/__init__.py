"""``fastflamingo.vllm``: a vLLM general plugin that serves Llama 3.2 Vision (``MllamaForConditionalGeneration``) on
vLLM's V1 engine (issue 21; vLLM dropped the model after 0.10.2).

vLLM finds :func:`register` through the ``vllm.general_plugins`` entry point and calls it in every process that
builds or runs models (the front end, the engine core, each worker), possibly more than once, so it is idempotent and
imports vLLM only when called: ``import fastflamingo`` and ``import fastflamingo.vllm`` need only torch.

Status (phase 1): text-only prompts generate through ``vllm.LLM``; prompts with images are refused with a
per-request error until the cross-attention layers read vLLM's cross-attention KV cache (docs/vllm_notes.md has the
design).
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
    # the string form imports the model module lazily (in vLLM's inspection subprocess and in the workers)
    ModelRegistry.register_model(MODEL_ARCH, MODEL_REF)
    _registered = True


__all__ = ["register", "MODEL_ARCH", "MODEL_REF"]
