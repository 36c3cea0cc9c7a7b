"""Op ``mllama_decode``: one decode step of a Llama 3.2 Vision cross-attention layer (one new token per sample, K/V
read from a ``DynamicCache`` filled by a prefill, a fresh mask tensor per call as the model rebuilds it every step).
Inputs, reference, work and providers are those of ``mllama_xattn`` (benchmarks/mllama.py): transformers'
layer with SDPA (the denominator) and eager attention, the fastflamingo drop-in (on CUDA the decode kernel reads the
cache and the mask in place, skipping the tiles no token sees, with no host synchronisation).
"""
from __future__ import annotations

from .mllama import DECODE_OP, decode_cases, make_inputs, reference, register_providers, tiny, work
from .registry import Op, register_op

register_op(Op(DECODE_OP, "Llama 3.2 Vision cross-attention layer: one decode step", decode_cases, make_inputs,
               reference, work, tiny, default_devices=("cuda",)))
register_providers(DECODE_OP)
