"""Op ``evolla`` (opt-in): greedy ``generate`` of a scaled-down transformers ``EvollaForProteinText2Text``
(random weights), unpatched vs ``fastflamingo.patch(model)``.

Model (``cpu`` size): SaProt protein encoder 320 wide, 8 layers, 20 heads, MLP 1280 (Evolla-10B's SaProt-650M is
1280 wide, 33 layers); compressor of 64 latents, depth 2, 8 heads of 64; Llama decoder 1024 wide, 8 layers, 8 query /
2 KV heads of 128, MLP 3584 (Llama-3-8B: 4096, 32 layers), an aligner every 4th layer (as Evolla-10B: 32 layers, 8
aligners), vocabulary 32000. Input: batch 1, a protein of 512 tokens, a text prompt of 48 tokens, 16 new tokens.

Providers, run interleaved on ONE model object (patched in place for the fastflamingo ones, unpatched for upstream;
A B C C B A), each generating with ``min_new_tokens = max_new_tokens``:

- ``upstream``: transformers as configured (``EvollaConfig.use_cache`` is False, so every step reruns the whole text,
  and it re-encodes the protein and re-projects every aligner's K/V);
- ``fastflamingo``: the same ``generate`` call on the patched model: the protein is encoded and the K/V projected
  once per sequence, and the patched ``generate`` turns the KV cache on (upstream cannot run it: its aligner broadcasts
  the whole text mask against a decode step's query; tests/test_evolla.py);
- ``fastflamingo-nocache``: the patched model with ``generate(use_cache=False)``, upstream's configuration (the text is
  rerun every step; only the protein and the K/V are kept).

Pass ``gen``: ``median_ms`` = whole call; ``e2e_tokens_per_s`` = B * N / whole call (the figure of the issue);
``tokens_per_s`` = decode throughput B * (N - 1) / (t_N - t_1) from a timestamping logits processor; the same from
the process CPU time (``cpu_*``); ``tokens_identical``: each provider's tokens equal upstream's (else ``mismatch``).
"""
from __future__ import annotations

import statistics
import time
from types import SimpleNamespace
from typing import List, Optional

import torch

import fastflamingo

from .registry import Case, Op, Provider, Runner, register_op, register_provider
from .timing import peak_bytes

OP = "evolla"
SIZES = {
    "cpu": dict(batch=1, protein=512, text=48, new_tokens=16, reps=2, protein_hidden=320, protein_layers=8,
                protein_heads=20, hidden=1024, layers=8, heads=8, kv_heads=2, intermediate=3584, vocab=32000,
                latents=64, resampler_depth=2, aligner_every=4),
    "tiny": dict(batch=1, protein=24, text=8, new_tokens=4, reps=2, protein_hidden=32, protein_layers=2,
                 protein_heads=4, hidden=32, layers=4, heads=4, kv_heads=2, intermediate=64, vocab=100, latents=8,
                 resampler_depth=2, aligner_every=2),
}
PROVIDERS = ("upstream", "fastflamingo", "fastflamingo-nocache")
_MODEL = {}  # one model, kept across providers (the key says which)


def _label(p) -> str:
    return (f"evolla B{p['batch']} protein {p['protein']} T{p['text']} +{p['new_tokens']} tok "
            f"(SaProt d{p['protein_hidden']} L{p['protein_layers']}, Llama d{p['hidden']} L{p['layers']})")


def _case(size: str) -> Case:
    p = dict(model="evolla", size=size, **SIZES[size])
    return Case(OP, p, _label(p), 0, passes=("gen",))


def cases(profile: str, shots: Optional[List[int]] = None) -> List[Case]:
    return [] if profile == "priority" else [_case("cpu")]


def tiny(case: Case) -> Case:
    c = _case("tiny")
    c.providers = case.providers
    return c


def _model(p, device, dtype):
    from fastflamingo.testing import tiny_evolla

    key = tuple(sorted(p.items())) + (device, dtype)
    if _MODEL.get("key") != key:
        _MODEL.clear()
        model = tiny_evolla(
            gate=0.5, hidden_size=p["hidden"], num_layers=p["layers"], aligner_every=p["aligner_every"],
            protein_hidden=p["protein_hidden"], num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"],
            intermediate_size=p["intermediate"], vocab_size=p["vocab"], resampler_num_latents=p["latents"],
            resampler_depth=p["resampler_depth"], resampler_heads=8, resampler_dim_head=64 if p["size"] != "tiny"
            else 8, protein_encoder_config=dict(num_hidden_layers=p["protein_layers"],
                                                num_attention_heads=p["protein_heads"],
                                                intermediate_size=4 * p["protein_hidden"]),
        )
        _MODEL.update(key=key, model=model.to(device=device, dtype=dtype).eval(),
                      params=sum(t.numel() for t in model.parameters()))
    return _MODEL["model"]


def make_inputs(case: Case, device: str, dtype: torch.dtype):
    p = case.params
    model = _model(p, device, dtype)
    g = torch.Generator().manual_seed(0)
    batch = dict(input_ids=torch.randint(3, p["vocab"], (p["batch"], p["text"]), generator=g),
                 attention_mask=torch.ones(p["batch"], p["text"], dtype=torch.long),
                 protein_input_ids=torch.randint(4, 446, (p["batch"], p["protein"]), generator=g),
                 protein_attention_mask=torch.ones(p["batch"], p["protein"], dtype=torch.long))
    return SimpleNamespace(model=model, batch={k: v.to(device) for k, v in batch.items()}, device=device, leaves=[],
                           shared={}, patched=False, params=_MODEL["params"])


