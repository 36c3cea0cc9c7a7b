"""Load-time drop-ins (``fastflamingo.hf.register_dropins`` / ``dropins()``): transformers builds fastflamingo's
layers itself while it builds a model, through its class-replacement mapping.

The oracle is ``fastflamingo.patch`` after a plain ``from_pretrained`` of the same checkpoint: the same module
classes at the same paths, state_dict, options and outputs (exactly: the same classes run the same arithmetic on
the same weights), and transformers' own model for outputs. Also: no upstream layer is ever constructed (counted),
meta-device construction, ``device_map`` with CPU and disk offload, save / reload, ``generate``, weights missing
from a checkpoint initialised by transformers' rules, ``unpatch`` (which builds the upstream layers back) and the
class-level records transformers rewrites (models built later without drop-ins still record their layers).
"""
import random

import pytest
import torch

import fastflamingo

transformers = pytest.importorskip("transformers")
from fastflamingo import models, testing  # noqa: E402
from fastflamingo.hf import load  # noqa: E402
from helpers import rel_err  # noqa: E402
from mllama_cases import CASES, model_inputs as mllama_inputs, random_rows  # noqa: E402
from test_idefics import model_inputs as idefics_inputs  # noqa: E402
from transformers import IdeficsForVisionText2Text, MllamaForCausalLM, MllamaForConditionalGeneration  # noqa: E402

UPSTREAM_MODULES = tuple(spec.module for spec in load.SPECS.values())


@pytest.fixture(autouse=True)
def _nothing_registered_after():
    yield
    load.unregister_dropins()


def _mllama(**kw):
    return testing.tiny_mllama("sdpa", **kw), mllama_inputs(*CASES["interleaved"])


