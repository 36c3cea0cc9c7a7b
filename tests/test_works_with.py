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
from fastflamingo.testing import tiny_idefics  # noqa: E402
from test_idefics import model_inputs  # noqa: E402
from upstream import of  # noqa: E402,F401 (a fixture)


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
    model = tiny_idefics()
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
    model = tiny_idefics()
    inputs = model_inputs()
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=4, do_sample=False, cache_implementation="static")
    fastflamingo.patch(model)
    with torch.no_grad():
        got = model.generate(**inputs, max_new_tokens=4, do_sample=False, cache_implementation="static")
    assert torch.equal(got, expected)



# --------------------------------------------------------------------------------------------------------------
# torch.inference_mode (serving code, pipelines)
# --------------------------------------------------------------------------------------------------------------


def test_inference_mode_block():
    block, inputs = _block()
    block.eval()
    with torch.no_grad():
        expected = block(*inputs)
    with torch.inference_mode():  # used to fail: "Inference tensors do not track version counter"
        got = block(*[t.clone() for t in inputs])  # inference tensors, as inputs built inside the block are
        again = block(*[t.clone() for t in inputs])
    assert torch.equal(got, expected) and torch.equal(again, expected)


def test_inference_mode_generate_open_flamingo_and_idefics():
    model, media_token, _ = _open_flamingo()
    inputs = _flamingo_inputs(media_token)
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=4)
    fastflamingo.patch(model)
    with torch.inference_mode():
        assert torch.equal(model.generate(**inputs, max_new_tokens=4), expected)
    idefics, idefics_inputs = tiny_idefics(), model_inputs()
    with torch.no_grad():
        expected = idefics.generate(**idefics_inputs, max_new_tokens=4, do_sample=False)
    fastflamingo.patch(idefics)
    with torch.inference_mode():
        assert torch.equal(idefics.generate(**idefics_inputs, max_new_tokens=4, do_sample=False), expected)


def test_inference_mode_sees_in_place_edits_of_the_media_locations():
    """Inference tensors have no version counter: the mask is derived per call, never reused stale."""
    block, (x, media, ml) = _block()
    block.eval()
    with torch.inference_mode():
        locations = ml.clone()
        first = block(x, media, locations)
        locations[0, 3] = False  # in place: the same tensor object now holds another mask
        second = block(x, media, locations)
    with torch.no_grad():
        assert torch.equal(second, block(x, media, locations.clone()))
    assert not torch.equal(first, second)


# --------------------------------------------------------------------------------------------------------------
# a batch without images: every parameter upstream touches gets a gradient (DDP needs them all)
# --------------------------------------------------------------------------------------------------------------


