"""Attention maps: ``output_attentions=True`` on a patched model returns what upstream returns, and
``fastflamingo.attention_maps`` records every family's cross-attention maps (and the resamplers' latent attention)
as upstream's own attention computes them.

The oracles are the upstream modules themselves, in fp32: transformers' eager attention returns its probabilities
(mllama, IDEFICS: a forward hook on the upstream attention reads them), and OpenFlamingo / flamingo-pytorch /
the perceivers multiply theirs into V with ``einsum("... i j, ... j d -> ... i d", attn, v)``, read by a
TorchFunctionMode while the upstream module runs.
"""
import contextlib
import copy
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

import fastflamingo as ff
from fastflamingo.attention_recording import RECORDER_ATTR, AttentionMaps, attention_maps
from fastflamingo.models._outputs import attentions_requested
from fastflamingo.testing import tiny_flamingo_palm, tiny_idefics, tiny_mllama, tiny_open_flamingo
from helpers import assert_close
from mllama_cases import CASES, model_inputs as mllama_inputs

transformers = pytest.importorskip("transformers")

TOL = 1e-5
MAPS_MODULE = sys.modules["fastflamingo.attention_recording"]


# ----------------------------------------------------------------------------------------------------------------
# Oracles: the upstream modules' own probabilities
# ----------------------------------------------------------------------------------------------------------------


class _EinsumProbs(TorchFunctionMode):
    """Records the first operand of ``einsum("... i j, ... j d -> ... i d", attn, v)``: the probabilities the
    upstream Flamingo attentions (and the perceivers) multiply into V."""

    def __init__(self, store):
        super().__init__()
        self.store = store

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.einsum and isinstance(args[0], str) and args[0].replace(" ", "") == "...ij,...jd->...id":
            self.store.append(args[1].detach().clone())
        return func(*args, **(kwargs or {}))


def capture_einsum_probs(modules):
    """Hooks that record, per call of each module in ``modules``, the probabilities its einsum attention uses."""
    store, handles = [], []
    for module in modules:
        mode = _EinsumProbs(store)

        def enter(*_, mode=mode):
            mode.__enter__()

        def leave(*_, mode=mode):
            mode.__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    return store, handles


def capture_weights(modules):
    """Hooks that record the second output (the eager attention weights) of each call of ``modules``."""
    store = []
    handles = [m.register_forward_hook(lambda _m, _a, out: store.append(out[1].detach().clone())) for m in modules]
    return store, handles


def remove(handles):
    for h in handles:
        h.remove()


def of_type(model, name):
    return [m for m in model.modules() if type(m).__name__ == name and not getattr(type(m), "_fastflamingo_dropin", 0)]


def assert_maps_match(maps, upstream, seen_rows, name):
    """Each map equals upstream's probabilities on the rows that see media, and is exactly 0 on the others."""
    assert len(maps) == len(upstream), f"{name}: {len(maps)} maps, upstream made {len(upstream)}"
    for i, (m, want) in enumerate(zip(maps, upstream)):
        seen = seen_rows(m)[:, None, :, None]  # (batch, 1, queries, 1)
        assert_close(torch.where(seen, m.probs, 0.0), torch.where(seen, want, 0.0), TOL, f"{name} map {i}")
        assert (m.probs.masked_select(~seen.expand_as(m.probs)) == 0).all(), f"{name} map {i}: unseen rows not 0"


# ----------------------------------------------------------------------------------------------------------------
# transformers' collector
# ----------------------------------------------------------------------------------------------------------------


def test_attentions_requested_reads_transformers_collector():
    """attentions_requested() finds transformers' output collector inside a forward pass that records attention
    maps, and only there (fails when a release moves or renames the collector)."""
    from transformers.utils import output_capturing

    assert hasattr(output_capturing, "_active_collector"), "transformers moved its output collector"
    model = tiny_mllama("eager")
    seen = []
    layer = model.model.language_model.layers[0]
    handle = layer.register_forward_pre_hook(lambda *_: seen.append(attentions_requested()))
    inputs = mllama_inputs(*CASES["interleaved"])
    with torch.no_grad():
        model(**inputs, output_attentions=True)
        model(**inputs, output_hidden_states=True)
        model(**inputs)
    handle.remove()
    assert seen == [True, False, False]
    assert not attentions_requested()
    assert attentions_requested(True) and not attentions_requested(False)