def _idefics(**kw):
    return testing.tiny_idefics(hidden_act="silu", **kw), idefics_inputs()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each family's tiny model saved once (mllama with 3 tiles of 10 tokens: not Llama 3.2's 4 x 1601)."""
    root = tmp_path_factory.mktemp("load_time")
    out = {}
    for family, (model, inputs) in {"mllama": _mllama(image_size=42, max_num_tiles=3),
                                    "idefics": _idefics()}.items():
        model.save_pretrained(root / family)
        out[family] = (type(model), root / family, _inputs(family, inputs))
    return out


def _inputs(family, inputs):
    if family == "mllama":  # the saved model has 3 tiles of 42 x 42 pixels
        rows, tiles = CASES["interleaved"]
        return mllama_inputs(rows, [[min(t, 3) for t in sample] for sample in tiles], max_tiles=3, image_size=42)
    return inputs


@pytest.fixture(scope="module")
def loaded(saved):
    """Per family, in this order: transformers' model, the model loaded with drop-ins, a plain load after that, the
    same patched (read-only for the tests that share them: each load with drop-ins costs transformers' mapping
    several seconds, see docs/transformers_loading.md)."""
    out = {}
    for family, (cls, path, _) in saved.items():
        upstream = cls.from_pretrained(path).eval()
        with load.dropins():
            model = cls.from_pretrained(path).eval()
        after = cls.from_pretrained(path).eval()
        patched = cls.from_pretrained(path).eval()
        fastflamingo.patch(patched)
        out[family] = dict(upstream=upstream, dropins=model, after=after, patched=patched)
    return out


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def upstream_layers(model):
    return {n: m for n, m in model.named_modules() if type(m).__name__ in load.SPECS
            and type(m).__module__ in UPSTREAM_MODULES}


def dropin_layers(model):
    return {n: m for n, m in model.named_modules() if load.is_load_time_dropin(m)}


def structure(model):
    return [(name, type(module)) for name, module in model.named_modules()]


OPTIONS = ("empty_rows", "tokens_per_tile", "max_num_tiles", "layer_idx", "training")


def options(model):
    return {name: {a: getattr(m, a) for a in OPTIONS if hasattr(m, a)} for name, m in model.named_modules()
            if getattr(type(m), "_fastflamingo_dropin", False)}


@pytest.fixture
def constructions(monkeypatch):
    """How many times each upstream class fastflamingo replaces is constructed."""
    counts = {name: 0 for name in load.SPECS}
    for name in load.SPECS:
        cls = load.upstream_class(name)
        init = cls.__init__

        def counted(self, *args, _name=name, _init=init, **kwargs):
            counts[_name] += 1
            _init(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", counted)
    return counts


# --------------------------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------------------------


def test_every_class_patch_replaces_in_transformers_families_is_built_at_load_time():
    replaced = {name for names in load.replaced_by_transformers_families().values() for name in names}
    assert set(load.SPECS) == replaced
    assert {spec.family for spec in load.SPECS.values()} == set(load.TRANSFORMERS_FAMILIES)
    for name, spec in load.SPECS.items():  # the drop-in the registry's rules build for that class
        assert spec.family in models.names() and name in models.family(spec.family).replaces


def test_register_unregister_and_the_context_manager():
    from transformers.monkey_patching import get_patch_mapping

    assert load.registered_options() is None
    assert set(load.register_dropins(empty_rows="zero")) == set(load.SPECS)
    assert load.registered_options() == load.Options("zero")
    assert set(get_patch_mapping()) >= set(load.SPECS)
    with load.dropins() as inner:  # other options for the block, the previous ones back after it
        assert inner == load.Options("hf")
    assert load.registered_options() == load.Options("zero")
    assert set(load.unregister_dropins()) == set(load.SPECS)
    assert not set(get_patch_mapping()) & set(load.SPECS) and load.registered_options() is None
    assert load.unregister_dropins() == ()
    with load.dropins():
        pass
    assert load.registered_options() is None and not set(get_patch_mapping()) & set(load.SPECS)


def test_bad_options_and_a_foreign_mapping_are_refused():
    from transformers.monkey_patching import register_patch_mapping, unregister_patch_mapping

    with pytest.raises(ValueError, match="empty_rows"):
        load.register_dropins(empty_rows="none")
    assert load.registered_options() is None

    class Other(torch.nn.Module):
        pass

    register_patch_mapping({"IdeficsPerceiverResampler": Other})
    try:
        with pytest.raises(ValueError, match="IdeficsPerceiverResampler with .*Other"):
            load.register_dropins()
        assert load.registered_options() is None
    finally:
        unregister_patch_mapping(["IdeficsPerceiverResampler"])


# --------------------------------------------------------------------------------------------------------------
# equal to patch() after loading
# --------------------------------------------------------------------------------------------------------------


def assert_same_as_patched(model, patched, upstream, inputs):
    """Same module classes at the same paths, options, state_dict and outputs as ``patch`` after loading; the
    drop-ins in place of every upstream layer."""
    assert dropin_layers(model) and not upstream_layers(model)
    assert structure(model) == structure(patched)
    assert options(model) == options(patched)
    assert list(model.state_dict()) == list(upstream.state_dict()) == list(patched.state_dict())
    assert all(torch.equal(t, patched.state_dict()[k]) for k, t in model.state_dict().items())
    out = logits(model, inputs)
    assert torch.equal(out, logits(patched, inputs))
    return out


@pytest.mark.parametrize("family", ["mllama", "idefics"])
def test_equals_patch_after_loading(saved, loaded, family):
    inputs = saved[family][2]
    models_ = loaded[family]
    out = assert_same_as_patched(models_["dropins"], models_["patched"], models_["upstream"], inputs)
    assert rel_err(out, logits(models_["upstream"], inputs)) <= 1e-5
    # training: the same gradients (then back to eval mode for the other tests)
    grads = {}
    for name in ("dropins", "patched"):
        model = models_[name].train()
        model.zero_grad()
        model(**inputs).logits.square().mean().backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        model.eval()
    assert grads["dropins"].keys() == grads["patched"].keys()
    assert all(torch.equal(g, grads["patched"][n]) for n, g in grads["dropins"].items())


def test_empty_rows_zero_and_no_upstream_layer_built(saved, constructions):
    cls, path, inputs = saved["mllama"]
    upstream = cls.from_pretrained(path).eval()
    assert sum(constructions.values()) > 0  # the counter sees transformers build its layers
    patched = cls.from_pretrained(path).eval()
    fastflamingo.patch(patched, empty_rows="zero")
    before = dict(constructions)
    with load.dropins(empty_rows="zero"):
        model = cls.from_pretrained(path).eval()
    assert constructions == before, "an upstream layer was constructed while loading with drop-ins"
    assert {m.empty_rows for m in dropin_layers(model).values()} == {"zero"}
    assert_same_as_patched(model, patched, upstream, inputs)


def test_mllama_tile_size_comes_from_the_vision_model(loaded):
    attentions = [m for m in loaded["mllama"]["dropins"].modules()
                  if isinstance(m, models.mllama.MllamaTextCrossAttention)]
    assert attentions and {(m.tokens_per_tile, m.max_num_tiles) for m in attentions} == {(10, 3)}
    with load.dropins():  # no vision encoder: Llama 3.2's sizes, as patch()
        text_only = MllamaForCausalLM(loaded["mllama"]["dropins"].config.text_config)
    attentions = [m for m in text_only.modules() if isinstance(m, models.mllama.MllamaTextCrossAttention)]
    assert attentions and {(m.tokens_per_tile, m.max_num_tiles) for m in attentions} == {(1601, 4)}


def test_random_layouts_match_transformers(loaded):
    """Fresh random prompts (images anywhere, 1-3 tiles, padding either side) through the load-time model."""
    upstream, model = loaded["mllama"]["upstream"], loaded["mllama"]["dropins"]
    rng = random.Random(7)
    for trial in range(3):
        rows, tiles = random_rows(rng, batch=rng.randint(1, 3), length=rng.randint(5, 17), max_images=3, max_tiles=3)
        inputs = mllama_inputs(rows, tiles, max_tiles=3, image_size=42, seed=trial)
        assert rel_err(logits(model, inputs), logits(upstream, inputs)) <= 1e-5, (rows, tiles)


@pytest.mark.parametrize("family", ["mllama", "idefics"])
def test_output_recording_of_models_built_before_during_and_after(saved, loaded, family):
    """transformers rewrites the model classes' ``_can_record_outputs`` to name the replacement, for good: the
    drop-ins' hidden states are recorded, and so are the layers of models built after (plain or patched)."""
    inputs = saved[family][2]
    models_ = loaded[family]
    assert upstream_layers(models_["after"])
    with torch.no_grad():
        states = {name: m(**inputs, output_hidden_states=True).hidden_states for name, m in models_.items()}
    config = models_["upstream"].config
    assert len(states["upstream"]) == getattr(config, "text_config", config).num_hidden_layers + 1
    for name, got in states.items():
        assert len(got) == len(states["upstream"]), name
        assert all(rel_err(g, w) <= 1e-5 for g, w in zip(got, states["upstream"])), name


