"""Idefics2's perceiver resampler (transformers ``models/idefics2``) patched by fastflamingo: the drop-ins against
transformers' own modules on tiny configs built here (no Hub), fp32 within 1e-5, gradients, bf16 against fp64,
padding masks (partly and fully padded images, padding images), greedy ``generate``, state_dict round trips,
patch / unpatch, attention maps and the ``attn_implementation="fastflamingo"`` route."""
import copy

import pytest
import torch

import fastflamingo
from fastflamingo import functional, testing
from fastflamingo.models import idefics2
from fastflamingo.models.idefics2 import fused, resampler as patched_forward

from helpers import grads_match

transformers = pytest.importorskip("transformers")
from transformers.models.idefics2 import modeling_idefics2 as upstream  # noqa: E402

HIDDEN, LATENTS, PATCHES = 64, 8, 16


def perceiver_config(attn="sdpa", **kw):
    fields = dict(hidden_size=HIDDEN, rms_norm_eps=1e-5, resampler_n_latents=LATENTS, resampler_depth=2,
                  resampler_n_heads=4, resampler_head_dim=16, num_key_value_heads=2)
    fields.update(kw)
    config = transformers.Idefics2PerceiverConfig(**fields)
    config._attn_implementation = attn
    return config


def randomised(module, seed=0):
    """Random values in every parameter (norm weights and latents included: upstream initialises them to ones)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            scale = p.shape[-1] ** -0.5 if p.dim() > 1 else 0.3
            p.copy_(torch.randn(p.shape, generator=gen) * scale + (p.dim() == 1))
    return module


def upstream_resampler(attn="sdpa", seed=0, **kw):
    return randomised(upstream.Idefics2PerceiverResampler(perceiver_config(attn, **kw)), seed).eval()


def patched(module):
    module = copy.deepcopy(module)
    fastflamingo.patch(module)
    return module


def context_and_mask(images=4, patches=PATCHES, seed=1, dtype=torch.float32):
    """Context and patch mask: image 0 unpadded, 1 and 3 partly padded, 2 fully padded (its latents see only
    themselves)."""
    gen = torch.Generator().manual_seed(seed)
    context = torch.randn(images, patches, HIDDEN, generator=gen).to(dtype)
    mask = torch.ones(images, patches, dtype=torch.bool)
    mask[1, patches // 2 + 1:] = False
    mask[2] = False
    mask[3, ::3] = False
    return context, mask


@pytest.fixture(scope="module")
def pair():
    """(upstream resampler, the same resampler patched)."""
    model = upstream_resampler()
    return model, patched(model)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def test_patch_a_bare_resampler_and_unpatch_restores_upstream():
    model = upstream_resampler()
    before = {path: type(m) for path, m in model.named_modules()}
    keys = list(model.state_dict())
    report = fastflamingo.patch(model)
    assert report.counts() == {"Idefics2PerceiverLayer": 2}, report
    assert all(isinstance(layer, idefics2.Idefics2PerceiverLayer) for layer in model.layers)
    assert isinstance(model.layers[0].self_attn, idefics2.Idefics2PerceiverAttention)
    assert "forward" in model.__dict__ and list(model.state_dict()) == keys
    assert fastflamingo.unpatch(model) == 2
    assert {path: type(m) for path, m in model.named_modules()} == before and "forward" not in model.__dict__


@pytest.mark.parametrize("padded", [False, True])
def test_resampler_matches_transformers(pair, padded):
    model, fast = pair
    context, mask = context_and_mask()
    if not padded:
        mask = torch.ones_like(mask)
    with torch.no_grad():
        want, got = model(context, mask), fast(context, mask)
    assert got.shape == want.shape == (4, LATENTS, HIDDEN)
    assert max_err(got, want) <= 1e-5 * want.abs().max().item()


def test_mask_is_converted_once_and_reaches_the_op(pair, monkeypatch):
    """The op gets the (images, patches) key mask itself (None without padding), GQA heads unrepeated."""
    _, fast = pair
    seen, real = [], functional.perceiver_attn
    monkeypatch.setattr(functional, "perceiver_attn",
                        lambda q, km, *a, key_mask=None, **k: seen.append((q.shape, km.shape, key_mask))
                        or real(q, km, *a, key_mask=key_mask, **k))
    context, mask = context_and_mask()
    with torch.no_grad():
        fast(context, mask)
        fast(context, torch.ones_like(mask))
    assert [s[0][2] for s in seen] == [4] * 4 and [s[1][2] for s in seen] == [2] * 4
    assert all(torch.equal(s[2], mask) for s in seen[:2]) and seen[2][2] is None and seen[3][2] is None


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_layers_take_upstreams_4d_mask(attn):
    """Drop-in layers under upstream's own resampler forward (the 4D mask it builds: additive for eager, boolean
    for SDPA) give upstream's output."""
    model = upstream_resampler(attn)
    fast = patched(model)
    patched_forward.uninstall(fast)
    context, mask = context_and_mask()
    with torch.no_grad():
        assert max_err(fast(context, mask), model(context, mask)) <= 1e-5 * 4


