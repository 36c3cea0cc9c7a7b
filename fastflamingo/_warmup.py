"""``fastflamingo.warmup(model, ...)``: compile, ahead of the first real step, every Triton kernel a patched model
will launch, and settle every launch config it will pick.

A Triton kernel compiles on its first launch with a new specialization, and a ``ConfigChooser`` times its
candidates on the first launch with a new autotune key (unless the tuned table of this GPU, ``fastflamingo/configs``,
has the key): both happen inside the first forward of each shape, and neither may happen during CUDA-graph capture.
``warmup`` finds the fastflamingo modules of the model (cross-attention, gated projections, perceiver attention),
and runs each op they use on random inputs of the model's head sizes and widths, once per size class of the autotune
keys (text length, media count, rows; ``kernels/*.py``, ``*_CLASSES``) up to ``max_text`` text tokens and
``max_media`` media, plus one decode step per media class. Nothing of the model's state changes: the ops are called directly on random inputs (stand-in weights of the
same shapes and dtypes), not through the modules, so parameters, their gradients and the media caches stay as they
were.
"""
from __future__ import annotations

import dataclasses
import time
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import functional
from .masks import MediaMask


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


@dataclasses.dataclass(frozen=True)
class _Attention:
    heads: int
    head_dim: int
    immediate: bool


@dataclasses.dataclass(frozen=True)
class _Gate:
    linear: nn.Linear
    alpha: torch.Tensor
    row_gate: bool


def class_sizes(limit: int, bounds: Sequence[int], per: int = 1) -> List[int]:
    """One size per autotune size class (``kernels._utils.size_class`` with ``bounds``) that sizes up to ``limit``
    reach, where the keyed quantity is ``size * per``: the largest size within each class bound below
    ``limit * per``, then ``limit`` itself (the largest class reached)."""
    limit = max(int(limit), 1)
    sizes = {int(bound) // per for bound in bounds if bound < limit * per}
    return sorted({s for s in sizes if 1 <= s < limit} | {limit})


def _discover(model: nn.Module) -> Tuple[List[_Attention], List[_Gate], List[Tuple[int, int]], Optional[int]]:
    """(cross-attention shapes, gated projections, perceiver (heads, head_dim), latents per media or None)."""
    from . import modules
    from .idefics import attention as idefics_attention
    from .idefics import layer as idefics_layer
    from .idefics import perceiver as idefics_perceiver

    attention, gates, perceiver, latents = set(), [], set(), None
    for module in model.modules():
        if isinstance(module, modules.MaskedCrossAttention):
            attention.add(_Attention(module.heads, module.dim_head, bool(module.only_attend_immediate_media)))
        elif isinstance(module, idefics_attention.IdeficsCrossAttention):
            attention.add(_Attention(module.num_heads, module.head_dim, True))
        if isinstance(module, modules.GatedCrossAttentionBlock):
            gates += [_Gate(module.attn.to_out, module.attn_gate, False), _Gate(module.ff[3], module.ff_gate, False)]
        elif isinstance(module, idefics_layer.IdeficsGatedCrossAttentionLayer):
            gates += [_Gate(module.cross_attn.o_proj, module.alpha_cross_attn, True),
                      _Gate(module.mlp.down_proj, module.alpha_dense, False)]
        if isinstance(module, modules.PerceiverAttention):
            perceiver.add((module.heads, module.dim_head))
        elif isinstance(module, idefics_perceiver.IdeficsPerceiverAttention):
            perceiver.add((module.n_heads, module.head_dim))
        if isinstance(module, modules.PerceiverResampler) or type(module).__name__ == "IdeficsPerceiverResampler":
            latents = int(module.latents.shape[-2])
    unique_gates = {(id(g.linear), id(g.alpha)): g for g in gates if type(g.linear) is nn.Linear}
    return sorted(attention, key=repr), list(unique_gates.values()), sorted(perceiver), latents


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
    dtype = dtype or params[0].dtype
    backward = model.training if backward is None else backward
    attention, gates, perceiver, found_latents = _discover(model)
    latents = latents or found_latents or 64
    from .kernels import _utils

    stats = _utils.CompileStats()
    before = {id(c): c.stats() for c in _utils.CHOOSERS}
    report = WarmupReport()
    start = time.perf_counter()
    with stats.installed(), torch.set_grad_enabled(backward), backend("triton" if interpreted else "auto"):
        for spec in attention:
            report.calls += _warm_attention(spec, device, dtype, batch, max_text, max_media, latents, backward, decode)
        for gate in gates:
            report.calls += _warm_gate(gate, device, dtype, batch, max_text, backward, decode)
        if media_tokens:
            for heads, head_dim in perceiver:
                report.calls += _warm_perceiver(heads, head_dim, device, dtype, batch, max_media, latents,
                                                media_tokens, backward)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    report.seconds = time.perf_counter() - start
    report.compiled, report.cache_hits = stats.compiled, stats.cache_hits
    for chooser in _utils.CHOOSERS:
        old, new = before.get(id(chooser), {"table": 0, "timed": 0}), chooser.stats()
        report.table += new["table"] - old["table"]
        report.timed += new["timed"] - old["timed"]
    return report


def _rand(*shape, device, dtype, grad) -> torch.Tensor:
    return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)


