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


SM = -11  # report rows: ``kernel variant... sm regs spill shared mma ldg stg atom instr sec status``


def _table_rows(stdout):
    return [line.split() for line in stdout.splitlines()
            if len(line.split()) >= 13 and line.split()[SM] in ("80", "90")]


def test_quick_compile_has_no_spills():
    """One config per kernel of every family, sm_80 and sm_90: compiles, no spill, shared memory within limits."""
    pytest.importorskip("triton")
    result = _run(["--quick"])
    rows = _table_rows(result.stdout)
    bad = [" ".join(row) for row in rows if row[-1] != "ok"]
    assert result.returncode == 0 and not bad, result.stdout + result.stderr
    kernels = {row[0] for row in rows}
    assert {"media_xattn_fwd", "media_xattn_bwd_dkdv", "media_xattn_bwd_dq", "attention_bwd_preprocess"} <= kernels
    assert {"perceiver_fwd", "perceiver_bwd", "gated_linear_fwd"} <= kernels  # every family is compiled
    assert {"media_decode_split", "media_decode_combine"} <= kernels
    assert {row[SM] for row in rows} == {"80", "90"}
    # every 16-bit tl.dot runs on tensor cores: the report's MMA column is never 0 for a bf16 kernel with a dot
    assert all(int(row[SM + 4]) > 0 for row in rows if "bf16" in row[1] and "preprocess" not in row[0]
               and "combine" not in row[0] and "epilogue" not in row[0]), result.stdout


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
    """The AOT registry compiles every GPU config the launchers may pick on each architecture: every bf16 and fp32
    config, the first fp16 config of each list; with and without the key-mask specialization."""
    pytest.importorskip("triton")
    code = """
import torch
from fastflamingo.kernels import media_xattn as mod
from fastflamingo.kernels._utils import ARCHS
seen = {(v.kernel, v.signature["Q"], v.constexprs["BLOCK_D"], v.constexprs["BLOCK_M"], v.constexprs["BLOCK_N"],
         v.num_warps, v.num_stages, v.constexprs["KEY_MASK"], arch)
        for v in mod.aot_variants() if "BLOCK_N" in v.args for arch in v.archs}
names = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
missing = []
for arch in ARCHS:
    for dtype, name in names.items():
        for head_dim in (64, 128):
            for kind in ("fwd", "dkdv", "dq"):
                for masked in (False, True):
                    configs = mod.shipped_configs(kind, dtype, head_dim, arch, specialized=masked)
                    for c in configs[:1] if dtype == torch.float16 else configs:
                        kernel = {"fwd": "media_xattn_fwd"}.get(kind, f"media_xattn_bwd_{kind}")
                        key = (kernel, name, head_dim, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                               c.num_stages, masked, arch)
                        if key not in seen:
                            missing.append(key)
assert not missing, missing
print("covered", len(seen))
"""
    result = _run([], code=code)
    assert result.returncode == 0, result.stdout + result.stderr


