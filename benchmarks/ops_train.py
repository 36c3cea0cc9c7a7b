"""Op ``train``: a training step of a whole random-weight model, patched vs unpatched (issue 10).

What OpenFlamingo and IDEFICS train: the language model and the vision encoder are frozen; the gated
cross-attention layers and the Perceiver resampler are trained (OpenFlamingo also trains the input embeddings, for
its two new tokens). One step = forward of 32-shot interleaved batches (``<image>`` + text per shot) with the LM
loss on the text tokens, backward, and an ``AdamW`` step. Reported per provider (pass ``train-step``):
``samples_per_s`` (batch / median step time), ``median_ms`` and ``peak_mb``: the memory a step adds at its peak
over what exists before it (weights, AdamW state): activations, gradients and temporaries. ``grads_mb`` is the size
of the trainable gradients (the same for both providers), so ``peak_mb - grads_mb`` approximates the activations.

Models (``model`` parameter of a case):

- ``of3b``: the real OpenFlamingo ``Flamingo`` class with OpenFlamingo-3B's structure (a cross-attention layer before
  every LM layer, 8 x 64 cross-attention heads, ff_mult 4, Perceiver depth 6 with 64 latents); ``--full``: MPT-1B's
  width (2048, 24 layers, 16 heads, MLP 8192) and ViT-L's 1024 vision width; CPU: width 512, 4 layers, vision 512;
- ``idefics9b``: ``transformers.IdeficsForVisionText2Text`` at IDEFICS-9B's layer shapes (LLaMA-7B's 4096 = 32 x
  128, MLP 11008, a gated layer every 4 layers, ViT-H's 1280 vision width, Perceiver of 16 x 96 heads, 64
  latents); ``--full`` keeps those sizes with 8 decoder layers (two gated layers) to fit one GPU; CPU: width 512
  (4 x 128 heads), MLP 1376, 4 layers with a gated layer every 2, vision 256.

The vision encoders are small stand-ins (32 px images): they are frozen and run under ``no_grad`` in both providers.
Both providers run on ONE model object with ONE optimizer (``fastflamingo.patch`` swaps modules in place and keeps
the Parameter objects), their steps interleaved A B B A, so a drift of the machine's load hits both alike. A
correctness gate compares the loss and the trainable gradients of both providers at identical weights first.
"""
from __future__ import annotations

import time
from types import SimpleNamespace
from typing import List, Optional

import torch

import fastflamingo

from .registry import Case, Op, Provider, Runner, register_op, register_provider
from .timing import peak_bytes

OP = "train"
PASS = "train-step"
SIZES = {
    "of3b": {
        "full": dict(batch=8, hidden=2048, layers=24, heads=16, intermediate=8192, vis_dim=1024, depth=6,
                     tokens_per_shot=18, vocab=50282, reps=6),
        "cpu": dict(batch=2, hidden=512, layers=4, heads=8, intermediate=2048, vis_dim=512, depth=2,
                    tokens_per_shot=18, vocab=1024, reps=3),
        "tiny": dict(batch=1, hidden=64, layers=2, heads=4, intermediate=128, vis_dim=32, depth=1,
                     tokens_per_shot=4, vocab=128, reps=1),
    },
    "idefics9b": {
        "full": dict(batch=4, hidden=4096, layers=8, heads=32, intermediate=11008, vis_dim=1280, interval=4,
                     perceiver_heads=16, perceiver_head_dim=96, depth=6, tokens_per_shot=18, vocab=32000, reps=6),
        "cpu": dict(batch=2, hidden=512, layers=4, heads=4, intermediate=1376, vis_dim=256, interval=2,
                    perceiver_heads=2, perceiver_head_dim=96, depth=2, tokens_per_shot=18, vocab=1024, reps=3),
        "tiny": dict(batch=1, hidden=64, layers=2, heads=2, intermediate=96, vis_dim=32, interval=1,
                     perceiver_heads=2, perceiver_head_dim=16, depth=1, tokens_per_shot=4, vocab=128, reps=1),
    },
}
SHOTS = (32,)
LR = 1e-4


def _label(p) -> str:
    return (f"{p['model']}-shape train B{p['batch']} S{p['shots']} T{p['text']} "
            f"(d{p['hidden']} L{p['layers']}, {p['size']})")


def _case(model: str, size: str, shots: int) -> Case:
    p = dict(model=model, size=size, shots=shots, mode="immediate", **SIZES[model][size])
    p["text"] = p["tokens_per_shot"] * (shots + 1)
    return Case(OP, p, _label(p), shots, passes=(PASS,))


def cases(profile: str, shots: Optional[List[int]] = None) -> List[Case]:
    if profile == "priority":
        return []
    size = "full" if profile in ("full", "diagonal") else "cpu"
    return [_case(m, size, s) for m in SIZES for s in (shots or SHOTS)]


def tiny(case: Case) -> Case:
    c = _case(case.params["model"], "tiny", min(case.shots, 4))
    c.providers = case.providers
    return c


