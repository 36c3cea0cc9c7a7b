"""The media K/V cache: projected once per generate, never stale."""
import pytest
import torch

import fastflamingo as ff
from fastflamingo.cache import clear_media_cache
from fastflamingo.testing import tiny_open_flamingo


class CallCounter:
    def __init__(self, modules):
        self.count = 0
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, *args):
        self.count += 1


@pytest.fixture
def flamingo():
    try:
        model, media_token, _ = tiny_open_flamingo(num_layers=4, cross_attn_every_n_layers=1)
    except ModuleNotFoundError as exc:
        pytest.skip(str(exc))
    g = torch.Generator().manual_seed(3)
    vision_x = torch.randn(2, 3, 1, 3, 32, 32, generator=g)
    ids = torch.randint(0, 90, (2, 18), generator=g)
    ids[0, [0, 6, 12]] = media_token
    ids[1, [3, 9]] = media_token
    return model, vision_x, ids


def _generate(model, vision_x, ids, **kw):
    with torch.no_grad():
        return model.generate(vision_x=vision_x, lang_x=ids, attention_mask=torch.ones_like(ids), **kw)


@pytest.mark.parametrize("beams", [1, 3], ids=["greedy", "beam3"])
def test_generate_projects_media_once_and_gives_identical_tokens(flamingo, beams):
    model, vision_x, ids = flamingo
    steps = 6
    ref = _generate(model, vision_x, ids, max_new_tokens=steps, num_beams=beams)
    upstream_blocks = [b for b in model.lang_encoder.gated_cross_attn_layers]
    upstream_calls = CallCounter([b.attn.to_kv for b in upstream_blocks])
    _generate(model, vision_x, ids, max_new_tokens=steps, num_beams=beams)
    assert upstream_calls.count == len(upstream_blocks) * steps  # upstream: every layer, every step

    ff.patch(model)
    blocks = list(model.lang_encoder.gated_cross_attn_layers)
    calls = CallCounter([b.attn.to_kv for b in blocks])
    out = _generate(model, vision_x, ids, max_new_tokens=steps, num_beams=beams)
    assert torch.equal(out, ref)
    assert calls.count == len(blocks)  # once per layer per generate
    assert all(b.attn.media_cache.hits == steps - 1 for b in blocks)


def test_new_images_between_calls_are_projected_again(flamingo):
    model, vision_x, ids = flamingo
    ref_a = _generate(model, vision_x, ids, max_new_tokens=4)
    ref_b = _generate(model, vision_x.flip(0), ids, max_new_tokens=4)
    ff.patch(model)
    assert torch.equal(_generate(model, vision_x, ids, max_new_tokens=4), ref_a)
    assert torch.equal(_generate(model, vision_x.flip(0), ids, max_new_tokens=4), ref_b)
    # a different batch size
    assert torch.equal(_generate(model, vision_x[:1], ids[:1], max_new_tokens=4), ref_a[:1])


def _block_and_inputs():
    torch.manual_seed(0)
    block = ff.GatedCrossAttentionBlock(dim=32, dim_visual=16, dim_head=8, heads=2).eval()
    with torch.no_grad():
        block.attn_gate.fill_(0.5)
    media = torch.randn(2, 3, 4, 16)
    ml = torch.zeros(2, 10, dtype=torch.bool)
    ml[:, [0, 4, 7]] = True
    return block, media, ml


def _decode_step(block, media, ml, x):
    return block(x, media, ml, use_cached_media=True)


def test_direct_decode_loop_hits_and_matches_fresh_projection():
    block, media, ml = _block_and_inputs()
    x = torch.randn(2, 1, 32)
    with torch.no_grad():
        outs = [_decode_step(block, media, ml, x) for _ in range(4)]
        with ff.cache_disabled():
            fresh = _decode_step(block, media, ml, x)
    assert block.attn.media_cache.hits == 3 and block.attn.media_cache.misses == 1
    for out in outs:
        assert torch.equal(out, fresh)


