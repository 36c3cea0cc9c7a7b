"""transformers' own hub kernels and fastflamingo.patch on the same model.

From transformers 5.25, ``from_pretrained`` kernelizes the model by default (``use_kernels``, or the environment
variable ``USE_HUB_KERNELS``): every layer decorated with ``use_kernel_forward_from_hub`` (the activations, RMSNorms
of some models) gets the forward of a Hugging Face ``kernels`` layer for the model's device, and ``model.train()`` /
``model.eval()`` kernelize again whenever the mode changes, walking whatever modules the model holds by then. The
checks here: ``patch()`` after ``from_pretrained`` and ``unpatch()`` give the same outputs with hub kernels off, on
with transformers' default mapping (nothing for CPU, so the original forwards), and on with a local CPU kernel that
really replaces transformers' SiLU activation (a ``LocalLayerRepository`` built in a temporary folder: no network);
re-kernelizing a patched model keeps it patched and its outputs unchanged.
"""
import importlib.metadata
import json
from contextlib import nullcontext

import pytest
import torch

import fastflamingo
from helpers import rel_err

transformers = pytest.importorskip("transformers")
try:  # by distribution: from the checkout root a bare `import kernels` must find Hugging Face's, never a folder
    importlib.metadata.distribution("kernels")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("Hugging Face's `kernels` is not installed", allow_module_level=True)
if tuple(int(p) for p in transformers.__version__.split(".")[:2]) < (5, 25):
    pytest.skip("from_pretrained kernelizes by default from transformers 5.25", allow_module_level=True)
import kernels  # noqa: E402

from fastflamingo import testing  # noqa: E402
from mllama_cases import CASES, model_inputs as mllama_inputs  # noqa: E402
from test_idefics import model_inputs as idefics_inputs  # noqa: E402

SILU_LAYER = '''import torch
from torch import nn

CALLS = [0]  # how many times the kernel ran: proves the model used it


class Silu(nn.Module):
    # a kernel layer is stateless: no __init__, no members (kernels validates this against the layer it replaces)
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        CALLS[0] += 1
        return nn.functional.silu(x)
'''


def local_silu_repo(root):
    """A ``kernels`` layer repository on disk whose ``Silu`` layer computes SiLU on any device and counts its calls:
    ``build/torch-universal/`` (a build for any torch and backend) with ``metadata.json`` and the Python package."""
    repo = root / "silu-local"
    variant = repo / "build" / "torch-universal"
    package = variant / "silu_local"  # the metadata name with "-" as "_"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("from . import layers\nfrom .layers import CALLS\n")
    (package / "layers.py").write_text(SILU_LAYER)
    meta = {"id": "fastflamingo_test_silu_local", "name": "silu-local", "version": 1, "license": "MIT",
            "python-depends": [], "backend": {"type": "cpu"}}
    try:  # the digest of the files (optional: without it, every load warns that the metadata records none)
        from kernels._rust import Digest, DigestAlgorithm  # kernels 0.19's own hasher; private, so optional

        meta["digest"] = {"algorithm": "sha256", "files": Digest.hash_variant(DigestAlgorithm.SHA256, variant).files}
    except (ImportError, AttributeError):
        pass
    (variant / "metadata.json").write_text(json.dumps(meta, indent=2))
    return repo


def tiny_idefics():
    return testing.tiny_idefics(hidden_act="silu"), idefics_inputs()


def tiny_mllama():
    return testing.tiny_mllama("sdpa"), mllama_inputs(*CASES["interleaved"])


FAMILIES = {"idefics": tiny_idefics, "mllama": tiny_mllama}
# the upstream layers patch() replaces in each family
PATCHED = {"idefics": ("IdeficsGatedCrossAttentionLayer", "IdeficsPerceiverResampler"),
           "mllama": ("MllamaCrossAttentionDecoderLayer",)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each family's tiny model saved once, with its inputs, and the local kernel repository."""
    root = tmp_path_factory.mktemp("hub_kernels")
    out = {"repo": local_silu_repo(root)}
    for family, build in FAMILIES.items():
        model, inputs = build()
        model.save_pretrained(root / family)
        out[family] = (type(model), root / family, inputs)
    return out


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def upstream_layers(model, family):
    return {n: m for n, m in model.named_modules() if type(m).__name__ in PATCHED[family]
            and type(m).__module__.startswith("transformers.")}


@pytest.mark.parametrize("hub", ["env-off", "arg-off", "default", "local-cpu-kernel"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_patch_and_unpatch_after_from_pretrained(saved, family, hub, monkeypatch):
    cls, path, inputs = saved[family]
    # offline: nothing here may reach the Hub (the local kernel is a folder; the default mapping has no CPU entries)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    kwargs = {}
    if hub == "env-off":
        monkeypatch.setenv("USE_HUB_KERNELS", "0")
    elif hub == "arg-off":
        kwargs["use_kernels"] = False
    local = hub == "local-cpu-kernel"
    calls = kernels.get_local_kernel(saved["repo"]).CALLS if local else [0]
    # the local kernel is mapped for the whole test, so that the re-kernelization of train()/eval() still sees it
    mapping = {"SiLU": {"cpu": kernels.LocalLayerRepository(repo_path=saved["repo"], layer_name="Silu")}}
    with kernels.use_kernel_mapping(mapping) if local else nullcontext():
        model = cls.from_pretrained(path, **kwargs).eval()
        assert model.use_kernels == (hub in ("default", "local-cpu-kernel"))
        originals = upstream_layers(model, family)
        assert originals

        before = calls[0]
        ref = logits(model, inputs)
        assert calls[0] > before or not local, "the local kernel did not run: the model is not kernelized"

        report = fastflamingo.patch(model)
        assert sum(report.counts().values()) == len(originals), report.counts()
        assert not upstream_layers(model, family)
        out = logits(model, inputs)
        assert rel_err(out, ref) <= 1e-5

        # a mode change kernelizes again (when use_kernels), walking the patched model: it stays patched
        model.train()
        model.eval()
        assert not upstream_layers(model, family)
        before = calls[0]
        assert torch.equal(logits(model, inputs), out)
        assert calls[0] > before or not local, "the local kernel is not used after re-kernelizing"

        assert fastflamingo.unpatch(model) == len(originals)
        assert upstream_layers(model, family) == originals
        assert torch.equal(logits(model, inputs), ref)
