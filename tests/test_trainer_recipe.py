"""examples/train_mllama.py, the Trainer recipe of docs/training.md: fastflamingo.patch before transformers'
Trainer, activation checkpointing, LoRA (peft), merge, save and reload into an unpatched model.

The recipe runs twice on the same tiny checkpoint, patched and unpatched (fp32, fixed seed, no dropout), and the
two runs must agree step by step."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from helpers import assert_close

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parent.parent
STEPS = 4
CROSS_LAYERS = ("model.language_model.layers.1", "model.language_model.layers.3")
PROJECTIONS = ("cross_attn.q_proj", "cross_attn.k_proj", "cross_attn.v_proj", "cross_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")


def _load_recipe():
    spec = importlib.util.spec_from_file_location("train_mllama", ROOT / "examples" / "train_mllama.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


recipe = _load_recipe()


class CrossLayerCalls:
    """Counts the calls of every cross layer's ``input_layernorm`` during training: with activation checkpointing
    each step runs it twice (the forward pass and the recomputation in the backward pass). (Not ``cross_attn``: the
    drop-in calls its ``attend`` method, so forward hooks on the drop-in's ``cross_attn`` never fire.)"""

    def __init__(self):
        self.count = 0

    def __call__(self, model):
        for name, module in model.named_modules():
            if name.endswith(tuple(f"{layer}.input_layernorm" for layer in CROSS_LAYERS)):
                module.register_forward_hook(self._hook)

    def _hook(self, *args):
        self.count += 1


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe")
    base = recipe.build_base(out / "base", seed=0)
    calls = {"patched": CrossLayerCalls(), "upstream": CrossLayerCalls()}
    results = {name: recipe.train(out / name, steps=STEPS, patch=name == "patched", lora=True, base=base,
                                  before_training=calls[name])
               for name in ("patched", "upstream")}
    return results, calls, out


def _batch(model):
    samples = recipe.make_samples(model.config, 2, seed=1)  # other images and tokens than the training data
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0] if k != "labels"}


def _logits(model, batch):
    """On the model's device (the Trainer moves the model to the GPU where there is one), returned on the CPU."""
    device = next(model.parameters()).device
    with torch.no_grad():
        return model(**{k: v.to(device) for k, v in batch.items()}).logits.cpu()


def test_losses_fall_and_match_the_unpatched_recipe(runs):
    results, _, _ = runs
    patched, upstream = results["patched"].losses, results["upstream"].losses
    assert len(patched) == len(upstream) == STEPS
    assert all(later < earlier for earlier, later in zip(patched, patched[1:])), patched
    for step, (ours, theirs) in enumerate(zip(patched, upstream), 1):
        assert abs(ours - theirs) <= 1e-5, f"step {step}: patched {ours} vs unpatched {theirs}"


def test_the_patch_ran_and_checkpointing_recomputed_its_layers(runs):
    results, calls, _ = runs
    assert results["patched"].patch_report.counts() == {"MllamaCrossAttentionDecoderLayer": 2}
    assert results["upstream"].patch_report is None
    # forward + recomputation in the backward, per cross layer and step: as upstream's layers
    assert calls["patched"].count == calls["upstream"].count == 2 * len(CROSS_LAYERS) * STEPS


def test_lora_wraps_the_dropins_projections_as_upstreams_and_trains_them(runs):
    results, _, _ = runs
    patched, upstream = results["patched"], results["upstream"]
    assert patched.lora_modules == upstream.lora_modules
    for layer in CROSS_LAYERS:
        for projection in PROJECTIONS:
            assert f"{layer}.{projection}" in patched.lora_modules
    assert patched.lora_weights.keys() == upstream.lora_weights.keys()
    cross_b = [n for n in patched.lora_weights if n.split("base_model.model.", 1)[-1].startswith(CROSS_LAYERS)
               and ".lora_B." in n]
    assert len(cross_b) == len(CROSS_LAYERS) * len(PROJECTIONS)
    for name in cross_b:  # lora_B starts at zero: a trained one got gradients through the drop-in
        assert patched.lora_weights[name].abs().max() > 0, name
    for name, weight in upstream.lora_weights.items():
        assert_close(patched.lora_weights[name], weight, 1e-4, name)


def test_merged_checkpoint_loads_into_an_unpatched_model(runs):
    from transformers import MllamaForConditionalGeneration

    results, _, out = runs
    trained = results["patched"].model
    reloaded = MllamaForConditionalGeneration.from_pretrained(out / "patched" / "merged", dtype=torch.float32).eval()
    assert not any(getattr(type(m), "_fastflamingo_dropin", False) for m in reloaded.modules())
    assert list(reloaded.state_dict()) == list(trained.state_dict())
    batch = _batch(trained)
    assert_close(_logits(reloaded, batch), _logits(trained, batch), 1e-5, "reloaded vs trained (patched)")
    assert_close(_logits(reloaded, batch), _logits(results["upstream"].model, batch), 1e-5,
                 "reloaded vs trained unpatched")


def test_adapter_loads_onto_an_unpatched_base(runs):
    from peft import PeftModel
    from transformers import MllamaForConditionalGeneration

    results, _, out = runs
    base = MllamaForConditionalGeneration.from_pretrained(out / "base", dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, out / "patched" / "adapter").eval()
    batch = _batch(results["patched"].model)
    assert_close(_logits(adapted, batch), _logits(results["patched"].model, batch), 1e-5, "adapter vs merged")


def test_script_runs_full_fine_tuning_from_its_command_line(tmp_path, capsys):
    """``python examples/train_mllama.py OUT --steps 2 --no-lora``, run through its ``main`` in this process."""
    assert recipe.main([str(tmp_path), "--steps", "2", "--no-lora"]) == 0
    printed = capsys.readouterr().out
    assert "MllamaCrossAttentionDecoderLayer" in printed and "step 2 loss" in printed, printed
    assert (tmp_path / "merged" / "config.json").is_file() and not (tmp_path / "adapter").exists()
    assert json.loads((tmp_path / "losses.json").read_text())["lora"] is False


@pytest.mark.gpu
def test_liger_through_the_trainer_keeps_the_losses(tmp_path, monkeypatch):
    """CUDA: the Trainer applies Liger-Kernel (use_liger_kernel) after the patch; the losses stay within Liger's own
    fp32 loss tolerance (rtol 1e-5, its mini-mllama convergence test) of the recipe without Liger."""
    pytest.importorskip("liger_kernel.transformers")
    from test_liger import LIGER_MODULE_GLOBALS, modeling_mllama

    for name in LIGER_MODULE_GLOBALS:  # what Liger assigns at module level, put back after the test
        monkeypatch.setattr(modeling_mllama, name, getattr(modeling_mllama, name))
    base = recipe.build_base(tmp_path / "base", seed=0)
    with_liger = recipe.train(tmp_path / "liger", steps=STEPS, liger=True, base=base).losses
    without = recipe.train(tmp_path / "plain", steps=STEPS, liger=False, base=base).losses
    assert all(later < earlier for earlier, later in zip(with_liger, with_liger[1:])), with_liger
    for ours, theirs in zip(with_liger, without):
        assert abs(ours - theirs) <= 1e-5 * abs(theirs) + 1e-6, (with_liger, without)
