"""IDEFICS drop-ins and patching against the real transformers implementation (models/idefics)."""
import copy
import subprocess
import sys
import warnings

import pytest
import torch

import fastflamingo
from fastflamingo.masks import MediaMask
from fastflamingo.models import idefics as ff
from fastflamingo.testing import idefics_config, tiny_idefics

transformers = pytest.importorskip("transformers")
from transformers import IdeficsForVisionText2Text, IdeficsModel  # noqa: E402
from transformers.models.idefics import modeling_idefics as hf  # noqa: E402
from transformers.models.idefics import perceiver as hf_perceiver  # noqa: E402

# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def assert_grads_close(grads, ref_grads, tol=1e-5):
    """Every gradient within ``tol`` of max-abs. The perceiver's ``k_layer_norm.bias`` gradient is analytically
    zero (it adds q.bias to every score of a row, which the softmax ignores): both sides are rounding noise there,
    so it is only checked to be noise relative to the largest gradient."""
    assert grads.keys() == ref_grads.keys()
    largest = max(g.abs().max().item() for g in ref_grads.values())
    for name, g in ref_grads.items():
        assert grads[name] is not None, name
        if name.endswith("k_layer_norm.bias"):  # only the perceiver's LayerNorm has a bias
            assert grads[name].abs().max() <= tol * largest and g.abs().max() <= tol * largest, name
            continue
        assert rel_err(grads[name], g) <= tol, name


def processor_mask(batch, num_text, num_images, seed=0):
    """What IdeficsProcessor produces: one-hot current image from each <image> token on, all-zero rows before
    the first image and after an EOS until the next image; odd samples have one padded (never seen) image."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, num_text, num_images)
    for b in range(batch):
        real = num_images - (b % 2) if num_images > 1 else num_images
        if num_text == 1:  # a decode step: the last prompt row is repeated
            if b % 3 != 2:
                mask[b, 0, (b % real)] = 1
            continue
        starts = sorted(torch.randperm(num_text - 1, generator=g)[:real].add(1).tolist())
        for i, s in enumerate(starts):
            end = starts[i + 1] if i + 1 < len(starts) else num_text
            eos = s + 1 + (end - s - 1) // 2 if (i == 0 and end - s > 3) else end  # zero rows after an EOS
            mask[b, s:eos, i] = 1
    return mask


def expand_like_idefics_model(image_attention_mask, latents, dtype=torch.float32):
    """IdeficsModel's expansion (modeling_idefics.py, IdeficsModel.forward): additive (B, 1, T, N*n) + gate."""
    m = image_attention_mask[..., None].expand(-1, -1, -1, latents).reshape(*image_attention_mask.shape[:2], -1)
    m = torch.where(m[:, None].bool(), torch.full((), 0.0, dtype=dtype), torch.finfo(dtype).min)
    gate = (m == 0.0).any(dim=-1).to(dtype).squeeze(1)
    return m, gate


def pair(cfg, dtype=torch.float32):
    up = hf.IdeficsGatedCrossAttentionLayer(cfg, layer_idx=0)
    ours = ff.IdeficsGatedCrossAttentionLayer(cfg, layer_idx=0)
    ours.load_state_dict(up.state_dict(), strict=True)
    return up.to(dtype), ours.to(dtype)


def run_layer(layer, x, img, mask, gate, w):
    x = x.detach().clone().requires_grad_()
    img = img.detach().clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    out = layer(x, None, img, image_attention_mask=mask, cross_attention_gate=gate)
    (out.float() * w).sum().backward()
    grads = {"hidden_states": x.grad, "image_hidden_states": img.grad}
    grads.update({n: p.grad for n, p in layer.named_parameters()})
    return out.detach(), grads


