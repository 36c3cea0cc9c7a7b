"""Triton kernels of fastflamingo (installed as ``fastflamingo.kernels``; the source folder is ``kernels/``).

One kernel family per module; each module holds its ``@triton.jit`` kernels, host launchers returning plain tensors,
its launch configurations and ``aot_variants()`` for ``python -m fastflamingo.aot``. Importing this package does
not import triton (only the family modules do): ``fastflamingo`` loads them lazily through
``fastflamingo._backend.load_kernels``.
"""

# Every kernel family, in the order ``python -m fastflamingo.aot`` compiles them. A new family (perceiver attention,
# tanh gating) adds its module name here and an ``aot_variants(quick: bool)`` function in the module.
KERNEL_FAMILIES = ("media_xattn", "perceiver_attn", "gated_linear", "media_decode")

__all__ = ["KERNEL_FAMILIES"]
