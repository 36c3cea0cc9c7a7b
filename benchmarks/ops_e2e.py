"""Op ``e2e``: whole random-weight models, unpatched (``upstream``) vs ``fastflamingo.patch(model)``
(docs/performance.md, "Benchmark matrix", row F).

Models (``model`` parameter of a case):

- ``openflamingo``: the real OpenFlamingo ``Flamingo`` class on a small Hugging Face LLaMA
  (``fastflamingo.testing.tiny_open_flamingo``), cross-attention every 2nd layer (8 x 64 heads as upstream);
- ``idefics``: ``transformers.IdeficsForVisionText2Text`` from an ``IdeficsConfig`` (qk norms, vector gates,
  resampler), patched through the IDEFICS rules of ``fastflamingo.patch``.

Passes: ``fwd`` (prefill logits, no grad), ``fwd+bwd`` (prefill forward + backward of the logits with a random
cotangent, i.e. a training step without the optimizer) and ``gen`` (greedy ``generate``: decode tokens/s =
B * N / (t(N + 1 new tokens) - t(1 new token)), so the prefill is not counted; ``median_ms`` is the whole
generate call). Images are evenly spaced ``<image>`` tokens, the first at position 0 (n_img = shots + 1).
"""
from __future__ import annotations

import time
from types import SimpleNamespace
from typing import List, Optional

import torch

import fastflamingo

from . import shapes
from .registry import Case, Op, Provider, Runner, register_op, register_provider
from .timing import peak_bytes, time_call

OP = "e2e"
SIZES = {
    # CPU: seconds per step on 2 cores; CUDA: a small model that still makes the cross-attention visible
    "cpu": dict(batch=1, text=1024, hidden=256, layers=4, heads=4, vis_dim=256, new_tokens=8),
    "cuda": dict(batch=4, text=2048, hidden=1024, layers=8, heads=16, vis_dim=1024, new_tokens=32),
    "tiny": dict(batch=1, text=48, hidden=48, layers=4, heads=4, vis_dim=32, new_tokens=3),
}
SHOTS = (0, 4, 32)
_BUDGET = {"cpu": 0.4, "cuda": 0.2, "tiny": 0.02}


def _case(model, size, shots) -> Case:
    p = dict(model=model, size=size, shots=shots, mode="immediate", **SIZES[size])
    return Case(OP, p, _label(p), shots, passes=("fwd", "fwd+bwd", "gen"))


def _label(p) -> str:
    return f"{p['model']} B{p['batch']} T{p['text']} S{p['shots']} d{p['hidden']} L{p['layers']}"


def cases(profile: str, shots: Optional[List[int]] = None) -> List[Case]:
    # the full grid adds nothing here: a model is already every op at once
    if profile == "priority":
        return []
    size = "cpu" if profile in ("cpu", "quick") else "cuda"
    chosen = shots or ((0, 32) if profile == "quick" else SHOTS)
    return [_case(m, size, s) for m in ("openflamingo", "idefics") for s in chosen]


def tiny(case: Case) -> Case:
    p = dict(case.params, size="tiny", **SIZES["tiny"])
    p["model"] = case.params["model"]
    p["text"] = max(p["text"], 4 * (case.shots + 1) + 8)
    return Case(OP, p, _label(p), case.shots, case.passes, case.providers)


def _token_ids(batch, text, num_media, media_token_id, vocab, g):
    ids = torch.randint(0, vocab, (batch, text), generator=g)
    locations = shapes.media_locations(batch, text, num_media, 0.0, "cpu")
    ids[locations] = media_token_id
    return ids, locations


