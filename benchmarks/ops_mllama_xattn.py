"""Op ``mllama_xattn``: Llama 3.2 Vision cross-attention prefill, one ``MllamaCrossAttentionDecoderLayer``
(``layer`` cells) and the attention core on the cache layout with transformers' additive mask (``core`` cells).
Cells, inputs, the fp32 reference, work and providers are in benchmarks/mllama.py, shared with ``mllama_decode``.
"""
from __future__ import annotations

from .mllama import PREFILL_OP, make_inputs, prefill_cases, reference, register_providers, tiny, work
from .registry import Op, register_op

register_op(Op(PREFILL_OP, "Llama 3.2 Vision cross-attention: decoder layer and attention core, prefill",
               prefill_cases, make_inputs, reference, work, tiny, default_devices=("cuda",)))
register_providers(PREFILL_OP)
