"""fastflamingo as a transformers attention implementation: ``attn_implementation="fastflamingo"``.

::

    import fastflamingo.hf
    fastflamingo.hf.register()          # once per process; returns "fastflamingo"
    model = MllamaForConditionalGeneration.from_pretrained(path, attn_implementation="fastflamingo")
    # or only the text model:  attn_implementation={"text_config": "fastflamingo", "vision_config": "sdpa"}
    # or on a loaded model:    model.set_attn_implementation("fastflamingo")

The cross-attention layers of mllama (Llama 3.2 Vision) and IDEFICS then run fastflamingo's ops; every other
attention call is transformers' SDPA (``attention.py`` says what runs where). Unlike :func:`fastflamingo.patch`,
the model's modules stay transformers' own: see docs/attn_implementation.md for what this route cannot do.

Registration is explicit: ``import fastflamingo`` needs only torch and never touches another library's global
registry; :func:`register` imports transformers and adds the name to its two registries.
"""
from __future__ import annotations

from .attention import NAME, attention


def register() -> str:
    """Register ``"fastflamingo"`` with transformers' ``AttentionInterface`` (the attention function) and
    ``AttentionMaskInterface`` (the mask function: transformers' SDPA one, so self-attention layers get the masks
    they get under ``"sdpa"``; without it they would get no mask at all). Idempotent; returns the name to pass as
    ``attn_implementation``."""
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


__all__ = ["NAME", "attention", "register"]