# Launches of every family at small shapes whose sizes and strides divide by 16 (or equal 1) exactly where the AOT
# variants' representative shapes do; each launcher runs on CPU tensors with its kernels replaced by a recorder.
_CAPTURE = r"""
import json, sys, torch
from fastflamingo.kernels import _utils as U, gated_linear as G, media_decode as D, media_xattn as X
from fastflamingo.kernels import mllama_decode as LD, mllama_xattn as LX, perceiver_attn as P, _attention as A
from fastflamingo.models.mllama import mask as M
from fastflamingo.ops import gated_linear as og, media_decode as od, media_xattn as ox, mllama_decode as old
from fastflamingo.ops import mllama_xattn as olx, perceiver_attn as op

FAMILIES = (X, D, P, G, LX, LD)
variants = [v for m in FAMILIES for v in m.aot_variants() if 90 in v.archs]  # before the kernels are replaced
launches = []

class Recorder:
    def __init__(self, fn):
        self.fn = fn
    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            launches.append((self.fn, dict(zip(self.fn.arg_names, args), **kwargs)))
        return launch

for module in FAMILIES + (A,):  # _attention holds the delta pre-pass shared by two families
    for name in [n for n in vars(module) if n.endswith("_kernel")]:
        setattr(module, name, Recorder(getattr(module, name)))

bf16 = torch.bfloat16
r = lambda *shape: torch.randn(*shape).to(bf16)
# media_xattn d64 (AOT: B16 T4096 H8 M33): B2 T64 H8 M3, 64 latents, k/v views of a fused projection
q, kv = r(2, 64, 8, 64), r(2, 3 * 64, 2, 8, 64)
tt = torch.zeros(2, 64, dtype=torch.int64); tt[:, 0] = 1; tt[:, 20] = 1; tt[:, 40] = 1; tt = tt.cumsum(1)
cfg = lambda kind: X.shipped_configs(kind, bf16, 64, 90)[0]
o, lse = ox.launch_fwd(q, kv[:, :, 0], kv[:, :, 1], tt, 3, 64, True, 0.125, cfg("fwd"))
for splits in (1, 3):  # dK/dV writing the gradients, and fp32 partials per token split
    ox.launch_bwd(r(2, 64, 8, 64), q, kv[:, :, 0], kv[:, :, 1], o, lse, tt, 3, 64, True, 0.125, cfg("dkdv"),
                  dq_config=cfg("dq"), dkdv_splits=splits)
# its key-mask specialization (AOT: d64 immediate, key_mask)
km = torch.arange(3 * 64).expand(2, -1) % 3 != 0
cfg = lambda kind: X.shipped_configs(kind, bf16, 64, 90, specialized=True)[0]
o, lse = ox.launch_fwd(q, kv[:, :, 0], kv[:, :, 1], tt, 3, 64, True, 0.125, cfg("fwd"), key_mask=km)
for splits in (1, 3):
    ox.launch_bwd(r(2, 64, 8, 64), q, kv[:, :, 0], kv[:, :, 1], o, lse, tt, 3, 64, True, 0.125, cfg("dkdv"),
                  dq_config=cfg("dq"), dkdv_splits=splits, key_mask=km)
# media_decode d64 (AOT: B1 H8 M33, 1 and 17 splits): one token, 3 media; with a key mask immediate with one split
# and all-previous with 17
q1 = r(1, 1, 8, 64); kv1 = r(1, 3 * 64, 2, 8, 64); tt1 = torch.tensor([[3]])
for splits in (1, 17):
    od.launch(q1, kv1[:, :, 0], kv1[:, :, 1], tt1, 3, 64, False, 0.125, D.shipped_config(bf16, 64, 90), splits)
    od.launch(q1, kv1[:, :, 0], kv1[:, :, 1], tt1, 3, 64, splits == 1, 0.125, D.shipped_config(bf16, 64, 90), splits,
              key_mask=km[:1])
# perceiver d64 (AOT: N528 L64 H8 P256): N4 L64 H8 P32
kvm, kvl, ql = r(4, 32, 2, 8, 64), r(4, 64, 2, 8, 64), r(4, 64, 8, 64)
pcfg = lambda kind: P.shipped_configs(kind, bf16, 64, 90)[0]
for splits in (1, 2):  # the results themselves, and fp32 partials per key split
    po, plse = op.launch_fwd(ql, kvm[:, :, 0], kvm[:, :, 1], kvl[:, :, 0], kvl[:, :, 1], 0.125, pcfg("fwd"),
                             splits=splits)
    op.launch_bwd(r(4, 64, 8, 64), ql, kvm[:, :, 0], kvm[:, :, 1], kvl[:, :, 0], kvl[:, :, 1], po, plse, 0.125,
                  pcfg("bwd"), splits=splits)
# gated linear, OpenFlamingo epilogue (AOT: 65536 x 4096 x 512): 64 x 64 x 32
og.launch_fwd(r(64, 64), r(64, 32), r(64, 32), None, r(1), None, G.shipped_configs(bf16, 90)[0])
# its decode forms (AOT: split-K at 4 x 4096 x 11008, cuBLAS + epilogue at 1 x 4096 x 512): 4 x 64 x 512, 1 x 64 x 32
og.launch_fwd(r(4, 64), r(4, 512), r(64, 512), None, r(1), form="splitk")
og.launch_fwd(r(1, 64), r(1, 32), r(64, 32), None, r(1), form="cublas")
# mllama prefill, 11B shape (AOT: B2 S2048 H32 Hkv8 d128, one image of 4 x 1601 keys): S64, cache-layout k/v
cam = torch.zeros(2, 64, 1, 4, dtype=torch.long); cam[:, 8:, 0] = 1
closed = M.from_cross_attention_mask(cam, 1601, "hf")
mq, mk = r(2, 64, 32, 128), r(2, 8, 4 * 1601, 128)
ranges = (closed.img_start, closed.img_end, closed.image_keys, closed.image_stride, closed.max_runs)
lcfg = lambda kind: LX.shipped_configs(kind, bf16, 128, 90)[0]
mo, mlse = olx.launch_fwd(mq, mk, mk, *ranges, 0.09, lcfg("fwd"))
olx.launch_bwd(r(2, 64, 32, 128), mq, mk, mk, mo, mlse, *ranges, 0.09, lcfg("dkdv"), dq_config=lcfg("dq"))
# mllama decode, 11B (AOT: B4 Tq1 H32 Hkv8, 4 units of 1601 keys, 1 and 8 splits, with and without the mask)
dq1, dk1 = r(4, 1, 32, 128), r(4, 8, 4 * 1601, 128)
additive = torch.zeros(4, 1, 1, 4 * 1601, dtype=bf16)
for mask in (additive, None):
    units, count, unit_len = M.decode_units(mask, 4 * 1601, 1601, 4, "cpu")
    for splits in (1, 8):
        old.launch(dq1, dk1, dk1, None if mask is None else mask[:, 0], units, count, unit_len, 0.09,
                   LD.shipped_config(bf16, 128, 90), splits)

report = []
for fn, args in launches:
    warps, stages = args.pop("num_warps"), args.pop("num_stages")
    ours = U.runtime_specialization(fn, args, warps, stages, 90)[1:4]
    names = U.constexpr_names(fn)
    types = U.AotVariant("", fn, args, 0, 0, "").signature
    same = [v for v in variants if v.fn is fn and v.num_warps == warps and v.num_stages == stages
            and all(v.args[n] == args[n] for n in names) and v.signature == types]
    if not same:
        report.append(f"{fn.__name__}: no AOT variant with the launch's constexprs {[(n, args[n]) for n in names]}")
        continue
    theirs = U.runtime_specialization(same[0].fn, same[0].args, warps, stages, 90)[1:4]
    if repr(ours) != repr(theirs):
        report.append(f"{fn.__name__} {same[0].label}: launch {ours} != AOT {theirs}")
print(json.dumps({"launches": len(launches), "problems": report}))
"""


