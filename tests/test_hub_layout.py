"""fastflamingo's layers as a Hugging Face kernel repository: ``python -m fastflamingo.hf.hub build OUTDIR`` writes a
universal build that ``kernels`` loads from the folder (``LocalLayerRepository``, ``get_local_kernel``; no network).

- The stateless layers replace the forwards of transformers' own mllama and IDEFICS classes (named by
  ``hub.mark_layers``: they carry no ``use_kernel_forward_from_hub``) through ``kernels.kernelize``, in inference and
  training modes, and through ``from_pretrained``, which kernelizes while loading: outputs and gradients within
  1e-5 of transformers', and the build's ops really run (counted in the build's own copy of fastflamingo).
- The stateful layers (fastflamingo's IDEFICS drop-ins with their media caches) come in through a transformers
  ``KernelConfig``: transformers builds their layouts in place of the upstream classes, kernelize gives them the
  kernel's forward, generation reuses the cached media K/V.
"""
import importlib
import importlib.metadata
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
try:  # by distribution: from the checkout root a bare `import kernels` must find Hugging Face's, never a folder
    importlib.metadata.distribution("kernels")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("Hugging Face's `kernels` is not installed", allow_module_level=True)
import kernels  # noqa: E402
from kernels import Mode, kernelize, use_kernel_mapping  # noqa: E402

