"""Triton kernels of fastflamingo (installed as ``fastflamingo.kernels``; the source folder is ``kernels/``).

One kernel family per module, named by its op's stem: the ``@triton.jit`` kernels, their launch configurations, the
device-side schedules and ``aot_variants()`` for ``python -m fastflamingo.aot``. The host-side launchers and the
custom ops are in ``fastflamingo/ops/<stem>.py``, which import these modules on their first launch. Importing this
package does not import triton (only the family modules do).
"""

# Every kernel family, in the order ``python -m fastflamingo.aot`` compiles them. A new family adds its module
# name here and to :func:`families`, an ``aot_variants(quick: bool)`` function in the module (launches described by
# their arguments: ``_utils.aot_launch``), per-architecture config lists (``_utils.per_arch``), and
# ``selftest_cases(toy)`` in its ops module, listed in ``fastflamingo.ops.families()``.
KERNEL_FAMILIES = ("media_xattn", "perceiver_attn", "gated_linear", "media_decode", "mllama_xattn", "mllama_decode")


def families() -> dict:
    """``{name: module}`` for every kernel family (imports triton)."""
    from . import gated_linear, media_decode, media_xattn, mllama_decode, mllama_xattn, perceiver_attn

    modules = {"media_xattn": media_xattn, "perceiver_attn": perceiver_attn, "gated_linear": gated_linear,
               "media_decode": media_decode, "mllama_xattn": mllama_xattn, "mllama_decode": mllama_decode}
    return {name: modules[name] for name in KERNEL_FAMILIES}


__all__ = ["KERNEL_FAMILIES", "families"]
