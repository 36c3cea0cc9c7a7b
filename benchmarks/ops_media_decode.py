"""Op ``media_decode``: one decode step of ONE gated cross-attention layer (docs/performance.md,
matrix rows D/E): one new token per sample after an (shots + 1)-image prompt, OpenFlamingo
``GatedCrossAttentionBlock`` (``use_cached_media=True``) and transformers' ``IdeficsGatedCrossAttentionLayer`` (the
repeated last row of the image mask), eval mode, ``no_grad``, the SAME media tensor on every call as in a real
decode loop. Upstream recomputes the media K/V projection every step; fastflamingo projects it once and reuses it
(``cache.py``), so its first call (``first_call_ms``: the correctness-gate call, or ``warmup_ms`` with
``--no-check``) is the uncached step and the timed calls are the cached steps. On CUDA the ``*-cudagraph``
providers capture the step in a ``torch.cuda.CUDAGraph`` after warm-up and time the replay.
"""
from __future__ import annotations

import copy
import time
from types import SimpleNamespace
from typing import List, Optional

import torch

import fastflamingo
from fastflamingo import masks as ff_masks

from . import references, shapes
from .registry import Case, Op, Provider, Runner, register_op, register_provider
from .upstream import openflamingo_helpers, openflamingo_unavailable

DECODE = "media_decode"


def _decode_label(p: dict) -> str:
    return f"{p['model']} B{p['batch']} S{p['shots']} {shapes.MODE_SHORT[p['mode']]} decode"


def _decode_case(model: str, batch: int, shots: int, mode: str = "immediate") -> Case:
    # prompt length: only OpenFlamingo's media_locations see it (the step depends on the image count alone)
    text = dict(shapes.DIAGONAL).get(shots, 512)
    p = dict(model=model, batch=batch, text=text, shots=shots, mode=mode, **shapes.DECODE_LAYERS[model])
    return Case(DECODE, p, _decode_label(p), shots, passes=("fwd",))


def _decode_cases(profile: str, shots: Optional[List[int]] = None) -> List[Case]:
    if profile == "priority":  # docs/performance.md, "Priority cells", item 4
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
        H = openflamingo_helpers()
        kw = dict(dim=p["dim"], dim_visual=p["dim_visual"], dim_head=p["head_dim"], heads=p["heads"],
                  ff_mult=p["ff_mult"], only_attend_immediate_media=immediate)
        up = H.GatedCrossAttentionBlock(**kw)
        with torch.no_grad():  # upstream initialises the gates to 0, which would hide both branches
            up.attn_gate.fill_(0.5)
            up.ff_gate.fill_(0.5)
        ff = fastflamingo.GatedCrossAttentionBlock(**kw)
    else:
        from transformers.models.idefics.modeling_idefics import IdeficsGatedCrossAttentionLayer
        from fastflamingo.models.idefics import IdeficsGatedCrossAttentionLayer as FFLayer

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
            return references.gated_block(m, x, media, inputs.mask, p)
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
    "upstream", "upstream", _decode_provider("upstream"), openflamingo_unavailable,
    description="open_flamingo GatedCrossAttentionBlock / transformers IdeficsGatedCrossAttentionLayer"))
register_provider(DECODE, Provider("fastflamingo", "fastflamingo", _decode_provider("fastflamingo"),
                                   description="fastflamingo drop-in (same state_dict), media K/V cache"))
register_provider(DECODE, Provider("upstream-cudagraph", "baseline", _decode_graph_provider("upstream"),
                                   _cuda_only, description="upstream step replayed from a CUDA graph",
                                   devices=("cuda",)))
register_provider(DECODE, Provider("fastflamingo-cudagraph", "fastflamingo", _decode_graph_provider("fastflamingo"),
                                   _cuda_only, description="fastflamingo step replayed from a CUDA graph",
                                   devices=("cuda",)))