from fastflamingo import testing  # noqa: E402
from fastflamingo.hf import hub, hub_layers  # noqa: E402
from helpers import grads_match, rel_err  # noqa: E402
from mllama_cases import CASES, model_inputs as mllama_inputs  # noqa: E402
from test_idefics import model_inputs as idefics_inputs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HUB_ID = "fastflamingo/fastflamingo-layers"  # what the repository would be published as


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """The repository, written by the build command."""
    out = tmp_path_factory.mktemp("hub") / "fastflamingo-layers"
    done = subprocess.run([sys.executable, "-m", "fastflamingo.hf.hub", "build", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "hf upload --repo-type kernel" in done.stdout
    return out


@pytest.fixture(scope="module")
def layers(repo):
    return kernels.get_local_kernel(repo).layers


@pytest.fixture
def calls(layers, monkeypatch):
    """How many times the build's ops run (its own copy of fastflamingo's functional ops)."""
    counts = Counter()

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    for name in ("gated_linear", "media_xattn", "perceiver_attn"):
        monkeypatch.setattr(layers.FF, name, counted(name, getattr(layers.FF, name)))
    monkeypatch.setattr(layers, "mllama_xattn", counted("mllama_xattn", layers.mllama_xattn))
    return counts


@pytest.fixture
def marked():
    yield hub.mark_layers()
    hub.unmark_layers()


FAMILIES = {
    "mllama": (lambda: testing.tiny_mllama("sdpa"), lambda: mllama_inputs(*CASES["interleaved"]),
               {"mllama_xattn", "gated_linear"}),
    "idefics": (lambda: testing.tiny_idefics(hidden_act="silu"), idefics_inputs,
                {"media_xattn", "gated_linear", "perceiver_attn"}),
}


def kernelized(model):
    """{module path: class name} of the modules whose forward a kernel layer replaced."""
    return {name: type(m).__name__ for name, m in model.named_modules() if "_kernel_repo" in m.__dict__}


def expected_kernelized(model):
    classes = {cls: name for name, (_, cls, _) in hub_layers.STATELESS.items()}
    return {name: type(m).__name__ for name, m in model.named_modules()
            if type(m).__name__ in classes and (type(m).__name__ != "IdeficsAttention" or m.is_cross_attention)}


# --------------------------------------------------------------------------------------------------------------
# the build
# --------------------------------------------------------------------------------------------------------------


def test_build_is_a_universal_kernel_repository(repo, layers):
    variant = repo / "build" / "torch-universal"
    metadata = kernels.Metadata.read_from_file(variant / "metadata.json")
    raw = json.loads((variant / "metadata.json").read_text())
    assert metadata.name.python_name == "fastflamingo_layers" and metadata.version == 1
    assert metadata.digest is not None and metadata.python_depends == []  # nothing a kernel may not depend on
    assert raw["id"].startswith("_fastflamingo_layers_universal_") and (variant / "fastflamingo_layers").is_dir()
    assert (repo / "README.md").read_text().startswith("---\nlicense: mit")
    # kernels imports the build under its id; the layers and the layouts are there
    assert layers.__name__ == f"{raw['id']}._fastflamingo.hf.hub_layers"
    for name in list(hub_layers.STATELESS) + [f"{layer}Layout" for layer in hub_layers.STATEFUL.values()]:
        assert isinstance(getattr(layers, name), type), name
    # its custom ops are its own: registered under the build's id, never as fastflamingo:: (which the installed
    # library registers, so both load side by side)
    assert not [p for p in variant.rglob("*.py") if "\"fastflamingo::" in p.read_text()
                or "torch.ops.fastflamingo." in p.read_text()]
    importlib.import_module(f"{raw['id']}._fastflamingo.ops.gated_linear")  # (imported when a kernel first runs)
    assert hasattr(getattr(torch.ops, raw["id"]), "gated_linear")
    # the copy leaves out the test kit, the selftest, the compile check and this builder; it keeps what its package's
    # __init__ imports (the other routes import only torch), so the copy imports as a whole
    copy = variant / "fastflamingo_layers" / "_fastflamingo"
    assert (copy / "kernels" / "mllama_xattn.py").is_file() and (copy / "configs" / "__init__.py").is_file()
    assert not any((copy / p).exists() for p in ("testing.py", "selftest", "aot.py", "hf/hub.py"))
    assert hasattr(importlib.import_module(f"{raw['id']}._fastflamingo"), "patch")


def test_build_refuses_a_used_folder_and_a_bad_version(repo, tmp_path):
    with pytest.raises(FileExistsError, match="not empty"):
        hub.build(repo)
    with pytest.raises(ValueError, match="version"):
        hub.build(tmp_path / "new", version=0)


def test_mark_layers_names_the_transformers_classes(marked):
    from transformers.models.idefics.modeling_idefics import IdeficsAttention

    assert set(marked) == set(hub_layers.STATELESS)
    assert IdeficsAttention.kernel_layer_name == "IdeficsCrossAttention"
    assert IdeficsAttention.kernel_condition(type("Self", (), {"is_cross_attention": False})()) is False
    assert set(hub.unmark_layers()) == set(marked)
    assert "kernel_layer_name" not in IdeficsAttention.__dict__ and hub.unmark_layers() == ()
    hub.mark_layers()  # the fixture's unmark finds them marked again


# --------------------------------------------------------------------------------------------------------------
# stateless layers: kernelize
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_kernelize_inference_and_training(repo, family, marked, calls):
    build, make_inputs, ops = FAMILIES[family]
    upstream, model, inputs = build(), build(), make_inputs()
    mapping = hub.kernel_mapping(repo, devices=("cpu",))
    with use_kernel_mapping(mapping):
        kernelize(model, mode=Mode.INFERENCE, device="cpu")
    assert kernelized(model) == expected_kernelized(model) != {}
    with torch.no_grad():
        assert rel_err(model(**inputs).logits, upstream(**inputs).logits) <= 1e-5
    assert set(calls) == ops, calls

    calls.clear()
    for m in (upstream, model):
        m.train()
        m.zero_grad()
    with use_kernel_mapping(mapping):
        kernelize(model, mode=Mode.TRAINING, device="cpu")
    assert kernelized(model) == expected_kernelized(model)
    want, got = upstream(**inputs).logits, model(**inputs).logits
    assert rel_err(got, want) <= 1e-5
    want.square().mean().backward()
    got.square().mean().backward()
    assert set(calls) == ops, calls
    want = {n: p.grad for n, p in upstream.named_parameters() if p.grad is not None}
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    grads_match(got, want)  # gradients that are ~0 in exact arithmetic (a key norm's bias, a gate at 5e-6) held to a floor


def test_from_pretrained_kernelizes_while_loading(repo, marked, calls, tmp_path, monkeypatch):
    """transformers kernelizes at the end of ``from_pretrained`` (and again on ``train()`` / ``eval()``) with the
    mapping in force: the stateless layers are in place from the start, ``generate`` gives transformers' tokens."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    build, make_inputs, ops = FAMILIES["mllama"]
    upstream, inputs = build(), make_inputs()
    upstream.save_pretrained(tmp_path / "model")
    with use_kernel_mapping(hub.kernel_mapping(repo, devices=("cpu",))):
        model = type(upstream).from_pretrained(tmp_path / "model").eval()
        assert kernelized(model) == expected_kernelized(model) != {}
        with torch.no_grad():
            assert rel_err(model(**inputs).logits, upstream(**inputs).logits) <= 1e-5
            assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False),
                               upstream.generate(**inputs, max_new_tokens=3, do_sample=False))
        model.train()  # kernelized again, in training mode
        assert kernelized(model) == expected_kernelized(model)
    assert set(calls) == ops


# --------------------------------------------------------------------------------------------------------------
# stateful layers: KernelConfig
# --------------------------------------------------------------------------------------------------------------


def test_kernel_config_builds_the_cached_layouts(repo, layers, calls, tmp_path, monkeypatch):
    """The ``KernelConfig`` example of docs/transformers_loading.md, offline: the Hub id resolves to the folder through
    ``kernels``' ``LOCAL_KERNELS``. transformers 5.25 refuses a CPU model in ``KernelConfig`` (its device list has
    no "cpu"); the test adds it, so that the whole route runs here (on a GPU nothing is patched)."""
    from transformers.utils import kernel_config as transformers_kernel_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LOCAL_KERNELS", f"{HUB_ID}={repo}")
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    monkeypatch.setattr(transformers_kernel_config, "KERNELS_SUPPORTED_DEVICE_TYPES",
                        transformers_kernel_config.KERNELS_SUPPORTED_DEVICE_TYPES + ["cpu"])
    build, make_inputs, _ = FAMILIES["idefics"]
    upstream, inputs = build(), make_inputs()
    upstream.save_pretrained(tmp_path / "model")
    try:
        model = type(upstream).from_pretrained(tmp_path / "model", kernel_config=hub.kernel_config(HUB_ID),
                                               allow_all_kernels=True).eval()
    finally:
        registered = hub.unregister_layouts()  # transformers leaves them registered for every later model
    assert set(registered) == set(hub_layers.STATEFUL)
    stateful = {name: type(m).__name__ for name, m in model.named_modules() if "_kernel_repo" in m.__dict__}
    assert stateful == {"model.perceiver_resampler": "IdeficsPerceiverResamplerCachedLayout",
                        "model.gated_cross_attn_layers.0": "IdeficsGatedCrossAttentionLayerCachedLayout",
                        "model.gated_cross_attn_layers.1": "IdeficsGatedCrossAttentionLayerCachedLayout"}
    assert list(model.state_dict()) == list(upstream.state_dict())
    with torch.no_grad():
        assert rel_err(model(**inputs).logits, upstream(**inputs).logits) <= 1e-5
        tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert torch.equal(tokens, upstream.generate(**inputs, max_new_tokens=3, do_sample=False))
    assert calls["media_xattn"] and calls["perceiver_attn"] and calls["gated_linear"]
    # the state the layouts exist for: the decode steps reused the media K/V and the resampler's output
    assert model.model.gated_cross_attn_layers[0].cross_attn.media_cache.hits > 0
    assert model.model.perceiver_resampler.media_cache.hits > 0
    # and nothing is left registered: the next model is transformers' own
    again = type(upstream).from_pretrained(tmp_path / "model")
    assert type(again.model.perceiver_resampler).__module__.startswith("transformers.")
