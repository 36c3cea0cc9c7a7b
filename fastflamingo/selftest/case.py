"""What a selftest case is, and the helpers that keep the families' declarations (``selftest/<stem>.py``) short and
alike: the configs to force (:func:`shipped`, :func:`one_config_plan`), inputs (:func:`randn`), NaN-filled outputs
(:func:`nan_like`) and tolerances (:func:`tolerance`)."""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterable, List, Sequence, Tuple

import torch

# (name, kernel output, PyTorch-path reference) triples returned by a case.
Checks = List[Tuple[str, torch.Tensor, torch.Tensor]]


@dataclasses.dataclass
class Case:
    """One forced launch of one kernel at one config, and what its outputs must equal.

    ``kernel``: the kernel under test (the name ``fastflamingo.aot`` reports, e.g. ``media_xattn_bwd_dq``).
    ``config``: the config label (``M64xN64-w4-s3``). ``detail``: dtype, head size, mode, shape.
    ``run(device)``: builds fresh random inputs on ``device``, launches with the forced config into NaN-filled
    outputs and returns ``(name, output, reference)`` triples; the reference is the PyTorch path in fp32.
    ``tol``: the largest relative error (max |out - ref| / max |ref|) accepted.
    """

    kernel: str
    config: str
    detail: str
    run: Callable[[torch.device], Checks]
    tol: float


_TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
HEAD_DIMS = (64, 96, 128)
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def tolerance(dtype: torch.dtype, grad: bool = False) -> float:
    """Relative error allowed against an fp32 reference: fp32 1e-4 (IEEE products in the kernels), fp16 5e-3,
    bf16 3e-2; twice that for gradients (one more rounding of the incoming gradient)."""
    return _TOLERANCE[dtype] * (2 if grad else 1)


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES[dtype]


def shipped(configs_of: Callable[[int], Sequence]) -> list:
    """The configs a family forces, given ``configs_of(arch)`` (its shipped list for an architecture): this GPU's
    list on a GPU; under the interpreter (``--dry-run``) every architecture's list, each config once, in order."""
    from ..kernels import _utils

    archs = _utils.ARCHS if _utils.INTERPRET else (_utils.device_arch(),)
    out, seen = [], set()
    for arch in archs:
        for config in configs_of(arch):
            label = _utils.config_label(config)
            if label not in seen:
                seen.add(label)
                out.append(config)
    return out


def one_config_plan(config_of: Callable[[torch.dtype, int, int], object]) -> Iterable[tuple]:
    """``(dtype, head_dim, config)`` for a family that ships one config per (dtype, head tile, architecture), given
    ``config_of(dtype, head_dim, arch)``: bf16 at every head size of :data:`HEAD_DIMS`, fp16 at 64, fp32 at 128."""
    for dtype, head_dims in ((torch.bfloat16, HEAD_DIMS), (torch.float16, (64,)), (torch.float32, (128,))):
        for head_dim in head_dims:
            for config in shipped(lambda arch: [config_of(dtype, head_dim, arch)]):
                yield dtype, head_dim, config


def decode_cases(kernel: str, config_of: Callable[[torch.dtype, int, int], object], variants: Sequence[tuple],
                 run: Callable[..., Checks], shape_label: str) -> List[Case]:
    """The cases of a split-key decode family: every ``(dtype, head_dim, config)`` of :func:`one_config_plan` x
    ``variants`` ``(splits, label, run keywords)``; ``run(device, config=, splits=, dtype=, head_dim=, **keywords)``.
    Several splits also exercise the combine kernel."""
    from ..kernels._utils import config_label

    cases = []
    for dtype, head_dim, config in one_config_plan(config_of):
        for splits, label, keywords in variants:
            cases.append(Case(kernel + ("" if splits == 1 else "+combine"), config_label(config),
                              f"{dtype_name(dtype)} d{head_dim} {label} splits {splits} {shape_label}",
                              functools.partial(run, config=config, splits=splits, dtype=dtype, head_dim=head_dim,
                                                **keywords), tolerance(dtype)))
    return cases


def randn(*shape, dtype: torch.dtype, device, scale: float = 1.0) -> torch.Tensor:
    """Random normal values, drawn in fp32 then rounded to ``dtype``; the reference sees the rounded values."""
    return (torch.randn(*shape, device=device) * scale).to(dtype)


def nan_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer full of NaN (unit last stride): an element the kernel does not write stays NaN."""
    return torch.full_like(t, float("nan"), memory_format=torch.contiguous_format)
