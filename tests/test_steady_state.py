"""Steady state in generate: no data-dependent host reads of ours in decode steps.

A host read of tensor data (``.item()``, ``bool(tensor)``, ``.tolist()``, ``nonzero``, ``torch.equal``) is a device
synchronisation on a GPU and makes a step uncapturable in a CUDA graph. These tests count them inside the language
model's forward (its hooks included) at every step of a real ``generate``, patched and unpatched, and require the
patched model to read no more than upstream does in every decode step (upstream's own reads, e.g. transformers'
causal-mask shortcut, are not ours to remove). On CPU the PyTorch path runs: it has decode paths without host
schedules for exactly this reason.
"""
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastflamingo as ff
from fastflamingo.models.idefics import mask as image_mask
from test_media_cache import flamingo  # noqa: F401  (the OpenFlamingo model and prompt fixture)

_READ_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::equal", "aten::is_nonzero"}


class HostReads(TorchDispatchMode):
    """Counts data-dependent host reads: the dispatcher ops that return tensor data to Python, plus ``tolist``
    (which reads the data without dispatching). Keeps where each read came from, for the failure message."""

    def __init__(self):
        super().__init__()
        self.reads = []
        self._tolist = None

    def _record(self, what):
        frames = [f for f in traceback.extract_stack()[:-2] if "torch/" not in f.filename]
        self.reads.append((what, "".join(traceback.format_list(frames[-6:]))))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.name() in _READ_OPS:
            self._record(func.name())
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        original = self._tolist = torch.Tensor.tolist
        mode = self

        def tolist(t):
            mode._record("Tensor.tolist")
            return original(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def reads_per_forward(module, run):
    """Run ``run()`` and return, per call of ``module`` (hooks included), the host reads made inside it."""
    calls, active = [], []

    def enter(*_):
        counter = HostReads()
        counter.__enter__()
        active.append(counter)

    def leave(*_):
        counter = active.pop()
        counter.__exit__(None, None, None)
        calls.append(counter.reads)

    handles = (module.register_forward_pre_hook(enter, prepend=True),
               module.register_forward_hook(leave, always_call=True))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return calls


def assert_decode_reads_within_upstream(upstream, patched, steps):
    assert len(upstream) == len(patched) == steps, (len(upstream), len(patched))
    for step in range(1, steps):  # every decode step after the prompt's forward
        ours = patched[step]
        if len(ours) > len(upstream[step]):
            where = "\n".join(f"{what}:\n{stack}" for what, stack in ours)
            pytest.fail(f"decode step {step + 1}: {len(ours)} host reads patched, {len(upstream[step])} upstream:\n"
                        f"{where}")


@pytest.mark.parametrize("beams", [1, 3], ids=["greedy", "beam3"])
def test_open_flamingo_decode_steps_read_no_more_than_upstream(flamingo, beams):
    model, vision_x, ids = flamingo
    steps = 5
    tokens = {}

    def run(name):
        def go():
            with torch.no_grad():
                tokens[name] = model.generate(vision_x=vision_x, lang_x=ids, attention_mask=torch.ones_like(ids),
                                              max_new_tokens=steps, min_new_tokens=steps, num_beams=beams)
        return go

    upstream = reads_per_forward(model.lang_encoder, run("upstream"))
    ff.patch(model)
    patched = reads_per_forward(model.lang_encoder, run("patched"))
    assert torch.equal(tokens["patched"], tokens["upstream"])
    assert_decode_reads_within_upstream(upstream, patched, steps)


@pytest.mark.parametrize("beams", [1, 2], ids=["greedy", "beam2"])
def test_idefics_decode_steps_read_no_more_than_upstream(beams, monkeypatch):
    pytest.importorskip("transformers")
    from fastflamingo.testing import tiny_idefics
    from test_idefics import model_inputs

    model = tiny_idefics()
    inputs = model_inputs()
    steps = 5
    tokens = {}

    def run(name):
        def go():
            with torch.no_grad():
                tokens[name] = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                              num_beams=beams)
        return go

    upstream = reads_per_forward(model.model, run("upstream"))
    ff.patch(model)
    # the gated layers take the model's closed-form mask: the expanded bias is never read
    monkeypatch.setattr(image_mask, "idefics_media_mask", lambda *a, **k: pytest.fail("read the expanded mask"))
    patched = reads_per_forward(model.model, run("patched"))
    assert torch.equal(tokens["patched"], tokens["upstream"])
    assert_decode_reads_within_upstream(upstream, patched, steps)
    assert ff.unpatch(model) == 3
    assert not any(getattr(m, "_fastflamingo_hooks", None) for m in model.modules())
    assert not model.model._forward_pre_hooks and not model.model._forward_hooks
