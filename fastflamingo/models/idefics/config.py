"""IDEFICS config access without importing transformers: any object with IdeficsConfig's attributes, or a plain
dict, read with upstream's defaults; and the activations upstream's MLPs use."""
from __future__ import annotations

from functools import partial
from typing import Any, Optional

from torch import nn

# IdeficsConfig's defaults (transformers models/idefics/configuration_idefics.py), used for missing attributes.
DEFAULTS = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_attention_heads=32,
    dropout=0.0,
    hidden_act="silu",
    alpha_initializer="zeros",
    alphas_initializer_range=0.0,
    alpha_type="float",
    rms_norm_eps=1e-6,
    qk_layer_norms=False,
)
PERCEIVER_DEFAULTS = dict(qk_layer_norms_perceiver=False)


def get(config: Any, name: str, defaults: Optional[dict] = None):
    if isinstance(config, dict):
        if name in config:
            return config[name]
    elif hasattr(config, name):
        return getattr(config, name)
    if defaults is not None and name in defaults:
        return defaults[name]
    raise AttributeError(f"the IDEFICS config ({type(config).__name__}) has no attribute {name!r}")


def has(config: Any, name: str) -> bool:
    return name in config if isinstance(config, dict) else hasattr(config, name)


def vision_embed_dim(config: Any) -> Optional[int]:
    vision = get(config, "vision_config", {"vision_config": None})
    return None if vision is None or not has(vision, "embed_dim") else get(vision, "embed_dim")


def latents_per_image(config: Any) -> Optional[int]:
    """Keys per image in the ``image_hidden_states`` IdeficsModel gives a gated layer, as the config implies: the
    resampler's latents, or without a resampler the vision encoder's tokens at the configured image size (patches
    and the class token). None when the config does not say. A hint only: ``interpolate_pos_encoding`` or
    precomputed embeddings can give other counts, which callers must check."""
    try:
        if get(config, "use_resampler", {"use_resampler": False}):
            return int(get(get(config, "perceiver_config"), "resampler_n_latents", {"resampler_n_latents": 64}))
        vision = get(config, "vision_config")
        return (int(get(vision, "image_size")) // int(get(vision, "patch_size"))) ** 2 + 1
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):
        return None


_ACTIVATIONS = {
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "gelu": nn.GELU,  # transformers' GELUActivation is the exact (erf) GELU
    "gelu_pytorch_tanh": partial(nn.GELU, approximate="tanh"),
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


def activation(name: str) -> nn.Module:
    if name in _ACTIVATIONS:
        return _ACTIVATIONS[name]()
    # Rare names (gelu_new, quick_gelu, ...): use transformers' own definition so the math is upstream's.
    from transformers.activations import ACT2FN

    return ACT2FN[name]
