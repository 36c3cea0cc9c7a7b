"""mllama's (Llama 3.2 Vision) entry in the model registry (``fastflamingo.models.FAMILIES``)."""
from __future__ import annotations

from typing import Iterator

from torch import nn

from .. import _warm
from .._family import Family
from . import mask, rules
from .layers import MllamaCrossAttentionDecoderLayer, MllamaTextCrossAttention, MllamaTextMLP
from .warm import MllamaXattn


def warmup_shapes(module: nn.Module) -> Iterator[object]:
    """The ops one drop-in launches: the MLP's projection is gated by the row flag (``full_text_row_masked_out_
    mask``), the attention's only in ``empty_rows="zero"`` mode."""
    if isinstance(module, MllamaTextCrossAttention):
        yield MllamaXattn(module.num_heads, module.num_key_value_heads, module.head_dim, module.tokens_per_tile,
                          module.max_num_tiles)
    if not isinstance(module, MllamaCrossAttentionDecoderLayer):
        return
    # a replaced attention or MLP is called as written, with no gated projection (the layer's forward)
    if isinstance(module.cross_attn, MllamaTextCrossAttention):
        yield _warm.GatedLinear(module.cross_attn.o_proj, module.cross_attn_attn_gate, module.empty_rows == "zero")
    if isinstance(module.mlp, MllamaTextMLP):
        yield _warm.GatedLinear(module.mlp.down_proj, module.cross_attn_mlp_gate, True)


FAMILY = Family(
    name="mllama",
    upstream="transformers 5.x",
    model_classes=("MllamaForConditionalGeneration", "MllamaModel", "MllamaForCausalLM"),
    replaces=("MllamaCrossAttentionDecoderLayer", "MllamaTextCrossAttention"),
    ops=("mllama_xattn", "mllama_decode", "gated_linear"),
    mask=mask,
    rules=rules.rules,
    warmup_shapes=warmup_shapes,
)