def test_gradients_of_every_parameter(pair):
    model, fast = copy.deepcopy(pair[0]).train(), copy.deepcopy(pair[1]).train()
    context, mask = context_and_mask()
    weight = torch.randn(4, LATENTS, HIDDEN, generator=torch.Generator().manual_seed(3))
    grads = []
    for m in (model, fast):
        x = context.clone().requires_grad_()
        (m(x, mask) * weight).sum().backward()
        grads.append({"context": x.grad, **{n: p.grad for n, p in m.named_parameters() if p.requires_grad}})
    assert len(grads[1]) == len(list(model.parameters())) + 1
    grads_match(grads[1], grads[0])


def test_bf16_within_twice_transformers_error():
    """bf16 against an fp64 run of transformers' module: the drop-ins' error at most twice transformers' own."""
    model = upstream_resampler(hidden_size=HIDDEN, seed=5)
    fast = patched(model)
    context, mask = context_and_mask(seed=6)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(context.double(), mask)
        want = copy.deepcopy(model).bfloat16()(context.bfloat16(), mask)
        got = fast.bfloat16()(context.bfloat16(), mask)
    assert got.dtype == torch.bfloat16
    assert max_err(got, ref) <= 2 * max_err(want, ref), (max_err(got, ref), max_err(want, ref))


def test_state_dict_round_trips_strictly():
    config = perceiver_config()
    theirs = randomised(upstream.Idefics2PerceiverLayer(config, 0))
    ours = idefics2.Idefics2PerceiverLayer(config, 0)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    back = upstream.Idefics2PerceiverLayer(config, 0)
    back.load_state_dict(ours.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(theirs.state_dict().values(), back.state_dict().values()))
    context, mask = context_and_mask()
    latents = torch.randn(4, LATENTS, HIDDEN)
    with torch.no_grad():
        want = back(latents, context, attention_mask=upstream_4d_mask(config, mask))
        assert max_err(ours(latents, context, attention_mask=mask), want) <= 1e-5 * 4
    attn = idefics2.Idefics2PerceiverAttention(config)
    attn.load_state_dict(theirs.self_attn.state_dict(), strict=True)
    theirs.self_attn.load_state_dict(attn.state_dict(), strict=True)
    with torch.no_grad():
        got, weights = attn(latents, context, attention_mask=mask)
        want, _ = theirs.self_attn(latents, context, attention_mask=upstream_4d_mask(config, mask))
    assert weights is None and max_err(got, want) <= 1e-5 * 4


def upstream_4d_mask(config, mask):
    from transformers.masking_utils import create_bidirectional_mask

    full = torch.cat([mask, mask.new_ones(mask.shape[0], LATENTS)], -1)
    return create_bidirectional_mask(config=config, inputs_embeds=torch.zeros(mask.shape[0], LATENTS, HIDDEN),
                                     attention_mask=full)


def test_attention_maps_are_eagers_probabilities():
    """``fastflamingo.attention_maps(perceiver=True)`` records each layer's probabilities over
    ``[context; latents]``: those transformers' eager attention returns."""
    model = upstream_resampler("eager")
    fast = patched(model)
    context, mask = context_and_mask()
    want = []
    hooks = [layer.self_attn.register_forward_hook(lambda m, a, out: want.append(out[1])) for layer in model.layers]
    with torch.no_grad():
        model(context, mask)
        with fastflamingo.attention_maps(fast, perceiver=True) as maps:
            fast(context, mask)
    for h in hooks:
        h.remove()
    assert len(maps) == 2 and maps[0].key_shape == (PATCHES + LATENTS,)
    for m, w in zip(maps, want):
        assert m.probs.shape == w.shape and max_err(m.probs, w) <= 1e-5


def test_residual_linear_is_the_add_fused_into_the_gemm():
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(24, 40, bias=False)
    x, inp = torch.randn(3, 5, 40, generator=gen), torch.randn(3, 5, 24, generator=gen)
    assert torch.allclose(fused.residual_linear(x, inp, linear), x + linear(inp), atol=1e-6)
    assert torch.tanh(torch.tensor(fused.UNIT_GATE)) == 1.0  # the Triton path's gate is exactly 1


@pytest.mark.triton
def test_residual_linear_on_the_gated_linear_kernel(device):
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(32, 48, bias=False).to(device)
    x, inp = torch.randn(2, 7, 48, generator=gen).to(device), torch.randn(2, 7, 32, generator=gen).to(device)
    x.requires_grad_(), inp.requires_grad_()
    with fastflamingo.backend("triton"):
        got = fused.residual_linear(x, inp, linear)
        got.sum().backward()
    grads = x.grad.clone(), inp.grad.clone(), linear.weight.grad.clone()
    x.grad = inp.grad = linear.weight.grad = None
    want = x + linear(inp)
    want.sum().backward()
    assert torch.allclose(got, want, atol=1e-5)
    for a, b in zip(grads, (x.grad, inp.grad, linear.weight.grad)):
        assert torch.allclose(a, b, atol=1e-5)


