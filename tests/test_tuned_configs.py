"""Tuned launch configs as data (fastflamingo/configs/): the table format, the lookup a ConfigChooser makes before it
would time anything, and what benchmarks.tune writes.

No GPU here: the tables name a fake device, and the lookup is pointed at it by replacing the function that reads
the identity of the CUDA device. Timing is replaced by a function that fails the test, so "used with zero autotune
timings" is checked, not assumed.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastflamingo import configs

pytestmark = pytest.mark.triton

ROOT = Path(__file__).resolve().parent.parent
FAKE = configs.DeviceIdentity("Fake GPU 9000", (9, 0), configs.triton_major_minor() or "3.6")


@pytest.fixture
def utils():
    pytest.importorskip("triton")
    from fastflamingo.kernels import _utils

    return _utils


@pytest.fixture
def fake_device(monkeypatch, tmp_path):
    """Tables from ``tmp_path`` only, and every device reported as the fake GPU; returns a table writer."""
    monkeypatch.setenv(configs.ENV_VAR, str(tmp_path))
    monkeypatch.setattr(configs, "TABLE_DIR", tmp_path / "shipped-none")
    monkeypatch.setattr(configs, "device_identity", lambda device: FAKE)
    configs.clear_cache()

    def write(entries, identity=FAKE, name=None):
        table = configs.TunedTable(identity, {configs.key_string(e["kernel"], e["key"]): e for e in entries})
        table.save(tmp_path / (name or identity.filename()))
        configs.clear_cache()

    yield write
    configs.clear_cache()


@pytest.fixture
def no_timing(monkeypatch):
    """Any call of triton's do_bench fails the test."""
    import triton.testing

    def do_bench(*args, **kwargs):
        raise AssertionError("a config was timed although the tuned table has an entry")

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)


def _configs(utils):
    import triton

    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=4, num_stages=2) for m, n in ((16, 16), (32, 16),
                                                                                               (64, 32))]


def test_table_round_trip(tmp_path):
    entry = configs.make_entry("k", {"head_dim": 64, "dtype": "bf16"}, {"BLOCK_M": 64, "num_warps": 4,
                                                                        "num_stages": 3}, 0.25, {"a": 0.25, "b": 0.5})
    path = configs.TunedTable(FAKE, {configs.key_string("k", entry["key"]): entry}).save(tmp_path / "t.json")
    table = configs.load_table(path)
    assert table.identity == FAKE and len(table) == 1
    # key order does not matter; values and kernel do
    assert table.lookup("k", {"dtype": "bf16", "head_dim": 64}) == {"BLOCK_M": 64, "num_warps": 4, "num_stages": 3}
    assert table.lookup("k", {"dtype": "fp16", "head_dim": 64}) is None
    assert table.lookup("other", {"dtype": "bf16", "head_dim": 64}) is None
    assert FAKE.filename() == f"fake-gpu-9000-sm90-triton{FAKE.triton}.json"


def test_broken_table_names_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": 1, "device": {"name": "x"}, "entries": []}))
    with pytest.raises(ValueError, match="bad.json"):
        configs.load_table(bad)


def test_key_fields_are_json(utils):
    key = (128, 64, True, torch.bfloat16, 4096, 32)
    names = ("head_dim", "latents", "immediate", "dtype", "text_bucket", "media_bucket")
    assert configs.key_dict(key, names) == {"head_dim": 128, "latents": 64, "immediate": True, "dtype": "bf16",
                                            "text_bucket": 4096, "media_bucket": 32}
    assert configs.key_dict(key[:2]) == {"k0": 128, "k1": 64}


