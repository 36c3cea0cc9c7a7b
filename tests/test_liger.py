"""Liger-Kernel beside fastflamingo on transformers' mllama (Llama 3.2 Vision).

``liger_kernel.transformers.apply_liger_kernel_to_mllama(model=...)`` rebinds, on the instance, ``forward`` of
every text decoder layer's ``mlp`` (Liger's SwiGLU kernel), of every text RMSNorm (``input_layernorm``,
``post_attention_layernorm``, the final ``norm``) and of the vision tower's LayerNorms, and at module level
``modeling_mllama.apply_rotary_pos_emb`` (Liger's RoPE kernel, for every mllama model of the process) and the
classes ``MllamaTextRMSNorm`` / ``MllamaTextMLP`` (for models built afterwards). The cross layers are the text
decoder's layers too, so their MLP and norms are rebound; their cross-attention is left alone.

What runs in a cross layer's MLP (proved below by counting calls):

- Liger, then ``fastflamingo.patch``: the drop-in is a new module that adopts the Parameters, not the instance
  attributes that hold Liger's ``forward`` (models/_patching.py does not carry ``forward``): fastflamingo's MLP with
  the gate fused into ``down_proj``'s epilogue, and fastflamingo's RMSNorm. The self-attention layers keep Liger's.
- ``fastflamingo.patch``, then Liger: Liger binds its ``forward`` on the drop-in's MLP, which the drop-in never
  calls (it calls ``mlp.hidden`` and ``down_proj`` itself): the fused gate again; Liger's RMSNorm does run in the
  cross layers (the drop-in calls its norms as modules).

Liger's Triton kernels under the Triton interpreter (``TRITON_INTERPRET=1``, set by conftest without a GPU) need
two bridges, both gaps of the interpreter that compiled Triton does not have (see :func:`_bridge_the_interpreter`);
with them Liger's own kernel code runs, forward and backward, on CPU tensors. On a CUDA machine nothing is bridged
and the kernels are compiled. docs/training.md has the comparison of the two MLP forms and the recommendation.
"""
import contextlib
import copy
from dataclasses import dataclass

import pytest
import torch

import fastflamingo as ff
import fastflamingo.functional as FF
import fastflamingo.models.mllama as ff_mllama
from conftest import DEVICE
from fastflamingo.testing import tiny_mllama
from helpers import assert_close, assert_lowp_close, rel_err
from mllama_cases import IMAGE, PAD, model_inputs

pytest.importorskip("transformers")
pytest.importorskip("liger_kernel.transformers")  # imports transformers, and refuses transformers < 5
from liger_kernel.transformers import apply_liger_kernel_to_mllama  # noqa: E402
from liger_kernel.transformers.rms_norm import LigerRMSNorm  # noqa: E402
from liger_kernel.transformers.swiglu import LigerSwiGLUMLP  # noqa: E402
from transformers.models.mllama import modeling_mllama  # noqa: E402

pytestmark = pytest.mark.triton  # Liger's kernels are Triton: interpreted on CPU, compiled on CUDA

# apply_liger_kernel_to_mllama's defaults, except the fused linear cross-entropy: Liger 0.8.5 binds its
# MllamaForCausalLM forward to a MllamaForConditionalGeneration, which then fails on every call
# (test_default_fused_linear_cross_entropy_breaks_conditional_generation); Liger's own multimodal convergence test
# passes fused_linear_cross_entropy=False for this model too.
LIGER = dict(rope=True, cross_entropy=False, fused_linear_cross_entropy=False, layer_norm=True, rms_norm=True,
             swiglu=True)
# what apply_liger_kernel_to_mllama assigns at module level (with a model and the arguments above); put back after
# every test so that no later test of the session runs Liger's kernels unknowingly
LIGER_MODULE_GLOBALS = ("apply_rotary_pos_emb", "MllamaTextRMSNorm", "MllamaTextMLP")
SELF_LAYERS = ("model.language_model.layers.0", "model.language_model.layers.2")
CROSS_LAYERS = ("model.language_model.layers.1", "model.language_model.layers.3")
# fp32: the house bound for logits and loss, test_mllama.py's for gradients; Liger's own fp32 bounds are looser
# (its mini-mllama convergence test: logits atol 5e-3, loss rtol 1e-5)
LOGITS_TOL, GRAD_TOL = 1e-5, 1e-4


