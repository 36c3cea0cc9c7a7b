"""Patched models work wherever the upstream modules work (README, "Works with"): inference mode, pickling,
activation checkpointing, static caches and meta tensors. DDP/FSDP2 are in test_distributed.py, meta-device
loading, accelerate and ``init_weights`` in test_big_models.py, the fuzz tier in test_fuzz.py.
"""
import io

import pytest
import torch

import fastflamingo
from fastflamingo.testing import tiny_open_flamingo

transformers = pytest.importorskip("transformers")
from test_idefics import model_inputs, tiny_model  # noqa: E402


def _open_flamingo(**kw):
    try:
        return tiny_open_flamingo(num_layers=4, cross_attn_every_n_layers=2, **kw)
    except ModuleNotFoundError as exc:
        pytest.skip(str(exc))


def _flamingo_inputs(media_token, batch=2, num_text=14, seed=0):
    g = torch.Generator().manual_seed(seed)
    vision_x = torch.randn(batch, 2, 1, 3, 32, 32, generator=g)
    ids = torch.randint(0, 90, (batch, num_text), generator=g)
    ids[:, [0, 7]] = media_token
    return dict(vision_x=vision_x, lang_x=ids, attention_mask=torch.ones_like(ids))


def _block():
    torch.manual_seed(0)
    block = fastflamingo.GatedCrossAttentionBlock(dim=16, dim_visual=12, dim_head=8, heads=2)
    with torch.no_grad():
        block.attn_gate.fill_(0.7)
    media_locations = torch.tensor([[True, False, False, True, False, False]])
    return block, (torch.randn(1, 6, 16), torch.randn(1, 2, 3, 12), media_locations)


# --------------------------------------------------------------------------------------------------------------
# pickling (torch.save of a whole module after an eval forward filled its media cache)
# --------------------------------------------------------------------------------------------------------------


def test_torch_save_of_a_patched_module_after_an_eval_forward():
    block, inputs = _block()
    block.eval()
    with torch.no_grad():
        expected = block(*inputs)
        block(*inputs)
    assert block.attn.media_cache.hits == 1  # the cache holds a projection (and a weak reference to the media)
    buffer = io.BytesIO()
    torch.save(block, buffer)  # used to fail: "cannot pickle 'weakref.ReferenceType' object"
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.attn.media_cache.value is None  # a cache is not state: the copy starts empty
    with torch.no_grad():
        assert torch.equal(loaded(*inputs), expected)


def test_torch_save_of_a_patched_idefics_model_after_generate():
    model = tiny_model()
    inputs = model_inputs()
    fastflamingo.patch(model)
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded.generate(**inputs, max_new_tokens=3, do_sample=False), tokens)
    assert fastflamingo.unpatch(loaded) == 3  # the originals travelled with the pickle


# --------------------------------------------------------------------------------------------------------------
# activation checkpointing
# --------------------------------------------------------------------------------------------------------------


def test_open_flamingo_activation_checkpointing_selects_the_same_modules():
    """OpenFlamingo's training script checkpoints every module with ``_use_gradient_checkpointing`` set
    (open_flamingo/train/train.py); the drop-ins keep the marker, so patching changes neither which modules are
    checkpointed nor the gradients."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper)

    model, media_token, _ = _open_flamingo()
    # what Flamingo(..., gradient_checkpointing=True) sets up (open_flamingo/src/flamingo.py, flamingo_lm.py)
    model._use_gradient_checkpointing = True
    model.perceiver._use_gradient_checkpointing = True
    model.lang_encoder.init_flamingo_layers(True)
    model.train()
    inputs = _flamingo_inputs(media_token, seed=2)

    def marked():
        return [name for name, m in model.named_modules() if getattr(m, "_use_gradient_checkpointing", False)]

    def grads():
        model.zero_grad(set_to_none=True)
        model(**inputs, labels=inputs["lang_x"]).loss.backward()
        return {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone()
                for n, p in model.named_parameters() if p.grad is not None}

    expected_marked, expected = marked(), grads()
    assert len(expected_marked) == 8
    fastflamingo.patch(model)
    assert marked() == expected_marked  # was 5 of 8: the drop-ins lost the marker
    apply_activation_checkpointing(
        model, checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda m: getattr(m, "_use_gradient_checkpointing", False) and m is not model,
    )
    wrapped = [m for m in model.modules() if type(m).__name__ == "CheckpointWrapper"]
    assert any(isinstance(m._checkpoint_wrapped_module, fastflamingo.GatedCrossAttentionBlock) for m in wrapped)
    assert any(isinstance(m._checkpoint_wrapped_module, fastflamingo.PerceiverResampler) for m in wrapped)
    got = grads()
    assert got.keys() == expected.keys()
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_torch_utils_checkpoint_of_a_dropin():
    block, (x, media, ml) = _block()
    x.requires_grad_(True)
    block(x, media, ml).square().sum().backward()
    expected = {n: p.grad.clone() for n, p in block.named_parameters()} | {"x": x.grad.clone()}
    block.zero_grad(set_to_none=True)
    x.grad = None
    out = torch.utils.checkpoint.checkpoint(block, x, media, ml, use_reentrant=False)
    out.square().sum().backward()
    got = {n: p.grad for n, p in block.named_parameters()} | {"x": x.grad}
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-7, msg=name)


# --------------------------------------------------------------------------------------------------------------
# static KV cache in generate
# --------------------------------------------------------------------------------------------------------------


def test_static_cache_generate_open_flamingo():
    model, media_token, _ = _open_flamingo()
    inputs = _flamingo_inputs(media_token)
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=5, cache_implementation="static")
    fastflamingo.patch(model)
    with torch.no_grad():
        assert torch.equal(model.generate(**inputs, max_new_tokens=5, cache_implementation="static"), expected)


def test_static_cache_generate_idefics():
    model = tiny_model()
    inputs = model_inputs()
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=4, do_sample=False, cache_implementation="static")
    fastflamingo.patch(model)
    with torch.no_grad():
        got = model.generate(**inputs, max_new_tokens=4, do_sample=False, cache_implementation="static")
    assert torch.equal(got, expected)