def test_chooser_uses_the_table_with_zero_timings(utils, fake_device, no_timing):
    candidates = _configs(utils)
    chooser = utils.ConfigChooser("fake_kernel", candidates, key_names=("dtype", "head_dim", "bucket"))
    key = (torch.bfloat16, 64, 128)
    fake_device([configs.make_entry("fake_kernel", {"dtype": "bf16", "head_dim": 64, "bucket": 128}, candidates[1])])
    launched = []
    chosen = chooser.choose(key, launched.append, device=torch.device("cpu"))
    assert chosen is candidates[1]
    assert launched == [] and chooser.stats() == {"single": 0, "table": 1, "timed": 0}
    assert chooser.choose(key, launched.append, device=torch.device("cpu")) is candidates[1]  # cached


def test_chooser_times_when_the_table_is_for_another_device(utils, fake_device, monkeypatch):
    import triton.testing

    candidates = _configs(utils)
    chooser = utils.ConfigChooser("fake_kernel", candidates, key_names=("dtype", "head_dim", "bucket"))
    other = configs.DeviceIdentity(FAKE.name, (8, 0), FAKE.triton)  # same name, another architecture
    fake_device([configs.make_entry("fake_kernel", {"dtype": "bf16", "head_dim": 64, "bucket": 128}, candidates[1])],
                identity=other)
    times = {16: 3.0, 32: 2.0, 64: 1.0}
    timed = []

    def do_bench(fn, **kwargs):
        fn()
        return times[timed[-1].kwargs["BLOCK_M"]]

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    chosen = chooser.choose((torch.bfloat16, 64, 128), timed.append, device=torch.device("cpu"))
    assert chosen is candidates[2] and len(timed) == 3
    assert chooser.stats()["timed"] == 1
    assert sorted(chooser.timings[(torch.bfloat16, 64, 128)].values()) == [1.0, 2.0, 3.0]


def test_table_entry_that_is_not_a_candidate_is_ignored(utils, fake_device, monkeypatch):
    import triton
    import triton.testing

    candidates = _configs(utils)
    chooser = utils.ConfigChooser("fake_kernel", candidates, key_names=("dtype", "head_dim", "bucket"))
    stale = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3)  # not shipped here
    fake_device([configs.make_entry("fake_kernel", {"dtype": "bf16", "head_dim": 64, "bucket": 128}, stale)])
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kwargs: 1.0)
    with pytest.warns(UserWarning, match="not a candidate"):
        chosen = chooser.choose((torch.bfloat16, 64, 128), lambda c: None, device=torch.device("cpu"))
    assert chosen in candidates and chooser.stats()["timed"] == 1


def test_tables_switched_off(utils, fake_device, monkeypatch):
    candidates = _configs(utils)
    fake_device([configs.make_entry("fake_kernel", {"dtype": "bf16", "head_dim": 64, "bucket": 128}, candidates[1])])
    monkeypatch.setenv(configs.ENV_VAR, "off")
    configs.clear_cache()
    assert configs.table_for(FAKE) is None


