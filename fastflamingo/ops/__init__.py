"""The boundary between the public functional API and the kernels: custom ops and their launchers.

Each kernel family of ``fastflamingo.kernels`` has its ops module here under the same stem, with its launchers, its
custom ops and ``selftest_cases(toy)`` (the checks ``python -m fastflamingo.selftest`` runs). Importing this package
or its modules needs torch only.
"""


def families() -> dict:
    """``{name: ops module}`` for every kernel family that has one (a new family adds its module here too)."""
    from ..kernels import KERNEL_FAMILIES
    from . import gated_linear, media_decode, media_xattn, mllama_decode, mllama_xattn, perceiver_attn

    modules = {"media_xattn": media_xattn, "perceiver_attn": perceiver_attn, "gated_linear": gated_linear,
               "media_decode": media_decode, "mllama_xattn": mllama_xattn, "mllama_decode": mllama_decode}
    return {name: modules[name] for name in KERNEL_FAMILIES if name in modules}


__all__ = ["families"]
