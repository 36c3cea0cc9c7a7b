"""The boundary between the public functional API and the kernels: custom ops and their launchers.

Each kernel family of ``fastflamingo.kernels`` (the source folder ``kernels/``) has its ops module here under the
same stem, with its launchers and its custom ops. Importing this package or its modules needs torch only. The ops
layer reaches no higher: no model family, no reference, no test kit, no selftest imports here
(``tests/test_layout.py`` checks it).

``KERNEL_FAMILIES`` is the one list of kernel families: ``python -m fastflamingo.aot``, the selftest, ``info`` and
the layout test read it. It lives here, not in ``kernels/``, because that folder has no ``__init__.py`` on purpose:
with one, every process started from the checkout root would import it as a top-level package named ``kernels`` in
place of Hugging Face's ``kernels``, which transformers imports (docs/design.md, "Why kernels/ has no __init__.py").
A new family adds its name here, ``kernels/<stem>.py`` with ``aot_variants(quick: bool)`` and per-architecture
config lists (``_utils.per_arch``), ``fastflamingo/ops/<stem>.py`` with its launchers and
``fastflamingo/selftest/<stem>.py`` with ``cases(toy)``.
"""

# Every kernel family, in the order ``python -m fastflamingo.aot`` compiles them.
KERNEL_FAMILIES = ("media_xattn", "perceiver_attn", "gated_linear", "media_decode", "mllama_xattn", "mllama_decode")


def kernel_modules() -> dict:
    """``{name: kernel module}`` (``fastflamingo.kernels.<name>``) for every kernel family (imports triton)."""
    from ..kernels import gated_linear, media_decode, media_xattn, mllama_decode, mllama_xattn, perceiver_attn

    modules = {"media_xattn": media_xattn, "perceiver_attn": perceiver_attn, "gated_linear": gated_linear,
               "media_decode": media_decode, "mllama_xattn": mllama_xattn, "mllama_decode": mllama_decode}
    return {name: modules[name] for name in KERNEL_FAMILIES}


__all__ = ["KERNEL_FAMILIES", "kernel_modules"]
