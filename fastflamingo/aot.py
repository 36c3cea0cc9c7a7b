"""Compile every Triton kernel of fastflamingo for the GPU, ahead of time and without a GPU.

    python -m fastflamingo.aot [--quick] [--arch 80 90] [--jobs N] [--family NAME] [--save FILE] [--compare FILE]
                               [--no-reuse]

For each kernel family listed in ``fastflamingo.ops.KERNEL_FAMILIES``, its ``aot_variants()`` describe the
launches its launcher makes at representative shapes (every argument, as passed) for every shipped launch config of
each architecture, dtype and representative constexpr combination. The specialization comes from those arguments
by Triton's own rules (integers that are multiples of 16 or equal to 1, aligned pointers), so what is compiled is
the kernel a GPU launch compiles; ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` compiles it
for each architecture whose list ships the config (ptxas and cuobjdump ship inside the triton wheel). The report
lists registers per thread, local memory (stack bytes: register spills), shared memory and the compiled instruction
mix (from the SASS: tensor-core MMA instructions, global loads and stores, atomics, all instructions but NOPs) per
kernel/config/arch.
Exit status 1 on a compile error, a spill, more than ``MAX_REGISTERS`` (240) registers (a config that needs more is
one compiler release away from spilling), or shared memory over the architecture's per-block limit; 2 when the
environment cannot compile (triton missing, kernels already imported under the interpreter). CI runs it under the
pinned Triton and under the newest release (``PYTHONPATH=.triton-newest``, see tools/bootstrap.sh). A 16-bit
``tl.dot`` that compiles without tensor-core MMA instructions (HMMA on sm_80, HGMMA or HMMA on sm_90) fails too.

``--save FILE`` writes the report as JSON; ``--compare FILE`` checks this compile against a saved one, entry by entry
(kernel x variant x architecture): every measure (registers, spills, shared memory, MMA, global loads, stores and
atomics, total instructions) must be equal or lower, or at most 2% higher (listed, so a note can give the reason);
an entry may not lose its Hopper warpgroup MMA (HGMMA) nor disappear. The saved file names the Triton release; a
compare under another release exits 2, since the compiler, not the kernel, would explain the difference. The
baselines CI compares against live in ``benchmarks/results/aot/`` (one per Triton release it compiles with).

Each saved entry carries the key Triton's own compile cache names that compile by (``triton_cache_key``: the
sha256 ``triton.compile`` derives from Triton's own sources and libtriton, the kernel's source with the jit
functions it calls, the signature, constexprs and specialization attributes, ptxas' version and the target
architecture, the compile options and the cache-invalidating environment variables), computed by the functions
``triton.compile`` itself calls and checked against the hash of every compile this tool makes. ``--compare`` takes
an entry whose key equals today's from the saved report instead of compiling it: it is the compile Triton's
on-disk cache would skip, so its code, and every figure read from it, is the saved one. Only when the report was
also measured the same way (``measure``: this tool's SASS reading and cuobjdump's version). Everything else (a
changed kernel, option or release, an entry without a key) compiles; ``--no-reuse`` compiles everything.

The interpreter has to be off while the kernel modules are imported (``@triton.jit`` picks interpreted or compiled
at decoration time), so this module removes ``TRITON_INTERPRET`` from its environment before importing them. Run
it as its own process; compiled kernels land in triton's cache, so a second run is fast.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

# Opt-in shared memory per block (bytes): the launch limit the compiled kernel must fit.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
DEFAULT_ARCHS = (80, 90)

_VARIANTS: list = []  # filled before the worker pool forks


def _prepare_environment() -> Optional[str]:
    """Turn the interpreter off for this process; return why compiling is impossible, or None."""
    os.environ.pop("TRITON_INTERPRET", None)
    # Triton 3.9 warns on every compile that this default (fused multiply-add on) will change in 3.10; state it, so
    # the compiles stay those a launch makes today and the report stays readable
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    try:
        import triton  # noqa: F401
        from triton.runtime.interpreter import InterpretedFunction
    except Exception as exc:
        return f"triton does not import ({type(exc).__name__}: {exc})"
    for name, module in list(sys.modules.items()):
        if name.startswith("fastflamingo.kernels.") and module is not None:
            if any(isinstance(obj, InterpretedFunction) for obj in vars(module).values()):
                return (f"{name} was imported with TRITON_INTERPRET set, so its kernels are interpreted and cannot "
                        "be compiled; run `python -m fastflamingo.aot` as its own process")
    return None


def _families(selected: Sequence[str]) -> List[str]:
    from .ops import KERNEL_FAMILIES

    families = list(KERNEL_FAMILIES)
    if selected:
        unknown = sorted(set(selected) - set(families))
        if unknown:
            raise SystemExit(f"unknown kernel families {unknown}; known: {families}")
        families = [f for f in families if f in selected]
    return families


def _collect(families: Sequence[str], quick: bool) -> list:
    from .ops import kernel_modules

    modules = kernel_modules()
    variants = []
    for family in families:
        variants += modules[family].aot_variants(quick=quick)
    return variants


_RESOURCE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def _cuobjdump(cubin: bytes, option: str) -> str:
    """cuobjdump's listing of a compiled kernel (the tool ships inside the triton wheel)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        return subprocess.run([tool, option, handle.name], check=True, capture_output=True, text=True).stdout


