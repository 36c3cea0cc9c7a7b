"""The compile check's reuse of saved entries (``python -m fastflamingo.aot --compare``): an entry is taken from the
saved report only when its Triton cache key equals the one Triton gives today's compile. tests/test_aot.py's
test_save_and_compare runs the tool with reuse.

The keys are computed in a subprocess with TRITON_INTERPRET unset (``@triton.jit`` picks interpreted or compiled at
decoration time, and conftest has turned the interpreter on here), for a small kernel written to a temporary module.
"""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

KERNEL = '''
import triton
import triton.language as tl


@triton.jit
def scale(x_ptr, y_ptr, n, factor, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    tl.store(y_ptr + offsets, tl.load(x_ptr + offsets, mask=inside) * factor{extra}, mask=inside)
'''

# each case: (module, n, BLOCK, arch, num_warps); the module "same" holds the source of "base" again
KEYS = '''
import importlib.util, json, sys
from fastflamingo import aot
assert aot._prepare_environment() is None
import torch, triton
from fastflamingo.kernels._utils import AotVariant, meta_tensor

def load(name):
    spec = importlib.util.spec_from_file_location(name, sys.argv[1] + "/" + name + ".py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.scale

cases = {"base": ("base", 1024, 128, 90, 4), "same": ("same", 1024, 128, 90, 4),
         "source": ("changed", 1024, 128, 90, 4), "constexpr": ("base", 1024, 256, 90, 4),
         "specialization": ("base", 1000, 128, 90, 4), "arch": ("base", 1024, 128, 80, 4),
         "warps": ("base", 1024, 128, 90, 8)}
keys, fns = {}, {}
for case, (module, n, block, arch, warps) in cases.items():
    fn = fns.setdefault(module, load(module))
    x, y = meta_tensor((n,), torch.float32), meta_tensor((n,), torch.float32)
    variant = AotVariant("scale", fn, dict(x_ptr=x, y_ptr=y, n=n, factor=2.0, BLOCK=block), warps, 3, case, (arch,))
    keys[case] = aot.triton_cache_key(*aot._launch(variant, arch))
    if case == "base":  # the key is the one Triton's own compile names its cache entry by
        source, target, options = aot._launch(variant, arch)
        keys["compiled"] = triton.compile(source, target=target, options=options).hash
keys["triton"] = triton.__version__
print(json.dumps(keys))
'''


def _keys(tmp_path, pythonpath=None):
    for name, extra in (("base", ""), ("same", ""), ("changed", " + 1.0")):
        (tmp_path / f"{name}.py").write_text(KERNEL.format(extra=extra))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    result = subprocess.run([sys.executable, "-c", KEYS, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """The keys under this process's Triton."""
    pytest.importorskip("triton")
    return _keys(tmp_path_factory.mktemp("keys"))


def test_cache_key_is_tritons_and_follows_every_input_of_the_compile(keys):
    """The key equals the hash of Triton's own compile, is the same for the same source, and changes with the
    kernel's source, a constexpr, the specialization (n no longer a multiple of 16), the architecture and the
    launch options."""
    assert keys["base"] and keys["base"] == keys["compiled"] == keys["same"], keys
    for case in ("source", "constexpr", "specialization", "arch", "warps"):
        assert keys[case] and keys[case] != keys["base"], (case, keys)


def test_cache_key_changes_across_triton_releases(keys, tmp_path):
    """The same kernel, launch and architecture keyed under the locked Triton and under the newest release
    (.triton-newest/, tools/bootstrap.sh): different keys, so a report is never reused across releases."""
    newest = os.path.join(ROOT, ".triton-newest")
    if not os.path.isdir(os.path.join(newest, "triton")):
        pytest.skip("no .triton-newest/ (bash tools/bootstrap.sh)")
    other = _keys(tmp_path, pythonpath=newest)
    if other["triton"] == keys["triton"]:
        pytest.skip(f".triton-newest/ holds this process's release, triton {keys['triton']}")
    assert keys["base"] != other["base"], (keys, other)
    assert other["base"] == other["compiled"], other


def test_reusable_only_on_equal_keys():
    """A saved entry stands for today's compile only with the same cache key, every figure, and a report measured
    the same way; an entry saved without a key (an older report), a missing entry or no report compiles."""
    from fastflamingo import aot

    figures = dict(regs=200, spill=0, shared=65536, mma=36, ldg=60, stg=8, atom=0, instr=1300, hgmma=36, dots16=4)
    name = "k | bf16 d128 | sm_90"
    report = {"measure": "m1", "entries": {name: dict(figures, triton_cache_key="abc")}}
    assert aot.reusable(report, "m1", name, "abc") == report["entries"][name]
    assert aot.reusable(report, "m1", name, "abd") is None  # another compile
    assert aot.reusable(report, "m1", name, None) is None  # a compile-stage hook installed: no key
    assert aot.reusable(report, "m2", name, "abc") is None  # figures read another way
    assert aot.reusable(report, "m1", "other | bf16 d64 | sm_90", "abc") is None
    assert aot.reusable(None, "m1", name, "abc") is None
    old = {"measure": "m1", "entries": {name: figures}}  # saved before keys were kept
    assert aot.reusable(old, "m1", name, "abc") is None
    assert aot.reusable({"entries": report["entries"]}, "m1", name, "abc") is None  # no measure recorded
    without_instr = {k: v for k, v in figures.items() if k != "instr"}
    partial = {"measure": "m1", "entries": {name: dict(without_instr, triton_cache_key="abc")}}
    assert aot.reusable(partial, "m1", name, "abc") is None