# ----------------------------------------------------------------------------------------------------------------
# output_attentions: mllama and IDEFICS, patched vs unpatched
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mllama():
    """Upstream tiny mllama models (eager, sdpa) with the same weights and their patched copies."""
    upstream = {attn: tiny_mllama(attn) for attn in ("eager", "sdpa")}
    patched = {}
    for attn, model in upstream.items():
        patched[attn] = copy.deepcopy(model)
        ff.patch(patched[attn])
    return upstream, patched


def _attentions(model, inputs, **kwargs):
    with torch.no_grad():
        out = model(**inputs, **kwargs)
    return out.logits, out.attentions


@pytest.mark.parametrize("case", ["interleaved", "consecutive", "text_only", "left_padding"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_mllama_output_attentions_match_upstream(mllama, attn, case):
    """One map per layer, self and cross, in layer order, with upstream's shapes and values (eager); none under
    sdpa, as upstream; the logits are unchanged. Through the argument and (eager) through the config."""
    upstream, patched = mllama
    inputs = mllama_inputs(*CASES[case], seed=3)
    want_logits, want = _attentions(upstream[attn], inputs, output_attentions=True)
    got_logits, got = _attentions(patched[attn], inputs, output_attentions=True)
    assert_close(got_logits, want_logits, TOL, "logits")
    assert len(got) == len(want) == (4 if attn == "eager" else 0)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, TOL, f"layer {i}")
    if attn == "sdpa":
        return  # transformers' config refuses output_attentions=True unless the implementation is eager
    with _configured(patched[attn]):
        _, by_config = _attentions(patched[attn], inputs)
    with _configured(upstream[attn]):
        _, want_by_config = _attentions(upstream[attn], inputs)
    assert len(by_config) == len(want_by_config) == len(want)
    for i, (g, w) in enumerate(zip(by_config, want_by_config)):
        assert_close(g, w, TOL, f"layer {i}, config.output_attentions")


@contextlib.contextmanager
def _configured(model):
    """``output_attentions=True`` in the model's config and every sub-config, for the block."""
    configs = {id(m.config): m.config for m in model.modules() if hasattr(getattr(m, "config", None), "to_dict")}
    for config in configs.values():
        config.output_attentions = True
    try:
        yield
    finally:
        for config in configs.values():
            config.output_attentions = False


def test_mllama_output_attentions_empty_rows_zero_and_gradients(mllama):
    """empty_rows="zero": rows that see no image get all-zero maps (their output is 0), the others upstream's; the
    returned maps are the tensors the output was computed from, so their gradients equal upstream's."""
    upstream, _ = mllama
    zero = copy.deepcopy(upstream["eager"])
    ff.patch(zero, empty_rows="zero")
    inputs = mllama_inputs(*CASES["left_padding"], seed=4)
    sees = inputs["cross_attention_mask"].any(-1).any(-1)  # (batch, text): the row sees an image
    _, want = _attentions(upstream["eager"], inputs, output_attentions=True)
    _, got = _attentions(zero, inputs, output_attentions=True)
    for layer in (1, 3):
        keep = sees[:, None, :, None]
        assert_close(got[layer] * keep, want[layer] * keep, TOL, f"cross layer {layer}")
        assert (got[layer].masked_select(~keep.expand_as(got[layer])) == 0).all()

    grads = []
    for model in (upstream["eager"], copy.deepcopy(upstream["eager"])):
        if model is not upstream["eager"]:
            ff.patch(model)
        model.zero_grad(set_to_none=True)
        maps = model(**inputs, output_attentions=True).attentions
        (maps[1] * torch.linspace(0, 1, maps[1].shape[-1])).sum().backward()
        grads.append(model.model.language_model.layers[1].cross_attn.q_proj.weight.grad.clone())
    upstream["eager"].zero_grad(set_to_none=True)
    assert_close(grads[1], grads[0], TOL, "d q_proj through the cross map")


def test_mllama_generate_attentions_match_upstream(mllama):
    """generate(output_attentions=True): per step and layer (prefill, then decode steps reading the cache)."""
    upstream, patched = mllama
    inputs = mllama_inputs(*CASES["interleaved"], seed=5)
    kwargs = dict(max_new_tokens=3, do_sample=False, output_attentions=True, return_dict_in_generate=True)
    with torch.no_grad():
        want = upstream["eager"].generate(**inputs, **kwargs)
        got = patched["eager"].generate(**inputs, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    assert len(got.attentions) == len(want.attentions) == 3
    for step, (g_step, w_step) in enumerate(zip(got.attentions, want.attentions)):
        assert len(g_step) == len(w_step) == 4
        for layer, (g, w) in enumerate(zip(g_step, w_step)):
            assert_close(g, w, TOL, f"step {step} layer {layer}")


def test_mllama_weights_follow_the_attention_implementation():
    """The drop-in attention alone: eager-like implementations ("eager", "fastflamingo") return the eager
    probabilities, sdpa None; another implementation registered with transformers runs that call and its weights
    come back as it returns them."""
    from types import SimpleNamespace

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.mllama import modeling_mllama as hf

    from fastflamingo.models.mllama import MllamaTextCrossAttention

    config = SimpleNamespace(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, dropout=0.0,
                             rms_norm_eps=1e-5, _attn_implementation="eager")
    torch.manual_seed(0)
    upstream = hf.MllamaTextCrossAttention(config, layer_idx=0)
    ours = MllamaTextCrossAttention(copy.copy(config), layer_idx=0, tokens_per_tile=5, max_num_tiles=2)
    ours.load_state_dict(upstream.state_dict())
    x, states = torch.randn(2, 7, 48), torch.randn(2, 20, 48)
    mask = torch.zeros(2, 1, 7, 20)
    mask[0, :, :3, 10:] = torch.finfo(torch.float32).min
    want_out, want = upstream(x, states, attention_mask=mask)

    def marked_attention(module, query, key, value, attention_mask, **kwargs):
        out, probs = hf.eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
        return out, probs.sum(-1)  # weights of another shape: passed through as they are

    ALL_ATTENTION_FUNCTIONS.register("maps_test_attention", marked_attention)
    try:
        for implementation, expected in (("eager", want), ("fastflamingo", want), ("sdpa", None),
                                         ("maps_test_attention", want.sum(-1))):
            ours.config._attn_implementation = implementation
            out, weights = ours(x, states, attention_mask=mask, output_attentions=True)
            assert_close(out, want_out, TOL, implementation)
            if expected is None:
                assert weights is None
            else:
                assert_close(weights, expected, TOL, implementation)
            assert ours(x, states, attention_mask=mask)[1] is None  # not requested: the kernels, no weights
    finally:
        del ALL_ATTENTION_FUNCTIONS._global_mapping["maps_test_attention"]


def test_patched_model_under_the_fastflamingo_implementation(mllama):
    """attn_implementation="fastflamingo" (fastflamingo's attention function): the patched model returns what the
    unpatched one returns under it, which is what eager returns (that function runs eager for every layer while maps
    are recorded)."""
    import fastflamingo.hf as ffhf

    upstream, _ = mllama
    routed = copy.deepcopy(upstream["eager"])
    routed.set_attn_implementation(ffhf.register())
    model = copy.deepcopy(routed)
    ff.patch(model)
    inputs = mllama_inputs(*CASES["consecutive"], seed=10)
    _, eager = _attentions(upstream["eager"], inputs, output_attentions=True)
    _, want = _attentions(routed, inputs, output_attentions=True)
    _, got = _attentions(model, inputs, output_attentions=True)
    assert len(got) == len(want) == len(eager) == 4
    for i, (g, w, e) in enumerate(zip(got, want, eager)):
        assert_close(g, w, TOL, f"map {i}")
        assert_close(g, e, TOL, f"map {i} vs eager")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_idefics_output_attentions_match_upstream(attn):
    """IDEFICS records only its self-attention maps (upstream's OutputRecorder): the same maps, patched or not."""
    from test_idefics import model_inputs as idefics_inputs

    upstream = tiny_idefics(attn=attn)
    model = copy.deepcopy(upstream)
    ff.patch(model)
    inputs = idefics_inputs(seed=2)
    want_logits, want = _attentions(upstream, inputs, output_attentions=True)
    got_logits, got = _attentions(model, inputs, output_attentions=True)
    assert_close(got_logits, want_logits, TOL, "logits")
    assert len(got) == len(want) == (4 if attn == "eager" else 0)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, TOL, f"layer {i}")


# ----------------------------------------------------------------------------------------------------------------
# fastflamingo.attention_maps, every family
# ----------------------------------------------------------------------------------------------------------------


def _text_time_seen(media_locations, num_media, immediate):
    """(batch, text) bool: the token sees some media (OpenFlamingo's rule, restated from media_locations)."""
    text_time = media_locations.cumsum(-1)
    return (text_time >= 1) & (text_time <= num_media) if immediate else text_time >= 1


@pytest.fixture(scope="module")
def open_flamingo():
    try:
        upstream, media_token, _ = tiny_open_flamingo(num_layers=4, cross_attn_every_n_layers=2)
    except ModuleNotFoundError as exc:
        pytest.skip(str(exc))
    model = copy.deepcopy(upstream)
    ff.patch(model)
    return upstream, model, media_token


def _open_flamingo_inputs(media_token, seed=0, extra_image_token=True):
    """Two prompts of 3 images; the second has text before its first image and (``extra_image_token``) a fourth
    ``<image>`` token with no fourth image (upstream averages uniformly there, fastflamingo gives 0)."""
    g = torch.Generator().manual_seed(seed)
    vision_x = torch.randn(2, 3, 1, 3, 32, 32, generator=g)
    ids = torch.randint(0, 90, (2, 21), generator=g)
    ids[0, [0, 8, 15]] = media_token
    ids[1, [4, 9, 12, 17] if extra_image_token else [4, 9, 12]] = media_token
    return vision_x, ids, torch.ones_like(ids)


def _run_open_flamingo(model, inputs, generate=False):
    vision_x, ids, mask = inputs
    with torch.no_grad():
        if generate:
            return model.generate(vision_x=vision_x, lang_x=ids, attention_mask=mask, max_new_tokens=3)
        return model(vision_x, ids, attention_mask=mask).logits


@pytest.mark.parametrize("generate", [False, True])
def test_open_flamingo_maps_match_upstream(open_flamingo, generate):
    """Per cross-attention call (a forward; or generate's prefill and decode steps with use_cached_media), the maps
    equal upstream's probabilities; tokens that see no media have all-zero rows (upstream: zero in immediate mode
    before the first image, uniform after more <image> tokens than images). Outputs are unchanged."""
    upstream, model, media_token = open_flamingo
    inputs = _open_flamingo_inputs(media_token, extra_image_token=not generate)
    probs, handles = capture_einsum_probs(of_type(upstream, "MaskedCrossAttention"))
    try:
        want = _run_open_flamingo(upstream, inputs, generate)
    finally:
        remove(handles)
    unrecorded = _run_open_flamingo(model, inputs, generate)
    with attention_maps(model) as maps:
        got = _run_open_flamingo(model, inputs, generate)
    if generate:
        assert torch.equal(got, unrecorded)
        assert torch.equal(got, want)  # no token sees nothing where upstream would average: same tokens
    else:
        assert_close(got, unrecorded, TOL, "logits")
    names = maps.names()
    assert len(names) == 2 and all(n.endswith(".attn") for n in names)
    assert [m.call for m in maps.by_name(names[1])] == ([0, 1, 2] if generate else [0])
    assert all(m.key_shape == (3, 64) and m.kind == "cross" for m in maps)
    assert maps[0].grouped().shape == (2, 8, 21, 3, 64)

    ids = inputs[1]
    prompt_seen = _text_time_seen(ids == media_token, 3, immediate=True)

    def seen_rows(m):
        if m.probs.shape[2] == ids.shape[1]:
            return prompt_seen
        return prompt_seen[:, -1:].expand(-1, m.probs.shape[2])  # decode: new tokens see the prompt's last media

    assert_maps_match(maps, probs, seen_rows, "OpenFlamingo")
    if not generate:
        assert (probs[0][1, :, -4:] == 1 / (3 * 64)).all()  # upstream's uniform rows after the fourth <image>


def test_open_flamingo_beam_search_maps_and_perceiver(open_flamingo, monkeypatch):
    """Beam search (media K/V shared per sample: kv_group) keeps its tokens; every map row sums to 1 or is 0.
    perceiver=True also records the resampler's latent attention, equal to upstream's."""
    from fastflamingo.models.openflamingo import modules as of_modules

    upstream, model, media_token = open_flamingo
    vision_x, ids, mask = _open_flamingo_inputs(media_token, seed=1)
    kwargs = dict(vision_x=vision_x, lang_x=ids, attention_mask=mask, max_new_tokens=2, num_beams=2)
    groups, dense = [], of_modules.dense_attention
    monkeypatch.setattr(of_modules, "dense_attention", lambda *a, **kw: groups.append(kw["kv_group"]) or dense(*a, **kw))
    with torch.no_grad():
        want_tokens = model.generate(**kwargs)
        with attention_maps(model) as maps:
            tokens = model.generate(**kwargs)
    assert torch.equal(tokens, want_tokens)
    assert 2 in groups  # the beams read one shared K/V row per sample
    for m in maps:
        assert m.probs.shape[0] == 4  # 2 samples x 2 beams
        sums = m.probs.sum(-1)
        assert torch.all(((sums - 1).abs() < 1e-5) | (sums == 0))

    probs, handles = capture_einsum_probs(of_type(upstream, "PerceiverAttention"))
    try:
        with torch.no_grad():
            upstream(vision_x, ids, attention_mask=mask)
    finally:
        remove(handles)
    with attention_maps(model, perceiver=True, layers=["perceiver.layers.1.0"]) as maps, torch.no_grad():
        model(vision_x, ids, attention_mask=mask)
    assert [m.name for m in maps] == ["perceiver.layers.1.0"] and maps[0].kind == "perceiver"
    assert maps[0].probs.shape == (6, 8, 64, 16 + 64)  # samples x media, heads, latents, media tokens + latents
    upstream_layer1 = probs[1].transpose(1, 2).flatten(0, 1)  # upstream: (b, heads, T, latents, keys)
    assert_close(maps[0].probs, upstream_layer1, TOL, "perceiver layer 1")


@pytest.mark.parametrize("immediate", [False, True])
def test_flamingo_pytorch_maps_match_upstream(immediate):
    """flamingo-pytorch (images): the maps equal upstream's probabilities; in all-previous mode text before the
    first image gets all-zero rows where upstream averages uniformly over every media."""
    pytest.importorskip("einops_exts")
    upstream = tiny_flamingo_palm(immediate=immediate)
    model = copy.deepcopy(upstream)
    ff.patch(model)
    text = torch.randint(4, 50, (2, 17), generator=torch.Generator().manual_seed(6))
    text[0, [0, 9]] = 3
    text[1, [3, 11]] = 3
    images = torch.randn(2, 2, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    probs, handles = capture_einsum_probs(of_type(upstream, "MaskedCrossAttention"))
    try:
        with torch.no_grad():
            want_logits = upstream(text, images=images)
    finally:
        remove(handles)
    with torch.no_grad():
        unrecorded = model(text, images=images)
        with attention_maps(model) as maps:
            logits = model(text, images=images)
    assert_close(logits, unrecorded, TOL, "logits")
    if immediate:  # all-previous mode differs from upstream in the rows before the first image (README)
        assert_close(logits, want_logits, TOL, "logits vs upstream")
    seen = _text_time_seen(text == 3, 2, immediate)
    if immediate:
        assert_maps_match(maps, probs, lambda m: seen, "flamingo-pytorch")
    else:  # after the first layer the hidden states differ (upstream's uniform rows reach the output)
        assert_maps_match(maps[:1], probs[:1], lambda m: seen, "flamingo-pytorch")
        assert (probs[0][1, :, :3] == 1 / (2 * 6)).all()  # upstream's uniform rows before the first image


def test_idefics_maps_match_upstream_cross_and_perceiver():
    """IDEFICS (upstream eager): the cross-attention maps equal the probabilities upstream's cross attention
    computes (it never returns them), with all-zero rows where the token sees no image (upstream: a uniform row
    its gate then zeroes); perceiver=True adds the resampler's latent attention, whose cache is bypassed."""
    from test_idefics import model_inputs as idefics_inputs

    upstream = tiny_idefics(attn="eager")
    model = copy.deepcopy(upstream)
    ff.patch(model)
    inputs = idefics_inputs(seed=8)
    cross, handles = capture_weights([layer.cross_attn for layer in of_type(upstream, "IdeficsGatedCrossAttentionLayer")])
    latent, more = capture_einsum_probs(of_type(upstream, "IdeficsPerceiverAttention"))
    try:
        with torch.no_grad():
            want_logits = upstream(**inputs).logits
    finally:
        remove(handles + more)
    with torch.no_grad():
        model(**inputs)  # fills the resampler's cache, which the recording call must not reuse
        with attention_maps(model, perceiver=True) as maps:
            logits = model(**inputs).logits
    assert_close(logits, want_logits, TOL, "logits")
    cross_maps = [m for m in maps if m.kind == "cross"]
    latent_maps = [m for m in maps if m.kind == "perceiver"]
    assert [m.key_shape for m in cross_maps] == [(3, 8)] * 2
    seen = inputs["image_attention_mask"].any(-1)
    assert_maps_match(cross_maps, cross, lambda m: seen, "IDEFICS cross")
    assert_maps_match(latent_maps, latent, lambda m: torch.ones(m.probs.shape[0], m.probs.shape[2], dtype=bool),
                      "IDEFICS perceiver")


def test_mllama_maps_equal_output_attentions(mllama):
    """attention_maps on mllama gives the cross layers' entries of upstream's eager output_attentions, also for a
    model whose config says sdpa (where output_attentions returns none); key_shape is (images, tiles, tokens)."""
    upstream, patched = mllama
    inputs = mllama_inputs(*CASES["consecutive"], seed=9)
    _, want = _attentions(upstream["eager"], inputs, output_attentions=True)
    with attention_maps(patched["sdpa"]) as maps, torch.no_grad():
        patched["sdpa"](**inputs)
    assert [m.name for m in maps] == ["model.language_model.layers.1.cross_attn",
                                      "model.language_model.layers.3.cross_attn"]
    for m, w in zip(maps, (want[1], want[3])):
        assert m.key_shape == (3, 4, 5)
        assert_close(m.probs, w, TOL, m.name)


# ----------------------------------------------------------------------------------------------------------------
# The API: only the recorded calls pay, selection, gradients, errors
# ----------------------------------------------------------------------------------------------------------------


class _Forbidden:
    calls = 0

    def __call__(self, *args, **kwargs):
        type(self).calls += 1
        raise AssertionError("an attention map was computed outside an attention_maps block")


def test_no_map_is_computed_outside_a_block(monkeypatch, mllama, open_flamingo):
    """Without a block (and after one ends) every family runs its kernels: the dense attention is never called
    and no module keeps a recorder."""
    from fastflamingo.models.idefics import attention as idefics_attention
    from fastflamingo.models.mllama import layers as mllama_layers
    from fastflamingo.models.openflamingo import modules as of_modules
    from test_idefics import model_inputs as idefics_inputs

    _, patched = mllama
    _, flamingo, media_token = open_flamingo
    idefics = tiny_idefics()
    ff.patch(idefics)
    with attention_maps(flamingo, perceiver=True), torch.no_grad():  # a block that ends before the calls below
        flamingo(*_open_flamingo_inputs(media_token)[:2])
    for module in (of_modules, idefics_attention, mllama_layers, MAPS_MODULE):
        monkeypatch.setattr(module, "dense_attention", _Forbidden())
    models = [patched["eager"], patched["sdpa"], flamingo, idefics]
    assert not any(RECORDER_ATTR in m.__dict__ for model in models for m in model.modules())
    with torch.no_grad():
        patched["eager"](**mllama_inputs(*CASES["interleaved"]))
        patched["sdpa"](**mllama_inputs(*CASES["interleaved"]), output_attentions=True)  # sdpa: no weights
        vision_x, ids, mask = _open_flamingo_inputs(media_token)
        flamingo(vision_x, ids, attention_mask=mask)
        flamingo.generate(vision_x=vision_x, lang_x=ids, attention_mask=mask, max_new_tokens=2)
        idefics(**idefics_inputs(seed=1))
    assert _Forbidden.calls == 0


def test_layers_selection_device_and_gradients(open_flamingo):
    """layers= records only those layers (by name or index; the others keep their kernels), device= moves the maps,
    detach=False keeps them in the graph the output was computed from."""
    _, model, media_token = open_flamingo
    vision_x, ids, mask = _open_flamingo_inputs(media_token)
    with attention_maps(model) as all_maps, torch.no_grad():
        model(vision_x, ids, attention_mask=mask)
    last = all_maps.names()[-1]
    for layers in ([last], -1, last):
        with attention_maps(model, layers=layers, device="meta") as maps, torch.no_grad():
            model(vision_x, ids, attention_mask=mask)
        assert maps.names() == [last] and len(maps) == 1 and maps[0].probs.device.type == "meta"
    with attention_maps(model, layers=[0], detach=False) as maps:
        model(vision_x, ids, attention_mask=mask)
    assert maps[0].probs.requires_grad
    (q_weight,) = [p for n, p in model.named_parameters() if n.endswith(maps[0].name + ".to_q.weight")]
    grad, = torch.autograd.grad(maps[0].probs[..., :64].sum(), q_weight)
    assert grad.abs().sum() > 0
    assert_close(maps[0].probs.detach(), all_maps[0].probs, TOL, "same map")
    maps.clear()
    assert len(maps) == 0 and isinstance(maps, AttentionMaps)


def test_drop_ins_used_directly_and_bad_arguments():
    """A drop-in block alone is recordable; unpatched models, unknown layers and nested blocks are refused."""
    block = ff.GatedCrossAttentionBlock(dim=32, dim_visual=24, dim_head=8, heads=4)
    x, media = torch.randn(2, 9, 32), torch.randn(2, 2, 5, 24)
    locations = torch.zeros(2, 9, dtype=torch.bool)
    locations[:, [1, 6]] = True
    want = block(x, media, locations)
    with attention_maps(block) as maps:
        got = block(x, media, locations)
    assert_close(got, want, TOL, "block output")
    assert [m.name for m in maps] == ["attn"] and maps[0].probs.shape == (2, 4, 9, 10)
    assert (maps[0].probs[:, :, 0] == 0).all()  # the token before the first image sees nothing

    with pytest.raises(TypeError, match="found no fastflamingo attention"):
        with attention_maps(torch.nn.Linear(3, 3)):
            pass
    with pytest.raises(TypeError, match="must be an nn.Module"):
        with attention_maps("model"):
            pass
    with pytest.raises(ValueError, match="not a recordable layer"):
        with attention_maps(block, layers=["ff"]):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with attention_maps(block, layers=[3]):
            pass
    with pytest.raises(TypeError, match="names"):
        with attention_maps(block, layers=[1.5]):
            pass
    with attention_maps(block):
        with pytest.raises(RuntimeError, match="recorded by another attention_maps block"):
            with attention_maps(block):
                pass
    assert RECORDER_ATTR not in block.attn.__dict__
    with pytest.raises(KeyError, match="not a recorded layer"):
        maps.by_name("ff")


def test_recorded_calls_under_gradient_checkpointing(mllama):
    """Layers that checkpoint themselves (gradient_checkpointing_enable) run a recorded call unchecked: one map per
    layer and call, and the backward pass works (IDEFICS maps; mllama output_attentions, equal to upstream's)."""
    from test_idefics import model_inputs as idefics_inputs

    idefics = tiny_idefics()
    ff.patch(idefics)
    idefics.gradient_checkpointing_enable()
    idefics.train()
    with attention_maps(idefics) as maps:
        idefics(**idefics_inputs(seed=11)).logits.sum().backward()
    assert [m.call for m in maps] == [0, 0] and all(m.probs.grad_fn is None for m in maps)

    upstream, _ = mllama
    models = [copy.deepcopy(upstream["eager"]) for _ in range(2)]
    ff.patch(models[1])
    inputs = mllama_inputs(*CASES["interleaved"], seed=12)
    grads, maps = [], []
    for model in models:
        model.gradient_checkpointing_enable()
        model.train()
        out = model(**inputs, output_attentions=True)
        out.logits.sum().backward()
        maps.append(out.attentions)
        grads.append(model.model.language_model.layers[1].cross_attn.k_proj.weight.grad)
    assert len(maps[1]) == len(maps[0]) == 4
    for i, (g, w) in enumerate(zip(maps[1], maps[0])):
        assert_close(g, w, TOL, f"layer {i}")
    assert_close(grads[1], grads[0], TOL, "d k_proj")