# --------------------------------------------------------------------------------------------------------------
# construction routes: from_config, meta device, device_map, missing weights
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["mllama", "idefics"])
def test_from_config_initialises_as_upstream(family):
    """``from_config`` runs transformers' ``_init_weights`` on the drop-ins as on upstream's layers: the same
    parameters for the same seed (mllama's gates zero, IDEFICS's "normal" alphas and resampler latents drawn)."""
    model, _ = _mllama() if family == "mllama" else _idefics(alpha_initializer="normal")

    def built(with_dropins):  # what AutoModel*.from_config calls
        torch.manual_seed(3)
        if not with_dropins:
            return type(model)._from_config(model.config)
        with load.dropins():
            return type(model)._from_config(model.config)

    upstream, ours = built(False), built(True)
    assert dropin_layers(ours) and list(ours.state_dict()) == list(upstream.state_dict())
    for name, tensor in upstream.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name


@pytest.mark.parametrize("family", ["mllama", "idefics"])
def test_weights_missing_from_the_checkpoint_get_upstreams_initialisation(saved, family, tmp_path):
    """A checkpoint without the gates (a language model's, say): transformers initialises them with its rules
    (mllama: zero gates; IDEFICS here: alpha_initializer "normal"), on the drop-ins as on upstream's layers."""
    from safetensors.torch import load_file, save_file

    cls, path, _ = saved[family]
    gates = ("cross_attn_attn_gate", "cross_attn_mlp_gate", "alpha_cross_attn", "alpha_dense")
    (tmp_path / "partial").mkdir()
    for item in path.iterdir():
        target = tmp_path / "partial" / item.name
        if item.suffix == ".safetensors":
            tensors = {k: v for k, v in load_file(item).items() if not k.endswith(gates)}
            save_file(tensors, target, metadata={"format": "pt"})
        else:
            target.write_bytes(item.read_bytes())

    def loaded(with_dropins):
        torch.manual_seed(5)
        if not with_dropins:
            return cls.from_pretrained(tmp_path / "partial")
        with load.dropins():
            return cls.from_pretrained(tmp_path / "partial")

    upstream, ours = loaded(False), loaded(True)
    missing = {n: p for n, p in upstream.named_parameters() if n.endswith(gates)}
    assert missing and dropin_layers(ours)
    for name, param in missing.items():
        got = ours.get_parameter(name)
        assert torch.isfinite(got).all() and torch.equal(got, param), name


