"""Selftest cases of the tanh-gated linear (``kernels/gated_linear.py``): the fused GEMM at every shipped config, and
the decode forms (split-K and cuBLAS + the epilogue kernel), against the PyTorch path."""
from __future__ import annotations

import functools

import torch

from ..ops import torch_path
from ..ops.gated_linear import launch_fwd, result_dtype
from . import case as S

# (per-channel alpha, row gate, bias, rows of a (B, R) view that does not flatten), rotated across the configs
_EPILOGUES = ((False, False, False, False), (True, True, False, False), (False, True, True, False),
              (False, False, False, True))


def cases(toy: bool) -> list:
    """Every shipped config of this GPU's architecture, forced: bf16 (the epilogue variants rotate across the
    configs), the first config in fp16, every fp32 config. ``toy``: interpreter-sized shapes (ragged everywhere)."""
    from ..kernels import _utils as U
    from ..kernels import gated_linear as K

    shape = (2, 20, 40, 48) if toy else (4, 150, 520, 384)  # batch, rows per batch, K (in), N (out)
    out = []
    for dtype, first_only in ((torch.bfloat16, False), (torch.float16, True), (torch.float32, False)):
        configs = S.shipped(functools.partial(K.shipped_configs, dtype))
        for i, config in enumerate(configs[:1] if first_only else configs):
            epilogue = _EPILOGUES[i % len(_EPILOGUES)]
            run = functools.partial(_fwd, config=config, dtype=dtype, epilogue=epilogue, shape=shape)
            out.append(S.Case("gated_linear_fwd", U.config_label(config), _detail(dtype, epilogue, shape), run,
                              S.tolerance(dtype)))
    # The decode forms at a few rows with a long reduction, forced: split-K (fp32 partials over K slices, then the
    # epilogue kernel sums them in slice order) and cuBLAS's product + the epilogue kernel. Their configs are fixed.
    shape = (2, 3, 512, 48) if toy else (2, 4, 4096, 512)
    for form, dtype, epilogue in ((f, d, e) for f in ("splitk", "cublas") for d in (torch.bfloat16, torch.float32)
                                  for e in _EPILOGUES[:2]):
        run = functools.partial(_fwd, config=None, dtype=dtype, epilogue=epilogue, shape=shape, form=form)
        label = U.config_label(K.splitk_config(dtype) if form == "splitk" else K.epilogue_config(shape[0] * shape[1]))
        out.append(S.Case(f"gated_linear_{form}", label, _detail(dtype, epilogue, shape), run, S.tolerance(dtype)))
    return out


def _detail(dtype, epilogue, shape) -> str:
    flags = "".join(n for n, on in zip(("+vec", "+gate", "+bias", "+3d"), epilogue) if on) or "scalar"
    return f"{S.dtype_name(dtype)} {flags} M{shape[0] * shape[1]} K{shape[2]} N{shape[3]}"


def _fwd(device, *, config, dtype, epilogue, shape, form=None):
    per_channel, has_gate, has_bias, strided = epilogue
    batch, rows, k_in, n_out = shape
    x = S.randn(batch, rows, n_out, dtype=dtype, device=device)
    # strided: rows of a (B, R) view that does not flatten to one row stride (the kernel's BATCHED path)
    inp = S.randn(batch, rows + 3 if strided else rows, k_in, dtype=dtype, device=device)[:, :rows]
    weight = S.randn(n_out, k_in, dtype=dtype, device=device, scale=k_in ** -0.5)
    bias = S.randn(n_out, dtype=dtype, device=device) if has_bias else None
    alpha = S.randn(n_out if per_channel else 1, dtype=dtype, device=device, scale=0.5)
    row_gate = (torch.rand(batch, rows, device=device) > 0.3) if has_gate else None
    out = torch.full(x.shape, float("nan"), dtype=result_dtype(x, inp, alpha), device=device)
    launch_fwd(x, inp, weight, bias, alpha, row_gate, config, out=out, form=form)
    ref = torch_path.gated_linear(x.float(), inp.float(), weight.float(), None if bias is None else bias.float(),
                                  alpha.float(), row_gate)
    return [("y", out, ref)]
