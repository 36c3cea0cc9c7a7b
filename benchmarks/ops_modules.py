"""Module-level ops: OpenFlamingo's real modules (``load_open_flamingo().helpers``) vs fastflamingo's drop-ins
loaded with the same state_dict.

- ``mca``: ``MaskedCrossAttention`` (LayerNorm, q / fused kv projections, masked attention, out projection);
- ``block``: ``GatedCrossAttentionBlock`` (PERF.md section 9.2 row E), gates set to 0.5 so the branches count;
- ``perceiver``: ``PerceiverAttention`` (row B, with projections), N = batch * images media;
- ``decode``: one decode step of ONE gated cross-attention layer (issue 6; PERF.md section 9.2 rows D/E): one new
  token per sample after an (shots + 1)-image prompt, OpenFlamingo ``GatedCrossAttentionBlock``
  (``use_cached_media=True``) and transformers' ``IdeficsGatedCrossAttentionLayer`` (the repeated last row of the
  image mask), eval mode, ``no_grad``, the SAME media tensor on every call as in a real decode loop. Upstream
  recomputes the media K/V projection every step; fastflamingo projects it once and reuses it (``cache.py``), so
  its first call (``first_call_ms``: the correctness-gate call, or ``warmup_ms`` with ``--no-check``) is the
  uncached step and the timed calls are the cached steps. On CUDA the ``*-cudagraph`` providers capture the step
  in a ``torch.cuda.CUDAGraph`` after warm-up and time the replay (PERF.md section 9.4 item 4).

The fp32 reference recomputes the module with the upstream weights in fp32 around the core reference of
``ops_xattn`` (fastflamingo semantics: a token that sees no media gets 0).
"""
from __future__ import annotations

import copy
import time
from types import SimpleNamespace
from typing import List, Optional

import torch
import torch.nn.functional as F

import fastflamingo
from fastflamingo import masks as ff_masks

from . import shapes
from .ops_media_xattn import reference_core
from .registry import Case, Op, Provider, Runner, register_op, register_provider

_HELPERS = None


def helpers():
    """open_flamingo/src/helpers.py, loaded without open_clip (fastflamingo.testing)."""
    global _HELPERS
    if _HELPERS is None:
        from fastflamingo.testing import load_open_flamingo

        _HELPERS = load_open_flamingo().helpers
    return _HELPERS


def _upstream_unavailable(device, dtype):
    try:
        helpers()
    except Exception as exc:
        return f"OpenFlamingo helpers do not load ({type(exc).__name__}: {exc})"
    return None


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
        if profile == "priority":  # the module ops have no PERF.md section 9.4 cells (decode: see below)
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
    H = helpers()
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


def _reference_mca(m, x, media, mask, p):
    """fp32 MaskedCrossAttention with fastflamingo semantics, from an fp32 copy of the upstream weights."""
    batch, text = x.shape[:2]
    q = m.to_q(m.norm(x)).view(batch, text, p["heads"], p["head_dim"])
    kv = m.to_kv(media.reshape(batch, -1, media.shape[-1]))
    k, v = kv.chunk(2, dim=-1)
    shape = (batch, kv.shape[1], p["heads"], p["head_dim"])
    out = reference_core(q, k.reshape(shape), v.reshape(shape), mask, p["latents"], p["head_dim"] ** -0.5)
    return m.to_out(out.reshape(batch, text, -1))


def _reference_for(op: str):
    def reference(inputs, case):
        p = case.params
        m = copy.deepcopy(inputs.upstream).float()
        with torch.no_grad():
            if op == "perceiver":
                return m(inputs.x.detach().float(), inputs.latents.detach().float())
            x, media = inputs.x.detach().float(), inputs.media.detach().float()
            if op == "mca":
                return _reference_mca(m, x, media, inputs.mask, p)
            x = _reference_mca(m.attn, x, media, inputs.mask, p) * m.attn_gate.tanh() + x
            return m.ff(x) * m.ff_gate.tanh() + x

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
    register_provider(_op, Provider("upstream", "upstream", _provider(_op, "upstream"), _upstream_unavailable,
                                    description=f"open_flamingo helpers.{_DESCRIPTIONS[_op].split()[1]}"))
    register_provider(_op, Provider("fastflamingo", "fastflamingo", _provider(_op, "fastflamingo"),
                                    description="fastflamingo drop-in (same state_dict)"))