def layer_inputs(cfg, batch, num_text, num_images, latents, dtype=torch.float32, seed=0, mask=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, num_text, cfg.hidden_size, generator=g)
    img = torch.randn(batch, num_images, latents, cfg.vision_config.embed_dim, generator=g)
    mask = processor_mask(batch, num_text, num_images, seed) if mask is None else mask
    for b in range(batch):  # padded images are all zeros (never attended by the processor's mask)
        unseen = mask[b].sum(0) == 0
        img[b, unseen] = 0
    m, gate = expand_like_idefics_model(mask, latents, dtype)
    w = torch.randn(batch, num_text, cfg.hidden_size, generator=g)
    return x.to(dtype), img.flatten(1, 2).to(dtype), m, gate, w


# --------------------------------------------------------------------------------------------------------------
# gated cross-attention layer
# --------------------------------------------------------------------------------------------------------------

LAYER_CASES = {
    # name: (config kwargs, batch, text, images, latents)
    "vector-qk": (dict(alpha_type="vector", qk=True), 2, 63, 3, 8),
    "float-noqk": (dict(alpha_type="float", qk=False), 2, 63, 3, 8),
    "float-qk-sdpa": (dict(alpha_type="float", qk=True, attn="sdpa"), 2, 63, 3, 8),
    "decode-T1": (dict(alpha_type="vector", qk=True), 3, 1, 2, 8),
    "T111-hd40": (dict(hidden=80, heads=2, vision=48, alpha_type="float", qk=True), 2, 111, 5, 5),
    # no resampler: every image gives its vision tokens (16 patches + CLS, the 257 of 224/14 scaled down)
    "hd96-vision-tokens": (dict(hidden=192, heads=2, alpha_type="vector", qk=False), 2, 40, 2, 17),
    "one-image": (dict(alpha_type="vector", qk=True), 2, 20, 1, 8),
}


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_gated_layer_matches_upstream_fp32(case):
    kw, batch, num_text, num_images, latents = LAYER_CASES[case]
    cfg = idefics_config(**kw)
    up, ours = pair(cfg)
    x, img, mask, gate, w = layer_inputs(cfg, batch, num_text, num_images, latents)
    ref, ref_grads = run_layer(up, x, img, mask, gate, w)
    out, grads = run_layer(ours, x, img, mask, gate, w)
    assert out.dtype == ref.dtype
    assert rel_err(out, ref) <= 1e-5
    assert ref_grads.keys() == grads.keys()
    for name, g in ref_grads.items():
        assert grads[name] is not None, name
        assert rel_err(grads[name], g) <= 1e-5, name
    # the test means something: the attention branch contributes (alphas nonzero, image states used)
    assert ref_grads["image_hidden_states"].abs().max() > 0


@pytest.mark.parametrize("kind", ["prefix", "general", "soft", "none", "gate"])
def test_gated_layer_other_masks(kind):
    """Masks the processor does not produce still give upstream's result: prefix rows (closed form, all
    previous), arbitrary 0/1 rows (dense boolean fallback), a soft additive bias (dense, bias as is), and no
    mask (every key visible, as upstream's eager attention)."""
    cfg = idefics_config(qk=True)
    up, ours = pair(cfg)
    batch, num_text, num_images, latents = 2, 30, 4, 6
    g = torch.Generator().manual_seed(1)
    if kind == "prefix":
        last = torch.randint(0, num_images + 1, (batch, num_text), generator=g)
        image_mask = (torch.arange(num_images) < last[..., None]).float()
    else:
        image_mask = (torch.rand(batch, num_text, num_images, generator=g) < 0.5).float()
    x, img, mask, gate, w = layer_inputs(cfg, batch, num_text, num_images, latents, mask=image_mask)
    if kind == "soft":
        mask = torch.randn(mask.shape, generator=g) * 3  # a real bias: no hard pattern
        gate = torch.ones(batch, num_text)
    if kind == "none":
        mask = None
    if kind == "gate":  # a gate that disagrees with the mask still zeroes its rows (upstream's masked_fill)
        image_mask = processor_mask(batch, num_text, num_images)
        x, img, mask, gate, w = layer_inputs(cfg, batch, num_text, num_images, latents, mask=image_mask)
        gate = gate * (torch.rand(gate.shape, generator=g) < 0.5)
        assert (gate != 0).any()
    expected_type = {"prefix": MediaMask, "general": torch.Tensor, "soft": type(None), "none": MediaMask,
                     "gate": MediaMask}[kind]
    assert isinstance(ff.idefics_media_mask(mask, batch, num_text, img.shape[1]), expected_type)
    ref, ref_grads = run_layer(up, x, img, mask, gate, w)
    out, grads = run_layer(ours, x, img, mask, gate, w)
    assert rel_err(out, ref) <= 1e-5
    for name, gr in ref_grads.items():
        assert rel_err(grads[name], gr) <= 1e-5, name