def _gradient_owners(module):
    return {name for name, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("immediate", [True, False], ids=["immediate", "all-previous"])
def test_text_only_batch_gives_every_parameter_a_gradient(of, backend, immediate):
    kwargs = dict(dim=16, dim_visual=12, dim_head=16, heads=2, only_attend_immediate_media=immediate)
    upstream, mine = of.GatedCrossAttentionBlock(**kwargs), fastflamingo.GatedCrossAttentionBlock(**kwargs)
    mine.load_state_dict(upstream.state_dict())
    x, media = torch.randn(2, 4, 16), torch.randn(2, 1, 2, 12)
    text_only = torch.zeros(2, 4, dtype=torch.bool)
    upstream(x, media, text_only).sum().backward()
    with fastflamingo.backend(backend):
        mine(x, media, text_only).sum().backward()
    assert "attn.to_q.weight" in _gradient_owners(upstream)
    assert _gradient_owners(mine) == _gradient_owners(upstream)  # used to miss attn.norm and attn.to_q
    if not immediate:  # upstream averages every media here (README, semantics note): only the sets must agree
        return
    for name, p in mine.named_parameters():
        torch.testing.assert_close(p.grad, upstream.get_parameter(name).grad, rtol=1e-5, atol=1e-6, msg=name)


def test_text_only_batch_idefics_layer_gives_every_parameter_a_gradient():
    from fastflamingo.testing import idefics_config
    from test_idefics import expand_like_idefics_model, pair

    upstream, mine = pair(idefics_config())
    mask, gate = expand_like_idefics_model(torch.zeros(2, 5, 2), latents=3)
    inputs = (torch.randn(2, 5, 64), None, torch.randn(2, 6, 32))
    for layer in (upstream, mine):
        layer(*inputs, image_attention_mask=mask, cross_attention_gate=gate).sum().backward()
    assert _gradient_owners(mine) == _gradient_owners(upstream)


# --------------------------------------------------------------------------------------------------------------
# meta tensors: shapes trace through the drop-ins as through upstream
# --------------------------------------------------------------------------------------------------------------


def test_meta_tensors_trace_through_the_open_flamingo_dropins(of):
    with torch.device("meta"):
        kwargs = dict(dim=16, dim_visual=12, dim_head=8, heads=2)
        pairs = [(of.GatedCrossAttentionBlock(**kwargs), fastflamingo.GatedCrossAttentionBlock(**kwargs))]
        for immediate in (True, False):
            kwargs["only_attend_immediate_media"] = immediate
            pairs.append((of.MaskedCrossAttention(**kwargs), fastflamingo.MaskedCrossAttention(**kwargs)))
        x, media = torch.randn(2, 4, 16, requires_grad=True), torch.randn(2, 2, 3, 12)
        locations = torch.tensor([[True, False, False, True], [False, False, True, False]])
        for upstream, mine in pairs:
            expected, got = upstream(x, media, locations), mine(x, media, locations)  # used to fail on meta
            assert got.is_meta and got.shape == expected.shape and got.dtype == expected.dtype
            got.sum().backward()  # the graph exists too
        resampler = fastflamingo.PerceiverResampler(dim=12, depth=1, dim_head=8, heads=2, num_latents=3)
        assert resampler(torch.randn(2, 2, 1, 5, 12)).shape == (2, 2, 3, 12)


def test_meta_tensors_trace_through_the_idefics_dropins():
    from fastflamingo.testing import idefics_config
    from test_idefics import expand_like_idefics_model
    from transformers.models.idefics import modeling_idefics as hf

    config = idefics_config(alpha_initializer="ones")  # (upstream's "normal" alphas ignore the device context)
    mask, gate = expand_like_idefics_model(torch.eye(5, 2)[None].expand(2, -1, -1), latents=3)
    with torch.device("meta"):
        upstream = hf.IdeficsGatedCrossAttentionLayer(config, layer_idx=0)
        mine = fastflamingo.models.idefics.IdeficsGatedCrossAttentionLayer(config, layer_idx=0)
        inputs = (torch.randn(2, 5, 64), None, torch.randn(2, 6, 32))
        kwargs = dict(image_attention_mask=mask.to("meta"), cross_attention_gate=gate.to("meta"))
        expected, got = upstream(*inputs, **kwargs), mine(*inputs, **kwargs)
    assert got.is_meta and got.shape == expected.shape and got.dtype == expected.dtype


# --------------------------------------------------------------------------------------------------------------
# dtype mixes: the drop-ins accept exactly what upstream accepts
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("media_dtype", [torch.bfloat16, torch.float16])
def test_perceivers_accept_half_media_with_fp32_latents_as_upstream(of, media_dtype):
    """Upstream concatenates ``[media; latents]`` before projecting, which promotes half media to fp32."""
    from transformers.models.idefics import perceiver as hf_perceiver

    upstream, mine = of.PerceiverAttention(dim=16, dim_head=8, heads=2), fastflamingo.PerceiverAttention(
        dim=16, dim_head=8, heads=2)
    mine.load_state_dict(upstream.state_dict())
    x, latents = torch.randn(2, 2, 5, 16).to(media_dtype), torch.randn(2, 2, 3, 16)
    torch.testing.assert_close(mine(x, latents), upstream(x, latents), rtol=1e-5, atol=1e-6)
    upstream = hf_perceiver.IdeficsPerceiverAttention(16, 2, 8, True)
    mine = fastflamingo.models.idefics.IdeficsPerceiverAttention(16, 2, 8, True)
    mine.load_state_dict(upstream.state_dict())
    context, latents = torch.randn(2, 5, 16).to(media_dtype), torch.randn(2, 3, 16)
    torch.testing.assert_close(mine(context, latents), upstream(context, latents), rtol=1e-5, atol=1e-6)
