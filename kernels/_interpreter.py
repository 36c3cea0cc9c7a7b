"""Two fixes to the Triton interpreter (``TRITON_INTERPRET=1``), applied by the tests and by
``python -m fastflamingo.selftest --dry-run`` so that the kernels run on CPU tensors exactly as the GPU computes them.
The GPU code stays free of test-only branches.

- ``tl.device_assert`` is a no-op unless the interpreter builder's debug option is on (``TRITON_DEBUG`` does not
  reach it): turn it on.
- bf16 ``tl.dot`` multiplies the raw uint16 bit patterns (triton-lang/triton#11584): convert bf16 operands to fp32
  first, which is exact and equals the GPU's bf16 MMA with fp32 accumulation.

``fastflamingo._backend`` refuses bf16 CPU tensors under the interpreter unless the second fix is in place (it
looks for the ``_bf16_fixed`` mark on ``InterpreterBuilder.create_dot``).
"""
from __future__ import annotations

if not __name__.startswith("fastflamingo.kernels."):  # kernels/ has no __init__.py on purpose (kernels/README.md)
    raise ImportError(f"{__name__}: the Triton kernels are imported as fastflamingo.kernels.<module>, never as a "
                      "top-level 'kernels' (that name is Hugging Face's package, which transformers imports)")

import dataclasses


def make_strict_and_bf16_exact() -> None:
    """Apply both fixes (idempotent)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as interp

    interp.interpreter_builder.options = dataclasses.replace(interp.interpreter_builder.options, debug=True)
    original = interp.InterpreterBuilder.create_dot
    if getattr(original, "_bf16_fixed", False):
        return

    def to_f32(handle):
        if handle.dtype.scalar == tl.bfloat16:
            return interp.TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return handle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, to_f32(a), to_f32(b), d, input_precision, max_num_imprecise_acc)

    create_dot._bf16_fixed = True
    interp.InterpreterBuilder.create_dot = create_dot