def _media_locations(batch: int, text: int, media: int, device) -> torch.Tensor:
    from .testing import evenly_spaced_media_locations

    return evenly_spaced_media_locations(batch, text, media, first=0, device=device)


def _warm_attention(spec: _Attention, device, dtype, batch, max_text, max_media, latents, backward, decode) -> int:
    calls = 0
    mode = "immediate" if spec.immediate else "all_previous"
    from .kernels import media_xattn as kernels

    for media in class_sizes(max_media, kernels.MEDIA_CLASSES):
        kv = _rand(batch, media * latents, 2, spec.heads, spec.head_dim, device=device, dtype=dtype, grad=backward)
        k, v = kv[:, :, 0], kv[:, :, 1]  # views of one fused projection, like the modules' to_kv
        texts = [t for t in class_sizes(max_text, kernels.TEXT_CLASSES) if t >= min(media, max_text)]
        for text in texts + ([1] if decode else []):
            q = _rand(batch, text, spec.heads, spec.head_dim, device=device, dtype=dtype, grad=backward and text > 1)
            if text == 1:  # a decode step: the token after the whole prompt
                text_time = torch.full((batch, 1), media, dtype=torch.int32, device=device)
            else:
                text_time = _media_locations(batch, text, media, device).cumsum(-1).to(torch.int32)
            out = functional.media_xattn(q, k, v, MediaMask(text_time, media, mode))
            if backward and out.requires_grad:
                out.backward(torch.randn_like(out))
            calls += 1
    return calls


def _warm_gate(gate: _Gate, device, dtype, batch, max_text, backward, decode) -> int:
    # a stand-in projection and gate of the same shapes and dtypes: the model's parameters (and their .grad) are
    # never touched
    model_linear = gate.linear
    linear = nn.Linear(model_linear.in_features, model_linear.out_features, bias=model_linear.bias is not None,
                       device=device, dtype=model_linear.weight.dtype).requires_grad_(backward)
    alpha = torch.zeros_like(gate.alpha, device=device).requires_grad_(backward)
    from .kernels import gated_linear as kernels

    calls = 0
    for rows in ([1] if decode else []) + class_sizes(max_text, kernels.ROW_CLASSES, per=batch):
        x = _rand(batch, rows, linear.out_features, device=device, dtype=dtype, grad=backward)
        inp = _rand(batch, rows, linear.in_features, device=device, dtype=dtype, grad=backward)
        row_gate = torch.ones(batch, rows, device=device, dtype=dtype) if gate.row_gate else None
        out = functional.gated_linear(x, inp, linear, alpha, row_gate)
        if backward and out.requires_grad:
            out.backward(torch.randn_like(out))
        calls += 1
    return calls


def _warm_perceiver(heads, head_dim, device, dtype, batch, max_media, latents, media_tokens, backward) -> int:
    from .kernels import perceiver_attn as kernels

    calls = 0
    for media in class_sizes(max_media, kernels.ROW_CLASSES, per=batch * heads):
        num = batch * media
        q = _rand(num, latents, heads, head_dim, device=device, dtype=dtype, grad=backward)
        kv_media = _rand(num, media_tokens, 2, heads, head_dim, device=device, dtype=dtype, grad=backward)
        kv_latents = _rand(num, latents, 2, heads, head_dim, device=device, dtype=dtype, grad=backward)
        out = functional.perceiver_attn(q, kv_media[:, :, 0], kv_media[:, :, 1], kv_latents[:, :, 0],
                                        kv_latents[:, :, 1])
        if backward and out.requires_grad:
            out.backward(torch.randn_like(out))
        calls += 1
    return calls


__all__: Sequence[str] = ("warmup", "WarmupReport")