def test_aot_compiles_the_specialization_a_launch_makes():
    """For every kernel, a real launcher call (kernels replaced by a recorder, CPU tensors) specializes exactly like
    the AOT variant of the same config: the same argument types, the same integers marked divisible by 16 or folded
    as the constant 1, the same aligned pointers (Triton's own rules, via kernels/_utils.runtime_specialization)."""
    pytest.importorskip("triton")
    result = _run([], code=_CAPTURE)
    assert result.returncode == 0, result.stdout + result.stderr
    import json

    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["launches"] >= 10 and not report["problems"], report


def test_save_and_compare(tmp_path):
    """--save writes the compiled-code report with each entry's Triton cache key; --compare passes against itself,
    taking every entry from the report (their keys are today's); it compiles an entry whose key differs or is
    absent (a report saved before keys were kept) and fails on its regression (a measure more than 2% worse, here
    registers) and names it, while a doctored figure under today's key is taken as saved (it stands for the very
    compile Triton's cache would skip); --no-reuse compiles everything and finds both; a report saved under another
    Triton release is refused (exit 2)."""
    pytest.importorskip("triton")
    import json

    saved = tmp_path / "aot.json"
    args = ["--quick", "--arch", "90", "--family", "perceiver_attn"]
    result = _run(args + ["--save", str(saved)])
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(saved.read_text())
    entries = report["entries"]
    assert entries and all(set(e) >= {"regs", "spill", "shared", "mma", "ldg", "stg", "instr", "hgmma"}
                           for e in entries.values())
    assert all(e["mma"] > 0 and e["hgmma"] > 0 for e in entries.values())  # bf16 on sm_90: warpgroup MMA
    assert report["measure"] and all(len(e["triton_cache_key"]) == 64 for e in entries.values()), report
    count = len(entries)
    assert count >= 3, entries
    result = _run(args + ["--compare", str(saved)])
    assert result.returncode == 0 and "REGRESSED (more than 2% worse, a new spill, or HGMMA lost): 0" in result.stdout
    assert f"{count} reused from {saved}" in result.stdout and ", 0 compiled" in result.stdout, result.stdout

    kept, changed, old = sorted(entries)[:3]
    worse = json.loads(saved.read_text())
    for key in (kept, changed):  # today's compile looks 10% worse than these
        worse["entries"][key]["regs"] = int(entries[key]["regs"] * 0.9)
    worse["entries"][changed]["triton_cache_key"] = "0" * 64  # saved for another compile
    del worse["entries"][old]["triton_cache_key"]
    tampered = tmp_path / "worse.json"
    tampered.write_text(json.dumps(worse))
    result = _run(args + ["--compare", str(tampered)])
    assert f"{count - 2} reused from {tampered}" in result.stdout and ", 2 compiled" in result.stdout, result.stdout
    assert result.returncode == 1 and f"{changed}: regs" in result.stdout, result.stdout + result.stderr
    assert f"{kept}: regs" not in result.stdout, result.stdout
    result = _run(args + ["--compare", str(tampered), "--no-reuse"])
    assert f"0 reused from {tampered}" in result.stdout and f", {count} compiled (--no-reuse)" in result.stdout
    assert result.returncode == 1 and f"{kept}: regs" in result.stdout and f"{changed}: regs" in result.stdout

    other = dict(report, triton="0.0.1")
    (tmp_path / "other.json").write_text(json.dumps(other))
    result = _run(args + ["--compare", str(tmp_path / "other.json")])
    assert result.returncode == 2 and "saved under triton 0.0.1" in result.stderr


