"""``attn_implementation="fastflamingo"`` (fastflamingo.hf) against the real transformers classes: tiny mllama and
IDEFICS models (fastflamingo.testing), masks from transformers' own processor code (mllama_cases), the route's op
counted by spies, and the vision-size inference of the mllama mask checked on random processor layouts."""
import copy
import random
import subprocess
import sys

import pytest
import torch

import fastflamingo as ff
from fastflamingo.models.idefics import mask as idefics_mask
from fastflamingo.models.mllama import mask as mask_mod
from fastflamingo.models.mllama import reference, torch_path
from fastflamingo.testing import idefics_config, tiny_idefics, tiny_mllama
from helpers import assert_close, grads_match
from mllama_cases import CASES, make_qkv, model_inputs, prepare, processor_mask, random_rows

transformers = pytest.importorskip("transformers")
import fastflamingo.hf as ffhf  # noqa: E402
from transformers.models.idefics import modeling_idefics as hf_idefics  # noqa: E402
from transformers.models.mllama import modeling_mllama as hf  # noqa: E402

NAME = ffhf.register()
CROSS_LAYERS = (1, 3)  # tiny_mllama's cross-attention layers


def routed(model, implementation=NAME):
    """A copy of ``model`` that runs through the route (``set_attn_implementation``, as a user would)."""
    model = copy.deepcopy(model)
    model.set_attn_implementation(implementation)
    return model


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


class Spy:
    """Counts the calls of ``owner.name`` (and keeps their keyword arguments), passing them through."""

    def __init__(self, monkeypatch, owner, name):
        self.calls = []
        original = getattr(owner, name)

        def spy(*args, **kwargs):
            self.calls.append(kwargs)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, spy)

    def __len__(self):
        return len(self.calls)


def op_spy(monkeypatch, family):
    """The op the route runs for ``family``: mllama_xattn, or IDEFICS's media_xattn (imported by the route at call
    time, so patching the module attribute sees every call)."""
    if family == "mllama":
        import fastflamingo.models.mllama as owner

        return Spy(monkeypatch, owner, "mllama_xattn")
    return Spy(monkeypatch, ff.functional, "media_xattn")


@pytest.fixture(scope="module")
def mllama():
    return {attn: tiny_mllama(attn) for attn in ("eager", "sdpa")}


@pytest.fixture(scope="module")
def idefics():
    return {attn: tiny_idefics(attn=attn) for attn in ("eager", "sdpa")}


# ----------------------------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------------------------


