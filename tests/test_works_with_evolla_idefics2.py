"""Patched Evolla and Idefics2 models work wherever transformers' own work (README, "Works with"; the older families
are in test_works_with.py, test_big_models.py and test_compile.py): inference mode, torch.save of a whole model
after generate, torch.compile of the drop-ins, patching on the meta device, accelerate dispatch with CPU and disk
offload, activation checkpointing, fully padded proteins / images and text-only batches. Every comparison is
against the unpatched transformers model in fp32 (1e-5 relative, as tests/test_evolla.py and test_idefics2.py).

torch.compile: the patched whole models take 35 s (Idefics2) and 66 s (Evolla) to compile even with
``aot_eager`` on this 2-core CPU, so the drop-ins are compiled one by one: Evolla's aligner with the default
inductor backend (about 20 s cold), Evolla's compressor and the patched Idefics2 resampler with ``aot_eager`` (the
same AOTAutograd graphs, forward and backward, without inductor's C++ build, which took 15 s and 39 s cold for
them and would put this file far over its time budget).
"""
import copy
import io

import pytest
import torch

import fastflamingo
from fastflamingo import testing
from fastflamingo.models.evolla.decoding import KvCachedGenerate
from fastflamingo.models.evolla.protein_cache import CachedProteinEncoding
from fastflamingo.models.idefics2 import Idefics2PerceiverLayer
from fastflamingo.models.idefics2.resampler import ResamplerForward
from helpers import assert_close, grads_match

transformers = pytest.importorskip("transformers")
import test_evolla as evolla_cases  # noqa: E402
import test_idefics2 as idefics2_cases  # noqa: E402
from transformers import EvollaForProteinText2Text, Idefics2ForConditionalGeneration  # noqa: E402

NEW_TOKENS = 3


# --------------------------------------------------------------------------------------------------------------
# models and inputs
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evolla():
    """(upstream, the same model patched); tests that change a model work on copies."""
    upstream = testing.tiny_evolla()
    patched = copy.deepcopy(upstream)
    fastflamingo.patch(patched)
    return upstream, patched


@pytest.fixture(scope="module")
def idefics2():
    upstream = testing.tiny_idefics2()
    idefics2_cases.randomised(upstream.model.connector, seed=7)
    patched = copy.deepcopy(upstream)
    fastflamingo.patch(patched)
    return upstream, patched


def evolla_batch(seed, padded_protein=True):
    """test_evolla's batch: a right-padded protein, a left-padded prompt and (``padded_protein``) a fully padded
    protein in the last sample, which upstream's SaProt turns into NaN logits for that sample."""
    return evolla_cases.inputs(seed=seed, padded_protein=padded_protein)


def idefics2_batch():
    """test_idefics2's batch (sample 0: two images, the second half padded; sample 1: one image and an all-zero
    padding image that upstream drops) with sample 0's second image entirely padded: its pixels are kept, its
    pixel mask hides every patch, so its latents attend only to themselves in the resampler."""
    ids, attention_mask, pixels, pixel_mask = idefics2_cases.images_and_prompt()
    pixel_mask = pixel_mask.clone()
    pixel_mask[0, 1] = False
    return dict(input_ids=ids, attention_mask=attention_mask, pixel_values=pixels, pixel_attention_mask=pixel_mask)


def idefics2_generate(model, batch):
    return model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)


def assert_evolla_logits(got, want):
    """Equal NaN rows (a fully padded protein) and the other samples within 1e-5."""
    nan = torch.isnan(want).flatten(1).all(1)
    assert torch.equal(torch.isnan(got).flatten(1).all(1), nan) and not torch.isnan(got[~nan]).any()
    assert_close(got[~nan], want[~nan], 1e-5)


def assert_idefics2_logits(got, want):
    assert_close(got, want, 1e-5)


