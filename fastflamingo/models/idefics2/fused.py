"""The two fusions of the Idefics2 perceiver layer, on the library's existing ops.

- :func:`residual_linear`: ``x + linear(inp)``, the residual add done by the GEMM that produces the branch. On the
  PyTorch path that is ``addmm`` (BLAS accumulates into a copy of ``x``: the branch is never a tensor of its own); on
  the Triton path it is ``functional.gated_linear``'s epilogue with a gate of exactly 1 (``tanh(20.0)`` rounds to 1
  in fp32, so ``x + 1 * h`` is ``x + h`` bit for bit and ``d alpha`` is never asked for).
- :func:`normed_projection`: ``linear(rms_norm(context))`` without the normalised context. RMSNorm is a per-row
  scale ``r`` times a per-channel weight ``w``, so ``(w * x * r) @ W^T = r * (x @ (W * w)^T)``: the weight is scaled
  once (out_features x in_features, far fewer values than the media tokens), the raw context goes into the GEMM and
  only its (tokens, out_features) result is scaled by ``r``. Upstream normalises the context in fp32 (three
  context-sized temporaries per layer), concatenates it with the latents and projects the concatenation.
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn
from torch.nn import functional as F

from ... import _backend, functional

# tanh(UNIT_GATE) == 1.0 exactly in fp32 (1 - 2e^-40 rounds to 1), in the kernel's epilogue and in torch
UNIT_GATE = 20.0


def _plain(linear: nn.Module) -> bool:
    """A bare nn.Linear without hooks (a LoRA wrapper, a quantized layer or an accelerate-offloaded Linear runs as
    a module: its call does more than its math)."""
    return type(linear) is nn.Linear and not (linear._forward_hooks or linear._forward_pre_hooks
                                              or "_hf_hook" in linear.__dict__)


def residual_linear(x: torch.Tensor, inp: torch.Tensor, linear: nn.Module) -> torch.Tensor:
    """``x + linear(inp)`` (upstream's ``residual + branch``), the add fused into the GEMM's epilogue."""
    if not _plain(linear):
        return x + linear(inp)
    weight, bias = linear.weight, linear.bias

    def triton_reasons() -> List[str]:
        from ...ops import gated_linear as gated_ops

        return gated_ops.unsupported_reasons(x, inp, weight, bias, x.new_ones(()), None)

    if _backend.choose("gated_linear", (x, inp, weight), triton_reasons) == "triton":
        gate = torch.full((), UNIT_GATE, dtype=torch.float32, device=x.device)
        return functional.gated_linear(x, inp, linear, gate)
    if bias is not None or x.dtype != inp.dtype or inp.dtype != weight.dtype or x.shape[:-1] != inp.shape[:-1]:
        return x + linear(inp)  # upstream's promotion and broadcasting, as written
    rows = inp.reshape(-1, inp.shape[-1])
    out = torch.addmm(x.reshape(-1, x.shape[-1]), rows, weight.t())
    return out.view(*inp.shape[:-1], weight.shape[0])


def inverse_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``rsqrt(mean(x^2) + eps)`` per row, in fp32 (as upstream's RMSNorm; fp64 stays fp64, where upstream rounds
    to fp32), without an fp32 copy of ``x``: (..., 1)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))
    return torch.rsqrt(norm.square() / x.shape[-1] + eps)


def normed_projection(x: torch.Tensor, inv_rms: torch.Tensor, norm_weight: torch.Tensor,
                      weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(norm_weight * (x * inv_rms).to(x.dtype), weight)`` (upstream's RMSNorm, then a bias-free
    projection) computed as ``inv_rms * F.linear(x, weight * norm_weight)``; the result in ``x``'s dtype."""
    if weight.dtype in (torch.float16, torch.bfloat16):  # one rounding of the scaled weight, as upstream's w * x_hat
        scaled = (weight.float() * norm_weight.float()).to(weight.dtype)
    else:
        scaled = weight * norm_weight
    out = F.linear(x, scaled.to(x.dtype))
    if out.dtype == torch.float32:
        return out * inv_rms
    return (out * inv_rms).to(x.dtype)


__all__ = ["residual_linear", "inverse_rms", "normed_projection", "UNIT_GATE"]
