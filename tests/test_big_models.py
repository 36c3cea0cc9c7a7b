"""Big-model loading: ``patch`` on models built on the meta device and on models accelerate dispatched with a
``device_map`` (CPU and disk offload), and transformers' ``init_weights`` on patched models.

IDEFICS-80B and Llama-3.2-90B are loaded this way: the model is built on meta (``init_empty_weights``, FSDP's
deferred init), then materialised (``to_empty`` + load) or dispatched layer by layer with accelerate hooks that
move (or read from disk) each layer's weights just before it runs.
"""
import pytest
import torch

import fastflamingo
from fastflamingo.models._patching import ORIGINAL_ATTR
from fastflamingo.testing import tiny_open_flamingo

transformers = pytest.importorskip("transformers")
from fastflamingo.testing import idefics_config  # noqa: E402
from test_idefics import model_inputs  # noqa: E402
from transformers import IdeficsForVisionText2Text  # noqa: E402

REPLACED = ("IdeficsGatedCrossAttentionLayer", "IdeficsPerceiverResampler", "GatedCrossAttentionBlock",
            "PerceiverResampler")


def _open_flamingo(**kw):
    try:
        return tiny_open_flamingo(num_layers=4, cross_attn_every_n_layers=2, **kw)
    except ModuleNotFoundError as exc:
        pytest.skip(str(exc))


def _flamingo_inputs(media_token, batch=2, num_text=16):
    g = torch.Generator().manual_seed(4)
    vision_x = torch.randn(batch, 2, 1, 3, 32, 32, generator=g)
    ids = torch.randint(0, 90, (batch, num_text), generator=g)
    ids[:, [1, 9]] = media_token
    ids[1, 1] = 3  # the second sample sees only its second image
    return dict(vision_x=vision_x, lang_x=ids, attention_mask=torch.ones_like(ids))


def _idefics_on_meta(alpha_initializer="normal"):
    # (upstream draws "normal" alphas with torch.normal(size=...), which ignores the device context: CPU tensors)
    with torch.device("meta"):
        return IdeficsForVisionText2Text(idefics_config(alpha_type="vector", alpha_initializer=alpha_initializer))


# --------------------------------------------------------------------------------------------------------------
# meta device
# --------------------------------------------------------------------------------------------------------------


def test_patch_meta_idefics_then_to_empty_and_load():
    reference = IdeficsForVisionText2Text(idefics_config()).eval()
    model = _idefics_on_meta("zeros")
    report = fastflamingo.patch(model)  # used to raise "drop-in ... has tensors the upstream module lacks"
    assert report.counts() == {"IdeficsGatedCrossAttentionLayer": 2, "IdeficsPerceiverResampler": 1}
    dropins = [m for m in model.modules() if getattr(m, ORIGINAL_ATTR, None) is not None]
    assert len(dropins) == 3 and all(t.is_meta for m in dropins for t in m.state_dict().values())
    model.to_empty(device="cpu")
    model.init_weights()  # non-persistent buffers (position ids, rotary frequencies) are computed, not loaded
    model.load_state_dict(reference.state_dict())
    model.eval()
    inputs = model_inputs()
    with torch.no_grad():
        expected, got = reference(**inputs).logits, model(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    fastflamingo.unpatch(model)  # the originals take the materialised tensors back
    assert not any(t.is_meta for t in model.state_dict().values())
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=0)


def test_patch_meta_open_flamingo_then_load_assign():
    accelerate = pytest.importorskip("accelerate")
    reference, media_token, _ = _open_flamingo()
    with accelerate.init_empty_weights():  # parameters on meta, buffers real
        model, _, _ = _open_flamingo()
    assert model.perceiver.latents.is_meta
    report = fastflamingo.patch(model)
    assert report.counts() == {"PerceiverResampler": 1, "GatedCrossAttentionBlock": 2}
    model.load_state_dict(reference.state_dict(), assign=True)  # the other materialisation: adopt loaded tensors
    for name, t in model.state_dict().items():
        assert not t.is_meta, name
    inputs = _flamingo_inputs(media_token)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_init_weights_reaches_the_dropins_as_the_originals():
    """transformers' ``_init_weights`` dispatches on upstream classes (alphas, resampler latents): after patching
    it must initialise the drop-ins exactly as it initialises the originals (same values for the same seed)."""

    def initialised(patch):
        model = _idefics_on_meta()  # built on meta: nothing is initialised yet
        if patch:
            fastflamingo.patch(model)
        model.to_empty(device="cpu")
        torch.manual_seed(0)
        model.init_weights()
        return dict(model.named_parameters())

    upstream, patched = initialised(False), initialised(True)
    assert upstream.keys() == patched.keys()
    for name, p in upstream.items():
        assert torch.equal(patched[name], p), name
    # and the values are really initialised (normal alphas, latents), not left as to_empty's garbage
    alpha = patched["model.gated_cross_attn_layers.0.alpha_cross_attn"]
    assert torch.isfinite(alpha).all() and 0.3 < alpha.std() < 3


