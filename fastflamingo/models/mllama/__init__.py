"""The mllama family: drop-in modules, the kernels' front end, mask and patch rules for transformers' mllama
(Llama 3.2 Vision) cross-attention.

- :class:`MllamaCrossAttentionDecoderLayer`, :class:`MllamaTextCrossAttention`: transformers' signatures, parameter
  names and state_dict keys (``fastflamingo.patch`` swaps them into ``MllamaForConditionalGeneration``,
  ``MllamaModel`` and ``MllamaForCausalLM``);
- :func:`mllama_xattn`: the attention core (interval-masked GQA; Triton prefill/backward/decode kernels, PyTorch path);
- :mod:`fastflamingo.models.mllama.mask`: the closed form of the cross-attention mask (:class:`MllamaMask`).

``import fastflamingo.models.mllama`` needs only torch.
"""
from . import mask
from .family import FAMILY
from .functional import mllama_xattn
from .layers import MllamaCrossAttentionDecoderLayer, MllamaTextCrossAttention, MllamaTextMLP, MllamaTextRMSNorm
from .mask import MllamaMask

__all__ = ["MllamaCrossAttentionDecoderLayer", "MllamaTextCrossAttention", "MllamaTextMLP", "MllamaTextRMSNorm",
           "MllamaMask", "mllama_xattn", "mask", "FAMILY"]
