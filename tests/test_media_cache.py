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
    # generate repeat_interleaves the images per beam: the cache keeps one K/V row per sample, not one per beam
    for block in blocks:
        (k, v), r = block.attn.media_cache.value
        assert r == beams and k.shape[0] == v.shape[0] == vision_x.shape[0]


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
    from fastflamingo.testing import tiny_idefics
    from test_idefics import model_inputs

    model = tiny_idefics()
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
    # beam search expands the images per beam: one cached K/V row per sample
    for layer in layers:
        (k, v), r = layer.cross_attn.media_cache.value
        assert r == beams and k.shape[0] == v.shape[0] == inputs["input_ids"].shape[0]


# ---------------------------------------------------------------------------------------------- beam groups


def test_repeat_factor_finds_the_largest_exact_group():
    from fastflamingo.cache import repeat_factor

    rows = torch.randn(2, 3, 4)
    assert repeat_factor(rows.repeat_interleave(6, dim=0)) == 6
    assert repeat_factor(rows.repeat_interleave(3, dim=0)) == 3
    assert repeat_factor(rows) == 1
    assert repeat_factor(rows[:1].expand(4, -1, -1)) == 4
    tweaked = rows.repeat_interleave(4, dim=0)
    tweaked[5, 0, 0] += 1e-6  # one beam differs: only groups of 1 (of 4 rows each: 0..3, 4..7) are exact
    assert repeat_factor(tweaked) == 1
    tweaked = rows.repeat_interleave(4, dim=0)
    tweaked[3] = tweaked[4]  # rows 2, 3 differ from 0, 1 of their group of 4, but pairs still match
    tweaked[2] = tweaked[4]
    assert repeat_factor(tweaked) == 2
    assert repeat_factor(torch.randn(1, 3)) == 1 and repeat_factor(torch.randn(4, 0)) == 1


def test_block_with_beam_repeated_media_matches_per_beam_projection():
    """Media rows repeated per beam: the cached projection holds B rows, the output equals the uncached one, and
    project_media still returns one K/V row per media row."""
    block, media, ml = _block_and_inputs()
    beams = 3
    media_r = media.repeat_interleave(beams, dim=0)
    ml_r = ml.repeat_interleave(beams, dim=0)
    x = torch.randn(media_r.shape[0], 10, 32)
    with ff.cache_disabled(), torch.no_grad():
        fresh = block(x, media_r, ml_r)
        fresh_decode = _decode_step(block, media_r, ml_r, x[:, :1])
        k_ref, v_ref = block.attn.project_media(media_r)
    with torch.no_grad():
        got = block(x, media_r, ml_r)
        got_decode = _decode_step(block, media_r, ml_r, x[:, :1])
        k, v = block.attn.project_media(media_r)
    (k_c, _), r = block.attn.media_cache.value
    assert r == beams and k_c.shape[0] == media.shape[0]
    torch.testing.assert_close(got, fresh)
    torch.testing.assert_close(got_decode, fresh_decode)
    assert k.shape == k_ref.shape and torch.equal(k, k_ref) and torch.equal(v, v_ref)
    # with autograd recording (no cache) the projection is per row and gradients flow as before
    media_g = media_r.clone().requires_grad_(True)
    block(x, media_g, ml_r).sum().backward()
    assert media_g.grad.shape == media_r.shape


@pytest.mark.parametrize("mask_kind", ["soft_bias", "hard_no_closed_form", "none"])
def test_idefics_layer_with_beam_repeated_images_matches_uncached(mask_kind):
    """IdeficsCrossAttention with images repeated per beam: the cached K/V has one row per sample on every mask
    path (soft additive bias, dense boolean, all media), and the output equals the uncached per-row projection."""
    pytest.importorskip("transformers")
    from fastflamingo.testing import tiny_idefics

    model = tiny_idefics()
    ff.patch(model)
    attn = model.model.gated_cross_attn_layers[0].cross_attn
    g = torch.Generator().manual_seed(7)
    groups, beams, num_text, num_images, latents = 2, 3, 6, 2, 4
    batch, num_keys = groups * beams, num_images * latents
    images = torch.randn(groups, num_keys, attn.kv_input_dim, generator=g).repeat_interleave(beams, dim=0)
    hidden = torch.randn(batch, num_text, attn.hidden_size, generator=g)
    if mask_kind == "soft_bias":
        mask = torch.randn(batch, 1, num_text, num_keys, generator=g)
    elif mask_kind == "hard_no_closed_form":
        allowed = torch.rand(batch, num_text, num_images, generator=g) > 0.4
        allowed[:, 0] = False  # a token that sees nothing
        mask = allowed.repeat_interleave(latents, dim=-1)[:, None]
    else:
        mask = None
    with ff.cache_disabled(), torch.no_grad():
        want = attn.attend(hidden, images, mask)
    with torch.no_grad():
        got = attn.attend(hidden, images, mask)
    (k, v), r = attn.media_cache.value
    assert r == beams and k.shape[0] == v.shape[0] == groups
    torch.testing.assert_close(got, want)