def test_meta_device_then_materialise(saved):
    cls, path, inputs = saved["idefics"]
    reference = cls.from_pretrained(path).eval()
    with torch.device("meta"), load.dropins():
        model = cls._from_config(reference.config)
    # (IDEFICS's "normal" alphas come from torch.normal(size=...), which ignores the device context, upstream's alike)
    assert dropin_layers(model) and model.model.gated_cross_attn_layers[0].cross_attn.q_proj.weight.is_meta
    model.to_empty(device="cpu")
    model.init_weights()  # non-persistent buffers (rotary frequencies) are computed, not loaded
    model.load_state_dict(reference.state_dict())
    assert rel_err(logits(model.eval(), inputs), logits(reference, inputs)) <= 1e-5


def test_device_map_cpu_and_disk_offload(saved, tmp_path):
    pytest.importorskip("accelerate")
    cls, path, inputs = saved["idefics"]
    reference = cls.from_pretrained(path).eval()
    expected = logits(reference, inputs)
    with torch.no_grad():
        tokens = reference.generate(**inputs, max_new_tokens=3, do_sample=False)
    device_map = {
        "model.embed_tokens": "cpu", "model.vision_model": "cpu", "model.perceiver_resampler": "disk",
        "model.layers": "cpu", "model.gated_cross_attn_layers.0": "disk", "model.gated_cross_attn_layers.1": "cpu",
        "model.norm": "cpu", "lm_head": "cpu",
    }
    for dm in ("cpu", device_map):
        with load.dropins():
            model = cls.from_pretrained(path, device_map=dm, offload_folder=tmp_path / "offload").eval()
        assert set(dropin_layers(model)) == {"model.perceiver_resampler", "model.gated_cross_attn_layers.0",
                                             "model.gated_cross_attn_layers.1"}
        offloaded = model.model.gated_cross_attn_layers[0].alpha_cross_attn.is_meta
        assert offloaded == (dm != "cpu")  # really on disk with the offload map
        assert rel_err(logits(model, inputs), expected) <= 1e-5
        with torch.no_grad():
            assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), tokens)


# --------------------------------------------------------------------------------------------------------------
# after loading: save / reload, generate, unpatch, patch, records
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["mllama", "idefics"])
def test_save_reload_generate_unpatch(saved, loaded, family, tmp_path, constructions):
    cls, path, inputs = saved[family]
    upstream = loaded[family]["upstream"]
    expected = logits(upstream, inputs)
    with torch.no_grad():
        want = upstream.generate(**inputs, max_new_tokens=3, do_sample=False)
    with load.dropins():
        model = cls.from_pretrained(path).eval()
    assert not any(constructions.values()), "an upstream layer was constructed while loading with drop-ins"
    dropins = dropin_layers(model)
    with torch.no_grad():
        assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), want)

    model.save_pretrained(tmp_path / "saved")  # upstream's checkpoint: loads with or without drop-ins
    again = cls.from_pretrained(tmp_path / "saved").eval()
    assert not dropin_layers(again) and torch.equal(logits(again, inputs), expected)
    with load.dropins():
        again = cls.from_pretrained(tmp_path / "saved").eval()
    assert dropin_layers(again).keys() == dropins.keys() and torch.equal(logits(again, inputs), logits(model, inputs))

    # patch() on a model built with drop-ins has nothing left to do (as on a patched model)
    assert not fastflamingo.patch(model).replaced
    # unpatch builds transformers' layers back around the very same Parameters: what loading without drop-ins gives
    params = dict(model.named_parameters())
    assert fastflamingo.unpatch(model) == len(dropins)
    assert not dropin_layers(model) and structure(model) == structure(upstream)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert torch.equal(logits(model, inputs), expected)
    with torch.no_grad():
        assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), want)
    # and patch() works on it as on any loaded model
    fastflamingo.patch(model)
    assert rel_err(logits(model, inputs), expected) <= 1e-5