# ------------------------------------------------------------------------------------------------------------
# decode: one gated cross-attention layer, one new token per sample (issue 6)
# ------------------------------------------------------------------------------------------------------------

DECODE = "decode"


def _decode_label(p: dict) -> str:
    return f"{p['model']} B{p['batch']} S{p['shots']} {shapes.MODE_SHORT[p['mode']]} decode"


def _decode_case(model: str, batch: int, shots: int, mode: str = "immediate") -> Case:
    # prompt length: only OpenFlamingo's media_locations see it (the step depends on the image count alone)
    text = dict(shapes.DIAGONAL).get(shots, 512)
    p = dict(model=model, batch=batch, text=text, shots=shots, mode=mode, **shapes.DECODE_LAYERS[model])
    return Case(DECODE, p, _decode_label(p), shots, passes=("fwd",))


def _decode_cases(profile: str, shots: Optional[List[int]] = None) -> List[Case]:
    if profile == "priority":  # PERF.md section 9.4 item 4
        out = [_decode_case("idefics80b", 16, 32, "all_previous"), _decode_case("of9b", 1, 4, "immediate")]
        return [c for c in out if not shots or c.shots in shots]
    if profile in ("cpu", "diagonal", "quick"):  # the issue-6 cells
        models, batches = ("of3b", "idefics9b"), shapes.DECODE_BATCHES
        default = (0, 32) if profile == "quick" else shapes.DECODE_SHOTS
    elif profile == "full":
        models, batches, default = ("of3b", "of9b", "idefics9b", "idefics80b"), shapes.BATCHES, shapes.DECODE_SHOTS
    else:
        raise ValueError(f"unknown profile {profile}")
    out = []
    for model in models:
        family = shapes.DECODE_LAYERS[model]["family"]
        # IDEFICS' processor attends to the latest image only; all-previous is an OpenFlamingo option
        modes = shapes.MODES if family == "of" or profile == "full" else ("immediate",)
        for mode in modes:
            for batch in batches:
                for s in shots or default:
                    out.append(_decode_case(model, batch, s, mode))
    return out


def _decode_tiny(case: Case) -> Case:
    p = dict(case.params)
    tiny = "tiny-" + p["family"]
    p.update(model=tiny, batch=min(p["batch"], 2), text=4 * (case.shots + 1) + 4, **shapes.DECODE_LAYERS[tiny])
    return Case(case.op, p, _decode_label(p), case.shots, case.passes, case.providers)


def _idefics_config(p: dict):
    from transformers import IdeficsConfig

    config = IdeficsConfig(
        hidden_size=p["dim"], intermediate_size=p["intermediate"], num_attention_heads=p["heads"],
        qk_layer_norms=p["qk_norms"], alpha_type="float", alpha_initializer="ones", dropout=0.0,
        vision_config=dict(embed_dim=p["dim_visual"]),
    )
    config._attn_implementation = "sdpa"
    return config


def _idefics_image_mask(batch: int, num_media: int, latents: int, immediate: bool, dtype, device):
    """The additive (batch, 1, 1, images * latents) mask IdeficsModel builds for a decode token from the repeated
    last row of the (batch, text, images) image mask: the last image only (immediate, the processor's default)
    or every image (all-previous)."""
    row = torch.zeros(batch, 1, num_media, dtype=torch.bool)
    if immediate:
        row[..., -1] = True
    else:
        row[...] = True
    row = row[..., None].expand(-1, -1, -1, latents).reshape(batch, 1, 1, num_media * latents)
    zero = torch.zeros((), dtype=dtype)
    return torch.where(row, zero, torch.finfo(dtype).min).to(device)


