"""Ahead-of-time GPU compile check (``python -m fastflamingo.aot``), run without a GPU.

The kernels are compiled in a subprocess with TRITON_INTERPRET unset: in this pytest process conftest has turned
the interpreter on, and ``@triton.jit`` fixes interpreted vs compiled when a kernel module is imported.
"""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, interpret=None, code=None, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret is not None:
        env["TRITON_INTERPRET"] = interpret
    command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "fastflamingo.aot", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _table_rows(stdout):
    """Report rows: ``kernel variant... sm regs spill shared sec status``."""
    return [line.split() for line in stdout.splitlines()
            if len(line.split()) >= 8 and line.split()[-6] in ("80", "90")]


def test_quick_compile_has_no_spills():
    """One config per kernel of every family, sm_80 and sm_90: compiles, no spill, shared memory within limits."""
    pytest.importorskip("triton")
    result = _run(["--quick"])
    rows = _table_rows(result.stdout)
    bad = [" ".join(row) for row in rows if row[-1] != "ok"]
    assert result.returncode == 0 and not bad, result.stdout + result.stderr
    kernels = {row[0] for row in rows}
    assert {"media_xattn_fwd", "media_xattn_bwd_dkdv", "media_xattn_bwd_dq", "media_xattn_bwd_preprocess"} <= kernels
    assert {"perceiver_fwd", "perceiver_bwd", "gated_linear_fwd"} <= kernels  # every family is compiled
    assert {"media_decode_split", "media_decode_combine"} <= kernels
    assert {row[-6] for row in rows} == {"80", "90"}


def test_aot_unsets_the_interpreter():
    """Run with TRITON_INTERPRET=1 in the environment: the tool switches it off itself."""
    pytest.importorskip("triton")
    result = _run(["--quick", "--arch", "90", "--family", "media_xattn"], interpret="1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert {row[0] for row in _table_rows(result.stdout)} >= {"media_xattn_fwd", "media_xattn_bwd_dq"}


def test_aot_refuses_interpreted_kernels():
    """Kernels imported under the interpreter cannot be compiled: a clear message and exit status 2."""
    pytest.importorskip("triton")
    code = ("import sys; import fastflamingo.kernels.media_xattn; "
            "from fastflamingo import aot; sys.exit(aot.main(['--quick']))")
    result = _run([], interpret="1", code=code)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "imported with TRITON_INTERPRET set" in result.stderr


def test_variants_cover_every_shipped_config():
    """The AOT registry compiles every GPU config the launchers may pick, for every dtype."""
    pytest.importorskip("triton")
    code = """
import torch
from fastflamingo.kernels import media_xattn as mod
seen = {(v.kernel, v.signature["Q"], v.constexprs["BLOCK_D"], v.constexprs.get("BLOCK_M"), v.constexprs.get("BLOCK_N"),
         v.num_warps, v.num_stages) for v in mod.aot_variants() if "Q" in v.signature}
names = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
missing = []
for dtype, name in names.items():
    for head_dim in (64, 128):
        for kind in ("fwd", "dkdv", "dq"):
            for c in mod.shipped_configs(kind, dtype, head_dim):
                kernel = {"fwd": "media_xattn_fwd"}.get(kind, f"media_xattn_bwd_{kind}")
                key = (kernel, name, head_dim, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"],
                       c.num_warps, c.num_stages)
                if key not in seen:
                    missing.append(key)
assert not missing, missing
print("covered", len(seen))
"""
    result = _run([], code=code)
    assert result.returncode == 0, result.stdout + result.stderr
