"""Op ``gated_linear``: the tanh-gated out-projection ``y = x + tanh(alpha) * (a @ W^T)`` (docs/performance.md, "Benchmark matrix", row C).

Providers: ``upstream`` (OpenFlamingo's eager ``attn(x) * attn_gate.tanh() + x``), ``fastflamingo``
(``functional.gated_linear``: the gate fused into the projection's epilogue on Triton), ``compile`` / ``compile-max-autotune``
(``torch.compile`` of the eager expression, CUDA), and ``gemm-alone`` (the projection without the gate: the speed
of light of any fused version, kind ``bound``).

Shapes: OpenFlamingo M = 65536 rows (B16 x T4096), K = 512 (inner dim), N = 4096; IDEFICS-80B M = 8192,
K = N = 8192; CPU M = 2048, K = 512, N = 1024. ``shots`` does not apply (0 in the rows).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import List, Optional

import torch
import torch.nn.functional as F

from fastflamingo import reference as ff_reference

from .registry import Case, Op, Provider, Runner, register_op, register_provider

OP = "gated_linear"


def _case(name, m, k, n, alpha="scalar") -> Case:
    return Case(OP, dict(model=name, m=m, k=k, n=n, alpha=alpha), f"{name} M{m} K{k} N{n} {alpha}", 0)


def cases(profile: str, shots: Optional[List[int]] = None) -> List[Case]:
    if profile in ("cpu", "quick"):
        return [_case("cpu", 2048, 512, 1024)]
    if profile in ("diagonal", "full", "priority"):
        out = [_case("of", 65536, 512, 4096), _case("idefics", 8192, 8192, 8192)]
        if profile == "full":
            out.append(_case("idefics", 8192, 8192, 8192, "vector"))
        return out
    raise ValueError(profile)


def tiny(case: Case) -> Case:
    p = dict(case.params, model=f"tiny-{case.params['model']}", m=64, k=32, n=48)
    return Case(OP, p, f"{p['model']} M{p['m']} K{p['k']} N{p['n']} {p['alpha']}", 0, case.passes, case.providers)


def make_inputs(case: Case, device: str, dtype: torch.dtype):
    p = case.params
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_()

    a = rnd(p["m"], p["k"])
    # the projection is an nn.Linear (upstream's to_out / ff[3]): fastflamingo's fused op takes the module
    linear = torch.nn.Linear(p["k"], p["n"], bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(p["n"], p["k"], generator=g) * p["k"] ** -0.5)
    x = rnd(p["m"], p["n"])
    alpha = rnd(p["n"] if p["alpha"] == "vector" else 1, scale=0.5)
    return SimpleNamespace(a=a, linear=linear, w=linear.weight, x=x, alpha=alpha,
                           leaves=[a, linear.weight, x, alpha])


def reference(inputs, case):
    a, w, x, alpha = (t.detach().float() for t in (inputs.a, inputs.w, inputs.x, inputs.alpha))
    return ff_reference.gated_linear(x, a, w, None, alpha)


def work(case: Case, pass_: str, dtype):
    p = case.params
    es = torch.tensor([], dtype=dtype).element_size()
    m, k, n = p["m"], p["k"], p["n"]
    fwd = (2 * m * k * n, es * (m * k + k * n + 2 * m * n))  # read a, W, x; write y
    bwd = (4 * m * k * n, es * (2 * m * k + 2 * k * n + 2 * m * n))  # read dy, a, W; write da, dW, dx
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": (fwd[0] + bwd[0], fwd[1] + bwd[1])}.get(pass_, (None, None))


register_op(Op(OP, "tanh-gated out-projection x + tanh(alpha) * (a @ W^T)", cases, make_inputs, reference, work,
               tiny, default_devices=("cuda",)))


def _eager(a, w, x, alpha):
    return F.linear(a, w) * alpha.tanh() + x  # OpenFlamingo GatedCrossAttentionBlock order


def _build_upstream(inputs, case, device, dtype) -> Runner:
    return Runner(lambda: _eager(inputs.a, inputs.w, inputs.x, inputs.alpha))


def _build_fastflamingo(inputs, case, device, dtype) -> Runner:
    from fastflamingo import functional as FF

    # x + tanh(alpha) * linear(inp), fused into the GEMM epilogue on Triton
    return Runner(lambda: FF.gated_linear(inputs.x, inputs.a, inputs.linear, inputs.alpha), note="gated_linear")


def _compile_builder(mode):
    def build(inputs, case, device, dtype) -> Runner:
        fn = torch.compile(_eager, mode=mode, dynamic=False)
        return Runner(lambda: fn(inputs.a, inputs.w, inputs.x, inputs.alpha), note=f"torch.compile(mode={mode})")

    return build


def _build_gemm(inputs, case, device, dtype) -> Runner:
    return Runner(lambda: F.linear(inputs.a, inputs.w), check=False, leaves=[inputs.a, inputs.w])


def _cuda_only(device, dtype):
    return None if device == "cuda" else "torch.compile baselines run on CUDA only (CPU inductor compile is slow)"


register_provider(OP, Provider("upstream", "upstream", _build_upstream, description="eager linear * tanh + x"))
register_provider(OP, Provider("compile", "baseline", _compile_builder(None), _cuda_only, devices=("cuda",),
                               description="torch.compile default"))
register_provider(OP, Provider("compile-max-autotune", "baseline", _compile_builder("max-autotune"), _cuda_only,
                               devices=(), description="torch.compile max-autotune (opt-in: long compile)"))
register_provider(OP, Provider("gemm-alone", "bound", _build_gemm, description="the projection alone (speed of light)"))
register_provider(OP, Provider("fastflamingo", "fastflamingo", _build_fastflamingo,
                               description="fastflamingo gated residual (fused when available)"))