def _decode_modules(p: dict, immediate: bool):
    """The upstream layer and the fastflamingo drop-in with the same state_dict."""
    if p["family"] == "of":
        H = helpers()
        kw = dict(dim=p["dim"], dim_visual=p["dim_visual"], dim_head=p["head_dim"], heads=p["heads"],
                  ff_mult=p["ff_mult"], only_attend_immediate_media=immediate)
        up = H.GatedCrossAttentionBlock(**kw)
        with torch.no_grad():  # upstream initialises the gates to 0, which would hide both branches
            up.attn_gate.fill_(0.5)
            up.ff_gate.fill_(0.5)
        ff = fastflamingo.GatedCrossAttentionBlock(**kw)
    else:
        from transformers.models.idefics.modeling_idefics import IdeficsGatedCrossAttentionLayer
        from fastflamingo.idefics import IdeficsGatedCrossAttentionLayer as FFLayer

        config = _idefics_config(p)
        up = IdeficsGatedCrossAttentionLayer(config, layer_idx=0)
        with torch.no_grad():  # tanh(0.5) gates, as the OpenFlamingo cells
            up.alpha_cross_attn.fill_(0.5)
            up.alpha_dense.fill_(0.5)
        ff = FFLayer(config, layer_idx=0)
    ff.load_state_dict(up.state_dict(), strict=True)
    return up, ff


def _decode_make_inputs(case: Case, device: str, dtype: torch.dtype):
    p = case.params
    torch.manual_seed(0)
    num_media, batch = p["shots"] + 1, p["batch"]
    immediate = p["mode"] == "immediate"
    with torch.device(device):  # initialise on the device (an IDEFICS-80B layer has 0.7B parameters)
        up, ff = _decode_modules(p, immediate)
    # eval mode: fastflamingo reuses media K/V only there (and upstream has no dropout to switch off anyway)
    up, ff = up.to(device=device, dtype=dtype).eval(), ff.to(device=device, dtype=dtype).eval()
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    ns = SimpleNamespace(upstream=up, fastflamingo=ff, family=p["family"], immediate=immediate, leaves=[])
    ns.x = rnd(batch, 1, p["dim"])
    if p["family"] == "of":
        ns.media = rnd(batch, num_media, p["latents"], p["dim_visual"])
        # the prompt's media_locations, kept by FlamingoLayer across decode steps (one tensor for the whole loop)
        ns.locations = shapes.media_locations(batch, p["text"], num_media, 0.0, device)
        ns.mask = ff_masks.from_media_locations(ns.locations, num_media, only_attend_immediate_media=immediate,
                                                use_cached_media=True, num_text=1)
    else:
        ns.media = rnd(batch, num_media * p["latents"], p["dim_visual"])  # image_hidden_states, images-major
        ns.image_mask = _idefics_image_mask(batch, num_media, p["latents"], immediate, dtype, device)
        ns.gate = torch.ones(batch, 1, device=device, dtype=dtype)  # cross_attention_gate: the token sees an image
    return ns


def _decode_call(inputs, module, fresh_mask: bool):
    """The step as the model makes it. IdeficsModel rebuilds the additive image mask in every forward, so each
    call gets a new mask tensor (``fresh_mask``; a graph replays one static buffer instead)."""
    if inputs.family == "of":
        kwargs = dict(media_locations=inputs.locations, use_cached_media=True)
        return lambda: module(inputs.x, inputs.media, **kwargs)

    def forward():
        mask = inputs.image_mask.clone() if fresh_mask else inputs.image_mask
        return module(inputs.x, image_hidden_states=inputs.media, image_attention_mask=mask,
                      cross_attention_gate=inputs.gate)

    return forward


def _decode_reference(inputs, case):
    p = case.params
    m = copy.deepcopy(inputs.upstream).float()
    x, media = inputs.x.float(), inputs.media.float()
    with torch.no_grad():
        if p["family"] == "of":
            x = _reference_mca(m.attn, x, media, inputs.mask, p) * m.attn_gate.tanh() + x
            return m.ff(x) * m.ff_gate.tanh() + x
        # every decode token sees an image: upstream semantics = fastflamingo semantics; the fp32 mask is rebuilt
        mask = _idefics_image_mask(p["batch"], p["shots"] + 1, p["latents"], inputs.immediate, torch.float32,
                                   x.device)
        return m(x, image_hidden_states=media, image_attention_mask=mask, cross_attention_gate=inputs.gate.float())