def _cubin_resources(cubin: bytes) -> Dict[str, int]:
    text = _cuobjdump(cubin, "--dump-resource-usage")
    match = _RESOURCE.search(text)
    if match is None:
        raise RuntimeError(f"cannot read the resource usage from cuobjdump:\n{text}")
    regs, stack, _, local = (int(x) for x in match.groups())
    return {"regs": regs, "spill": stack + local}


_SASS_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")
# SASS opcodes per measure. LDGSTS is cp.async (global -> shared), UTMALDG / UTMASTG the Hopper tensor-memory copies
MIX = {
    "mma": ("HMMA", "HGMMA"),
    "ldg": ("LDG", "LDGSTS", "UTMALDG"),
    "stg": ("STG", "UTMASTG"),
    "atom": ("RED", "ATOM", "ATOMG", "REDG"),
}
MEASURES = ("regs", "spill", "shared", "mma", "ldg", "stg", "atom", "instr")
TOLERANCE = 0.02  # a measure may grow by this fraction (reported) before --compare calls it a regression
_DOT_16BIT = re.compile(r"tt\.dot\b[^\n]*?:\s*tensor<[0-9x]+x(?:bf16|f16)\b")


def _sass_mix(cubin: bytes) -> Dict[str, int]:
    """Instruction counts of the compiled kernel, from cuobjdump's SASS listing."""
    opcodes = [op for op in _SASS_OPCODE.findall(_cuobjdump(cubin, "-sass")) if op != "NOP"]
    mix = {name: sum(1 for op in opcodes if op in names) for name, names in MIX.items()}
    mix["hgmma"] = sum(1 for op in opcodes if op == "HGMMA")
    mix["instr"] = len(opcodes)
    return mix