def test_weight_update_invalidates():
    block, media, ml = _block_and_inputs()
    x = torch.randn(2, 1, 32)
    with torch.no_grad():
        before = _decode_step(block, media, ml, x)
        block.attn.to_kv.weight.mul_(1.5)  # e.g. an optimizer step or load_state_dict: bumps the version
        after = _decode_step(block, media, ml, x)
        with ff.cache_disabled():
            fresh = _decode_step(block, media, ml, x)
    assert block.attn.media_cache.misses == 2
    assert not torch.equal(before, after) and torch.equal(after, fresh)


def test_in_place_media_change_invalidates():
    block, media, ml = _block_and_inputs()
    x = torch.randn(2, 1, 32)
    with torch.no_grad():
        _decode_step(block, media, ml, x)
        media.add_(1.0)
        after = _decode_step(block, media, ml, x)
        with ff.cache_disabled():
            fresh = _decode_step(block, media, ml, x)
    assert torch.equal(after, fresh) and block.attn.media_cache.misses == 2


def test_training_and_autograd_never_use_the_cache():
    block, media, ml = _block_and_inputs()
    x = torch.randn(2, 1, 32)
    block.train()
    with torch.no_grad():
        _decode_step(block, media, ml, x)
        _decode_step(block, media, ml, x)
    block.eval()
    out1 = _decode_step(block, media, ml, x)  # grad enabled and the weights require grad: records a graph
    out2 = _decode_step(block, media, ml, x)
    (out1.sum() + out2.sum()).backward()  # both graphs intact
    assert block.attn.media_cache.hits == 0 and block.attn.media_cache.misses == 0
    assert block.attn.to_kv.weight.grad is not None


def test_clear_media_cache_and_env_switch(monkeypatch):
    block, media, ml = _block_and_inputs()
    x = torch.randn(2, 1, 32)
    with torch.no_grad():
        _decode_step(block, media, ml, x)
        assert clear_media_cache(block) == 1
        _decode_step(block, media, ml, x)
        assert block.attn.media_cache.misses == 2
        monkeypatch.setenv("FASTFLAMINGO_MEDIA_CACHE", "0")
        _decode_step(block, media, ml, x)
        assert block.attn.media_cache.misses == 2 and block.attn.media_cache.hits == 0


def test_cache_does_not_keep_media_alive():
    import gc
    import weakref

    block, media, ml = _block_and_inputs()
    with torch.no_grad():
        _decode_step(block, media, ml, torch.randn(2, 1, 32))
    ref = weakref.ref(media)
    del media
    gc.collect()
    assert ref() is None


# ---------------------------------------------------------------------------------------------- IDEFICS


@pytest.mark.parametrize("beams", [1, 2], ids=["greedy", "beam2"])
def test_idefics_generate_runs_resampler_and_projections_once(beams):
    pytest.importorskip("transformers")
    from test_idefics import model_inputs, tiny_model

    model = tiny_model()
    inputs = model_inputs()
    steps = 5
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=steps, do_sample=False, num_beams=beams)
    layers = list(model.model.gated_cross_attn_layers)
    resampler = model.model.perceiver_resampler
    upstream_k = CallCounter([layer.cross_attn.k_proj for layer in layers])
    upstream_resampler = CallCounter([resampler])
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=steps, do_sample=False, num_beams=beams)
    assert upstream_resampler.count == steps  # transformers 5 reruns the resampler at every step (SEMANTICS 5)
    assert upstream_k.count == steps * len(layers)

    ff.patch(model)
    layers = list(model.model.gated_cross_attn_layers)
    k_calls = CallCounter([layer.cross_attn.k_proj for layer in layers])
    resampler_blocks = CallCounter([model.model.perceiver_resampler.blocks[0][0]])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, num_beams=beams)
    assert torch.equal(out, ref)
    assert resampler_blocks.count == 1  # the resampler's work runs once per generate
    assert k_calls.count == len(layers)  # and each layer projects the images once
