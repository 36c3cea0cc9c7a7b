"""Op ``e2e``: whole random-weight models, unpatched (``upstream``) vs ``fastflamingo.patch(model)``
(PERF.md section 9.2 row F).

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
