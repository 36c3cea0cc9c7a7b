"""Module ops: whole resamplers and IDEFICS' gated cross-attention layer (the Perceiver attention core is in
``ops_perceiver_attn.py``).

- ``resampler``: the whole ``PerceiverResampler`` (OpenFlamingo, depth 6, 8 x 64) or
  ``IdeficsPerceiverResampler`` (depth 6, 16 x 96, qk LayerNorm), upstream module vs the drop-in.
- ``idefics_block``: transformers' ``IdeficsGatedCrossAttentionLayer`` vs the drop-in, prefill (docs/performance.md, matrix row E).

References come from :mod:`fastflamingo.reference` (upstream's math restated), in fp32.
"""
from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import List, Optional

import torch

import fastflamingo
from fastflamingo import reference as ref

from . import shapes
from .registry import Case, Op, Provider, Runner, register_op, register_provider
from .upstream import openflamingo_helpers


def _label(op, p):
    return f"{p['model']} B{p['batch']} S{p['shots']} " + (
        f"T{p['text']}" if op == "idefics_block" else f"P{p['tokens']} L{p['latents']}")


def _case(op, model, batch, shots, **extra) -> Case:
    p = shapes.perceiver_params(model, batch, shots, **extra)
    return Case(op, p, _label(op, p), shots)


def _tiny(case: Case) -> Case:
    p = shapes.tiny_perceiver_params(case.params)
    if "text" in p:
        p.update(text=24, hidden=64, lm_heads=4)
    return Case(case.op, p, _label(case.op, p), min(case.shots, 2), case.passes, case.providers)


# ------------------------------------------------------------------------------------------------- modules