def test_register_is_explicit_and_idempotent():
    """``import fastflamingo`` (and ``fastflamingo.hf``) neither imports transformers nor touches its registries;
    register() adds the attention and the mask function, twice is the same, and the name passes transformers'
    checks (no "flash": mllama refuses flash attention; not "org/repo": that would be a Hub kernel)."""
    script = (
        "import sys, fastflamingo, fastflamingo.hf as h\n"
        "assert 'transformers' not in sys.modules\n"
        "from transformers.masking_utils import AttentionMaskInterface, sdpa_mask\n"
        "from transformers.modeling_utils import AttentionInterface\n"
        "assert 'fastflamingo' not in AttentionInterface._global_mapping\n"
        "assert h.register() == h.register() == 'fastflamingo'\n"
        "assert AttentionInterface._global_mapping['fastflamingo'] is h.attention\n"
        "assert AttentionMaskInterface._global_mapping['fastflamingo'] is sdpa_mask\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "flash" not in NAME and "/" not in NAME


# ----------------------------------------------------------------------------------------------------------------
# mllama: the vision sizes inferred from the mask
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("empty_rows", mask_mod.EMPTY_ROWS)
def test_inferred_sizes_are_exact_on_processor_masks(empty_rows):
    """Random prompts through transformers' processor code (left / right padding, rows that see no image,
    consecutive images, text-only samples in a batch, 1-4 of up to 1-4 tiles, odd tile sizes): without the vision
    sizes the closed form is found for every mask, and it means exactly what the processor mask means."""
    rng = random.Random(1)
    checked = 0
    for _ in range(120):
        tokens_per_tile, max_tiles = rng.choice((1, 2, 5, 7)), rng.randint(1, 4)
        rows, tiles = random_rows(rng, batch=rng.randint(1, 5), length=rng.randint(1, 20), max_images=4,
                                  max_tiles=max_tiles)
        if not any(tiles):
            continue
        cam = processor_mask(rows, tiles, max_tiles)
        additive, flag = prepare(cam, tokens_per_tile, torch.float32)
        inferred = mask_mod.from_additive_mask(additive, None, None, flag, empty_rows)
        assert inferred is not None, (tokens_per_tile, max_tiles, rows, tiles)
        assert torch.equal(inferred.visible(), reference.visible_keys(cam, tokens_per_tile, empty_rows))
        checked += 1
    assert checked > 100


def test_inferred_sizes_for_named_layouts():
    """The named layouts recover their true image stride (tiles x tokens) when the blocks allow it, and masks
    without the form (a soft bias, a row that sees images 0 and 2 but not 1) are refused, as at known sizes."""
    for name, (rows, tiles) in CASES.items():
        cam = processor_mask(rows, tiles, 4)
        additive, _ = prepare(cam, 5, torch.float32)
        inferred = mask_mod.from_additive_mask(additive, None, None)
        assert torch.equal(inferred.visible(), reference.visible_keys(cam, 5)), name
    additive, _ = prepare(processor_mask(*CASES["interleaved"], 4), 5, torch.float32)
    assert mask_mod.from_additive_mask(additive, None, None).image_stride == 4 * 5
    soft = additive.clone()
    soft[0, 0, 3, 2] = -1.5
    gap = torch.zeros(1, 2, 3, 2, dtype=torch.long)
    gap[0, 0, 0, 0] = 1
    gap[0, 1, [0, 2], 0] = 1
    assert mask_mod.from_additive_mask(soft, None, None) is None
    assert mask_mod.from_additive_mask(prepare(gap, 3, torch.float32)[0], None, None) is None
    with pytest.raises(ValueError, match="max_tiles"):
        mask_mod.from_additive_mask(additive, 5, None)
    with pytest.raises(ValueError, match="tokens_per_tile"):
        mask_mod.from_additive_mask(additive, 0, 4)


def test_inferred_sizes_try_llama_first(monkeypatch):
    """A key count that Llama 3.2's 4 x 1601 divides is read at those sizes (one pass, no block search); the result
    is the one known sizes give."""
    cam = processor_mask(*CASES["consecutive"], 4)
    additive, flag = prepare(cam, mask_mod.TOKENS_PER_TILE, torch.float32)
    searched = Spy(monkeypatch, mask_mod, "_block_size")
    inferred = mask_mod.from_additive_mask(additive, None, None, flag)
    known = mask_mod.from_additive_mask(additive, mask_mod.TOKENS_PER_TILE, mask_mod.MAX_TILES, flag)
    assert len(searched) == 0
    mask_mod.from_additive_mask(prepare(cam, 5, torch.float32)[0], None, None)
    assert len(searched) == 1  # at other sizes the blocks are searched
    for name in ("img_start", "img_end", "image_keys", "image_stride", "has_all", "max_runs"):
        assert torch.equal(torch.as_tensor(getattr(inferred, name)), torch.as_tensor(getattr(known, name))), name


@pytest.mark.parametrize("case", ["consecutive", "left_padding", "text_only"])
def test_op_with_inferred_sizes_matches_the_oracle(monkeypatch, case):
    """``mllama_xattn(..., tokens_per_tile=None, max_tiles=None)`` on odd shapes (7-token tiles, 3 tiles per
    slot, 6 query heads of 24 on 2 K/V heads): the closed form serves it, within 1e-5 of the float64 oracle."""
    from fastflamingo.models.mllama import mllama_xattn

    rows, tiles = CASES[case]
    tiles = [[min(n, 3) for n in sample] for sample in tiles]
    cam = processor_mask(rows, tiles, 3)
    additive, _ = prepare(cam, 7, torch.float32)
    batch, num_text = cam.shape[:2]
    q, k, v = make_qkv("cpu", torch.float32, batch, num_text, 6, 2, 24, additive.shape[-1], seed=3)
    runs = Spy(monkeypatch, torch_path, "runs")
    out = mllama_xattn(q, k, v, additive, scale=0.3, tokens_per_tile=None, max_tiles=None)
    want, _ = reference.attention(q, k, v, reference.visible_keys(cam, 7), 0.3)
    assert_close(out, want, 1e-5, case)
    assert len(runs) == 1


# ----------------------------------------------------------------------------------------------------------------
# mllama: whole models through the route
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_mllama_logits_match_transformers(mllama, monkeypatch, case):
    """MllamaForConditionalGeneration through the route: logits within 1e-5 of transformers' SDPA (every token)
    and eager (the real tokens: on left-padding tokens transformers' own eager and SDPA self-attention differ),
    every cross-attention call served by mllama_xattn's closed form, derived once per forward for both layers."""
    inputs = model_inputs(*CASES[case])
    model = routed(mllama["sdpa"])
    op, runs, derived = op_spy(monkeypatch, "mllama"), Spy(monkeypatch, torch_path, "runs"), \
        Spy(monkeypatch, mask_mod, "_inferred")
    got = logits(model, inputs)
    assert len(op) == len(CROSS_LAYERS) and len(runs) == len(CROSS_LAYERS) and len(derived) == 1
    assert all(call["tokens_per_tile"] is None for call in op.calls)
    assert_close(got, logits(mllama["sdpa"], inputs), 1e-5, f"{case} vs sdpa")
    real = inputs["attention_mask"].bool()
    assert_close(got[real], logits(mllama["eager"], inputs)[real], 1e-5, f"{case} vs eager")


def test_mllama_generate_dynamic_and_static_cache(mllama, monkeypatch):
    """Greedy tokens identical to transformers' with a dynamic and a static cache (whose cross layers hold the
    vision keys, images x tiles x tokens): prefill and decode steps both run the op."""
    inputs = model_inputs(*CASES["left_padding"])
    model = routed(mllama["sdpa"])
    for options in ({}, dict(cache_implementation="static")):
        kwargs = dict(inputs, max_new_tokens=5, do_sample=False, **options)
        op = op_spy(monkeypatch, "mllama")
        with torch.no_grad():
            got = model.generate(**kwargs)
        assert len(op) == 5 * len(CROSS_LAYERS), options
        monkeypatch.undo()
        with torch.no_grad():
            want = mllama["sdpa"].generate(**kwargs)
        assert torch.equal(got, want), (options, got[:, -5:].tolist(), want[:, -5:].tolist())


def test_mllama_cross_layer_compiles_fullgraph(mllama, monkeypatch):
    """transformers' MllamaCrossAttentionDecoderLayer with the route compiles with fullgraph=True (no host
    synchronisation in the graph: the op attends densely while traced) and gives eager's output."""
    layer = copy.deepcopy(mllama["eager"].model.language_model.layers[CROSS_LAYERS[0]])
    expected_layer = copy.deepcopy(layer)
    layer.cross_attn.config = copy.copy(layer.cross_attn.config)
    layer.cross_attn.config._attn_implementation = NAME
    rows, tiles = CASES["interleaved"]
    cam = processor_mask(rows, tiles, 4)
    mask, flag = prepare(cam, 5, torch.float32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(cam.shape[0], cam.shape[1], 64, generator=g)
    states = torch.randn(cam.shape[0] * cam.shape[2] * 4, 5, 64, generator=g)
    op = op_spy(monkeypatch, "mllama")
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = compiled(x, states, mask, None, flag)
        want = expected_layer(x, states, mask, None, flag)
    assert len(op) >= 1  # traced through the op
    assert_close(got, want, 1e-5, "compiled layer")


@pytest.mark.triton
def test_mllama_compiled_route_refuses_explicit_triton():
    """Inferring the tile sizes reads the mask on the host, which a compiled graph cannot: backend "auto" attends
    densely there (the test above), an explicit "triton" says why it cannot serve (never a silent fallback)."""
    model = tiny_mllama("eager", num_heads=4)  # head_dim 16: the kernels' smallest, so this is the one reason
    layer = model.model.language_model.layers[CROSS_LAYERS[0]]
    layer.cross_attn.config = copy.copy(layer.cross_attn.config)
    layer.cross_attn.config._attn_implementation = NAME
    cam = processor_mask(*CASES["interleaved"], 4)
    mask, flag = prepare(cam, 5, torch.float32)
    x, states = torch.randn(cam.shape[0], cam.shape[1], 64), torch.randn(cam.shape[0] * cam.shape[2] * 4, 5, 64)
    compiled = torch.compile(layer, backend="aot_eager")
    with ff.backend("triton"), torch.no_grad(), pytest.raises(ff.BackendError, match="tokens_per_tile=None"):
        compiled(x, states, mask, None, flag)


def test_mllama_sub_config_dict_and_from_pretrained(mllama, tmp_path, monkeypatch):
    """from_pretrained(..., attn_implementation=...) with the name, and with a per-sub-config dict that keeps the
    vision tower on SDPA: the configs say so, and the logits match."""
    mllama["sdpa"].save_pretrained(tmp_path)
    inputs = model_inputs(*CASES["interleaved"])
    want = logits(mllama["sdpa"], inputs)
    for implementation, vision in ((NAME, NAME), ({"text_config": NAME, "vision_config": "sdpa"}, "sdpa")):
        model = transformers.MllamaForConditionalGeneration.from_pretrained(
            tmp_path, attn_implementation=implementation).eval()
        assert model.config.text_config._attn_implementation == NAME
        assert model.config.vision_config._attn_implementation == vision
        op = op_spy(monkeypatch, "mllama")
        assert_close(logits(model, inputs), want, 1e-5, str(implementation))
        assert len(op) == len(CROSS_LAYERS)
        monkeypatch.undo()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_mllama_training_gradients_match(mllama, attn):
    """A training step's loss and the gradient of every parameter match transformers' (the vision tower on the
    same implementation as the reference, through the sub-config dict)."""
    inputs = model_inputs(*CASES["interleaved"])
    results = []
    for model in (copy.deepcopy(mllama[attn]), routed(mllama[attn], {"text_config": NAME, "vision_config": attn})):
        model.train()
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss_want, want), (loss_got, got) = results
    assert_close(loss_got, loss_want, 1e-5, "loss")
    assert len(want) == sum(1 for _ in mllama[attn].parameters())  # every parameter has a gradient
    grads_match(got, want)


def test_mllama_dropout_only_when_training(mllama, monkeypatch):
    inputs = model_inputs(*CASES["interleaved"])
    model = routed(mllama["sdpa"])
    for i in CROSS_LAYERS:
        model.model.language_model.layers[i].cross_attn.dropout = 0.25
    op = op_spy(monkeypatch, "mllama")
    logits(model, inputs)
    model.train()
    torch.manual_seed(1)
    first = logits(model, inputs)
    second = logits(model, inputs)
    assert [c["dropout_p"] for c in op.calls] == [0.0, 0.0] + [0.25] * 4
    assert (first - second).abs().max() > 1e-4  # dropout does act


@pytest.mark.parametrize("case", ["consecutive", "left_padding"])
def test_mllama_output_attentions_are_eager_maps(mllama, case):
    """output_attentions=True: every layer's map is eager's, as under attn_implementation="eager" (the call is
    delegated to transformers' eager function; self-attention gets SDPA's mask made additive, or the causal mask SDPA
    would apply when its mask function hands it none), and the logits are unchanged."""
    inputs = model_inputs(*CASES[case])
    with torch.no_grad():
        want = mllama["eager"](**inputs, output_attentions=True)
        got = routed(mllama["eager"])(**inputs, output_attentions=True)
    assert len(want.attentions) == len(got.attentions) == 4
    for layer, (mine, theirs) in enumerate(zip(got.attentions, want.attentions)):
        assert_close(mine, theirs, 1e-6, f"layer {layer}")
    real = inputs["attention_mask"].bool()  # sdpa and eager differ on padding tokens' own rows (fully masked)
    assert_close(got.logits[real], want.logits[real], 1e-5, "logits")


def _cross_call(mllama, mask, implementation=NAME):
    """An upstream MllamaTextCrossAttention called alone (6 text tokens, 40 vision keys) under ``implementation``."""
    attn = copy.deepcopy(mllama["eager"].model.language_model.layers[CROSS_LAYERS[0]].cross_attn)
    attn.config = copy.copy(attn.config)
    attn.config._attn_implementation = implementation
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, 64, generator=g)
    states = torch.randn(2, 40, 64, generator=g)
    with torch.no_grad():
        return attn(x, states, attention_mask=mask)[0]