def _launch(variant, arch):
    """``(source, target, options)`` of the compile a GPU launch of ``variant`` on ``sm_<arch>`` makes."""
    import triton

    from .kernels._utils import runtime_specialization

    target, signature, constexprs, attrs, options = runtime_specialization(
        variant.fn, variant.args, variant.num_warps, variant.num_stages, arch)
    source = triton.compiler.ASTSource(fn=variant.fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return source, target, options


def triton_cache_key(source, target, options: dict) -> Optional[str]:
    """The hash ``triton.compile(source, target=target, options=options)`` names its cache entry by, or None when
    this process has a hook installed that changes the compile stages (then nothing is reused).

    Computed by the same calls ``triton.compile`` makes before it looks into its cache (Triton 3.6 to 3.9):
    ``make_backend``, the backend's ``parse_options``, ``get_cache_invalidating_env_vars`` and ``get_cache_key``
    (``triton_key()``, ``source.hash()``, ``backend.hash()``, ``options.hash()``, the environment variables), so a
    release that keys differently keys this differently too. :func:`_compile_one` checks the result against the hash
    of the compile itself, so a release whose ``compile`` adds something this function misses fails loudly."""
    import hashlib

    import triton
    from triton.compiler import compiler

    if getattr(getattr(triton.knobs, "runtime", None), "add_stages_inspection_hook", None) is not None:
        return None
    backend = compiler.make_backend(target)
    options = backend.parse_options(dict(options or {}, **source.parse_options()))
    key = compiler.get_cache_key(source, backend, options, env_vars=compiler.get_cache_invalidating_env_vars())
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def measure_key() -> str:
    """What the figures of a compiled kernel depend on besides the compile: the code of this module that reads them
    from the cubin (the SASS opcode patterns and groups included) and the version of the cuobjdump that lists it."""
    import hashlib
    import inspect

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    version = subprocess.run([tool, "--version"], check=True, capture_output=True, text=True).stdout
    code = [inspect.getsource(f) for f in (_cuobjdump, _cubin_resources, _sass_mix, _measure)]
    text = repr((code, _RESOURCE.pattern, _SASS_OPCODE.pattern, _DOT_16BIT.pattern, MIX, version))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _measure(compiled) -> dict:
    """The report's figures of one compiled kernel."""
    row = dict(_cubin_resources(compiled.asm["cubin"]), shared=int(compiled.metadata.shared))
    row.update(_sass_mix(compiled.asm["cubin"]), dots16=len(_DOT_16BIT.findall(compiled.asm["ttir"])))
    return row


FIGURES = (*MEASURES, "hgmma", "dots16")  # what a report entry keeps of a compile


def _compile_one(job) -> dict:
    index, arch = job
    variant = _VARIANTS[index]
    row = {"kernel": variant.kernel, "label": variant.label, "arch": arch, "error": None}
    start = time.perf_counter()
    try:
        import triton

        source, target, options = _launch(variant, arch)
        key = triton_cache_key(source, target, options)
        compiled = triton.compile(source, target=target, options=options)
        if key is not None and key != compiled.hash:
            raise RuntimeError(f"triton {triton.__version__} cached this compile as {compiled.hash}, "
                               f"fastflamingo.aot.triton_cache_key computed {key}: the release keys its cache "
                               "differently, fix triton_cache_key before reusing saved entries")
        row["triton_cache_key"] = compiled.hash
        row.update(_measure(compiled))
    except Exception as exc:  # reported in the table; the exit status says it failed
        message = str(exc).strip().splitlines()
        row["error"] = f"{type(exc).__name__}: {message[-1] if message else ''}"[:300]
    row["seconds"] = time.perf_counter() - start
    return row


def _verdict(row: dict) -> str:
    from .kernels._utils import MAX_REGISTERS  # registers per thread a shipped config may use (why: see there)

    if row["error"]:
        return "ERROR"
    problems = []
    if row["spill"]:
        problems.append("SPILL")
    if row["regs"] > MAX_REGISTERS:
        problems.append("REGS")
    if row["shared"] > SHARED_MEMORY_LIMIT.get(row["arch"], min(SHARED_MEMORY_LIMIT.values())):
        problems.append("SMEM")
    if row["dots16"] and not row["mma"]:
        problems.append("NO-MMA")  # a 16-bit tl.dot the compiler lowered to FMAs
    return "+".join(problems) or "ok"


def _print_table(rows: List[dict], out=sys.stdout) -> None:
    header = (f"{'kernel':<28} {'variant':<36} {'sm':>3} {'regs':>4} {'spill':>5} {'shared':>7} {'mma':>4} {'ldg':>4} "
              f"{'stg':>4} {'atom':>4} {'instr':>6} {'sec':>5}  status")
    print(header, file=out)
    print("-" * len(header), file=out)
    for row in rows:
        if row["error"]:
            print(f"{row['kernel']:<28} {row['label']:<36} {row['arch']:>3} {'':>4} {'':>5} {'':>7} {'':>4} {'':>4} "
                  f"{'':>4} {'':>4} {'':>6} {row['seconds']:5.1f}  ERROR {row['error']}", file=out)
        else:
            print(f"{row['kernel']:<28} {row['label']:<36} {row['arch']:>3} {row['regs']:>4} {row['spill']:>5} "
                  f"{row['shared']:>7} {row['mma']:>4} {row['ldg']:>4} {row['stg']:>4} {row['atom']:>4} "
                  f"{row['instr']:>6} {row['seconds']:5.1f}  {_verdict(row)}", file=out)


def _key(row: dict) -> str:
    return f"{row['kernel']} | {row['label']} | sm_{row['arch']}"


def _save(path: str, rows: List[dict], args) -> None:
    import json

    import triton

    entries = {_key(r): dict({m: r[m] for m in FIGURES}, triton_cache_key=r["triton_cache_key"])
               for r in rows if not r["error"]}
    report = {"triton": triton.__version__, "archs": sorted(args.arch), "quick": args.quick,
              "families": args.family or "all", "measure": measure_key(), "entries": dict(sorted(entries.items()))}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as handle:
        json.dump(report, handle, indent=1)
        handle.write("\n")
    print(f"saved {len(entries)} entries to {path}")


def reusable(baseline: Optional[dict], measure: str, name: str, cache_key: Optional[str]) -> Optional[dict]:
    """The saved entry ``name`` of ``baseline`` when it may stand for today's compile: the report was measured the
    way this tool measures (``measure``) and the entry holds every figure and the very cache key Triton gives
    today's compile (``cache_key``; None, as for an entry saved without one, never matches). Otherwise None."""
    if baseline is None or cache_key is None or baseline.get("measure") != measure:
        return None
    entry = baseline["entries"].get(name)
    if not entry or entry.get("triton_cache_key") != cache_key or any(f not in entry for f in FIGURES):
        return None
    return entry


def _reuse(baseline: Optional[dict], jobs: list) -> Dict[tuple, dict]:
    """Report rows, by job, of the launches whose saved entry in ``baseline`` is today's compile (see
    :func:`reusable`); the other jobs compile."""
    if baseline is None:
        return {}
    measure, found = measure_key(), {}
    for index, arch in jobs:
        variant = _VARIANTS[index]
        row = {"kernel": variant.kernel, "label": variant.label, "arch": arch, "error": None}
        try:
            cache_key = triton_cache_key(*_launch(variant, arch))
        except Exception:  # the compile reports it
            cache_key = None
        entry = reusable(baseline, measure, _key(row), cache_key)
        if entry is not None:
            found[(index, arch)] = dict(row, **{f: entry[f] for f in FIGURES}, seconds=0.0,
                                        triton_cache_key=entry["triton_cache_key"])
    return found


def compare(baseline: dict, rows: List[dict]) -> Dict[str, List[str]]:
    """Entry-by-entry verdicts of this compile against a saved one: regressions, within-tolerance growth, gains."""
    current = {_key(r): r for r in rows if not r["error"]}
    found: Dict[str, List[str]] = {"regressed": [], "within": [], "better": [], "missing": [], "new": []}
    for key, old in baseline["entries"].items():
        new = current.get(key)
        if new is None:
            found["missing"].append(key)
            continue
        worse, within, better = [], [], []
        for measure in MEASURES:
            before, after = old[measure], new[measure]
            if after < before:
                better.append(f"{measure} {before}->{after}")
            elif after > before:
                limit = before * (1 + TOLERANCE)
                (within if after <= limit and measure != "spill" else worse).append(f"{measure} {before}->{after}")
        if old.get("hgmma") and not new["hgmma"]:
            worse.append("lost HGMMA (Hopper warpgroup MMA)")
        for name, items in (("regressed", worse), ("within", within), ("better", better)):
            if items:
                found[name].append(f"{key}: {', '.join(items)}")
    found["new"] = sorted(set(current) - set(baseline["entries"]))
    return found


def _print_compare(path: str, found: Dict[str, List[str]]) -> bool:
    titles = {"regressed": "REGRESSED (more than 2% worse, a new spill, or HGMMA lost)",
              "missing": "MISSING (in the saved report, not compiled now)",
              "within": "within 2% (give the reason in the change's note)",
              "better": "better", "new": "new (not in the saved report)"}
    print(f"\ncompare with {path}:")
    for name, title in titles.items():
        print(f"  {title}: {len(found[name])}")
        for line in found[name]:
            print(f"    {line}")
    return not (found["regressed"] or found["missing"])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastflamingo.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one config per kernel, bf16, head_dim 128")
    parser.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS), help="compute capabilities")
    parser.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    parser.add_argument("--family", nargs="*", default=[], help="only these kernel families")
    parser.add_argument("--save", metavar="FILE", help="write the report (JSON) to FILE")
    parser.add_argument("--compare", metavar="FILE", help="fail on any regression against the report saved in FILE")
    parser.add_argument("--no-reuse", action="store_true",
                        help="with --compare: compile every launch, also those whose saved entry has today's "
                             "Triton cache key")
    args = parser.parse_args(argv)

    problem = _prepare_environment()
    if problem:
        print(f"fastflamingo.aot: cannot compile: {problem}", file=sys.stderr)
        return 2
    baseline = None
    if args.compare:
        import json

        import triton

        with open(args.compare) as handle:
            baseline = json.load(handle)
        if baseline["triton"] != triton.__version__:
            print(f"fastflamingo.aot: {args.compare} was saved under triton {baseline['triton']}, this is triton "
                  f"{triton.__version__}: compare under the same release (or save a report for this one)",
                  file=sys.stderr)
            return 2
    _VARIANTS[:] = _collect(_families(args.family), args.quick)
    jobs = [(i, arch) for i, variant in enumerate(_VARIANTS) for arch in args.arch if arch in variant.archs]
    start = time.perf_counter()
    reused = _reuse(None if args.no_reuse else baseline, jobs)
    todo = [job for job in jobs if job not in reused]
    if args.jobs > 1 and len(todo) > 1:
        # fork: the workers inherit the collected variants (JIT functions do not pickle)
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            compiled = dict(zip(todo, pool.map(_compile_one, todo, chunksize=1)))
    else:
        compiled = {job: _compile_one(job) for job in todo}
    rows = [reused.get(job) or compiled[job] for job in jobs]
    _print_table(rows)

    failed = [r for r in rows if _verdict(r) != "ok"]
    import triton

    from .kernels._utils import MAX_REGISTERS

    print(f"\n{len(rows)} compiles of {len(_VARIANTS)} launches in {time.perf_counter() - start:.0f} s with triton "
          f"{triton.__version__} ({args.jobs} jobs); {len(failed)} failed")
    if baseline is not None:
        print(f"  {len(reused)} reused from {args.compare} (the same Triton cache key: the compile Triton's own cache "
              f"would skip), {len(todo)} compiled" + (" (--no-reuse)" if args.no_reuse else ""))
    for arch in args.arch:
        mine = [r for r in rows if r["arch"] == arch]
        compiled = [r for r in mine if not r["error"]]
        print(f"  sm_{arch}: {len(mine)} compiles, max registers {max((r['regs'] for r in compiled), default='-')}, "
              f"{sum(1 for r in compiled if r['regs'] > MAX_REGISTERS)} over {MAX_REGISTERS}, "
              f"{sum(1 for r in compiled if r['spill'])} spilling, {sum(1 for r in mine if r['error'])} errors")
    for row in failed:
        print(f"FAILED {_verdict(row)}: {row['kernel']} {row['label']} sm_{row['arch']}"
              + (f": {row['error']}" if row["error"] else ""), file=sys.stderr)
    if args.save:
        _save(args.save, rows, args)
    same = True
    if baseline is not None:
        archs = tuple(f"sm_{arch}" for arch in args.arch)
        entries = {k: v for k, v in baseline["entries"].items() if k.endswith(archs)}
        if args.family or args.quick:  # a partial compile is compared with the matching part of the saved report
            compiled = {_key(r) for r in rows}
            entries = {k: v for k, v in entries.items() if k in compiled}
        baseline = dict(baseline, entries=entries)
        same = _print_compare(args.compare, compare(baseline, rows))
        if not same:
            print(f"FAILED compare with {args.compare}", file=sys.stderr)
    return 1 if failed or not same else 0


if __name__ == "__main__":
    sys.exit(main())