def _generate(inputs, n: int, use_cache: Optional[bool]):
    """One greedy generate call: (new tokens on the CPU, wall stamps, CPU stamps); stamps[0] before the call,
    stamps[1..n] at each step's logits, stamps[-1] after the call."""
    from transformers import LogitsProcessor, LogitsProcessorList

    wall, cpu = [], []

    def stamp():
        if inputs.device == "cuda":
            torch.cuda.synchronize()
        wall.append(time.perf_counter())
        cpu.append(time.process_time())

    class StepClock(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamp()
            return scores

    stamp()
    with torch.no_grad():
        # use_cache only when asked for: an explicit use_cache=None overrides the generation config's False (and the
        # patched generate's True), and generate then hands the model a cache that every full-sequence step appends to
        options = {} if use_cache is None else {"use_cache": use_cache}
        out = inputs.model.generate(**inputs.batch, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                    logits_processor=LogitsProcessorList([StepClock()]), **options)
    stamp()
    return out[:, inputs.batch["input_ids"].shape[1]:].cpu(), wall, cpu


def _interleaved(inputs, case):
    p = case.params
    runs = {name: [] for name in PROVIDERS}
    peaks = {}
    for rep in range(p["reps"]):
        for which in (PROVIDERS if rep % 2 == 0 else PROVIDERS[::-1]):
            patched = which != "upstream"
            if patched and not inputs.patched:
                fastflamingo.patch(inputs.model)  # in place: the drop-ins adopt the same Parameters
            elif not patched and inputs.patched:
                fastflamingo.unpatch(inputs.model)
            inputs.patched = patched
            use_cache = False if which == "fastflamingo-nocache" else None

            def call():
                runs[which].append(_generate(inputs, p["new_tokens"], use_cache))

            if which not in peaks:
                peaks[which] = peak_bytes(call, inputs.device)
            else:
                call()
    if inputs.patched:
        fastflamingo.unpatch(inputs.model)
        inputs.patched = False
    return runs, peaks


def _row(inputs, case, which):
    if not inputs.shared:
        inputs.shared.update(zip(("runs", "peaks"), _interleaved(inputs, case)))
    p = case.params
    n, batch = p["new_tokens"], p["batch"]
    runs, peak = inputs.shared["runs"][which], inputs.shared["peaks"][which]
    ref = inputs.shared["runs"]["upstream"][0][0]
    identical = all(torch.equal(r[0], ref) for r in runs)

    def whole(k):
        return [(r[k][-1] - r[k][0]) * 1e3 for r in runs]

    def decode(k):
        return [r[k][n] - r[k][1] for r in runs]

    row = dict(median_ms=statistics.median(whole(1)), p20_ms=min(whole(1)), p80_ms=max(whole(1)), reps=len(runs),
               new_tokens=n, params_count=inputs.params, peak_mb=None if peak is None else peak / 2**20,
               generated=runs[0][0][0].tolist(), tokens_identical=identical,
               prefill_ms=statistics.median([(r[1][1] - r[1][0]) * 1e3 for r in runs]),
               e2e_tokens_per_s=batch * n * 1e3 / statistics.median(whole(1)),
               tokens_per_s=batch * (n - 1) / statistics.median(decode(1)),
               cpu_median_ms=statistics.median(whole(2)), cpu_e2e_tokens_per_s=batch * n * 1e3 / statistics.median(whole(2)),
               cpu_tokens_per_s=batch * (n - 1) / statistics.median(decode(2)), whole_ms_all=whole(1),
               interleaved="A B C C B A (upstream, fastflamingo, fastflamingo-nocache; one model object)")
    if not identical:
        row.update(status="mismatch", reason="generated tokens differ from the unpatched model's")
    return row


def _build(which):
    def build(inputs, case, device, dtype) -> Runner:
        runner = Runner(lambda: None, note="unpatched" if which == "upstream" else "fastflamingo.patch(model) in "
                        "place" + (", generate(use_cache=False)" if which == "fastflamingo-nocache" else ""),
                        check=False)
        runner.extra_passes["gen"] = lambda: dict(_row(inputs, case, which))
        return runner

    return build


register_op(Op(OP, "Evolla (SaProt + compressor + Llama with aligners, scaled down, random weights): greedy "
                   "generate tokens/s, patched vs unpatched on one model object (opt-in)",
               cases, make_inputs, reference=None, tiny=tiny, default_devices=()))
register_provider(OP, Provider("upstream", "upstream", _build("upstream"),
                               description="unpatched transformers EvollaForProteinText2Text"))
register_provider(OP, Provider("fastflamingo", "fastflamingo", _build("fastflamingo"),
                               description="fastflamingo.patch(model), same generate call (KV cache on)"))
register_provider(OP, Provider("fastflamingo-nocache", "fastflamingo", _build("fastflamingo-nocache"),
                               description="fastflamingo.patch(model), generate(use_cache=False)"))