def test_mllama_masks_without_closed_form_and_bad_masks(mllama, monkeypatch):
    """No cross mask: every key, as eager (SDPA would be causal); a soft bias: the exact dense path; a mask that
    is not a (batch, 1, text, keys) float or bool tensor: a clear error."""
    assert_close(_cross_call(mllama, None), _cross_call(mllama, None, "eager"), 1e-5, "no mask")
    assert (_cross_call(mllama, None) - _cross_call(mllama, None, "sdpa")).abs().max() > 1e-3  # SDPA: causal
    dense = Spy(monkeypatch, torch_path, "dense")
    bias = torch.randn(2, 1, 6, 40, generator=torch.Generator().manual_seed(3))
    assert_close(_cross_call(mllama, bias), _cross_call(mllama, bias, "eager"), 1e-5, "soft bias")
    assert len(dense) == 1
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(batch, 1, text, keys\)"):
        _cross_call(mllama, torch.zeros(2, 6, 40))
    with pytest.raises(TypeError, match="additive"):
        _cross_call(mllama, torch.zeros(2, 1, 6, 40, dtype=torch.long))


@pytest.mark.triton
def test_mllama_route_through_the_kernels(monkeypatch):
    """backend("triton"): the prefill kernels serve the route with the inferred closed form (a slot stride the
    kernels never saw from a vision config), logits match transformers' (interpreted on CPU)."""
    upstream = tiny_mllama("sdpa", num_heads=4)  # head_dim 16: the kernels' smallest
    inputs = model_inputs(*CASES["consecutive"])
    model = routed(upstream)
    from fastflamingo.ops import mllama_xattn as kernel_ops

    kernels = Spy(monkeypatch, kernel_ops, "mllama_xattn")
    with ff.backend("triton"):
        got = logits(model, inputs)
    assert len(kernels) == len(CROSS_LAYERS)
    assert_close(got, logits(upstream, inputs), 1e-5, "logits")


