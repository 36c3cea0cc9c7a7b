"""Module op ``idefics2_resampler``: transformers' ``Idefics2PerceiverResampler`` as it ships (SDPA) against the same
module patched by ``fastflamingo.patch`` (its layers are the drop-ins of ``fastflamingo/models/idefics2/``).

Shapes: Idefics2-8B's perceiver (hidden 4096, 16 query / 4 K/V heads of 96, 64 latents, depth 3, MLP 4x) on 4
images of 729 patch tokens (27 x 27 SigLIP patches), two of them partly padded as the processor pads images of
other aspect ratios; on CPU also a scaled-down width (hidden 1024), labelled by its shape. Both providers run one
model: ``fastflamingo`` patches it when built and unpatches it when done, so the weights exist once. The reference
is transformers' module itself in fp32.
"""
from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import List, Optional

import torch

import fastflamingo

from .registry import Case, Op, Provider, Runner, register_op, register_provider

OP = "idefics2_resampler"
IDEFICS2_8B = dict(hidden=4096, heads=16, kv_heads=4, head_dim=96, latents=64, depth=3)
# patches each image keeps: 27 x 27 unpadded, 27 x 18 and 20 x 27 after padding, 27 x 27
KEPT = (729, 486, 729, 540)


def _label(p) -> str:
    return (f"{p['model']} I{p['images']} P{p['tokens']} H{p['hidden']} {p['heads']}/{p['kv_heads']}x{p['head_dim']} "
            f"L{p['latents']} D{p['depth']}")


def _case(model: str, images: int = 4, tokens: int = 729, passes=("fwd", "fwd+bwd"), **sizes) -> Case:
    p = dict(IDEFICS2_8B, model=model, images=images, tokens=tokens)
    p.update(sizes)
    return Case(OP, p, _label(p), images, passes)


def cases(profile: str, shots: Optional[List[int]] = None) -> List[Case]:
    if profile in ("cpu", "quick"):
        # the 8B width costs ~0.4 TFLOP per forward: forward only on CPU, and a quarter width beside it
        return [_case("idefics2-8b", passes=("fwd",)), _case("idefics2-h1024", hidden=1024)]
    if profile == "priority":  # the device check's one cell: the shape
        return [_case("idefics2-8b")]
    return [_case("idefics2-8b")] + [_case("idefics2-8b", images=n) for n in (1, 16)]


def tiny(case: Case) -> Case:
    p = dict(case.params, hidden=64, heads=4, kv_heads=2, head_dim=16, latents=8, depth=2, tokens=20)
    return Case(case.op, p, _label(p), case.shots, case.passes, case.providers)


def _config(p):
    from transformers import Idefics2PerceiverConfig

    config = Idefics2PerceiverConfig(hidden_size=p["hidden"], resampler_n_latents=p["latents"],
                                     resampler_depth=p["depth"], resampler_n_heads=p["heads"],
                                     resampler_head_dim=p["head_dim"], num_key_value_heads=p["kv_heads"])
    config._attn_implementation = "sdpa"
    return config


def make_inputs(case: Case, device: str, dtype: torch.dtype):
    from transformers.models.idefics2.modeling_idefics2 import Idefics2PerceiverResampler

    p = case.params
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    with torch.device(device):
        model = Idefics2PerceiverResampler(_config(p)).to(dtype).eval()
    with torch.no_grad():  # upstream's latents are ones (every latent the same): draw them, and the norm weights
        for name, param in model.named_parameters():
            if param.dim() == 1 or name == "latents":
                param.copy_(1 + 0.2 * torch.randn(param.shape, generator=g))
    mask = torch.zeros(p["images"], p["tokens"], dtype=torch.bool)
    for image in range(p["images"]):
        mask[image, :max(1, p["tokens"] * KEPT[image % len(KEPT)] // 729)] = True
    context = torch.randn(p["images"], p["tokens"], p["hidden"], generator=g)
    ns = SimpleNamespace(model=model, mask=mask.to(device))
    ns.context = context.to(device, dtype).requires_grad_()
    ns.leaves = [ns.context]
    return ns


def reference(inputs, case):
    model = inputs.model if inputs.context.dtype == torch.float32 else copy.deepcopy(inputs.model).float()
    with torch.no_grad():
        return model(inputs.context.detach().float(), inputs.mask)


def work(case: Case, pass_: str, dtype):
    """Forward FLOPs (backward twice that): Q, O, K/V over ``[context; latents]``, the MLP, the attention."""
    p = case.params
    n, m, L, h = p["images"], p["tokens"], p["latents"], p["hidden"]
    q_width, kv_width = p["heads"] * p["head_dim"], p["kv_heads"] * p["head_dim"]
    per_layer = 2 * n * (L * h * q_width * 2 + (m + L) * h * kv_width * 2 + L * h * 4 * h * 3
                         + 2 * L * (m + L) * q_width)
    flops = per_layer * p["depth"]
    return (flops if pass_ == "fwd" else 3 * flops), None


def _provider(patched: bool):
    def build(inputs, case, device, dtype) -> Runner:
        model = inputs.model
        close = None
        if patched:
            fastflamingo.patch(model)

            def close():
                fastflamingo.unpatch(model)

        return Runner(lambda: model(inputs.context, inputs.mask), leaves=inputs.leaves + list(model.parameters()),
                      close=close)

    return build


def _needs_transformers(device, dtype):
    try:
        from transformers.models.idefics2 import modeling_idefics2  # noqa: F401
    except ImportError:
        return "transformers (with Idefics2) is not installed"
    return None


register_op(Op(OP, "Idefics2 perceiver resampler (Idefics2-8B shape), transformers vs patched", cases, make_inputs,
               reference, work=work, tiny=tiny))
register_provider(OP, Provider("upstream", "upstream", _provider(False), _needs_transformers,
                               description="transformers' Idefics2PerceiverResampler (SDPA)"))
register_provider(OP, Provider("fastflamingo", "fastflamingo", _provider(True), _needs_transformers,
                               description="the same module after fastflamingo.patch (drop-in layers)"))