def _openflamingo(p, device, dtype):
    from fastflamingo.testing import tiny_open_flamingo

    vocab = 512
    model, media_id, eoc_id = tiny_open_flamingo(
        hidden_size=p["hidden"], num_layers=p["layers"], num_heads=p["heads"], vis_dim=p["vis_dim"],
        cross_attn_every_n_layers=2, vocab_size=vocab,
    )
    model = model.to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    num_media = p["shots"] + 1
    ids, _ = _token_ids(p["batch"], p["text"], num_media, media_id, vocab - 2, g)
    vision_x = torch.randn(p["batch"], num_media, 1, 3, 32, 32, generator=g).to(device=device, dtype=dtype)
    ids, mask = ids.to(device), torch.ones_like(ids).to(device)

    def forward():
        return model(vision_x=vision_x, lang_x=ids, attention_mask=mask).logits

    def generate(n):
        return model.generate(vision_x=vision_x, lang_x=ids, attention_mask=mask, max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, eos_token_id=eoc_id, pad_token_id=0)

    return model, forward, generate


def _idefics(p, device, dtype):
    from transformers import IdeficsConfig, IdeficsForVisionText2Text

    torch.manual_seed(0)
    heads = max(1, p["vis_dim"] // 64)
    config = IdeficsConfig(
        vocab_size=500, additional_vocab_size=2, hidden_size=p["hidden"], intermediate_size=2 * p["hidden"],
        num_hidden_layers=p["layers"], num_attention_heads=p["heads"], cross_layer_interval=2, qk_layer_norms=True,
        alpha_type="vector", alpha_initializer="normal", alphas_initializer_range=1.0, use_resampler=True,
        max_position_embeddings=max(2048, p["text"] + 64),
        vision_config=dict(embed_dim=p["vis_dim"], image_size=32, patch_size=8, num_hidden_layers=2,
                           num_attention_heads=heads, intermediate_size=2 * p["vis_dim"]),
        perceiver_config=dict(use_resampler=True, resampler_n_latents=64, resampler_depth=2,
                              resampler_n_heads=heads, resampler_head_dim=64, qk_layer_norms_perceiver=True),
    )
    config._attn_implementation = "sdpa"
    model = IdeficsForVisionText2Text(config).eval().to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    num_media = p["shots"] + 1
    image_token = 500  # first additional token, as the processor's <image>
    ids, locations = _token_ids(p["batch"], p["text"], num_media, image_token, 500, g)
    text_time = locations.cumsum(-1)  # one-hot current image from each <image> token on (IdeficsProcessor)
    image_mask = torch.nn.functional.one_hot(text_time, num_media + 1)[..., 1:].long()
    pixels = torch.randn(p["batch"], num_media, 3, 32, 32, generator=g).to(device=device, dtype=dtype)
    inputs = dict(input_ids=ids.to(device), pixel_values=pixels, image_attention_mask=image_mask.to(device),
                  attention_mask=torch.ones_like(ids).to(device))

    def forward():
        return model(**inputs).logits

    def generate(n):
        return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    return model, forward, generate


_BUILDERS = {"openflamingo": _openflamingo, "idefics": _idefics}


def make_inputs(case: Case, device: str, dtype: torch.dtype):
    p = case.params
    model, forward, generate = _BUILDERS[p["model"]](p, device, dtype)
    leaves = [t for t in model.parameters() if t.requires_grad]
    return SimpleNamespace(model=model, forward=forward, generate=generate, leaves=leaves, device=device)


def reference(inputs, case):
    """Unpatched logits in fp32 (the same weights; rows before the first image do not exist: it is at 0)."""
    p = case.params
    if all(t.dtype == torch.float32 for t in inputs.model.parameters()):
        with torch.no_grad():
            return inputs.forward().float()
    _, forward, _ = _BUILDERS[p["model"]](p, inputs.device, torch.float32)
    with torch.no_grad():
        return forward().float()


register_op(Op(OP, "whole model: prefill fwd, fwd+bwd, generation tokens/s (patched vs unpatched)",
               cases, make_inputs, reference, tiny=tiny, default_devices=("cuda",)))


def _gen_pass(inputs, case, device):
    p = case.params
    budget = _BUDGET[p["size"]] if device == "cpu" or p["size"] == "tiny" else _BUDGET["cuda"]
    n = p["new_tokens"]

    def measure():
        with torch.no_grad():
            first = time_call(lambda: inputs.generate(1), device, budget)
            full = time_call(lambda: inputs.generate(n + 1), device, budget)
            peak = peak_bytes(lambda: inputs.generate(n + 1), device)
        decode_s = max(full.median_ms - first.median_ms, 1e-6) / 1e3
        return dict(median_ms=full.median_ms, p20_ms=full.p20_ms, p80_ms=full.p80_ms, reps=full.reps,
                    warmup_ms=full.warmup_ms, prefill_ms=first.median_ms, new_tokens=n,
                    tokens_per_s=p["batch"] * n / decode_s, peak_mb=None if peak is None else peak / 2**20)

    return measure


def _build(which):
    def build(inputs, case, device, dtype) -> Runner:
        note, close = "unpatched", None
        if which == "fastflamingo":
            try:
                report = fastflamingo.patch(inputs.model)
            except TypeError as exc:  # nothing patchable in this model (yet): a clean skip, not an error
                raise NotImplementedError(str(exc).splitlines()[0]) from exc
            note = f"patched: {report.counts() if hasattr(report, 'counts') else report}"

            def close():
                fastflamingo.unpatch(inputs.model)

        runner = Runner(inputs.forward, note=note, close=close)
        runner.extra_passes["gen"] = _gen_pass(inputs, case, device)
        return runner

    return build


register_provider(OP, Provider("upstream", "upstream", _build("upstream"),
                               description="unpatched model (OpenFlamingo / transformers IDEFICS)"))
register_provider(OP, Provider("fastflamingo", "fastflamingo", _build("fastflamingo"),
                               description="fastflamingo.patch(model)"))


# ------------------------------------------------------------------------------------------------------------
# e2e-of3b: whole-model greedy generation of an OpenFlamingo-3B-shaped model (issue 6), opt-in everywhere
# ------------------------------------------------------------------------------------------------------------
#
# The real OpenFlamingo ``Flamingo`` class on a random-weight LM of MPT-1B's shape (OpenFlamingo-3B's LM): width
# 2048, 24 layers, 16 heads, a 2-matrix GELU MLP of 8192, tied embeddings, vocabulary 50280 + <image> +
# <|endofchunk|>; built as a Hugging Face ``phi`` model (the same weight shapes as MPT, plus biases and rotary
# embeddings instead of ALiBi). A gated cross-attention layer before EVERY decoder layer (cross_attn_every_n_layers
# = 1: 24 layers), vision width 1024 (ViT-L/14), the OpenFlamingo perceiver (depth 6, 64 latents). The vision
# encoder is fastflamingo.testing's stand-in (one patchify conv + LayerNorm) on 32 px images (16 patches per
# image instead of ViT-L/14's 256 at 224 px): it and the perceiver run once per ``generate`` in both providers.
#
# The prompt is (shots + 1) chunks of ``<image>`` + random text, each closed by ``<|endofchunk|>`` except the
# last (the query), ``tokens_per_shot`` tokens per chunk. Greedy ``generate`` of ``new_tokens`` tokens
# (min_new_tokens = max_new_tokens): a LogitsProcessor timestamps every step, so one call gives the prefill
# (start -> first token's logits, vision encoding included) and every decode step (logits -> next logits).
#
# Passes (one set of ``reps`` generate calls serves both):
# - ``gen``: median_ms = whole ``generate`` call; tokens_per_s = decode throughput B * (N - 1) / (t_N - t_1);
#   e2e_tokens_per_s = B * N / whole call; prefill_ms;
# - ``decode-step``: median / p20 / p80 of the single decode steps (all reps pooled), tokens_per_s = B / median.
# Wall time (``perf_counter``) and this process's CPU time (``process_time``, the ``cpu_*`` fields: robust to a
# shared machine's descheduling, not to its memory-bandwidth contention) are both recorded.
# The first provider's pass runs BOTH providers' calls, interleaved A B B A (upstream, fastflamingo, ...) on the
# SAME model object: ``fastflamingo.patch`` in place for B (the drop-ins adopt its Parameters; no second copy),
# ``unpatch`` for A, so a drift of the machine's load hits both alike; each provider's rows are then built from
# its own calls. Patched tokens must equal upstream's exactly (``tokens_identical``; a difference turns the rows
# into ``mismatch``). There is no logits gate (a 3B prefill on CPU costs a minute): the token identity is the gate.

OF3B = "e2e-of3b"
OF3B_SIZES = {
    "of3b": dict(batch=1, hidden=2048, layers=24, heads=16, intermediate=8192, vis_dim=1024, vocab=50282,
                 lm="phi", image_size=32, patch_size=8, tokens_per_shot=18, new_tokens=16, reps=2),
    "tiny": dict(batch=1, hidden=64, layers=2, heads=4, intermediate=256, vis_dim=32, vocab=300, lm="phi",
                 image_size=32, patch_size=8, tokens_per_shot=4, new_tokens=4, reps=2),
}
_OF3B_PASSES = ("gen", "decode-step")
_MODEL = {}  # one model kept across cases (building 2.2B random parameters takes a while); the key says which


def _of3b_label(p) -> str:
    return (f"of3b-shape B{p['batch']} S{p['shots']} T{p['text']} +{p['new_tokens']} tok "
            f"(d{p['hidden']} L{p['layers']} xattn/1, {p['image_size']}px)")


def _of3b_case(size: str, batch: int, shots: int) -> Case:
    p = dict(model="of3b", size=size, shots=shots, mode="immediate", **OF3B_SIZES[size])
    p["batch"] = batch
    p["text"] = p["tokens_per_shot"] * (shots + 1) - 1  # no <|endofchunk|> after the query chunk
    return Case(OF3B, p, _of3b_label(p), shots, passes=_OF3B_PASSES)


def of3b_cases(profile: str, shots: Optional[List[int]] = None) -> List[Case]:
    if profile == "priority":
        return []
    batches = (1,) if profile in ("cpu", "quick") else (1, 16)  # B=16 prefill of a 3B model: minutes on CPU
    chosen = shots or ((32,) if profile == "quick" else SHOTS)
    return [_of3b_case("of3b", b, s) for b in batches for s in chosen]


def of3b_tiny(case: Case) -> Case:
    c = _of3b_case("tiny", min(case.params["batch"], 2), case.shots)
    c.providers = case.providers
    return c


def _of3b_model(p, device, dtype):
    from fastflamingo.testing import tiny_open_flamingo

    key = tuple(p[k] for k in ("hidden", "layers", "heads", "intermediate", "vis_dim", "vocab", "lm",
                               "image_size", "patch_size")) + (device, dtype)
    if _MODEL.get("key") != key:
        _MODEL.clear()  # never two models at once
        model, media_id, eoc_id = tiny_open_flamingo(
            lm=p["lm"], hidden_size=p["hidden"], num_layers=p["layers"], num_heads=p["heads"], vis_dim=p["vis_dim"],
            intermediate_size=p["intermediate"], cross_attn_every_n_layers=1, vocab_size=p["vocab"],
            image_size=p["image_size"], patch_size=p["patch_size"], lm_config=dict(tie_word_embeddings=True),
        )
        model = model.to(device=device, dtype=dtype).eval()
        _MODEL.update(key=key, model=model, ids=(media_id, eoc_id),
                      params=sum(t.numel() for t in model.parameters()))
    return _MODEL["model"], _MODEL["ids"]


def of3b_make_inputs(case: Case, device: str, dtype: torch.dtype):
    p = case.params
    model, (media_id, eoc_id) = _of3b_model(p, device, dtype)
    g = torch.Generator().manual_seed(0)
    num_media, per = p["shots"] + 1, p["tokens_per_shot"]
    chunks = []
    for i in range(num_media):
        text = torch.randint(0, p["vocab"] - 2, (p["batch"], per - 2), generator=g)
        parts = [torch.full((p["batch"], 1), media_id), text]
        if i < num_media - 1:
            parts.append(torch.full((p["batch"], 1), eoc_id))
        chunks.append(torch.cat(parts, 1))
    ids = torch.cat(chunks, 1)
    assert ids.shape[1] == p["text"], (ids.shape, p["text"])
    vision_x = torch.randn(p["batch"], num_media, 1, 3, p["image_size"], p["image_size"], generator=g)
    return SimpleNamespace(model=model, ids=ids.to(device), mask=torch.ones_like(ids).to(device),
                           vision_x=vision_x.to(device=device, dtype=dtype), eoc_id=eoc_id, device=device,
                           leaves=[], shared={}, patched=False, params=_MODEL["params"])


def _of3b_generate(inputs, n: int):
    """One greedy generate call. Returns (new tokens (B, n) on the CPU, wall stamps, CPU stamps): stamps[0] before
    the call, stamps[1..n] after each step's logits, stamps[-1] after the call; wall = ``perf_counter``, CPU =
    ``process_time`` (this process's CPU seconds: on a shared machine it leaves out the time the process waited
    for a core, which wall time does not)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    device = inputs.device
    wall, cpu = [], []

    def stamp():
        if device == "cuda":
            torch.cuda.synchronize()
        wall.append(time.perf_counter())
        cpu.append(time.process_time())

    class StepClock(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamp()
            return scores

    stamp()
    with torch.no_grad():
        out = inputs.model.generate(
            vision_x=inputs.vision_x, lang_x=inputs.ids, attention_mask=inputs.mask, max_new_tokens=n,
            min_new_tokens=n, do_sample=False, num_beams=1, eos_token_id=inputs.eoc_id, pad_token_id=0,
            logits_processor=LogitsProcessorList([StepClock()]),
        )
    stamp()
    return out[:, inputs.ids.shape[1]:].cpu(), wall, cpu


def _median(values):
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])


def _set_patched(inputs, patched: bool):
    if patched and not inputs.patched:
        fastflamingo.patch(inputs.model)
    elif not patched and inputs.patched:
        fastflamingo.unpatch(inputs.model)
    inputs.patched = patched


def _of3b_interleaved(inputs, case):
    """Both providers' generate calls, interleaved A B B A ... on the same model object (patched in place for B,
    unpatched for A), so that a slow drift of the machine's load hits both alike. The first call of each provider
    runs inside the peak-memory window."""
    p = case.params
    runs = {"upstream": [], "fastflamingo": []}
    peaks = {}
    for rep in range(p["reps"]):
        order = ("upstream", "fastflamingo") if rep % 2 == 0 else ("fastflamingo", "upstream")
        for which in order:
            _set_patched(inputs, which == "fastflamingo")
            if which not in peaks:
                peaks[which] = peak_bytes(lambda: runs[which].append(_of3b_generate(inputs, p["new_tokens"])),
                                          inputs.device)
            else:
                runs[which].append(_of3b_generate(inputs, p["new_tokens"]))
    _set_patched(inputs, False)
    return runs, peaks


def _of3b_rows(inputs, case, which):
    """The ``gen`` and ``decode-step`` rows of one provider from the interleaved runs."""
    from .timing import QUANTILES, quantile

    if not inputs.shared:
        inputs.shared.update(zip(("runs", "peaks"), _of3b_interleaved(inputs, case)))
    p = case.params
    n, batch = p["new_tokens"], p["batch"]
    runs, peak = inputs.shared["runs"][which], inputs.shared["peaks"][which]
    tokens = runs[0][0]
    ref = inputs.shared["runs"]["upstream"][0][0]
    stable = all(torch.equal(r[0], tokens) for r in runs)
    identical = bool(torch.equal(ref, tokens))

    def summary(k):  # k = 1: wall clock, 2: process CPU time
        whole = [(r[k][-1] - r[k][0]) * 1e3 for r in runs]
        prefill = [(r[k][1] - r[k][0]) * 1e3 for r in runs]  # vision encoding + prefill + first token's logits
        decode = [r[k][n] - r[k][1] for r in runs]  # the N - 1 decode steps after the first token
        steps = sorted((b - a) * 1e3 for r in runs for a, b in zip(r[k][1:n], r[k][2:n + 1]))
        return whole, prefill, decode, steps

    whole, prefill, decode, steps = summary(1)
    cwhole, cprefill, cdecode, csteps = summary(2)
    common = dict(
        new_tokens=n, params_count=inputs.params, peak_mb=None if peak is None else peak / 2**20,
        generated=tokens[0].tolist(), tokens_identical=identical, tokens_stable_across_reps=stable,
        prefill_ms=_median(prefill), cpu_prefill_ms=_median(cprefill),
        whole_ms_all=whole, cpu_whole_ms_all=cwhole, decode_s_all=decode, cpu_decode_s_all=cdecode,
        interleaved="A B B A ... (upstream, fastflamingo alternate; same model object, patched in place)",
    )
    if not identical:
        common.update(status="mismatch", reason="generated tokens differ from the unpatched model's")
    elif not stable:
        common.update(status="mismatch", reason="generated tokens differ between reps")
    gen = dict(common, median_ms=_median(whole), p20_ms=min(whole), p80_ms=max(whole), reps=len(runs),
               tokens_per_s=batch * (n - 1) / _median(decode), e2e_tokens_per_s=batch * n * 1e3 / _median(whole),
               cpu_median_ms=_median(cwhole), cpu_tokens_per_s=batch * (n - 1) / _median(cdecode),
               cpu_e2e_tokens_per_s=batch * n * 1e3 / _median(cwhole))
    med = quantile(steps, QUANTILES[0])
    step = dict(common, median_ms=med, p20_ms=quantile(steps, QUANTILES[1]), p80_ms=quantile(steps, QUANTILES[2]),
                reps=len(steps), tokens_per_s=batch * 1e3 / med, cpu_median_ms=quantile(csteps, QUANTILES[0]),
                cpu_p20_ms=quantile(csteps, QUANTILES[1]), cpu_p80_ms=quantile(csteps, QUANTILES[2]),
                cpu_tokens_per_s=batch * 1e3 / quantile(csteps, QUANTILES[0]))
    return {"gen": gen, "decode-step": step}


def _of3b_build(which):
    def build(inputs, case, device, dtype) -> Runner:
        note = "unpatched"
        if which == "fastflamingo":
            note = "fastflamingo.patch(model) in place"

        def run(pass_):
            return lambda: dict(_of3b_rows(inputs, case, which)[pass_])

        runner = Runner(lambda: None, note=note, check=False)
        for pass_ in _OF3B_PASSES:
            runner.extra_passes[pass_] = run(pass_)
        return runner

    return build


register_op(Op(OF3B, "OpenFlamingo-3B-shaped model (24 xattn layers, random weights): greedy generate, "
                     "patched vs unpatched on one model object (opt-in)",
               of3b_cases, of3b_make_inputs, reference=None, tiny=of3b_tiny, default_devices=()))
register_provider(OF3B, Provider("upstream", "upstream", _of3b_build("upstream"),
                                 description="unpatched OpenFlamingo Flamingo"))
register_provider(OF3B, Provider("fastflamingo", "fastflamingo", _of3b_build("fastflamingo"),
                                 description="fastflamingo.patch(model), same model object"))