def test_real_launcher_reads_the_table(fake_device, no_timing, monkeypatch, device):
    """The gated-linear launcher, with two candidates and a table for the fake device naming the second: the
    kernel runs with that config (right result), and nothing is timed. The table's key is written out by field
    name, as benchmarks.tune writes it, so this also pins the launcher's key layout."""
    import triton

    from fastflamingo.kernels import gated_linear as kernels
    from fastflamingo.ops import gated_linear as op

    alt = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)
    chooser = kernels.FWD_CHOOSER
    monkeypatch.setattr(chooser, "configs", [kernels.INTERPRETER_CONFIG, alt])
    monkeypatch.setattr(chooser, "prune", None)
    monkeypatch.setattr(chooser, "cache", {})
    monkeypatch.setattr(chooser, "sources", {})
    key = {"rows_bucket": kernels.row_bucket(30), "n": 24, "k": 40, "dtype": "fp32", "x_dtype": "fp32", "alpha_dtype": "fp32",
           "out_dtype": "fp32", "alpha_per_channel": False, "row_gate": False, "bias": False, "batched": False}
    assert set(key) == set(chooser.key_names)
    fake_device([configs.make_entry(chooser.name, key, alt)])
    launched = []
    original = kernels._gated_linear_fwd_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append(kwargs["BLOCK_M"])
                return original[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(kernels, "_gated_linear_fwd_kernel", Spy())
    x, inp = torch.randn(30, 24, device=device), torch.randn(30, 40, device=device)
    weight, alpha = torch.randn(24, 40, device=device) / 40 ** 0.5, torch.tensor([0.3], device=device)
    y = op.launch_fwd(x, inp, weight, None, alpha)
    assert launched == [16] and chooser.stats() == {"single": 0, "table": 1, "timed": 0}
    expected = x + torch.tanh(alpha) * (inp @ weight.T)
    assert (y - expected).abs().max() < 1e-5


def test_tune_dry_run_writes_a_table(tmp_path):
    """python -m benchmarks.tune --dry-run: the plumbing end to end (interpreter: one candidate, nothing timed)."""
    result = subprocess.run([sys.executable, "-m", "benchmarks.tune", str(tmp_path), "--dry-run", "--ops",
                             "gated_linear"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    (path,) = tmp_path.glob("dry-run-*.json")
    table = configs.load_table(path)
    assert table.identity.capability == (0, 0) and len(table) >= 1
    assert {e["kernel"] for e in table.entries.values()} >= {"gated_linear_fwd", "gated_linear_form"}
    forms = [e for e in table.entries.values() if e["kernel"] == "gated_linear_form"]
    assert all(e["form"] in ("fused", "splitk", "cublas") and set(e["key"]) == {"rows_bucket", "n", "k", "dtype"}
               for e in forms)
    assert table.generated["compiles"] == 0 and "gated_linear" in " ".join(table.generated["cells"])


@pytest.mark.parametrize("form", ["splitk", "cublas", "fused"])
def test_form_entry_routes_the_gated_projection(fake_device, form, monkeypatch, device):
    """A form entry in the GPU's table decides which kernels the gated projection launches for its key (ahead of
    the built-in shape rule); the result is right whichever form runs; a form this build lacks is ignored with a
    warning."""
    pytest.importorskip("triton")
    from fastflamingo.kernels import gated_linear as kernels
    from fastflamingo.ops import gated_linear as op

    monkeypatch.delenv("FASTFLAMINGO_GATED_LINEAR_FORM", raising=False)
    rows, n, k = 3, 24, 40
    key = configs.key_dict((kernels.row_bucket(rows), n, k, torch.float32), kernels.FORM_KEY)
    fake_device([configs.make_form_entry(kernels.FORM_TABLE_KERNEL, key, form)])
    launched = []
    for name in ("_gated_linear_fwd_kernel", "_gated_linear_epilogue_kernel"):
        original = getattr(kernels, name)

        class Spy:
            def __init__(self, name, original):
                self.name, self.original = name, original

            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    launched.append((self.name, kwargs.get("PARTIAL")))
                    return self.original[grid](*args, **kwargs)
                return launch

        monkeypatch.setattr(kernels, name, Spy(name, original))
    x, inp = torch.randn(rows, n, device=device), torch.randn(rows, k, device=device)
    weight, alpha = torch.randn(n, k, device=device) / k ** 0.5, torch.tensor([0.3], device=device)
    y = op.launch_fwd(x, inp, weight, None, alpha)
    expected = {"fused": [("_gated_linear_fwd_kernel", False)],
                "splitk": [("_gated_linear_fwd_kernel", True), ("_gated_linear_epilogue_kernel", None)],
                "cublas": [("_gated_linear_epilogue_kernel", None)]}[form]
    assert launched == expected
    assert (y - (x + torch.tanh(alpha) * (inp @ weight.T))).abs().max() < 1e-5

    fake_device([configs.make_form_entry(kernels.FORM_TABLE_KERNEL, key, "warp-speed")])
    with pytest.warns(UserWarning, match="warp-speed"):
        assert kernels.choose_form(rows, n, k, torch.float32, 4, torch.device(device)) == kernels.choose_form(
            rows, n, k, torch.float32, 4)
