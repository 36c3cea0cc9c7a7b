"""``python -m fastflamingo.selftest`` and ``python -m fastflamingo.info``: the cases every kernel family declares,
the verdicts (a NaN, an error beyond tolerance and a launch failure all fail), the exit status, and the dry run
end to end for one family (CI runs the whole dry run after the tests)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastflamingo import selftest
from fastflamingo.selftest.case import HEAD_DIMS

pytestmark = pytest.mark.triton
ROOT = Path(__file__).resolve().parent.parent


def _case(run, tol=1e-3):
    return selftest.Case("fake_kernel", "M16-w4-s1", "fp32 d64", run, tol)


def test_verdicts():
    good = torch.ones(3, 4)
    cases = {
        "ok": _case(lambda device: [("o", good + 1e-5, good)]),
        "nan": _case(lambda device: [("o", torch.full_like(good, float("nan")), good)]),
        "error": _case(lambda device: [("o", good * 1.1, good)]),
        "shape": _case(lambda device: [("o", good[:2], good)]),
        "raises": _case(lambda device: (_ for _ in ()).throw(RuntimeError("out of resources: shared memory"))),
    }
    outcomes = {name: selftest.run_case(0, case, torch.device("cpu")) for name, case in cases.items()}
    assert outcomes["ok"].ok and outcomes["ok"].line().endswith("ok")
    assert not outcomes["nan"].ok and "NaN" in outcomes["nan"].line()
    assert not outcomes["error"].ok and "FAIL (o)" in outcomes["error"].line()
    assert not outcomes["shape"].ok
    assert not outcomes["raises"].ok and "RuntimeError: out of resources" in outcomes["raises"].line()


def test_exit_status_on_failure(monkeypatch, capsys):
    failing = _case(lambda device: [("o", torch.zeros(2), torch.ones(2))])
    monkeypatch.setattr(selftest, "collect", lambda families, toy: ([failing], []))
    assert selftest.main(["--dry-run"]) == 1
    out = capsys.readouterr().out
    assert "1 FAILED" in out and "fake_kernel" in out
    monkeypatch.setattr(selftest, "collect", lambda families, toy: ([_case(lambda d: [("o", torch.ones(2),
                                                                                       torch.ones(2))])], []))
    assert selftest.main(["--dry-run"]) == 0


def test_every_family_declares_every_shipped_config():
    """Each kernel family's cases force every config its lists ship for this architecture (bf16 lists at head sizes
    64, 96 and 128), so a config added to a table is run by the selftest without anyone remembering to."""
    from fastflamingo.kernels import media_xattn, perceiver_attn

    cases, missing = selftest.collect((), toy=True)
    assert not missing, f"kernel families without selftest cases: {missing}"
    kernels = {c.kernel for c in cases}
    assert {"media_xattn_fwd", "media_xattn_bwd_dkdv", "media_xattn_bwd_dq", "perceiver_fwd", "perceiver_bwd",
            "gated_linear_fwd", "media_decode_split", "media_decode_split+combine"} <= kernels
    seen = {(c.kernel, c.config, c.detail.split()[0], c.detail.split()[1]) for c in cases}
    from fastflamingo.kernels._utils import config_label

    for head_dim in HEAD_DIMS:
        for kind, name in (("fwd", "media_xattn_fwd"), ("dkdv", "media_xattn_bwd_dkdv"), ("dq", "media_xattn_bwd_dq")):
            for config in media_xattn.shipped_configs(kind, torch.bfloat16, head_dim):
                assert (name, config_label(config), "bf16", f"d{head_dim}") in seen
        for kind in ("fwd", "bwd"):
            for config in perceiver_attn.shipped_configs(kind, torch.bfloat16, head_dim):
                assert (f"perceiver_{kind}", config_label(config), "bf16", f"d{head_dim}") in seen
    for kind in ("fwd", "bwd"):  # the key-mask + grouped-query specialization (IDEFICS2) at every bf16 config
        for config in perceiver_attn.shipped_configs(kind, torch.bfloat16, 96, specialized=True):
            assert any(c.kernel == f"perceiver_{kind}" and c.config == config_label(config) and "key_mask" in c.detail
                       and "/1kv" in c.detail for c in cases)
    for head_dim in (64, 128):  # the media_xattn key-mask specialization (Evolla) at every bf16 config
        for kind, name in (("fwd", "media_xattn_fwd"), ("dkdv", "media_xattn_bwd_dkdv"), ("dq", "media_xattn_bwd_dq")):
            for config in media_xattn.shipped_configs(kind, torch.bfloat16, head_dim, specialized=True):
                assert any(c.kernel == name and c.config == config_label(config) and "key_mask" in c.detail
                           and f"d{head_dim}" in c.detail.split() for c in cases)
    assert any(c.kernel.startswith("media_decode_split") and "key_mask" in c.detail for c in cases)
    dtypes = {c.detail.split()[0] for c in cases}
    assert dtypes == {"bf16", "fp16", "fp32"}
    assert any("splits 1" in c.detail for c in cases) and any("splits 8" in c.detail for c in cases)


def test_dry_run_of_one_family():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "fastflamingo.selftest", "--dry-run", "--family", "gated_linear"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("gated_linear_fwd")]
    assert lines and all(line.endswith(" ok") for line in lines), result.stdout
    assert "all ok" in result.stdout


def test_selftest_without_cuda_points_to_the_dry_run():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    result = subprocess.run([sys.executable, "-m", "fastflamingo.selftest"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "--dry-run" in result.stderr


def test_info_reports_backends_and_tables():
    result = subprocess.run([sys.executable, "-m", "fastflamingo.info"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    for heading in ("fastflamingo", "torch", "triton", "device", "backends", "kernel families", "tuned configs"):
        assert heading in result.stdout
    if not torch.cuda.is_available():
        assert "no CUDA device" in result.stdout


def test_device_check_usage():
    script = ROOT / "benchmarks" / "device_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert result.returncode == 2 and "usage" in result.stderr
    result = subprocess.run(["bash", str(script), "/tmp/never-written", "--stage", "nope"], capture_output=True,
                            text=True)
    assert result.returncode == 2 and "env selftest tests bench mllama tune bench-compile" in result.stderr
