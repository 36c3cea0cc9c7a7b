"""Module-level ops: OpenFlamingo's real modules (``load_open_flamingo().helpers``) vs fastflamingo's drop-ins
loaded with the same state_dict.

- ``mca``: ``MaskedCrossAttention`` (LayerNorm, q / fused kv projections, masked attention, out projection);
- ``block``: ``GatedCrossAttentionBlock`` (docs/performance.md, "Benchmark matrix", row E), gates set to 0.5 so the branches count;
- ``perceiver``: ``PerceiverAttention`` (row B, with projections), N = batch * images media.

The decode step of a gated layer is in ``ops_media_decode.py``.

The fp32 references (benchmarks/references.py) recompute the module with the upstream weights in fp32 around the
core reference of ``media_xattn`` (fastflamingo semantics: a token that sees no media gets 0).
"""
from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import List, Optional

import torch

import fastflamingo
from fastflamingo import masks as ff_masks

from . import references, shapes
from .registry import Case, Op, Provider, Runner, register_op, register_provider
from .upstream import openflamingo_helpers, openflamingo_unavailable


# ------------------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------------------


def _label(op: str, p: dict) -> str:
    m, b, s, mode = p["model"], p["batch"], p["shots"], shapes.MODE_SHORT[p["mode"]]
    if op == "perceiver":
        return f"{m} N{b * (s + 1)} P{p['patches']} (B{b} S{s})"
    return f"{m} B{b} T{p['text']} S{s} {mode}"


def _case(op, model, batch, text, shots, mode="immediate", passes=None, providers=None) -> Case:
    p = dict(model=model, batch=batch, text=text, shots=shots, mode=mode, first_frac=0.0, **shapes.MODELS[model])
    case = Case(op, p, _label(op, p), shots, providers=providers)
    if passes:
        case.passes = passes
    return case


def _cases_for(op: str):
    def cases(profile: str, shots: Optional[List[int]] = None) -> List[Case]:
        passes = None
        if profile in ("cpu", "quick"):
            default = (0, 32) if profile == "quick" else shapes.SHOTS
            return [_case(op, "cpu", 1, shapes.CPU_TEXT, s, passes=passes) for s in (shots or default)]
        if profile in ("diagonal", "full"):
            models = ("of",)
            texts = [None] if profile == "diagonal" else shapes.TEXTS
            out = []
            for m in models:
                for b in shapes.BATCHES:
                    for s, t in shapes.DIAGONAL:
                        for text in texts:
                            if shots and s not in shots:
                                continue
                            out.append(_case(op, m, b, text or t, s, passes=passes))
            return out
        if profile == "priority":  # the module ops have no priority cells (decode: see below)
            return []
        raise ValueError(f"unknown profile {profile}")

    return cases


def tiny(case: Case) -> Case:
    p = shapes.tiny_params(case.params)
    return Case(case.op, p, _label(case.op, p), case.shots, case.passes, case.providers)


# ------------------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------------------


def _make_modules(op: str, p: dict):
    H = openflamingo_helpers()
    immediate = p["mode"] == "immediate"
    common = dict(dim_head=p["head_dim"], heads=p["heads"])
    if op == "mca":
        up = H.MaskedCrossAttention(dim=p["dim"], dim_visual=p["dim_visual"], only_attend_immediate_media=immediate,
                                    **common)
        ff = fastflamingo.MaskedCrossAttention(dim=p["dim"], dim_visual=p["dim_visual"],
                                               only_attend_immediate_media=immediate, **common)
    elif op == "block":
        up = H.GatedCrossAttentionBlock(dim=p["dim"], dim_visual=p["dim_visual"],
                                        only_attend_immediate_media=immediate, **common)
        with torch.no_grad():  # upstream initialises the gates to 0, which would hide both branches
            up.attn_gate.fill_(0.5)
            up.ff_gate.fill_(0.5)
        ff = fastflamingo.GatedCrossAttentionBlock(dim=p["dim"], dim_visual=p["dim_visual"],
                                                   only_attend_immediate_media=immediate, **common)
    elif op == "perceiver":
        # the perceiver runs at the vision width (OpenFlamingo: dim_visual)
        up = H.PerceiverAttention(dim=p["dim_visual"], **common)
        ff = fastflamingo.PerceiverAttention(dim=p["dim_visual"], **common)
    else:
        raise ValueError(op)
    ff.load_state_dict(up.state_dict(), strict=True)
    return up, ff