def _decode_work(case: Case, pass_: str, dtype):
    """Useful work of a step with cached media K/V (the recompute upstream does is not useful work): q / out
    projections, the feed-forward, attention over the visible keys; bytes = those weights + the visible K/V."""
    if pass_ != "fwd":
        return None, None
    p = case.params
    b, inner, dim = p["batch"], p["heads"] * p["head_dim"], p["dim"]
    keys = p["latents"] * ((p["shots"] + 1) if p["mode"] == "all_previous" else 1)
    if p["family"] == "of":
        weights = 2 * dim * inner + 2 * dim * int(p["ff_mult"] * dim)
    else:
        weights = 2 * dim * inner + 3 * dim * p["intermediate"]
    elt = torch.finfo(dtype).bits // 8
    flops = 2 * b * weights + 4 * b * keys * inner
    nbytes = elt * (weights + 2 * b * keys * inner + 2 * b * dim)
    return flops, nbytes


def _decode_provider(which: str):
    def build(inputs, case, device, dtype) -> Runner:
        module = getattr(inputs, which)
        note = "K/V recomputed every step" if which == "upstream" else "media K/V cached after the first call"
        return Runner(_decode_call(inputs, module, fresh_mask=True), note=note)

    return build


GRAPH_WARMUP = 3


def _decode_graph_provider(which: str):
    """Capture the step in a CUDA graph after ``GRAPH_WARMUP`` eager calls (which fill fastflamingo's cache: the
    graph holds the cached step) and time ``graph.replay()``; static inputs, as a graphed decode loop has."""

    def build(inputs, case, device, dtype) -> Runner:
        fn = _decode_call(inputs, getattr(inputs, which), fresh_mask=False)
        start = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(stream):
            for _ in range(GRAPH_WARMUP):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.no_grad(), torch.cuda.graph(graph):
                out = fn()
        except Exception as exc:  # a host sync inside the step makes capture fail: a skip with the reason
            torch.cuda.synchronize()
            raise NotImplementedError(f"CUDA graph capture failed: {type(exc).__name__}: {exc}") from exc
        torch.cuda.synchronize()
        prep_ms = (time.perf_counter() - start) * 1e3
        state = {"graph": graph, "out": out}

        def replay():
            state["graph"].replay()
            return state["out"]

        def close():
            state.clear()

        return Runner(replay, prep_ms=prep_ms, close=close,
                      note=f"CUDA graph replay; prep_ms = {GRAPH_WARMUP} eager warm-up calls + capture")

    return build


def _cuda_only(device, dtype):
    return None if device == "cuda" else "CUDA graphs need a CUDA device"


register_op(Op(DECODE, "one gated cross-attention layer (OpenFlamingo / IDEFICS), 1 new token per sample",
               _decode_cases, _decode_make_inputs, _decode_reference, _decode_work, _decode_tiny,
               default_devices=("cuda",)))
register_provider(DECODE, Provider(
    "upstream", "upstream", _decode_provider("upstream"), _upstream_unavailable,
    description="open_flamingo GatedCrossAttentionBlock / transformers IdeficsGatedCrossAttentionLayer"))
register_provider(DECODE, Provider("fastflamingo", "fastflamingo", _decode_provider("fastflamingo"),
                                   description="fastflamingo drop-in (same state_dict), media K/V cache"))
register_provider(DECODE, Provider("upstream-cudagraph", "baseline", _decode_graph_provider("upstream"),
                                   _cuda_only, description="upstream step replayed from a CUDA graph",
                                   devices=("cuda",)))
register_provider(DECODE, Provider("fastflamingo-cudagraph", "fastflamingo", _decode_graph_provider("fastflamingo"),
                                   _cuda_only, description="fastflamingo step replayed from a CUDA graph",
                                   devices=("cuda",)))