def _idefics_config(p):
    from transformers import IdeficsConfig

    hidden, heads = p.get("hidden", 4096), p.get("lm_heads", 32)
    cfg = IdeficsConfig(
        vocab_size=100, hidden_size=hidden, intermediate_size=p.get("intermediate", 4 * hidden // 4 * 3 // 1),
        num_hidden_layers=1, num_attention_heads=heads, cross_layer_interval=1, qk_layer_norms=True,
        alpha_type="vector", alpha_initializer="ones", use_resampler=True,
        vision_config=dict(embed_dim=p["width"], image_size=32, patch_size=8, num_hidden_layers=1,
                           num_attention_heads=max(1, p["width"] // 64), intermediate_size=4 * p["width"]),
        perceiver_config=dict(use_resampler=True, resampler_n_latents=p["latents"], resampler_depth=p["depth"],
                              resampler_n_heads=p["heads"], resampler_head_dim=p["head_dim"],
                              qk_layer_norms_perceiver=True),
    )
    cfg._attn_implementation = "sdpa"
    return cfg


def _module_cases(op):
    def cases(profile: str, shots: Optional[List[int]] = None) -> List[Case]:
        extra = dict(text=2048, hidden=4096, lm_heads=32, intermediate=11008) if op == "idefics_block" else {}
        if profile in ("cpu", "quick"):
            if op == "idefics_block":  # scaled down for CPU, labelled by its shape
                extra.update(text=1024, hidden=1024, lm_heads=8, intermediate=2816)
            return [_case(op, m, 1, s, **extra) for m in (("idefics",) if op == "idefics_block" else ("of", "idefics"))
                    for s in (shots or (4,))]
        if profile == "priority":  # not among the priority cells of docs/performance.md: keep the one-call GPU check short
            return []
        models = ("idefics",) if op == "idefics_block" else ("of", "idefics")
        return [_case(op, m, b, s, **extra) for m in models for b, s in ((1, 4), (4, 8), (16, 32))]

    return cases


def _module_inputs(op):
    def make_inputs(case: Case, device: str, dtype: torch.dtype):
        p = case.params
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        num_images = p["batch"] * (p["shots"] + 1)
        ns = SimpleNamespace()
        if op == "resampler" and p["model"].endswith("of"):
            up = openflamingo_helpers().PerceiverResampler(dim=p["width"], depth=p["depth"], dim_head=p["head_dim"],
                                                           heads=p["heads"], num_latents=p["latents"])
            ours = fastflamingo.PerceiverResampler(dim=p["width"], depth=p["depth"], dim_head=p["head_dim"],
                                                   heads=p["heads"], num_latents=p["latents"])
            ns.x = torch.randn(p["batch"], p["shots"] + 1, 1, p["tokens"], p["width"], generator=g)
        elif op == "resampler":
            from transformers.models.idefics.perceiver import IdeficsPerceiverResampler

            cfg = _idefics_config(p)
            args = (cfg, p["width"], p["depth"], p["heads"], p["head_dim"], p["latents"])
            up, ours = IdeficsPerceiverResampler(*args), fastflamingo.IdeficsPerceiverResampler(*args)
            ns.x = torch.randn(num_images, p["tokens"], p["width"], generator=g)
        else:
            from transformers.models.idefics.modeling_idefics import IdeficsGatedCrossAttentionLayer

            from .shapes import media_locations

            cfg = _idefics_config(p)
            up = IdeficsGatedCrossAttentionLayer(cfg, layer_idx=0)
            ours = fastflamingo.IdeficsGatedCrossAttentionLayer(cfg, layer_idx=0)
            n_img = p["shots"] + 1
            ns.x = torch.randn(p["batch"], p["text"], p["hidden"], generator=g)
            ns.images = torch.randn(p["batch"], n_img * p["latents"], p["width"], generator=g)
            loc = media_locations(p["batch"], p["text"], n_img, 0.0, "cpu")
            tt = loc.cumsum(-1)
            one_hot = (tt[..., None] == torch.arange(1, n_img + 1)).float()  # IdeficsProcessor: current image
            mask = one_hot.repeat_interleave(p["latents"], -1)[:, None]
            ns.additive = torch.where(mask.bool(), 0.0, torch.finfo(dtype).min).to(device, dtype)
            ns.gate = one_hot.any(-1).to(device, dtype)
        ours.load_state_dict(up.state_dict(), strict=True)
        ns.upstream, ns.fastflamingo = up.to(device, dtype), ours.to(device, dtype)
        ns.x = ns.x.to(device, dtype).requires_grad_()
        ns.leaves = [ns.x]
        if op == "idefics_block":
            ns.images = ns.images.to(device, dtype).requires_grad_()
            ns.leaves.append(ns.images)
        return ns

    return make_inputs


def _call(op, module, inputs):
    if op == "idefics_block":
        return module(inputs.x, None, inputs.images, image_attention_mask=inputs.additive,
                      cross_attention_gate=inputs.gate)
    return module(inputs.x)


def _module_reference(op):
    def reference(inputs, case):
        m = copy.deepcopy(inputs.upstream).float()
        x = inputs.x.detach().float()
        with torch.no_grad():
            if op == "idefics_block":
                return ref.idefics_gated_cross_attention_layer(m, x, inputs.images.detach().float(),
                                                               inputs.additive.float(), inputs.gate.float(),
                                                               semantics="fastflamingo")
            if case.params["model"].endswith("of"):
                return ref.perceiver_resampler(m, x)
            return ref.idefics_perceiver_resampler(m, x)

    return reference


def _module_provider(op, which):
    def build(inputs, case, device, dtype) -> Runner:
        module = getattr(inputs, which)
        return Runner(lambda: _call(op, module, inputs), leaves=inputs.leaves + list(module.parameters()))

    return build


def _needs_transformers(device, dtype):
    try:
        import transformers  # noqa: F401
    except ImportError:
        return "transformers is not installed"
    return None


for _op, _desc in (("resampler", "whole Perceiver resampler (OpenFlamingo / IDEFICS), upstream vs drop-in"),
                   ("idefics_block", "IDEFICS gated cross-attention layer (prefill), upstream vs drop-in")):
    register_op(Op(_op, _desc, _module_cases(_op), _module_inputs(_op), _module_reference(_op), tiny=_tiny,
                   default_devices=("cuda",)))
    register_provider(_op, Provider("upstream", "upstream", _module_provider(_op, "upstream"), _needs_transformers,
                                    description="the upstream module"))
    register_provider(_op, Provider("fastflamingo", "fastflamingo", _module_provider(_op, "fastflamingo"),
                                    description="fastflamingo drop-in (same state_dict)"))