def reloaded(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


# --------------------------------------------------------------------------------------------------------------
# torch.inference_mode (serving code): no version counters, so no cache may be reused
# --------------------------------------------------------------------------------------------------------------


def test_evolla_inference_mode_forward_and_kv_cached_generate(evolla):
    upstream, patched = evolla
    batch, prompt = evolla_batch(seed=11), evolla_batch(seed=12, padded_protein=False)
    with torch.no_grad():
        want = upstream(**batch).logits
        tokens = upstream.generate(**prompt, max_new_tokens=NEW_TOKENS, do_sample=False)  # upstream: no KV cache
    with torch.inference_mode():
        inference_batch = {k: v.clone() for k, v in batch.items()}  # inference tensors, as serving code makes them
        assert_evolla_logits(patched(**inference_batch).logits, want)
        assert_evolla_logits(patched(**inference_batch).logits, want)  # again: nothing stale was reused
        inference_prompt = {k: v.clone() for k, v in prompt.items()}
        for _ in range(2):
            assert torch.equal(patched.generate(**inference_prompt, max_new_tokens=NEW_TOKENS, do_sample=False),
                               tokens)
        inference_prompt["protein_input_ids"][0, 2] += 1  # in place: no version counter sees it
        other = patched.generate(**inference_prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    with torch.no_grad():
        assert torch.equal(other, upstream.generate(**{k: v.clone() for k, v in inference_prompt.items()},
                                                    max_new_tokens=NEW_TOKENS, do_sample=False))


def test_idefics2_inference_mode_forward_and_generate(idefics2):
    upstream, patched = idefics2
    batch = idefics2_batch()
    with torch.no_grad():
        want = upstream(**batch).logits
        tokens = idefics2_generate(upstream, batch)
    with torch.inference_mode():
        inference_batch = {k: v.clone() for k, v in batch.items()}
        assert_idefics2_logits(patched(**inference_batch).logits, want)
        assert torch.equal(idefics2_generate(patched, inference_batch), tokens)


# --------------------------------------------------------------------------------------------------------------
# torch.save / torch.load of the whole patched model after generate filled its caches
# --------------------------------------------------------------------------------------------------------------


def test_evolla_torch_save_after_generate(evolla):
    upstream, patched = evolla
    model = copy.deepcopy(patched)
    prompt = evolla_batch(seed=13, padded_protein=False)
    with torch.no_grad():
        tokens = model.generate(**prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert model.model.protein_encoder.media_cache.value is not None  # generate left an encoding cached
    loaded = reloaded(model)
    encoder = loaded.model.protein_encoder
    hook = encoder.__dict__["forward"]
    assert isinstance(hook, CachedProteinEncoding) and hook.encoder is encoder
    assert encoder.media_cache.value is None  # a cache is not state
    adapters = [layer.adapter for layer in loaded.model.layers if getattr(layer, "adapter", None) is not None]
    assert len(adapters) == 2 and all(adapter.media_cache.value is None for adapter in adapters)
    generate = loaded.__dict__["generate"]
    assert isinstance(generate, KvCachedGenerate) and generate.model is loaded
    batch = evolla_batch(seed=14)
    with torch.no_grad():
        assert torch.equal(loaded.generate(**prompt, max_new_tokens=NEW_TOKENS, do_sample=False), tokens)
        assert_evolla_logits(loaded(**batch).logits, upstream(**batch).logits)
    assert fastflamingo.unpatch(loaded) == 3  # the originals travelled with the pickle
    assert "generate" not in loaded.__dict__ and "forward" not in encoder.__dict__


def test_idefics2_torch_save_after_generate(idefics2):
    """Used to fail in torch.load: the resampler's instance forward was a bound method, which pickles as
    ``getattr(resampler, "resample")``."""
    upstream, patched = idefics2
    model = copy.deepcopy(patched)
    batch = idefics2_batch()
    with torch.no_grad():
        tokens = idefics2_generate(model, batch)
    loaded = reloaded(model)
    resampler = loaded.model.connector.perceiver_resampler
    forward = resampler.__dict__["forward"]
    assert isinstance(forward, ResamplerForward) and forward.module is resampler
    with torch.no_grad():
        assert torch.equal(idefics2_generate(loaded, batch), tokens)
        assert_idefics2_logits(loaded(**batch).logits, upstream(**batch).logits)
    assert fastflamingo.unpatch(loaded) == 2 and "forward" not in resampler.__dict__


# --------------------------------------------------------------------------------------------------------------
# torch.compile (the torch path: no Triton on CPU)
# --------------------------------------------------------------------------------------------------------------


def test_evolla_aligner_compiles_with_inductor(evolla):
    """Three sources, per-sample batch masks, a sample that sees no key (upstream's uniform rows) and left-padded
    text: the inductor-compiled drop-in equals its eager self and upstream."""
    torch._dynamo.reset()
    config = evolla[0].config
    up, new = evolla_cases._aligner(config, protein_encoder_dim=config.hidden_size, structure_encoder_dim=20,
                                    msa_encoder_dim=12)
    args = evolla_cases._aligner_args(config)
    args.update(protein_batch_mask=torch.tensor([True, True, False, False]),
                structure_batch_mask=torch.tensor([True, False, True, False]),
                msa_batch_mask=torch.tensor([False, True, True, False]))
    compiled = torch.compile(new)
    with torch.no_grad():
        want, eager, got = up(**args), new(**args), compiled(**args)
    assert_close(got, eager, 1e-5)
    assert_close(got, want, 1e-5)


def test_evolla_compressor_compiles_forward_and_backward():
    torch._dynamo.reset()
    config = testing.evolla_config()
    up, new = evolla_cases._upstream_and_dropin(evolla_cases.hf.EvollaSequenceCompressorResampler,
                                                evolla_cases.ff.EvollaSequenceCompressorResampler, config)
    embeds = torch.randn(3, 10, config.protein_encoder_config.hidden_size, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2] = 0  # a fully padded protein: the latents see only themselves
    runs = []
    for module in (up, torch.compile(new, backend="aot_eager")):
        e = embeds.clone().requires_grad_()
        out = module(e, mask)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        params = module.named_parameters() if module is up else new.named_parameters()
        runs.append((out, {"embeds": e.grad, **{n: p.grad for n, p in params}}))
    assert_close(runs[1][0], runs[0][0], 1e-5)
    grads_match(runs[1][1], runs[0][1])


def test_idefics2_resampler_compiles_forward_and_backward():
    """The patched resampler (its forward and both drop-in layers) with partly and fully padded images, forward
    and gradients against upstream's (the unpadded batch, where the key mask is None, would be a second compile of
    both graphs: test_idefics2 covers that branch eagerly)."""
    torch._dynamo.reset()
    upstream = idefics2_cases.upstream_resampler(resampler_depth=1).train()  # one layer: half the tracing
    fast = idefics2_cases.patched(upstream).train()
    compiled = torch.compile(fast, backend="aot_eager", fullgraph=True)  # no graph break: no host read, no ContextVar
    context, mask = idefics2_cases.context_and_mask()
    weight = torch.randn(4, idefics2_cases.LATENTS, idefics2_cases.HIDDEN, generator=torch.Generator().manual_seed(3))
    runs = []
    for module, params in ((upstream, upstream), (compiled, fast)):
        x = context.clone().requires_grad_()
        out = module(x, mask)
        (out * weight).sum().backward()
        runs.append((out, {"context": x.grad, **{n: p.grad for n, p in params.named_parameters()}}))
    assert_close(runs[1][0], runs[0][0], 1e-5)
    grads_match(runs[1][1], runs[0][1])


# --------------------------------------------------------------------------------------------------------------
# meta device: patch before the weights exist, then materialise
# --------------------------------------------------------------------------------------------------------------


def test_evolla_patched_on_meta_then_to_empty_and_load(evolla):
    upstream, _ = evolla
    with torch.device("meta"):
        model = EvollaForProteinText2Text(upstream.config)
    assert fastflamingo.patch(model).counts() == {"EvollaSequenceCompressorResampler": 1,
                                                  "EvollaSequenceAlignerCrossAttention": 2}
    assert model.model.layers[1].adapter.query.weight.is_meta
    model.to_empty(device="cpu")
    model.init_weights()  # non-persistent buffers (rotary frequencies) are computed, not loaded
    model.load_state_dict(upstream.state_dict(), strict=True)
    model.eval()
    batch, prompt = evolla_batch(seed=15), evolla_batch(seed=16, padded_protein=False)
    with torch.no_grad():
        assert_evolla_logits(model(**batch).logits, upstream(**batch).logits)
        assert_evolla_logits(model(**prompt).logits, upstream(**prompt).logits)


def test_idefics2_patched_on_meta_then_load_assign(idefics2):
    accelerate = pytest.importorskip("accelerate")
    upstream, _ = idefics2
    with accelerate.init_empty_weights():  # parameters on meta, buffers real (position ids, rotary frequencies)
        model = Idefics2ForConditionalGeneration(upstream.config)
    assert model.model.connector.perceiver_resampler.latents.is_meta
    assert fastflamingo.patch(model).counts() == {"Idefics2PerceiverLayer": 2}
    model.load_state_dict(upstream.state_dict(), strict=True, assign=True)
    assert not any(t.is_meta for t in model.state_dict().values())
    model.eval()
    batch = idefics2_batch()
    with torch.no_grad():
        assert_idefics2_logits(model(**batch).logits, upstream(**batch).logits)


# --------------------------------------------------------------------------------------------------------------
# accelerate: device_map dispatch with CPU and disk offload
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["dispatch-then-patch", "patch-then-dispatch"])
def test_evolla_dispatched_with_cpu_and_disk_offload(evolla, tmp_path, order):
    """Used to give NaN / wrong logits: the drop-in feed-forward read ``fc2.weight`` outside ``fc2``'s forward,
    where accelerate had not loaded the offloaded weight (still on meta: a CPU matmul with it returns
    uninitialised memory)."""
    accelerate = pytest.importorskip("accelerate")
    upstream, _ = evolla
    model = copy.deepcopy(upstream)
    if order == "patch-then-dispatch":
        fastflamingo.patch(model)
    sizes = accelerate.utils.compute_module_sizes(model)
    device_map = accelerate.infer_auto_device_map(
        model, max_memory={"cpu": sizes[""] // 2},
        no_split_module_classes=["EvollaDecoderLayer", "EvollaProteinEncoder"])
    assert {"cpu", "disk"} <= set(device_map.values()), device_map
    accelerate.dispatch_model(model, device_map=device_map, offload_dir=tmp_path / "offload")
    if order == "dispatch-then-patch":
        fastflamingo.patch(model)
    adapter = model.model.layers[1].adapter
    assert isinstance(adapter, evolla_cases.ff.EvollaSequenceAlignerCrossAttention)
    assert adapter.ff.fc2.weight.is_meta  # really offloaded
    batch, prompt = evolla_batch(seed=17), evolla_batch(seed=18, padded_protein=False)
    with torch.no_grad():
        assert_evolla_logits(model(**batch).logits, upstream(**batch).logits)
        if order == "dispatch-then-patch":  # from_pretrained(device_map=...), then patch: the usual order
            assert torch.equal(model.generate(**prompt, max_new_tokens=NEW_TOKENS, do_sample=False),
                               upstream.generate(**prompt, max_new_tokens=NEW_TOKENS, do_sample=False))
    assert adapter.ff.fc2.weight.is_meta  # offloaded again after the call


@pytest.mark.parametrize("order", ["dispatch-then-patch", "patch-then-dispatch"])
def test_idefics2_dispatched_with_the_resampler_on_disk(idefics2, tmp_path, order):
    """Used to fail ("Cannot copy out of meta tensor"): the patched resampler forward replaced accelerate's
    instance forward, so the resampler's own ``latents`` were never loaded from disk. Now it goes where accelerate's
    forward calls (``_old_forward``), and unpatch puts back what was there in either order."""
    accelerate = pytest.importorskip("accelerate")
    upstream, _ = idefics2
    device_map = {"model.vision_model": "cpu", "model.connector.modality_projection": "cpu",
                  "model.connector.perceiver_resampler": "disk", "model.text_model": "cpu", "lm_head": "cpu"}
    if order == "dispatch-then-patch":  # from_pretrained(device_map=...), then patch: the usual order
        upstream.save_pretrained(tmp_path / "model")
        model = Idefics2ForConditionalGeneration.from_pretrained(
            tmp_path / "model", device_map=device_map, offload_folder=tmp_path / "offload").eval()
        assert fastflamingo.patch(model).counts() == {"Idefics2PerceiverLayer": 2}
    else:
        model = copy.deepcopy(upstream)
        assert fastflamingo.patch(model).counts() == {"Idefics2PerceiverLayer": 2}
        accelerate.dispatch_model(model, device_map=device_map, offload_dir=tmp_path / "offload")
    resampler = model.model.connector.perceiver_resampler
    assert resampler.latents.is_meta  # really offloaded
    accelerate_forward = resampler.__dict__["forward"]
    assert "_hf_hook" in resampler.__dict__ and not isinstance(accelerate_forward, ResamplerForward)
    batch = idefics2_batch()
    with torch.no_grad():
        want = upstream(**batch).logits
        assert_idefics2_logits(model(**batch).logits, want)
    assert resampler.latents.is_meta and resampler.__dict__["forward"] is accelerate_forward
    assert fastflamingo.unpatch(model) == 2
    assert resampler.__dict__["forward"] is accelerate_forward
    old_forward = resampler.__dict__["_old_forward"]
    assert getattr(old_forward, "__func__", None) is type(resampler).forward and old_forward.__self__ is resampler
    if order == "dispatch-then-patch":
        # (after patch-then-dispatch, accelerate's hooks sit on the drop-in layers, and unpatch does not move them
        # to the upstream layers it puts back: their offloaded weights stay on meta; not specific to Idefics2)
        with torch.no_grad():
            assert_idefics2_logits(model(**batch).logits, want)


# --------------------------------------------------------------------------------------------------------------
# activation checkpointing, and text-only batches
# --------------------------------------------------------------------------------------------------------------


def _evolla_grads(model, batch, checkpointing=False):
    model.train()
    if checkpointing:
        # (transformers 5.25 renamed gradient_checkpointing_enable, which now warns)
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.zero_grad(set_to_none=True)
    try:
        model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss.backward()
    finally:
        model.eval()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_evolla_gradient_checkpointing_gives_upstreams_gradients(evolla):
    """Activation checkpointing (``activation_checkpointing_enable()``) recomputes every decoder layer (aligners
    included) in the backward pass: the patched model's gradients equal upstream's without checkpointing; a
    text-only batch (no protein: the aligners are skipped) gives gradients to the same parameters as upstream's."""
    upstream, patched = evolla
    model = copy.deepcopy(patched)
    batch = evolla_batch(seed=19, padded_protein=False)
    calls = []
    # a pre-hook: the recomputation stops once it has what the backward pass needs (no post-forward hook runs)
    model.model.layers[1].adapter.register_forward_pre_hook(lambda *a: calls.append(1))
    want = _evolla_grads(upstream, batch)
    got = _evolla_grads(model, batch, checkpointing=True)
    assert len(calls) == 2  # the aligner's forward, then its recomputation in the backward pass
    assert len(want) == len([p for p in upstream.parameters() if p.requires_grad])
    grads_match(got, want)
    text_only = {k: batch[k] for k in ("input_ids", "attention_mask")}
    want, got = _evolla_grads(upstream, text_only), _evolla_grads(model, text_only, checkpointing=True)
    assert got.keys() == want.keys()
    grads_match(got, want)


def test_idefics2_checkpointed_perceiver_layers_give_upstreams_gradients():
    """Every drop-in perceiver layer of a patched resampler wrapped by torch's checkpoint wrapper (upstream's
    perceiver layers are no GradientCheckpointingLayer, so this is how a training script checkpoints them; the
    patched resampler forward calls the wrappers): the gradients of the context and of every parameter equal
    upstream's without checkpointing, partly and fully padded images included."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper)

    upstream = idefics2_cases.upstream_resampler().train()
    model = idefics2_cases.patched(upstream).train()
    apply_activation_checkpointing(
        model, checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda m: isinstance(m, Idefics2PerceiverLayer))
    wrapped = [m for m in model.modules() if type(m).__name__ == "CheckpointWrapper"]
    assert len(wrapped) == 2
    calls = []
    # a pre-hook: the recomputation stops once it has what the backward pass needs (no post-forward hook runs)
    wrapped[0]._checkpoint_wrapped_module.register_forward_pre_hook(lambda *a: calls.append(1))
    context, mask = idefics2_cases.context_and_mask()
    weight = torch.randn(4, idefics2_cases.LATENTS, idefics2_cases.HIDDEN, generator=torch.Generator().manual_seed(5))
    grads = []
    for m in (upstream, model):
        x = context.clone().requires_grad_()
        (m(x, mask) * weight).sum().backward()
        grads.append({"context": x.grad, **{n.replace("_checkpoint_wrapped_module.", ""): p.grad
                                            for n, p in m.named_parameters()}})
    assert len(calls) == 2  # the layer's forward, then its recomputation in the backward pass
    grads_match(grads[1], grads[0])
