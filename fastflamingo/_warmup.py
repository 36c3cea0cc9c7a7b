"""``fastflamingo.warmup(model, ...)``: compile, ahead of the first real step, every Triton kernel a patched model
will launch, and settle every launch config it will pick.

A Triton kernel compiles on its first launch with a new specialization, and a ``ConfigChooser`` times its
candidates on the first launch with a new autotune key (unless the tuned table of this GPU, ``fastflamingo/configs``,
has the key): both happen inside the first forward of each shape, and neither may happen during CUDA-graph capture.
``warmup`` asks every registered family (``fastflamingo.models.FAMILIES``) for the op shapes of the model's
drop-ins (cross-attention, gated projections, perceiver attention, mllama's grouped cross-attention) and warms each
shape once (``models/_warm.py``, ``models/mllama/warm.py``): its op on random inputs of the model's head sizes and
widths, once per size class of the autotune keys (text length, media count, rows; ``kernels/*.py``) up to
``max_text`` text tokens and ``max_media`` media, plus one decode step. Nothing of the model's state changes: the
ops are called directly on random inputs (stand-in weights of the same shapes and dtypes), not through the modules,
so parameters, their gradients and the media caches stay as they were.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Optional, Sequence

import torch
from torch import nn

from .models._warm import Latents, WarmSettings


@dataclasses.dataclass
class WarmupReport:
    """What ``warmup`` ran: op calls, kernels compiled (and found in Triton's cache), configs looked up in the tuned
    table or timed, seconds."""

    calls: int = 0
    compiled: int = 0
    cache_hits: int = 0
    table: int = 0
    timed: int = 0
    seconds: float = 0.0
    skipped: str = ""

    def __str__(self) -> str:
        if self.skipped:
            return f"fastflamingo.warmup: nothing to do ({self.skipped})"
        return (f"fastflamingo.warmup: {self.calls} op calls in {self.seconds:.1f} s; {self.compiled} kernels compiled "
                f"({self.cache_hits} from the cache); launch configs: {self.table} from the tuned table, "
                f"{self.timed} autotuned")


def _shapes(model: nn.Module) -> list:
    """The op shapes of every drop-in of the model, as each registered family declares them (equal shapes once,
    in the order found)."""
    from .models import FAMILIES

    found = {}
    for module in model.modules():
        for family in FAMILIES:
            for shape in family.warmup_shapes(module):
                found.setdefault(shape, None)
    return list(found)


def warmup(model: nn.Module, *, dtype: Optional[torch.dtype] = None, max_text: int = 2048, max_media: int = 32,
           batch: int = 1, latents: Optional[int] = None, media_tokens: Optional[int] = None,
           backward: Optional[bool] = None, decode: bool = True) -> WarmupReport:
    """Compile and tune, ahead of time, what ``model`` (patched with :func:`fastflamingo.patch`, or built from
    fastflamingo modules) will launch on its CUDA device.

    Args:
        model: the model; its device decides (nothing to do on CPU: the PyTorch path compiles nothing).
        dtype: activation dtype (default: the dtype of the model's first floating-point parameter).
        max_text, max_media: the longest text and the most media per sample the model will see.
        batch: batch size of the warm-up inputs (the autotune keys do not depend on it for attention; the gated
            projections' keys bucket ``batch x text`` rows).
        latents: latents per media (default: the model's Perceiver resampler, else 64).
        media_tokens: tokens per media entering the Perceiver (patches); None skips the Perceiver.
        backward: also run the backward kernels (default: ``model.training``).
        decode: also run one decode step (one new token per sample) for every media count.

    Returns:
        a :class:`WarmupReport` (printable).
    """
    from ._backend import backend, interpret_mode, requested_backend

    params = [p for p in model.parameters() if p.is_floating_point()]
    device = params[0].device if params else torch.device("cpu")
    interpreted = device.type == "cpu" and interpret_mode()  # the kernels on CPU tensors (tests)
    if device.type != "cuda" and not interpreted:
        return WarmupReport(skipped=f"the model is on {device}: only CUDA launches compile Triton kernels")
    if requested_backend() == "torch":
        return WarmupReport(skipped="the torch backend is selected")
    shapes = _shapes(model)
    found_latents = [shape.count for shape in shapes if isinstance(shape, Latents)]
    settings = WarmSettings(device=device, dtype=dtype or params[0].dtype, batch=batch, max_text=max_text,
                            max_media=max_media, latents=latents or (found_latents[-1] if found_latents else 64),
                            media_tokens=media_tokens or 0, backward=model.training if backward is None else backward,
                            decode=decode)
    from .kernels import _utils

    stats = _utils.CompileStats()
    before = {id(c): c.stats() for c in _utils.CHOOSERS}
    report = WarmupReport()
    start = time.perf_counter()
    with stats.installed(), torch.set_grad_enabled(settings.backward), backend("triton" if interpreted else "auto"):
        for shape in shapes:
            report.calls += shape.warm(settings)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    report.seconds = time.perf_counter() - start
    report.compiled, report.cache_hits = stats.compiled, stats.cache_hits
    for chooser in _utils.CHOOSERS:
        old, new = before.get(id(chooser), {"table": 0, "timed": 0}), chooser.stats()
        report.table += new["table"] - old["table"]
        report.timed += new["timed"] - old["timed"]
    return report


__all__: Sequence[str] = ("warmup", "WarmupReport")