def _interleaved_ids(p, media_id, eoc_id, g):
    """(shots + 1) chunks of ``<image>`` + random text, each closed by ``<|endofchunk|>`` (OpenFlamingo's
    interleaved training format), and the labels: the text tokens (``<image>`` masked with -100)."""
    chunks = []
    for _ in range(p["shots"] + 1):
        text = torch.randint(0, p["vocab"] - 3, (p["batch"], p["tokens_per_shot"] - 2), generator=g)
        chunks.append(torch.cat([torch.full((p["batch"], 1), media_id), text, torch.full((p["batch"], 1), eoc_id)], 1))
    ids = torch.cat(chunks, 1)
    labels = ids.masked_fill(ids == media_id, -100)
    return ids, labels


def _openflamingo(p, device, dtype):
    from fastflamingo.testing import tiny_open_flamingo

    model, media_id, eoc_id = tiny_open_flamingo(
        lm="llama", hidden_size=p["hidden"], num_layers=p["layers"], num_heads=p["heads"], vis_dim=p["vis_dim"],
        intermediate_size=p["intermediate"], cross_attn_every_n_layers=1, vocab_size=p["vocab"],
    )
    if p["depth"] != len(model.perceiver.layers):
        del model.perceiver.layers[p["depth"]:]
    model = model.to(device=device, dtype=dtype).train()
    # what OpenFlamingo trains (open_flamingo/src/factory.py): perceiver, gated cross-attention, input embeddings
    model.requires_grad_(False)
    model.perceiver.requires_grad_(True)
    model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    model.lang_encoder.get_input_embeddings().requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    ids, labels = _interleaved_ids(p, media_id, eoc_id, g)
    vision_x = torch.randn(p["batch"], p["shots"] + 1, 1, 3, 32, 32, generator=g).to(device=device, dtype=dtype)
    ids, labels = ids.to(device), labels.to(device)
    mask = torch.ones_like(ids)

    def loss():
        return model(vision_x=vision_x, lang_x=ids, attention_mask=mask, labels=labels).loss

    return model, loss