def test_init_weights_is_a_noop_on_an_initialised_patched_model():
    model = IdeficsForVisionText2Text(idefics_config())
    fastflamingo.patch(model)
    before = {n: p.clone() for n, p in model.named_parameters()}
    model.init_weights()  # every module is flagged initialised, upstream's and the drop-ins alike
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    fastflamingo.unpatch(model)
    assert "_init_weights" not in model.__dict__


# --------------------------------------------------------------------------------------------------------------
# accelerate device_map dispatch (CPU and disk offload)
# --------------------------------------------------------------------------------------------------------------


def _hooked(model):
    return {name: m._hf_hook for name, m in model.named_modules() if getattr(m, "_hf_hook", None) is not None}


def _assert_hooks_carried(model, before):
    after = _hooked(model)
    assert after.keys() == before.keys()
    assert all(after[name] is hook for name, hook in before.items())
    dropins = [m for m in model.modules() if getattr(m, ORIGINAL_ATTR, None) is not None]
    assert dropins and all(getattr(m, "_hf_hook", None) is not None for m in dropins)


def test_patch_idefics_dispatched_with_cpu_and_disk_offload(tmp_path):
    pytest.importorskip("accelerate")
    reference = IdeficsForVisionText2Text(idefics_config()).eval()
    reference.save_pretrained(tmp_path / "model")
    device_map = {
        "model.embed_tokens": "cpu", "model.vision_model": "cpu", "model.perceiver_resampler": "disk",
        "model.layers": "cpu", "model.gated_cross_attn_layers.0": "disk", "model.gated_cross_attn_layers.1": "cpu",
        "model.norm": "cpu", "lm_head": "cpu",
    }
    model = IdeficsForVisionText2Text.from_pretrained(
        tmp_path / "model", device_map=device_map, offload_folder=tmp_path / "offload"
    ).eval()
    assert model.model.gated_cross_attn_layers[0].alpha_cross_attn.is_meta  # really offloaded to disk
    hooks = _hooked(model)
    params = dict(model.named_parameters())
    inputs = model_inputs()
    with torch.no_grad():
        expected = reference(**inputs).logits
        tokens = reference.generate(**inputs, max_new_tokens=4, do_sample=False)
    fastflamingo.patch(model)
    _assert_hooks_carried(model, hooks)
    assert all(p is params[name] for name, p in model.named_parameters())  # the very same (offloaded) Parameters
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), tokens)
    assert model.model.gated_cross_attn_layers[0].alpha_cross_attn.is_meta  # offloaded again after the call


def test_patch_open_flamingo_dispatched_with_disk_offload(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    model, media_token, _ = _open_flamingo()
    inputs = _flamingo_inputs(media_token)
    with torch.no_grad():
        expected = model(**inputs).logits
    accelerate.disk_offload(model, tmp_path / "offload", execution_device="cpu")
    assert model.perceiver.latents.is_meta
    hooks = _hooked(model)
    fastflamingo.patch(model)
    _assert_hooks_carried(model, hooks)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", ["dispatch-patch", "patch-dispatch"])
def test_unpatch_of_a_dispatched_idefics_runs_upstream_again(tmp_path, order):
    """``unpatch`` after accelerate's ``dispatch_model`` with disk offload: the restored upstream modules load their
    (offloaded) weights before they run, whichever came first. Patching before dispatching leaves the hooks on the
    drop-ins only: ``restore`` hands them back to the upstream modules at the same paths."""
    accelerate = pytest.importorskip("accelerate")
    model = IdeficsForVisionText2Text(idefics_config()).eval()
    inputs = model_inputs()
    with torch.no_grad():
        expected = model(**inputs).logits
    device_map = {"model.embed_tokens": "cpu", "model.vision_model": "cpu", "model.perceiver_resampler": "disk",
                  "model.layers": "cpu", "model.gated_cross_attn_layers": "disk", "model.norm": "cpu",
                  "lm_head": "cpu"}

    def dispatch():
        accelerate.dispatch_model(model, device_map, offload_dir=tmp_path / "offload", main_device="cpu")

    if order == "dispatch-patch":
        dispatch()
        fastflamingo.patch(model)
    else:
        fastflamingo.patch(model)
        dispatch()
    assert model.model.gated_cross_attn_layers[0].alpha_cross_attn.is_meta  # really offloaded to disk
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
    assert fastflamingo.unpatch(model) > 0
    assert not any(getattr(m, ORIGINAL_ATTR, None) is not None for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