def test_the_attention_route_runs_perceiver_attn(monkeypatch):
    """``attn_implementation="fastflamingo"`` on transformers' unpatched resampler: the perceiver calls run
    ``perceiver_attn`` with the key mask read from the 4D mask, within 1e-5 of SDPA, padding included."""
    from fastflamingo import hf

    hf.register()
    model = upstream_resampler("sdpa")
    routed = copy.deepcopy(model)
    routed.config._attn_implementation = hf.NAME
    masks, real = [], functional.perceiver_attn
    monkeypatch.setattr(functional, "perceiver_attn",
                        lambda *a, key_mask=None, **k: masks.append(key_mask) or real(*a, key_mask=key_mask, **k))
    context, mask = context_and_mask()
    with torch.no_grad():
        for m in (mask, torch.ones_like(mask)):
            assert max_err(routed(context, m), model(context, m)) <= 1e-5 * 4
    assert len(masks) == 4 and all(torch.equal(k, mask) for k in masks[:2]) and masks[2] is None


# ----------------------------------------------------------------------------------------------------------------
# the connector and the whole model
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_pair():
    model = testing.tiny_idefics2()
    randomised(model.model.connector, seed=7)
    return model, patched(model)


def images_and_prompt():
    """Sample 0: two images, the second with its right half padded; sample 1: one image and a padding image (all
    zeros, dropped by upstream before the vision tower), its prompt left-padded."""
    gen = torch.Generator().manual_seed(2)
    pixels = torch.randn(2, 2, 3, 32, 32, generator=gen)
    pixel_mask = torch.ones(2, 2, 32, 32, dtype=torch.bool)
    pixel_mask[0, 1, :, 17:] = False
    pixels[0, 1, :, :, 17:] = 0
    pixels[1, 1] = 0
    image = [98] * LATENTS
    rows = [[1, 5] + image + [6] + image + [7, 8], [1, 9] + image + [10, 11]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    return ids, (ids != 0).long(), pixels, pixel_mask


def test_connector_matches_transformers(model_pair):
    model, fast = model_pair
    gen = torch.Generator().manual_seed(4)
    features = torch.randn(4, PATCHES, 32, generator=gen)
    _, mask = context_and_mask()
    with torch.no_grad():
        want, got = model.model.connector(features, mask), fast.model.connector(features, mask)
    assert max_err(got, want) <= 1e-5 * want.abs().max().item()


def test_model_logits_and_greedy_generate_match(model_pair):
    model, fast = model_pair
    ids, attention_mask, pixels, pixel_mask = images_and_prompt()
    inputs = dict(input_ids=ids, attention_mask=attention_mask, pixel_values=pixels, pixel_attention_mask=pixel_mask)
    with torch.no_grad():
        want, got = model(**inputs).logits, fast(**inputs).logits
    assert max_err(got, want) <= 1e-5 * want.abs().max().item()
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(fast.generate(**inputs, **kw), model.generate(**inputs, **kw))


def test_patch_and_unpatch_the_model_classes():
    for cls in (upstream.Idefics2ForConditionalGeneration, upstream.Idefics2Model):
        model = testing.tiny_idefics2(cls)
        before = {path: type(m) for path, m in model.named_modules()}
        report = fastflamingo.patch(model)
        assert report.counts() == {"Idefics2PerceiverLayer": 2}, report
        assert fastflamingo.unpatch(model) == 2
        assert {path: type(m) for path, m in model.named_modules()} == before


def test_load_time_dropins_equal_patch():
    """``fastflamingo.dropins()``: transformers builds the drop-in layers itself (here the resampler, as the
    connector builds it: ``_from_config``; each such build costs transformers' own scan of its modules), and the
    resampler gets the patched forward once its layers are attached; same output as upstream, and unpatch builds
    transformers' layers."""
    from fastflamingo.hf import load

    model = upstream_resampler()
    with load.dropins():
        built = upstream.Idefics2PerceiverResampler._from_config(model.config).eval()
    built.load_state_dict(model.state_dict(), strict=True)
    assert all(isinstance(layer, idefics2.Idefics2PerceiverLayer) for layer in built.layers)
    assert "forward" in built.__dict__
    context, mask = context_and_mask()
    with torch.no_grad():
        want = model(context, mask)
        assert max_err(built(context, mask), want) <= 1e-5 * want.abs().max().item()
        assert fastflamingo.unpatch(built) == 2
        assert type(built.layers[0]) is upstream.Idefics2PerceiverLayer and "forward" not in built.__dict__
        assert max_err(built(context, mask), want) <= 1e-5 * want.abs().max().item()