def test_compare_verdicts():
    """The comparison itself, on made-up reports: growth within 2% is listed but passes, more fails, a new spill
    fails however small, a kernel that loses its warpgroup MMA fails, a missing entry fails, gains are listed."""
    from fastflamingo import aot

    def entry(**changes):
        base = dict(regs=200, spill=0, shared=65536, mma=36, ldg=60, stg=8, atom=0, instr=1300, hgmma=36, dots16=4)
        return dict(base, **changes)

    def row(key, **changes):
        kernel, label, arch = key.split(" | ")
        return dict(entry(**changes), kernel=kernel, label=label, arch=int(arch[3:]), error=None)

    keys = [f"k{i} | bf16 d128 | sm_90" for i in range(6)]
    baseline = {"entries": {key: entry() for key in keys}}
    rows = [row(keys[0]), row(keys[1], instr=1320), row(keys[2], regs=210), row(keys[3], spill=8),
            row(keys[4], hgmma=0, mma=64), row("new | bf16 d64 | sm_80", regs=100)]
    found = aot.compare(baseline, rows)
    assert [line.split(":")[0] for line in found["within"]] == [keys[1]]
    assert sorted(line.split(":")[0] for line in found["regressed"]) == [keys[2], keys[3], keys[4]]
    assert "lost HGMMA" in next(line for line in found["regressed"] if line.startswith(keys[4]))
    assert found["missing"] == [keys[5]] and found["new"] == ["new | bf16 d64 | sm_80"]
    assert not found["better"]
    assert aot.compare(baseline, [row(k, regs=150) for k in keys])["better"]