def _bridge_the_interpreter(mp: pytest.MonkeyPatch) -> None:
    """Let Liger's kernels run under the Triton interpreter, as compiled Triton runs them; nothing else changes.

    - A Python float kernel argument (``eps``, ``offset``, SwiGLU's ``gate_multiplier``) reaches the kernel as a
      Python float, and Liger's kernels call ``.to(tl.float32)`` on it (AttributeError). Compiled Triton
      specialises a float argument to an fp32 scalar (``mangle_type(1e-6) == "fp32"``): the bridge hands the
      interpreted kernel that fp32 scalar. triton 3.6 and 3.9 both lack it.
    - ``triton.language.extra.libdevice.rsqrt`` (Liger's RMSNorm and LayerNorm) is a stub the interpreter does not
      implement (it returns None); ``tl.math.rsqrt``, which Liger itself imports on Triton < 3.0, is implemented:
      the bridge points those two kernel modules' ``rsqrt`` at it (looked up at call time, after the interpreter
      has patched ``tl.math``).
    """
    import numpy as np
    import triton.language as tl
    from liger_kernel.ops import layer_norm, rms_norm
    from triton.runtime import interpreter

    convert = interpreter._implicit_cvt

    def float_as_fp32(arg):
        if isinstance(arg, float):
            return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return convert(arg)

    mp.setattr(interpreter, "_implicit_cvt", float_as_fp32)
    for module in (layer_norm, rms_norm):
        mp.setattr(module, "rsqrt", lambda x: tl.math.rsqrt(x))


class Spies:
    """Records, by module, which forward served each MLP and RMSNorm: Liger's SwiGLU, Liger's RMSNorm, or
    fastflamingo's gated projection (``functional.gated_linear``, which the drop-in calls with ``mlp.down_proj``
    when the gate is fused into it). Installed before Liger binds its ``forward`` functions, so that the bound
    functions are these spies (which then call Liger's own). Also counts the calls of the attention route's op
    (``fastflamingo.models.mllama.mllama_xattn``, which ``attn_implementation="fastflamingo"`` looks up per call;
    the drop-ins hold their own reference)."""

    def __init__(self, mp: pytest.MonkeyPatch):
        self.calls = {"liger_swiglu": [], "liger_rms_norm": [], "gated_linear": [], "route_xattn": []}
        self._wrap(mp, LigerSwiGLUMLP, "forward", "liger_swiglu", lambda module, *a, **k: module)
        self._wrap(mp, LigerRMSNorm, "forward", "liger_rms_norm", lambda module, *a, **k: module)
        self._wrap(mp, FF, "gated_linear", "gated_linear", lambda x, inp, linear, *a, **k: linear)
        self._wrap(mp, ff_mllama, "mllama_xattn", "route_xattn", lambda *a, **k: None)

    def _wrap(self, mp, owner, name, log, module_of):
        original = getattr(owner, name)

        def spy(*args, **kwargs):
            self.calls[log].append(module_of(*args, **kwargs))
            return original(*args, **kwargs)

        mp.setattr(owner, name, spy)

    def clear(self):
        for log in self.calls.values():
            log.clear()

    def paths(self, model) -> dict:
        names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
        ran = {log: sorted({names[id(m)] for m in mods}) for log, mods in self.calls.items() if log != "route_xattn"}
        ran["route_xattn"] = len(self.calls["route_xattn"])
        return ran


@dataclass
class Run:
    model: torch.nn.Module
    loss: torch.Tensor
    logits: torch.Tensor
    grads: dict
    ran: dict  # Spies.paths: which modules each spied forward served


def _inputs(device):
    """Two prompts, one image each (2 tiles and 1 tile of 2 per image slot): text before the image in the second
    (rows that see no image: the MLP's row flag is 0 there), padding in the first."""
    rows = [[IMAGE, 5, 6, 7, 8, 9, 10, PAD, PAD], [3, 4, IMAGE, 11, 12, 13, 14, 15, 16]]
    inputs = model_inputs(rows, [[2], [1]], max_tiles=2)
    inputs["labels"] = inputs["input_ids"].masked_fill(inputs["input_ids"] == PAD, -100)
    return {k: v.to(device) for k, v in inputs.items()}