@pytest.mark.parametrize("num_images,latents", [(3, 8), (1, 64), (4, 17), (5, 1)])
def test_mask_latents_recovered_exactly(num_images, latents):
    """The layer finds the media structure from the expanded mask alone: processor masks keep their closed form
    with one media per image, and the MediaMask says which image each token sees."""
    image_mask = processor_mask(3, 25, num_images, seed=num_images)
    mask, _ = expand_like_idefics_model(image_mask, latents)
    mm = ff.idefics_media_mask(mask, 3, 25, num_images * latents)
    assert isinstance(mm, MediaMask) and mm.immediate
    # a media of the closed form is one image, or a run of images that no token sees (merged losslessly)
    per_key = mm.visible().repeat_interleave(num_images * latents // mm.num_media, dim=-1)
    assert torch.equal(per_key, image_mask.bool().repeat_interleave(latents, dim=-1))
    if bool((image_mask.sum((0, 1)) > 0).all()):
        assert mm.num_media == num_images


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("alpha_type,qk", [("vector", True), ("float", False)])
def test_gated_layer_low_precision(dtype, alpha_type, qk):
    """Against an fp32 reference, our low-precision error is at most twice upstream's own, plus a small atol."""
    cfg = idefics_config(alpha_type=alpha_type, qk=qk)
    up32, _ = pair(cfg)
    up_lp = copy.deepcopy(up32).to(dtype)
    ours_lp = ff.IdeficsGatedCrossAttentionLayer(cfg, layer_idx=0).to(dtype)
    ours_lp.load_state_dict(up_lp.state_dict(), strict=True)
    x, img, mask_lp, gate_lp, w = layer_inputs(cfg, 2, 47, 3, 8, dtype=dtype)
    mask32, gate32 = expand_like_idefics_model(processor_mask(2, 47, 3, 0), 8)
    ref, ref_grads = run_layer(up32, x.float(), img.float(), mask32, gate32, w)
    out_up, grads_up = run_layer(up_lp, x, img, mask_lp, gate_lp, w)
    out, grads = run_layer(ours_lp, x, img, mask_lp, gate_lp, w)
    assert out.dtype == out_up.dtype == dtype

    def check(name, mine, theirs, reference):
        scale = reference.abs().max().item()
        err_up = (theirs.double() - reference.double()).abs().max().item()
        err = (mine.double() - reference.double()).abs().max().item()
        assert torch.isfinite(mine).all(), name
        assert err <= 2 * err_up + 2e-3 * scale, (name, err, err_up, scale)

    check("output", out, out_up, ref)
    for name in ref_grads:
        check(name, grads[name], grads_up[name], ref_grads[name])


def test_fp16_fully_masked_rows_no_nan():
    """Pinned divergence (SEMANTICS 3.3): when every score of a fully-masked row is below about -16, fp16 eager
    upstream adds finfo.min, overflows to -inf and its softmax is NaN; masked_fill rescues the forward but the
    backward carries NaN. Here such rows get exactly zero attention and finite gradients equal to fp32's."""
    cfg = idefics_config(alpha_type="vector", qk=False)
    up32, _ = pair(cfg)
    hd = cfg.hidden_size // cfg.num_attention_heads
    with torch.no_grad():  # queries and keys aligned against each other: every score is about -50
        up32.cross_attn.q_proj.weight.fill_(0.05)
        up32.cross_attn.k_proj.weight.fill_(-0.05)
    batch, num_text, num_images, latents = 2, 12, 2, 4
    x = torch.rand(batch, num_text, cfg.hidden_size) + 1.0
    img = torch.rand(batch, num_images * latents, cfg.vision_config.embed_dim) + 1.0
    image_mask = torch.zeros(batch, num_text, num_images)
    image_mask[:, 6:, 0] = 1  # rows 0-5 see nothing
    w = torch.randn(batch, num_text, cfg.hidden_size)
    mask32, gate32 = expand_like_idefics_model(image_mask, latents)
    mask16, gate16 = expand_like_idefics_model(image_mask, latents, torch.float16)
    scores = (up32.cross_attn.q_proj(up32.input_layernorm(x)).view(batch, num_text, -1, hd)[0, 0, 0]
              @ up32.cross_attn.k_proj(img).view(batch, -1, cfg.num_attention_heads, hd)[0, :, 0].T) * hd**-0.5
    assert scores.max() < -16

    ref, ref_grads = run_layer(up32, x, img, mask32, gate32, w)
    up16 = copy.deepcopy(up32).half()
    out_up, grads_up = run_layer(up16, x.half(), img.half(), mask16, gate16, w)
    assert torch.isfinite(out_up).all()
    assert not all(torch.isfinite(g).all() for g in grads_up.values())  # upstream: NaN gradients

    ours16 = ff.IdeficsGatedCrossAttentionLayer(cfg, layer_idx=0).half()
    ours16.load_state_dict(up16.state_dict(), strict=True)
    out, grads = run_layer(ours16, x.half(), img.half(), mask16, gate16, w)
    assert torch.isfinite(out).all()
    for name, g in grads.items():
        assert torch.isfinite(g).all(), name
        scale = ref_grads[name].abs().max().item()
        assert (g.double() - ref_grads[name].double()).abs().max().item() <= 2e-2 * scale + 1e-3, name


def test_autocast_bf16_dtype_promotion():
    """fp32 weights under bf16 autocast: the fp32 alphas promote the result to fp32 exactly as upstream, and the
    fp32 qk-norm weights (q/k fp32, v bf16) do not trip the attention."""
    cfg = idefics_config(alpha_type="float", qk=True)
    up, ours = pair(cfg)
    x, img, mask, gate, w = layer_inputs(cfg, 2, 21, 2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, ref_grads = run_layer(up, x, img, mask, gate, w)
        out, grads = run_layer(ours, x, img, mask, gate, w)
    assert out.dtype == ref.dtype == torch.float32
    assert rel_err(out, ref) <= 2e-2
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) <= 5e-2, name


def test_dropout_training_and_eval():
    """config.dropout is applied to attention probabilities and both branches in training only (as upstream):
    eval matches upstream exactly; training is stochastic and unbiased."""
    cfg = idefics_config(dropout=0.3)
    up, ours = pair(cfg)
    x, img, mask, gate, _ = layer_inputs(cfg, 2, 16, 2, 8)
    up.eval(), ours.eval()
    with torch.no_grad():
        assert rel_err(ours(x, None, img, mask, gate), up(x, None, img, mask, gate)) <= 1e-5
        ours.train()
        a, b = ours(x, None, img, mask, gate), ours(x, None, img, mask, gate)
        assert not torch.equal(a, b)
        mean = torch.stack([ours(x, None, img, mask, gate) for _ in range(300)]).mean(0)
        ours.eval()
        exact = ours(x, None, img, mask, gate)
    assert (mean - exact).abs().mean() < 0.1 * exact.abs().mean()


def test_cross_attn_submodule_call_convention():
    """``layer.cross_attn`` is called like upstream's IdeficsAttention and returns ``(output, weights)``. Rows
    that see no image are 0 here where upstream averages all keys; the layer's gate zeroes them on both sides."""
    cfg = idefics_config(qk=True)
    up, ours = pair(cfg)
    x, img, mask, gate, _ = layer_inputs(cfg, 2, 9, 2, 4)
    with torch.no_grad():
        ref, _ = up.cross_attn(hidden_states=x, key_value_states=img, attention_mask=mask)
        out, weights = ours.cross_attn(hidden_states=x, key_value_states=img, attention_mask=mask)
    seen = gate.bool()
    assert weights is None and (~seen).any() and seen.any()
    assert rel_err(out[seen], ref[seen]) <= 1e-5
    assert torch.equal(out[~seen], torch.zeros_like(out[~seen]))


def test_state_dict_roundtrip_both_ways_and_alpha_shapes():
    for alpha_type, shape in (("float", (1,)), ("vector", (1, 1, 64))):
        for init in ("zeros", "ones"):
            cfg = idefics_config(alpha_type=alpha_type, alpha_initializer=init, qk=True)
            up = hf.IdeficsGatedCrossAttentionLayer(cfg, layer_idx=3)
            ours = ff.IdeficsGatedCrossAttentionLayer(cfg, layer_idx=3)
            assert list(ours.state_dict()) == list(up.state_dict())
            for key, t in up.state_dict().items():
                assert ours.state_dict()[key].shape == t.shape, key
            assert ours.alpha_cross_attn.shape == ours.alpha_dense.shape == shape
            assert torch.equal(ours.alpha_dense, up.alpha_dense)
            ours.load_state_dict(up.state_dict(), strict=True)
            up.load_state_dict(ours.state_dict(), strict=True)
    cfg = idefics_config(qk=False)
    keys = list(ff.IdeficsGatedCrossAttentionLayer(cfg).state_dict())
    assert keys == list(hf.IdeficsGatedCrossAttentionLayer(cfg, 0).state_dict())
    assert not any("layer_norm" in k for k in keys if k.startswith("cross_attn"))


def test_float_normal_alpha_divergence():
    """Upstream crashes for alpha_type="float" with a normal initializer (size=(1) is an int); the drop-in draws
    a (1,) normal sample with std alphas_initializer_range."""
    cfg = idefics_config(alpha_type="float", alpha_initializer="normal")
    with pytest.raises(TypeError):
        hf.IdeficsGatedCrossAttentionLayer(cfg, layer_idx=0)
    layers = [ff.IdeficsGatedCrossAttentionLayer(cfg) for _ in range(50)]
    alphas = torch.cat([layer.alpha_cross_attn.detach() for layer in layers])
    assert layers[0].alpha_dense.shape == (1,)
    assert 0.5 < alphas.std().item() < 1.6  # std 1.0 configured, not a constant


def test_gated_layer_errors_match_upstream():
    cfg = idefics_config()
    up, ours = pair(cfg)
    x, img, mask, gate, _ = layer_inputs(cfg, 2, 8, 2, 4)
    calls = [
        (dict(image_hidden_states=None, image_attention_mask=mask, cross_attention_gate=gate), ValueError),
        (dict(image_hidden_states=img, image_attention_mask=mask, cross_attention_gate=None), ValueError),
        (dict(image_hidden_states=img, image_attention_mask=mask, cross_attention_gate=gate, cache=object()),
         NotImplementedError),
        (dict(image_hidden_states=img, image_attention_mask=mask, cross_attention_gate=gate,
              past_key_values=object()), NotImplementedError),
    ]
    for kwargs, exc in calls:
        messages = []
        for layer in (up, ours):
            with warnings.catch_warnings(record=True) as caught, pytest.raises(exc) as info:
                warnings.simplefilter("always")
                layer(x, None, **kwargs)
            messages.append(str(info.value))
            if "past_key_values" in kwargs:
                assert any(issubclass(c.category, FutureWarning) for c in caught)
        assert messages[0] == messages[1]
    # past_key_values=None is accepted with a FutureWarning, like upstream
    with pytest.warns(FutureWarning):
        out = ours(x, None, img, mask, gate, past_key_values=None)
    assert out.shape == x.shape
    with pytest.raises(ValueError, match="image_attention_mask must have shape"):
        ours(x, None, img, image_attention_mask=mask[..., :-1], cross_attention_gate=gate)
    with pytest.raises(ValueError, match="image_hidden_states has feature size"):
        ours(x, None, img[..., :-1], image_attention_mask=mask, cross_attention_gate=gate)
    with pytest.raises(ValueError, match="cross_attention_gate must be"):
        ours(x, None, img, image_attention_mask=mask, cross_attention_gate=gate[:, :-1])


# --------------------------------------------------------------------------------------------------------------
# perceiver resampler
# --------------------------------------------------------------------------------------------------------------


def perceiver_pair(qk, head_dim=16, dtype=torch.float32):
    cfg = idefics_config(qk_perceiver=qk)
    args = (cfg, 32, 2, 2, head_dim, 8)
    up = hf_perceiver.IdeficsPerceiverResampler(*args)
    ours = ff.IdeficsPerceiverResampler(*args)
    ours.load_state_dict(up.state_dict(), strict=True)
    up.load_state_dict(ours.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(up.state_dict())
    return up.to(dtype), ours.to(dtype)


def run_perceiver(module, context, w):
    context = context.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    out = module(context)
    (out.float() * w).sum().backward()
    grads = {"context": context.grad}
    grads.update({n: p.grad for n, p in module.named_parameters()})
    return out.detach(), grads


@pytest.mark.parametrize("qk,head_dim", [(True, 16), (False, 16), (True, 40)])
def test_perceiver_matches_upstream_fp32(qk, head_dim):
    up, ours = perceiver_pair(qk, head_dim)
    # 2 samples x 3 images x (16 patches + CLS) tokens: IDEFICS's N x 257 scaled down
    context = torch.randn(6, 17, 32)
    w = torch.randn(6, 8, 32)
    ref, ref_grads = run_perceiver(up, context, w)
    out, grads = run_perceiver(ours, context, w)
    assert rel_err(out, ref) <= 1e-5
    assert_grads_close(grads, ref_grads)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_perceiver_low_precision(dtype):
    up32, _ = perceiver_pair(True)
    up_lp = copy.deepcopy(up32).to(dtype)
    ours_lp = ff.IdeficsPerceiverResampler(idefics_config(qk_perceiver=True), 32, 2, 2, 16, 8).to(dtype)
    ours_lp.load_state_dict(up_lp.state_dict(), strict=True)
    context = torch.randn(6, 17, 32).to(dtype)
    w = torch.randn(6, 8, 32)
    ref, ref_grads = run_perceiver(up32, context.float(), w)
    out_up, grads_up = run_perceiver(up_lp, context, w)
    out, grads = run_perceiver(ours_lp, context, w)
    assert out.dtype == dtype
    for name, mine, theirs, reference in [("output", out, out_up, ref)] + [
        (n, grads[n], grads_up[n], ref_grads[n]) for n in ref_grads
    ]:
        err_up = (theirs.double() - reference.double()).abs().max().item()
        err = (mine.double() - reference.double()).abs().max().item()
        scale = ref_grads["latents"].abs().max().item() if name.endswith("k_layer_norm.bias") else 0.0  # zero grad
        assert err <= 2 * err_up + 2e-3 * max(reference.abs().max().item(), scale), (name, err, err_up)


def test_perceiver_input_errors():
    _, ours = perceiver_pair(False)
    with pytest.raises(ValueError, match="context must have shape"):
        ours(torch.randn(2, 3, 17, 32))
    with pytest.raises(ValueError, match="feature size 31"):
        ours(torch.randn(2, 17, 31))


# --------------------------------------------------------------------------------------------------------------
# whole models: patch / unpatch
# --------------------------------------------------------------------------------------------------------------


def model_inputs(batch=2, num_text=14, num_images=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (batch, num_text), generator=g)
    image_mask = processor_mask(batch, num_text, num_images, seed).long()
    pixels = torch.randn(batch, num_images, 3, 32, 32, generator=g)
    for b in range(batch):  # the processor zero-pads missing images
        pixels[b, image_mask[b].sum(0) == 0] = 0
    return dict(input_ids=ids, pixel_values=pixels, image_attention_mask=image_mask,
                attention_mask=torch.ones(batch, num_text, dtype=torch.long))


@pytest.mark.parametrize("use_resampler,act", [(True, "silu"), (False, "gelu")])
def test_patch_model_logits_generate_and_unpatch(use_resampler, act):
    model = tiny_idefics(use_resampler=use_resampler, hidden_act=act)
    inputs = model_inputs()
    params_before = dict(model.named_parameters())
    keys_before = list(model.state_dict())
    originals = {n: m for n, m in model.named_modules() if type(m).__name__ in
                 ("IdeficsGatedCrossAttentionLayer", "IdeficsPerceiverResampler")}
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        # the cross attention matters for these weights (so the comparison below is not vacuous)
        alphas = {n: p.clone() for n, p in model.named_parameters() if "alpha_cross_attn" in n}
        for n, p in model.named_parameters():
            if "alpha_cross_attn" in n:
                p.zero_()
        blind = model(**inputs).logits
        for n, p in model.named_parameters():
            if n in alphas:
                p.copy_(alphas[n])
    assert (blind - ref).abs().max() > 1e-3

    report = fastflamingo.patch(model)
    expected = {"IdeficsGatedCrossAttentionLayer": 2}
    if use_resampler:
        expected["IdeficsPerceiverResampler"] = 1
    assert report.counts() == expected
    layer = model.model.gated_cross_attn_layers[0]
    assert isinstance(layer, ff.IdeficsGatedCrossAttentionLayer)
    assert list(model.state_dict()) == keys_before
    params_after = dict(model.named_parameters())
    assert params_after.keys() == params_before.keys()
    assert all(params_after[n] is p for n, p in params_before.items())

    with torch.no_grad():
        out = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        with fastflamingo.backend("torch"):
            out_torch = model(**inputs).logits
    assert rel_err(out, ref) <= 1e-5
    assert torch.equal(out_torch, out)
    assert torch.equal(tokens, ref_tokens)

    assert fastflamingo.patch(model).replaced == {}  # patching twice is a no-op
    assert fastflamingo.unpatch(model) == len(originals)
    for name, module in model.named_modules():
        if name in originals:
            assert module is originals[name]
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)


def test_patch_idefics_model_and_backward():
    base = tiny_idefics(IdeficsModel, attn="eager")
    base.train()  # dropout is 0: training mode only turns the gradient machinery on
    inputs = model_inputs(seed=3)
    w = torch.randn(2, 14, 64)

    def grads():
        base.zero_grad(set_to_none=True)
        (base(**inputs).last_hidden_state * w).sum().backward()
        return {n: p.grad.clone() for n, p in base.named_parameters() if p.grad is not None}

    ref = grads()
    report = fastflamingo.patch(base)
    assert report.counts() == {"IdeficsGatedCrossAttentionLayer": 2, "IdeficsPerceiverResampler": 1}
    assert base.gated_cross_attn_layers[1].training
    got = grads()
    assert any("alpha_cross_attn" in n for n in got) and any("perceiver_resampler" in n for n in got)
    assert_grads_close(got, ref)


@pytest.mark.parametrize("when", ["before", "after"])
def test_gradient_checkpointing_with_patch(when):
    """transformers' activation checkpointing reaches the drop-in whether it was enabled before or after patch."""
    model = tiny_idefics()
    model.train()
    inputs = model_inputs(seed=5)

    w = torch.randn(2, 14, 102)

    def grads():
        model.zero_grad(set_to_none=True)
        (model(**inputs).logits * w).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = grads()
    kwargs = {"activation_checkpointing_kwargs": {"use_reentrant": False}}
    if when == "before":
        model.activation_checkpointing_enable(**kwargs)
    fastflamingo.patch(model)
    if when == "after":
        model.activation_checkpointing_enable(**kwargs)
    layer = model.model.gated_cross_attn_layers[0]
    assert layer.gradient_checkpointing
    calls = []
    inner = layer._gradient_checkpointing_func
    layer._gradient_checkpointing_func = lambda *a, **k: calls.append(1) or inner(*a, **k)
    got = grads()
    assert calls  # the drop-in really checkpointed
    assert_grads_close(got, ref)


def test_patched_model_moves_with_to_and_unpatches():
    """The unused rotary buffers of upstream's cross attention follow .to() while patched and come back."""
    model = tiny_idefics()
    fastflamingo.patch(model)
    model.to(torch.float64)
    fastflamingo.unpatch(model)
    upstream = model.model.gated_cross_attn_layers[0]
    assert type(upstream).__name__ == "IdeficsGatedCrossAttentionLayer" and not hasattr(
        type(upstream), "_fastflamingo_dropin"
    )
    assert upstream.cross_attn.q_proj.weight.dtype == torch.float64
    inputs = model_inputs()
    inputs["pixel_values"] = inputs["pixel_values"].double()
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


# --------------------------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------------------------


def test_backend_torch_explicit():
    cfg = idefics_config()
    up, ours = pair(cfg)
    x, img, mask, gate, w = layer_inputs(cfg, 2, 33, 3, 8)
    ref, ref_grads = run_layer(up, x, img, mask, gate, w)
    with fastflamingo.backend("torch"):
        out, grads = run_layer(ours, x, img, mask, gate, w)
    assert rel_err(out, ref) <= 1e-5
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) <= 1e-5, name