def _make_inputs_for(op: str):
    def make_inputs(case: Case, device: str, dtype: torch.dtype):
        p = case.params
        torch.manual_seed(0)
        up, ff = _make_modules(op, p)
        up, ff = up.to(device=device, dtype=dtype), ff.to(device=device, dtype=dtype)
        g = torch.Generator(device="cpu").manual_seed(0)

        def rnd(*shape):
            return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_()

        num_media = p["shots"] + 1
        ns = SimpleNamespace(upstream=up, fastflamingo=ff, num_media=num_media, immediate=p["mode"] == "immediate")
        if op == "perceiver":
            ns.x = rnd(p["batch"], num_media, p["patches"], p["dim_visual"])
            ns.latents = rnd(p["batch"], num_media, p["latents"], p["dim_visual"])
            ns.args, ns.kwargs = (ns.x, ns.latents), {}
            ns.leaves = [ns.x, ns.latents]
            return ns
        text = p["text"]
        ns.x = rnd(p["batch"], text, p["dim"])
        ns.media = rnd(p["batch"], num_media, p["latents"], p["dim_visual"])
        ns.locations = shapes.media_locations(p["batch"], p["text"], num_media, p.get("first_frac", 0.0), device)
        ns.kwargs = dict(media_locations=ns.locations)
        ns.args = (ns.x, ns.media)
        ns.leaves = [ns.x, ns.media]
        ns.mask = ff_masks.from_media_locations(
            ns.locations, num_media, only_attend_immediate_media=ns.immediate, num_text=text,
        )
        return ns

    return make_inputs


def _reference_for(op: str):
    def reference(inputs, case):
        p = case.params
        m = copy.deepcopy(inputs.upstream).float()
        with torch.no_grad():
            if op == "perceiver":
                return m(inputs.x.detach().float(), inputs.latents.detach().float())
            x, media = inputs.x.detach().float(), inputs.media.detach().float()
            if op == "mca":
                return references.masked_cross_attention(m, x, media, inputs.mask, p)
            return references.gated_block(m, x, media, inputs.mask, p)

    return reference


def _work_for(op: str):
    def work(case: Case, pass_: str, dtype):
        """Analytic FLOPs: the projections (backward = 2x forward) plus the useful attention FLOPs."""
        p = case.params
        n_img = p["shots"] + 1
        inner = p["heads"] * p["head_dim"]
        if op == "perceiver":
            rows = p["batch"] * n_img
            proj = 2 * rows * (p["latents"] * p["dim_visual"] * inner  # to_q
                               + (p["patches"] + p["latents"]) * p["dim_visual"] * 2 * inner  # to_kv
                               + p["latents"] * inner * p["dim_visual"])  # to_out
            core = 4 * rows * p["latents"] * (p["patches"] + p["latents"]) * inner
        else:
            text = p["text"]
            keys = p["latents"]
            # immediate: each token sees one image; all-previous: on average half of them
            if p["mode"] == "all_previous":
                keys = p["latents"] * (n_img + 1) / 2
            proj = 2 * p["batch"] * (text * p["dim"] * inner * 2 + n_img * p["latents"] * p["dim_visual"] * 2 * inner)
            if op == "block":
                proj += 2 * p["batch"] * text * p["dim"] * 4 * p["dim"] * 2
            core = 4 * p["batch"] * text * keys * inner
        fwd = proj + core
        return {"fwd": (fwd, None), "bwd": (2 * proj + 2.5 * core, None),
                "fwd+bwd": (3 * proj + 3.5 * core, None)}.get(pass_, (None, None))

    return work


def _provider(op: str, which: str):
    def build(inputs, case, device, dtype) -> Runner:
        module = getattr(inputs, which)
        rows = None
        if which == "upstream" and not inputs.immediate and op != "perceiver":
            rows = inputs.mask.text_time > 0  # upstream averages all media for tokens that see none

        def forward():
            return module(*inputs.args, **inputs.kwargs)

        return Runner(forward, compare_rows=rows, leaves=list(inputs.leaves) + list(module.parameters()))

    return build


_DESCRIPTIONS = {
    "mca": "OpenFlamingo MaskedCrossAttention module",
    "block": "OpenFlamingo GatedCrossAttentionBlock",
    "perceiver": "OpenFlamingo PerceiverAttention module",
}
for _op in ("mca", "block", "perceiver"):
    register_op(Op(_op, _DESCRIPTIONS[_op], _cases_for(_op), _make_inputs_for(_op), _reference_for(_op),
                   _work_for(_op), tiny, default_devices=("cpu", "cuda") if _op == "mca" else ("cuda",)))
    register_provider(_op, Provider("upstream", "upstream", _provider(_op, "upstream"), openflamingo_unavailable,
                                    description=f"open_flamingo helpers.{_DESCRIPTIONS[_op].split()[1]}"))
    register_provider(_op, Provider("fastflamingo", "fastflamingo", _provider(_op, "fastflamingo"),
                                    description="fastflamingo drop-in (same state_dict)"))