def _run(base, inputs, steps, spies, dtype=torch.float32, backend=None) -> Run:
    """A copy of ``base`` with ``steps`` applied in order ("liger": apply_liger_kernel_to_mllama to the instance,
    "patch": fastflamingo.patch, "route": ``set_attn_implementation("fastflamingo")``), one forward and backward
    pass."""
    model = copy.deepcopy(base).to(dtype)
    for step in steps:
        if step == "liger":
            apply_liger_kernel_to_mllama(model=model, **LIGER)
        elif step == "patch":
            ff.patch(model)
        else:
            import fastflamingo.hf

            model.set_attn_implementation(fastflamingo.hf.register())
    spies.clear()
    batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    with ff.backend(backend) if backend else contextlib.nullcontext():
        out = model(**batch)
        out.loss.backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    return Run(model, out.loss.detach().float(), out.logits.detach().float(), grads, spies.paths(model))


ORDERS = {"transformers": (), "liger": ("liger",), "liger_then_patch": ("liger", "patch"),
          "patch_then_liger": ("patch", "liger")}


@pytest.fixture(scope="module")
def runs():
    """Every order on the same tiny model and inputs, computed once (on CPU each Liger run interprets its kernels).
    Everything Liger and the spies changed at module level is put back before the tests read the results."""
    with pytest.MonkeyPatch.context() as mp:
        for name in LIGER_MODULE_GLOBALS:
            mp.setattr(modeling_mllama, name, getattr(modeling_mllama, name))
        if DEVICE == "cpu":
            _bridge_the_interpreter(mp)
        spies = Spies(mp)
        # head_dim 16 (the attention kernels' smallest), 2 tiles per image: the vision tower Liger's LayerNorm runs
        # in stays small under the interpreter
        base = tiny_mllama("sdpa", num_heads=4, max_num_tiles=2).to(DEVICE)
        inputs = _inputs(DEVICE)
        out = {name: _run(base, inputs, steps, spies) for name, steps in ORDERS.items()}
        out["patch_then_liger_triton"] = _run(base, inputs, ORDERS["patch_then_liger"], spies, backend="triton")
        if _has_attention_route():
            out["route_and_liger"] = _run(base, inputs, ("route", "liger"), spies)
    return out


def _has_attention_route() -> bool:
    import importlib.util

    return importlib.util.find_spec("fastflamingo.hf") is not None


def _assert_same(run: Run, reference: Run, label: str, logits_tol=LOGITS_TOL, grad_tol=GRAD_TOL):
    assert_close(run.logits, reference.logits, logits_tol, f"{label}: logits")
    assert_close(run.loss, reference.loss, logits_tol, f"{label}: loss")
    assert run.grads.keys() == reference.grads.keys()
    for name, grad in reference.grads.items():
        assert_close(run.grads[name], grad, grad_tol, f"{label}: {name}")


def _mlp(layer):
    return f"{layer}.mlp"


def test_liger_alone_matches_transformers_and_runs_its_kernels(runs):
    liger = runs["liger"]
    _assert_same(liger, runs["transformers"], "Liger vs transformers")
    assert liger.ran["liger_swiglu"] == sorted(_mlp(l) for l in SELF_LAYERS + CROSS_LAYERS)
    norms = [f"{l}.{n}" for l in SELF_LAYERS + CROSS_LAYERS for n in ("input_layernorm", "post_attention_layernorm")]
    assert liger.ran["liger_rms_norm"] == sorted(norms + ["model.language_model.norm"])
    assert liger.ran["gated_linear"] == [] and liger.ran["route_xattn"] == 0


@pytest.mark.parametrize("order", ["liger_then_patch", "patch_then_liger", "patch_then_liger_triton"])
def test_either_order_matches_liger_alone_and_transformers(runs, order):
    """Logits, loss and every parameter's gradient, against Liger alone and against transformers (fp32).
    ``patch_then_liger_triton``: fastflamingo's Triton kernels too (``backend("triton")``), beside Liger's."""
    _assert_same(runs[order], runs["liger"], f"{order} vs Liger")
    _assert_same(runs[order], runs["transformers"], f"{order} vs transformers")


@pytest.mark.parametrize("order", ["liger_then_patch", "patch_then_liger", "patch_then_liger_triton"])
def test_cross_layers_run_the_fused_gate_in_either_order(runs, order):
    """In both orders the cross layers' MLP is fastflamingo's (``down_proj`` with the gate in its epilogue, called
    once per cross layer) and Liger's SwiGLU serves the self-attention layers only."""
    run = runs[order]
    assert run.ran["liger_swiglu"] == sorted(_mlp(l) for l in SELF_LAYERS)
    fused = [f"{_mlp(l)}.down_proj" for l in CROSS_LAYERS]
    assert [p for p in run.ran["gated_linear"] if p.endswith("mlp.down_proj")] == fused


