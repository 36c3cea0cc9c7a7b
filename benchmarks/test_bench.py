"""pytest-benchmark view of a CPU-sized subset of the suite's cells, built with the suite's own setup code
(the op registry's ``make_inputs``, ``reference`` and providers).

    pytest benchmarks/ --benchmark-only             # time them
    pytest benchmarks/ --benchmark-disable          # run each once as a smoke test

Not collected by ``pytest`` / ``pytest tests/`` (pytest.ini: ``testpaths = tests``). Each test first applies the
suite's correctness gate, then times the call with ``benchmark.pedantic``; the harness's peak memory goes into
``extra_info``.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks import catalog
from benchmarks.harness import TOLERANCE, rel_error
from benchmarks.timing import peak_bytes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHOTS = (4, 32)
TEXT = 1024  # half the suite's 2048 text tokens: the same structure, a quarter of the upstream cost
CELLS = [
    (op, provider, shots, pass_)
    for op, providers in (("media_xattn", ("upstream", "sdpa", "fastflamingo")), ("mca", ("upstream", "fastflamingo")))
    for provider in providers
    for shots in SHOTS
    for pass_ in ("fwd", "fwd+bwd")
]


def _case(op_name, shots):
    op = catalog.load_all()[op_name]
    case = op.cases("cpu", [shots])[0]
    case.params = dict(case.params, text=TEXT)
    case.label = case.label.replace("T2048", f"T{TEXT}")
    return op, case


@pytest.mark.parametrize("op_name,provider_name,shots,pass_", CELLS,
                         ids=[f"{o}-{p}-S{s}-{ps}" for o, p, s, ps in CELLS])
def test_cell(benchmark, op_name, provider_name, shots, pass_):
    op, case = _case(op_name, shots)
    provider = op.providers.get(provider_name)
    if provider is None or DEVICE not in provider.devices:
        pytest.skip(f"{provider_name} does not run on {DEVICE}")
    reason = provider.unavailable(DEVICE, torch.float32)
    if reason:
        pytest.skip(reason)
    torch.manual_seed(0)
    inputs = op.make_inputs(case, DEVICE, torch.float32)
    runner = provider.build(inputs, case, DEVICE, torch.float32)
    with torch.no_grad():  # the suite's correctness gate
        out = runner.forward()
        out = runner.unpack(out) if runner.unpack else out
        err = rel_error(out, op.reference(inputs, case), runner.compare_rows)
    assert err <= TOLERANCE[torch.float32], f"{provider_name} disagrees with the fp32 reference: rel err {err:.2e}"

    leaves = runner.leaves if runner.leaves is not None else inputs.leaves
    if pass_ == "fwd":
        def call():
            with torch.no_grad():
                runner.forward()
    else:
        out = runner.forward()
        cotangent = torch.randn_like(out)
        del out

        def call():
            for t in leaves:
                t.grad = None
            runner.forward().backward(cotangent)

    def timed():
        call()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    peak = peak_bytes(timed, DEVICE)
    benchmark.extra_info.update(case=case.label, provider=provider_name, pass_=pass_, rel_err=err,
                                peak_mb=None if peak is None else peak / 2**20)
    benchmark.pedantic(timed, rounds=3, iterations=1, warmup_rounds=1)
