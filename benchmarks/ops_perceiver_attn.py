"""Op ``perceiver_attn`` (docs/performance.md, matrix row B): latent queries attend to
``[media tokens; latents]``. Providers ``upstream`` (OpenFlamingo's einsum on the concatenated keys with the amax
shift), ``sdpa`` (SDPA on the concatenated keys), ``flex`` (FlexAttention, no mask; CUDA) and ``fastflamingo`` (two
key sources, no concat). The whole resamplers are in ``ops_resampler.py``.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import List, Optional

import torch
import torch.nn.functional as F

from fastflamingo import reference as ref

from . import flex, shapes
from .registry import Case, Op, Provider, Runner, register_op, register_provider

OP = "perceiver_attn"


def _label(p: dict) -> str:
    return f"{p['model']} B{p['batch']} S{p['shots']} P{p['tokens']} L{p['latents']}"


def _case(model: str, batch: int, shots: int) -> Case:
    p = shapes.perceiver_params(model, batch, shots)
    return Case(OP, p, _label(p), shots)


def _tiny(case: Case) -> Case:
    p = shapes.tiny_perceiver_params(case.params)
    return Case(case.op, p, _label(p), min(case.shots, 2), case.passes, case.providers)


def _core_cases(profile: str, shots: Optional[List[int]] = None) -> List[Case]:
    if profile in ("cpu", "quick"):
        return [_case("of", 1, s) for s in (shots or (4, 32))]
    if profile == "priority":
        return [_case(m, 16, 32) for m in ("of", "idefics")]
    return [_case(m, b, s) for m in ("of", "idefics") for b, s in ((1, 4), (4, 8), (16, 32))]


def _core_inputs(case: Case, device: str, dtype: torch.dtype):
    p = case.params
    g = torch.Generator().manual_seed(0)
    n = p["batch"] * (p["shots"] + 1)

    def rnd(tokens):
        return torch.randn(n, tokens, p["heads"], p["head_dim"], generator=g).to(device, dtype).requires_grad_()

    ns = SimpleNamespace(q=rnd(p["latents"]), k_media=rnd(p["tokens"]), v_media=rnd(p["tokens"]),
                         k_latents=rnd(p["latents"]), v_latents=rnd(p["latents"]), scale=p["head_dim"] ** -0.5)
    ns.leaves = [ns.q, ns.k_media, ns.v_media, ns.k_latents, ns.v_latents]
    return ns


def _core_reference(inputs, case):
    return ref.perceiver_attn(*(t.detach().float() for t in inputs.leaves), inputs.scale)


def _core_work(case: Case, pass_: str, dtype):
    p = case.params
    n = p["batch"] * (p["shots"] + 1)
    keys = p["tokens"] + p["latents"]
    es = torch.tensor([], dtype=dtype).element_size()
    flops = 4 * n * p["heads"] * p["latents"] * keys * p["head_dim"]
    io = es * n * p["heads"] * p["head_dim"] * (2 * keys + 2 * p["latents"])  # read q, k, v; write o
    return {"fwd": (flops, io), "bwd": (2.5 * flops, 2 * io), "fwd+bwd": (3.5 * flops, 3 * io)}.get(pass_, (None, None))


register_op(Op(OP, "Perceiver attention core: latents attend to [media; latents]", _core_cases,
               _core_inputs, _core_reference, _core_work, _tiny, default_devices=("cuda",)))


def _upstream_core(inputs, case, device, dtype) -> Runner:
    def run():  # OpenFlamingo helpers.py PerceiverAttention, after the projections
        k = torch.cat((inputs.k_media, inputs.k_latents), 1).transpose(1, 2)
        v = torch.cat((inputs.v_media, inputs.v_latents), 1).transpose(1, 2)
        sim = torch.einsum("...id,...jd->...ij", inputs.q.transpose(1, 2) * inputs.scale, k)
        attn = (sim - sim.amax(dim=-1, keepdim=True).detach()).softmax(dim=-1)
        return torch.einsum("...ij,...jd->...id", attn, v).transpose(1, 2)

    return Runner(run)


def _sdpa_core(inputs, case, device, dtype) -> Runner:
    def run():
        k = torch.cat((inputs.k_media, inputs.k_latents), 1).transpose(1, 2)
        v = torch.cat((inputs.v_media, inputs.v_latents), 1).transpose(1, 2)
        return F.scaled_dot_product_attention(inputs.q.transpose(1, 2), k, v, scale=inputs.scale).transpose(1, 2)

    return Runner(run, note="cat + SDPA")


def _flex_core(inputs, case, device, dtype) -> Runner:
    attend, note = flex.attention(device)

    def run():
        k = torch.cat((inputs.k_media, inputs.k_latents), 1).transpose(1, 2)
        v = torch.cat((inputs.v_media, inputs.v_latents), 1).transpose(1, 2)
        return attend(inputs.q.transpose(1, 2), k, v, scale=inputs.scale).transpose(1, 2)

    return Runner(run, note=f"cat + {note} flex_attention")


def _ff_core(inputs, case, device, dtype) -> Runner:
    from fastflamingo import functional as FF

    return Runner(lambda: FF.perceiver_attn(inputs.q, inputs.k_media, inputs.v_media, inputs.k_latents,
                                                 inputs.v_latents, scale=inputs.scale))


def _flex_unavailable(device, dtype):
    if device != "cuda":
        return "FlexAttention is compiled for CUDA here (no backward on CPU)"
    return flex.unavailable(device, dtype)


register_provider(OP, Provider("upstream", "upstream", _upstream_core,
                                             description="OpenFlamingo einsum on cat(media, latents)"))
register_provider(OP, Provider("sdpa", "baseline", _sdpa_core, description="cat + SDPA"))
register_provider(OP, Provider("flex", "baseline", _flex_core, _flex_unavailable, devices=("cuda",),
                                             description="cat + FlexAttention (no mask)"))
register_provider(OP, Provider("fastflamingo", "fastflamingo", _ff_core,
                                             description="functional.perceiver_attn (two sources, no cat)"))


