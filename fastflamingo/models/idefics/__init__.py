"""The IDEFICS family: drop-in modules for Hugging Face IDEFICS (transformers ``models/idefics``), its mask
recovery (``mask.py``, ``model_mask.py``) and its patch rules (``rules.py``).

Constructor arguments, submodule names and state_dict keys are those of upstream's
``IdeficsGatedCrossAttentionLayer`` and ``IdeficsPerceiverResampler``, so
``load_state_dict(upstream.state_dict(), strict=True)`` works in both directions. transformers is not imported:
the config is any object (or dict) with IdeficsConfig's attributes, read with upstream's defaults.

Inside a patched ``IdeficsModel`` the gated layers take the closed-form mask that the model's forward derives from
its (batch, text, num_images) argument (``model_mask.py``); called on their own they recover it from the expanded
mask they receive with :func:`mask.idefics_media_mask` (see there how).

Divergences from upstream, all deliberate:

- ``alpha_type="float"`` with a normal initializer raises a TypeError upstream (``torch.normal(size=(1))``); here
  it draws a (1,)-shaped normal sample, as intended.
- A token that sees no image gets an attention output of exactly 0 from ``cross_attn``, where upstream averages
  every key (uniform softmax over ``finfo.min`` scores). The layer's ``cross_attention_gate`` zeroes those rows on
  both sides, so the layer output is the same; the difference is that fp16 can no longer give NaN gradients there.
- ``image_attention_mask=None`` means every token sees every key (upstream's eager attention); upstream's sdpa path
  would apply a causal mask over (text, keys) because ``IdeficsAttention.is_causal`` is True.
"""
from .attention import IdeficsCrossAttention, IdeficsRMSNorm
from .family import FAMILY
from .layer import IdeficsGatedCrossAttentionLayer, IdeficsMLP
from .mask import idefics_media_mask
from .perceiver import IdeficsPerceiverAttention, IdeficsPerceiverMLP, IdeficsPerceiverResampler

__all__ = [
    "IdeficsGatedCrossAttentionLayer",
    "IdeficsCrossAttention",
    "IdeficsMLP",
    "IdeficsRMSNorm",
    "IdeficsPerceiverResampler",
    "IdeficsPerceiverAttention",
    "IdeficsPerceiverMLP",
    "idefics_media_mask",
    "FAMILY",
]