@pytest.mark.triton
def test_backend_triton_matches_upstream(device):
    cfg = idefics_config(qk=True)
    up, ours = pair(cfg)
    up, ours = up.to(device), ours.to(device)
    x, img, mask, gate, w = (t.to(device) for t in layer_inputs(cfg, 2, 24, 2, 8))
    ref, ref_grads = run_layer(up, x, img, mask, gate, w)
    with fastflamingo.backend("triton"):
        out, grads = run_layer(ours, x, img, mask, gate, w)
    assert rel_err(out, ref) <= 1e-4
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) <= 1e-4, name


# --------------------------------------------------------------------------------------------------------------
# import hygiene
# --------------------------------------------------------------------------------------------------------------


def test_import_and_run_without_transformers():
    code = (
        "import sys, types, torch\n"
        "sys.modules['transformers'] = None\n"  # any import of transformers now fails
        "import fastflamingo\n"
        "from fastflamingo import IdeficsGatedCrossAttentionLayer, IdeficsPerceiverResampler\n"
        "cfg = types.SimpleNamespace(hidden_size=32, intermediate_size=48, num_attention_heads=4, qk_layer_norms=True,\n"
        "    alpha_type='vector', alpha_initializer='ones', vision_config={'embed_dim': 16},\n"
        "    perceiver_config={'qk_layer_norms_perceiver': True})\n"
        "layer = IdeficsGatedCrossAttentionLayer(cfg)\n"
        "mask = torch.zeros(1, 1, 5, 8); mask[..., :2, :] = torch.finfo(torch.float32).min\n"
        "out = layer(torch.randn(1, 5, 32), None, torch.randn(1, 8, 16), mask, torch.ones(1, 5))\n"
        "res = IdeficsPerceiverResampler(cfg, 16, 1, 2, 8, 4)(torch.randn(2, 9, 16))\n"
        "assert out.shape == (1, 5, 32) and res.shape == (2, 4, 16)\n"
        "assert 'transformers' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