def test_liger_then_patch_drops_ligers_forwards_from_the_cross_layers(runs):
    """The drop-in adopts the Parameters, not Liger's instance-level ``forward``: the cross layers' norms are
    fastflamingo's too. ``unpatch`` gives back the upstream layers, Liger's forwards still bound there."""
    run = runs["liger_then_patch"]
    for layer in CROSS_LAYERS:
        dropin = run.model.get_submodule(layer)
        for child in (dropin.mlp, dropin.input_layernorm, dropin.post_attention_layernorm):
            assert "forward" not in vars(child)
    cross_norms = {f"{l}.{n}" for l in CROSS_LAYERS for n in ("input_layernorm", "post_attention_layernorm")}
    assert not cross_norms & set(run.ran["liger_rms_norm"])
    model = copy.deepcopy(run.model)
    ff.unpatch(model)
    for layer in CROSS_LAYERS:
        assert "forward" in vars(model.get_submodule(layer).mlp)  # Liger's, bound before the patch


def test_patch_then_liger_binds_a_swiglu_forward_the_dropin_never_calls(runs):
    """Liger rebinds the drop-in MLP's ``forward`` (so ``repr`` calls it LigerSwiGLUMLP) but the layer computes
    ``mlp.hidden`` and ``down_proj`` itself; Liger's RMSNorm does serve the cross layers' norms."""
    run = runs["patch_then_liger"]
    for layer in CROSS_LAYERS:
        assert "forward" in vars(run.model.get_submodule(layer).mlp)
        assert _mlp(layer) not in run.ran["liger_swiglu"]
    cross_norms = {f"{l}.{n}" for l in CROSS_LAYERS for n in ("input_layernorm", "post_attention_layernorm")}
    assert cross_norms <= set(run.ran["liger_rms_norm"])


def test_attention_route_beside_liger(runs):
    """``attn_implementation="fastflamingo"`` with Liger: the layers stay transformers' own, so Liger's SwiGLU serves
    every MLP, the cross layers' included, and the route's op serves the cross-attention (once per cross layer); no
    gate is fused. Logits, loss and gradients as Liger alone and transformers."""
    if "route_and_liger" not in runs:
        pytest.skip("fastflamingo.hf (attn_implementation='fastflamingo') is not in this tree")
    run = runs["route_and_liger"]
    assert run.ran["liger_swiglu"] == sorted(_mlp(l) for l in SELF_LAYERS + CROSS_LAYERS)
    assert run.ran["route_xattn"] == len(CROSS_LAYERS)
    assert run.ran["gated_linear"] == []
    _assert_same(run, runs["liger"], "route + Liger vs Liger")
    _assert_same(run, runs["transformers"], "route + Liger vs transformers")


def test_default_fused_linear_cross_entropy_breaks_conditional_generation(device, monkeypatch):
    """Liger 0.8.5 with its default ``fused_linear_cross_entropy=True`` binds the forward it wrote for
    ``MllamaForCausalLM`` to a ``MllamaForConditionalGeneration`` instance, which then fails on every call with or
    without fastflamingo (transformers 5.25): why LIGER turns it off. When this test fails, Liger has fixed it:
    update LIGER and docs/training.md."""
    for name in LIGER_MODULE_GLOBALS:
        monkeypatch.setattr(modeling_mllama, name, getattr(modeling_mllama, name))
    model = tiny_mllama("sdpa", num_heads=4, max_num_tiles=2).to(device)
    apply_liger_kernel_to_mllama(model=model, rope=False, layer_norm=False, rms_norm=False, swiglu=False)
    with pytest.raises(TypeError, match="multiple values for keyword argument 'full_text_row_masked_out_mask'"):
        model(**_inputs(device))


def _saved_for_backward(branch, tokens, hidden_size, intermediate_size, parameters):
    """(number of (tokens, hidden), number of (tokens, intermediate)) activations ``branch()`` keeps for its backward
    pass (distinct storages; parameters and one-per-token row flags not counted), after checking that nothing else
    is kept."""
    kept = {}
    params = {p.untyped_storage().data_ptr() for p in parameters}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = branch()
    out.sum().backward()
    sizes = [n for n in kept.values() if n > tokens]  # the gate (1 number) and the row flags (1 per token) aside
    assert set(sizes) <= {tokens * hidden_size, tokens * intermediate_size}, sizes
    return sizes.count(tokens * hidden_size), sizes.count(tokens * intermediate_size)