def _idefics(p, device, dtype):
    from transformers import IdeficsConfig, IdeficsForVisionText2Text

    torch.manual_seed(0)
    vocab = p["vocab"]
    config = IdeficsConfig(
        vocab_size=vocab, additional_vocab_size=2, hidden_size=p["hidden"], intermediate_size=p["intermediate"],
        num_hidden_layers=p["layers"], num_attention_heads=p["heads"], cross_layer_interval=p["interval"],
        qk_layer_norms=False, alpha_type="float", alpha_initializer="ones", use_resampler=True,
        max_position_embeddings=max(2048, p["text"] + 64),
        vision_config=dict(embed_dim=p["vis_dim"], image_size=32, patch_size=8, num_hidden_layers=1,
                           num_attention_heads=max(1, p["vis_dim"] // 64), intermediate_size=2 * p["vis_dim"]),
        perceiver_config=dict(use_resampler=True, resampler_n_latents=64, resampler_depth=p["depth"],
                              resampler_n_heads=p["perceiver_heads"], resampler_head_dim=p["perceiver_head_dim"],
                              qk_layer_norms_perceiver=False),
    )
    config._attn_implementation = "sdpa"
    model = IdeficsForVisionText2Text(config).to(device=device, dtype=dtype).train()
    # what IDEFICS trains: the gated cross-attention layers and the resampler (LM and vision encoder frozen)
    model.requires_grad_(False)
    model.model.gated_cross_attn_layers.requires_grad_(True)
    model.model.perceiver_resampler.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    image_id, eoc_id = vocab, vocab - 1
    ids, labels = _interleaved_ids(p, image_id, eoc_id, g)
    num_media = p["shots"] + 1
    text_time = (ids == image_id).cumsum(-1)  # one-hot current image from each <image> token on (IdeficsProcessor)
    image_mask = torch.nn.functional.one_hot(text_time, num_media + 1)[..., 1:].long()
    pixels = torch.randn(p["batch"], num_media, 3, 32, 32, generator=g).to(device=device, dtype=dtype)
    inputs = dict(input_ids=ids.to(device), pixel_values=pixels, image_attention_mask=image_mask.to(device),
                  attention_mask=torch.ones_like(ids).to(device))
    labels = labels.to(device)

    def loss():
        # the next-token loss over every logit column: transformers' own loss assumes vocab_size columns, while
        # IDEFICS' logits have vocab_size + additional_vocab_size of them
        logits = model(**inputs).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())

    return model, loss


_BUILDERS = {"of3b": _openflamingo, "idefics9b": _idefics}


def make_inputs(case: Case, device: str, dtype: torch.dtype):
    model, loss = _BUILDERS[case.params["model"]](case.params, device, dtype)
    trainable = [t for t in model.parameters() if t.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR)
    return SimpleNamespace(model=model, loss=loss, trainable=trainable, optimizer=optimizer, device=device,
                           dtype=dtype, leaves=[], shared={}, patched=False)


def _set_patched(inputs, patched: bool) -> None:
    if patched and not inputs.patched:
        fastflamingo.patch(inputs.model)
    elif not patched and inputs.patched:
        fastflamingo.unpatch(inputs.model)
    inputs.patched = patched


def _step(inputs) -> float:
    """One training step; returns its wall time in ms."""
    sync = torch.cuda.synchronize if inputs.device == "cuda" else (lambda: None)
    inputs.optimizer.zero_grad(set_to_none=True)
    sync()
    start = time.perf_counter()
    inputs.loss().backward()
    inputs.optimizer.step()
    sync()
    return (time.perf_counter() - start) * 1e3


def _gate(inputs) -> dict:
    """Loss and trainable gradients of both providers at identical weights (no optimizer step)."""
    out = {}
    for which in ("upstream", "fastflamingo"):
        _set_patched(inputs, which == "fastflamingo")
        inputs.optimizer.zero_grad(set_to_none=True)
        loss = inputs.loss()
        loss.backward()
        out[which] = (loss.detach().float(), [t.grad.detach().float().clone() if t.grad is not None else None
                                              for t in inputs.trainable])
    inputs.optimizer.zero_grad(set_to_none=True)
    (ref_loss, ref_grads), (loss, grads) = out["upstream"], out["fastflamingo"]
    worst = 0.0
    for a, b in zip(grads, ref_grads):
        if a is None or b is None:
            continue
        worst = max(worst, ((a - b).norm() / b.norm().clamp_min(1e-30)).item())
    return dict(loss_rel_err=abs((loss - ref_loss).item()) / max(abs(ref_loss.item()), 1e-30), grad_rel_err=worst)


def _interleaved(inputs, case):
    """Both providers' steps, A B B A ... on the same model and optimizer; one warm-up step each first (AdamW state,
    autotuning), then the peak-memory step, then ``reps`` timed steps."""
    p = case.params
    gate = _gate(inputs)
    times = {"upstream": [], "fastflamingo": []}
    peaks = {}
    for which in ("upstream", "fastflamingo"):
        _set_patched(inputs, which == "fastflamingo")
        _step(inputs)  # warm-up: creates the AdamW state, compiles / tunes kernels on a GPU
        peaks[which] = peak_bytes(lambda: _step(inputs), inputs.device,
                                  before=lambda: inputs.optimizer.zero_grad(set_to_none=True))
    for rep in range(p["reps"]):
        order = ("upstream", "fastflamingo") if rep % 2 == 0 else ("fastflamingo", "upstream")
        for which in order:
            _set_patched(inputs, which == "fastflamingo")
            times[which].append(_step(inputs))
    _set_patched(inputs, False)
    inputs.optimizer.zero_grad(set_to_none=True)
    return gate, times, peaks


def _rows(inputs, case, which) -> dict:
    from .timing import quantile

    if not inputs.shared:
        inputs.shared.update(zip(("gate", "times", "peaks"), _interleaved(inputs, case)))
    gate, times, peak = inputs.shared["gate"], sorted(inputs.shared["times"][which]), inputs.shared["peaks"][which]
    med = quantile(times, 0.5)
    grads_mb = sum(t.numel() * t.element_size() for t in inputs.trainable) / 2**20
    row = dict(median_ms=med, p20_ms=quantile(times, 0.2), p80_ms=quantile(times, 0.8), reps=len(times),
               samples_per_s=case.params["batch"] * 1e3 / med, peak_mb=None if peak is None else peak / 2**20,
               grads_mb=grads_mb, trainable_params=sum(t.numel() for t in inputs.trainable),
               params_count=sum(t.numel() for t in inputs.model.parameters()), steps_ms_all=times,
               interleaved="A B B A ... (upstream, fastflamingo alternate; one model, one AdamW)", **gate)
    if row["peak_mb"] is not None:
        row["activation_mb"] = max(row["peak_mb"] - grads_mb, 0.0)
    tolerance = 1e-3 if inputs.dtype == torch.float32 else 3e-2
    if gate["loss_rel_err"] > tolerance or gate["grad_rel_err"] > 10 * tolerance:
        row.update(status="mismatch", reason=f"loss/gradients differ from the unpatched model's ({gate})")
    return row


def _build(which):
    def build(inputs, case, device, dtype) -> Runner:
        runner = Runner(lambda: None, note="unpatched" if which == "upstream" else "fastflamingo.patch(model)",
                        check=False)
        runner.extra_passes[PASS] = lambda: _rows(inputs, case, which)
        return runner

    return build


register_op(Op(OP, "training step (LM frozen; cross-attention + resampler trained, AdamW) at 32 shots, patched vs "
                   "unpatched: samples/s and peak memory", cases, make_inputs, reference=None, tiny=tiny,
               default_devices=()))
register_provider(OP, Provider("upstream", "upstream", _build("upstream"),
                               description="unpatched model (OpenFlamingo / transformers IDEFICS)"))
register_provider(OP, Provider("fastflamingo", "fastflamingo", _build("fastflamingo"),
                               description="fastflamingo.patch(model), same model object and optimizer"))