# ----------------------------------------------------------------------------------------------------------------
# IDEFICS
# ----------------------------------------------------------------------------------------------------------------


def idefics_inputs(seed, batch=2, num_text=14, num_images=3):
    """IdeficsProcessor-like inputs (tests/test_idefics.py): rows before the first image and after an EOS see
    nothing, odd samples have a padded image nobody sees."""
    from test_idefics import model_inputs as idefics_model_inputs

    return idefics_model_inputs(batch, num_text, num_images, seed)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_idefics_logits_match_transformers(idefics, monkeypatch, seed):
    inputs = idefics_inputs(seed)
    op, derived = op_spy(monkeypatch, "idefics"), Spy(monkeypatch, idefics_mask, "_block_size")
    got = logits(routed(idefics["sdpa"]), inputs)
    assert len(op) == 2 and len(derived) == 1  # two gated layers, one mask recovery
    for attn in ("sdpa", "eager"):
        assert_close(got, logits(idefics[attn], inputs), 1e-5, attn)


def test_idefics_generate_and_training(idefics, monkeypatch):
    inputs = idefics_inputs(0)
    model = routed(idefics["sdpa"])
    op = op_spy(monkeypatch, "idefics")
    with torch.no_grad():
        got = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        want = idefics["sdpa"].generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, want)
    assert len(op) == 2 * 5
    results = []
    weights = torch.randn(2, 14, 102, generator=torch.Generator().manual_seed(4))
    for m in (copy.deepcopy(idefics["eager"]), routed(idefics["eager"])):
        m.train()
        loss = (m(**inputs).logits * weights).sum()  # (IDEFICS's own loss fails on its additional vocabulary)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    assert_close(results[1][0], results[0][0], 1e-5, "loss")
    assert any("alpha_cross_attn" in n for n in results[0][1])
    grads_match(results[1][1], results[0][1])


def test_idefics_cross_attention_compiles_and_refuses_bad_masks():
    """The gated layer with the route compiles with fullgraph=True (the drop-in's traced form: closed form checked
    on device) with eager's output; a mask of the wrong shape is a clear error."""
    from test_idefics import layer_inputs

    cfg = idefics_config(attn="eager")
    upstream = hf_idefics.IdeficsGatedCrossAttentionLayer(cfg, layer_idx=0).eval()
    ours = copy.deepcopy(upstream)
    ours.cross_attn.config = copy.deepcopy(cfg)
    ours.cross_attn.config._attn_implementation = NAME
    x, img, mask, gate, _ = layer_inputs(cfg, 2, 11, 3, 8)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        want = upstream(x, None, img, image_attention_mask=mask, cross_attention_gate=gate)
        assert_close(compiled(x, None, img, image_attention_mask=mask, cross_attention_gate=gate), want, 1e-5,
                     "compiled")
        assert_close(ours(x, None, img, image_attention_mask=mask, cross_attention_gate=gate), want, 1e-5, "eager")
        with pytest.raises(ValueError, match="image_attention_mask must have shape"):
            ours(x, None, img, image_attention_mask=mask[:, :, :-1], cross_attention_gate=gate[:, :-1])
