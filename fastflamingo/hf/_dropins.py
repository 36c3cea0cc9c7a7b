"""fastflamingo's drop-ins built from the arguments transformers passes the upstream constructors (the text config
and the layer index), holding what ``fastflamingo.patch`` gives the drop-ins it builds from upstream modules:
transformers' own activation module (``ACT2FN``: a hub kernel mapped to it keeps applying) and, for IDEFICS, the
rotary embedding upstream's cross attention builds and never uses (its non-persistent buffers follow ``.to()`` and
``unpatch``). Used where transformers builds the model: the load-time factories (``load.py``) and the kernel
repository's layouts (``hub_layers.py``); transformers is imported only when a drop-in is built.
"""
from __future__ import annotations

from torch import nn


def activation(name: str) -> nn.Module:
    """The activation module upstream's MLPs build for ``name``."""
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def complete_mllama_layer(layer: nn.Module, config) -> nn.Module:
    layer.mlp.act_fn = activation(config.hidden_act)
    return layer


def complete_idefics_layer(layer: nn.Module, config) -> nn.Module:
    from transformers.models.idefics.modeling_idefics import IdeficsRotaryEmbedding

    layer.mlp.act_fn = activation(config.hidden_act)
    layer.cross_attn.rotary_emb = IdeficsRotaryEmbedding(config)
    return layer


__all__ = ["activation", "complete_mllama_layer", "complete_idefics_layer"]