def test_activations_a_cross_layer_mlp_keeps_for_backward():
    """The evidence behind docs/training.md's choice for the cross layers' MLP, ``y = x + tanh(g) * F * mlp(h)``:
    Liger's SwiGLU keeps one (tokens, intermediate) activation fewer than the unfused SwiGLU (it recomputes SiLU),
    fastflamingo's gated projection one (tokens, hidden) fewer than the unfused gate (it never writes the branch):
    upstream 2 + 4, Liger 2 + 3, fastflamingo (Triton) 1 + 4, both together 1 + 3."""
    from types import SimpleNamespace

    from liger_kernel.transformers.functional import liger_swiglu

    from fastflamingo.models.mllama.layers import MllamaTextMLP

    hidden, intermediate, batch, text = 64, 224, 2, 24  # Llama 3.2 Vision's intermediate / hidden ratio, 3.5
    config = SimpleNamespace(hidden_size=hidden, intermediate_size=intermediate, hidden_act="silu")
    upstream = modeling_mllama.MllamaTextMLP(config).to(DEVICE)
    ours = MllamaTextMLP(config).to(DEVICE)
    ours.load_state_dict(upstream.state_dict())
    gate = torch.nn.Parameter(torch.tensor([0.6], device=DEVICE))
    flag = (torch.rand(batch, text, 1, device=DEVICE) > 0.3).float()  # F: upstream's (batch, text, 1) row flag
    x, h = (torch.randn(batch, text, hidden, device=DEVICE, requires_grad=True) for _ in range(2))
    branches = {
        "upstream": lambda: x + gate.tanh() * (flag * upstream(h)),
        "liger": lambda: x + gate.tanh() * (flag * LigerSwiGLUMLP.forward(upstream, h)),
        "fastflamingo": lambda: FF.gated_linear(x, ours.hidden(h), ours.down_proj, gate, row_gate=flag[..., 0]),
        "both": lambda: FF.gated_linear(x, liger_swiglu(ours.gate_proj(h), ours.up_proj(h)), ours.down_proj, gate,
                                        row_gate=flag[..., 0]),
    }
    params = list(upstream.parameters()) + list(ours.parameters()) + [gate]
    with pytest.MonkeyPatch.context() as mp:
        if DEVICE == "cpu":
            _bridge_the_interpreter(mp)
        with ff.backend("triton"):
            kept = {name: _saved_for_backward(branch, batch * text, hidden, intermediate, params)
                    for name, branch in branches.items()}
    assert kept == {"upstream": (2, 4), "liger": (2, 3), "fastflamingo": (1, 4), "both": (1, 3)}


@pytest.mark.gpu
def test_bf16_either_order_within_twice_ligers_own_error(device, monkeypatch):
    """bf16 on CUDA (compiled kernels, nothing bridged): each order's error against Liger alone in fp32 is at most
    twice Liger alone's own bf16 error (plus the house slack), logits and gradients of the cross layers."""
    for name in LIGER_MODULE_GLOBALS:
        monkeypatch.setattr(modeling_mllama, name, getattr(modeling_mllama, name))
    spies = Spies(monkeypatch)
    base = tiny_mllama("sdpa", num_heads=4, max_num_tiles=2).to(device)
    inputs = _inputs(device)
    reference = _run(base, inputs, ORDERS["liger"], spies)
    liger_bf16 = _run(base, inputs, ORDERS["liger"], spies, dtype=torch.bfloat16)
    for order in ("liger_then_patch", "patch_then_liger"):
        run = _run(base, inputs, ORDERS[order], spies, dtype=torch.bfloat16)
        assert_lowp_close(run.logits, reference.logits, liger_bf16.logits, f"{order}: logits")
        for name, grad in reference.grads.items():
            if name.startswith(CROSS_LAYERS):
                assert_lowp_close(run.grads[name], grad, liger_bf16.grads[name], f"{order}: {name}",
                                  atol=1e-2 * grad.abs().max().item())
        assert rel_err(run.loss, reference.loss) < 1e-2
