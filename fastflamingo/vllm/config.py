"""Make vLLM treat mllama checkpoints as encoder-decoder models.

vLLM switches to its encoder-decoder machinery (a cross-attention KV cache group, encoder outputs handed to
``forward`` on a request's first step, no chunked prefill) when ``hf_config.is_encoder_decoder`` is true. transformers'
``MllamaConfig`` says False, and vLLM reads the flag (a cached property of its ``ModelConfig``) before any
per-architecture config hook runs, so the flag has to be right on the config object that transformers builds:
:func:`register_config` registers, for model type ``mllama``, a ``MllamaConfig`` subclass whose instances say True.
``AutoConfig`` then builds it for every mllama checkpoint in this process; nothing else about the config changes.
"""
from __future__ import annotations

from transformers import AutoConfig, MllamaConfig


class EncoderDecoderMllamaConfig(MllamaConfig):
    """transformers' ``MllamaConfig`` with ``is_encoder_decoder = True`` (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        kwargs["is_encoder_decoder"] = True
        super().__init__(*args, **kwargs)
        # transformers may drop or reset the base class's keyword; the attribute is what vLLM reads
        self.is_encoder_decoder = True


def register_config() -> None:
    """Register :class:`EncoderDecoderMllamaConfig` for model type ``mllama`` with ``AutoConfig`` (idempotent)."""
    AutoConfig.register("mllama", EncoderDecoderMllamaConfig, exist_ok=True)
