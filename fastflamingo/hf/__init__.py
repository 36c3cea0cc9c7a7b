"""The routes by which transformers users reach fastflamingo without calling ``fastflamingo.patch`` after loading.

- ``attn_implementation="fastflamingo"`` (:func:`register`, ``attention.py``): transformers' modules stay, their
  cross-attention calls run fastflamingo's ops;
- load-time drop-ins (:func:`register_dropins`, :func:`dropins`, ``load.py``): transformers builds fastflamingo's
  layers itself while ``from_pretrained`` / ``from_config`` build the model;
- a Hugging Face kernel repository for ``kernels.kernelize`` (``hub.py``: ``python -m fastflamingo.hf.hub build DIR``).

Importing this package needs only torch; each route imports transformers (and ``kernels``) when it is used.

::

    import fastflamingo
    fastflamingo.register()             # once per process; returns "fastflamingo"
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
from .load import dropins, register_dropins, registered_options, unregister_dropins


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


__all__ = ["NAME", "attention", "register", "register_dropins", "unregister_dropins", "dropins",
           "registered_options"]
