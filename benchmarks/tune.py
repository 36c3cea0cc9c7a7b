"""``python -m benchmarks.tune OUTDIR``: time every candidate launch config at the priority shapes and write a
tuned table for this GPU (``fastflamingo/configs/`` describes the format; commit the file there).

The priority cells of the benchmark suite (``python -m benchmarks --priority``: media_decode, gated_linear,
media_xattn, perceiver_attn and any other registered op with priority cells) run once through their ``fastflamingo``
provider, forward and, where the cell has one, backward, with tuned tables switched off, so every kernel's config
chooser times all the candidates it keeps for each autotune key it meets. The table then maps each (kernel, key) to
the fastest config and keeps every candidate's time; for every gated-projection shape the cells met it also times
the projection's three forms (fused GEMM, split-K, cuBLAS + epilogue) and stores the fastest as a form entry. It
also records how many kernels were compiled and how long that took (what a cold process pays before its first step;
a tuned table removes the timing, ``fastflamingo.warmup`` moves the rest ahead of time).

    python -m benchmarks.tune OUTDIR                 # CUDA: writes OUTDIR/<gpu>-sm<cc>-triton<x.y>.json
    python -m benchmarks.tune OUTDIR --dry-run       # CPU, Triton interpreter, toy shapes: the same plumbing

Under ``--dry-run`` the interpreter has one candidate per key, so nothing is timed; the table it writes names a
``dry-run`` device that no GPU matches.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional, Sequence


def _plans(args, device: str):
    from . import catalog
    from .__main__ import build_plans, parse_args

    ops = catalog.load_all()
    bench_args = parse_args(["--priority", "--providers", "fastflamingo", "--dtype", args.dtype]
                            + (["--ops", args.ops] if args.ops else []) + (["--dry-run"] if args.dry_run else []))
    _, plans = build_plans(bench_args, ops, device)
    return [p for p in plans if p.providers]


def _exercise(plan, device: str) -> None:
    """One forward (and backward where the cell times one) through the fastflamingo provider."""
    import torch

    provider = plan.providers[0]
    inputs = plan.op.make_inputs(plan.case, device, plan.dtype)
    runner = provider.build(inputs, plan.case, device, plan.dtype)
    try:
        wants_grad = any(p in ("bwd", "fwd+bwd") for p in plan.case.passes)
        with torch.set_grad_enabled(wants_grad):
            out = runner.forward()
        if isinstance(out, (tuple, list)):
            out = out[0]
        if wants_grad and isinstance(out, torch.Tensor) and out.requires_grad:
            out.backward(torch.randn_like(out))
        if device == "cuda":
            torch.cuda.synchronize()
    finally:
        if runner.close is not None:
            runner.close()


def _identity(device: str):
    from fastflamingo import configs

    if device == "cuda":
        import torch

        return configs.device_identity(torch.device("cuda"))
    from .results import device_name

    return configs.DeviceIdentity(f"dry-run {device_name('cpu').split(' (')[0]}", (0, 0),
                                  configs.triton_major_minor() or "none")


def collect_entries(timed_only: bool) -> List[Dict]:
    """One table entry per (chooser, key) chosen in this process: the fastest config and every candidate's time.
    ``timed_only``: leave out keys with a single candidate (nothing was compared, nothing to store)."""
    from fastflamingo import configs
    from fastflamingo.kernels import _utils

    entries = []
    for chooser in _utils.CHOOSERS:
        for key, config in sorted(chooser.cache.items(), key=lambda item: repr(item[0])):
            timings = chooser.timings.get(key, {})
            if timed_only and not timings:
                continue
            best = min(timings.values()) if timings else None
            entries.append(configs.make_entry(chooser.name, configs.key_dict(key, chooser.key_names), config,
                                              best, timings))
    return entries


def tune_forms(device: str) -> List[Dict]:
    """One form entry per gated-projection shape the cells launched (``FORM_KEYS_SEEN``): the three forms (fused
    GEMM, split-K, cuBLAS + epilogue) timed at the row bucket's size on the GPU. Under ``--dry-run`` (no timing on
    the CPU) the entries name the default form, so the plumbing is the same."""
    import torch

    from fastflamingo import configs
    from fastflamingo.kernels import _utils
    from fastflamingo.kernels import gated_linear as K
    from fastflamingo.ops import gated_linear as op

    entries = []
    for key in sorted(K.FORM_KEYS_SEEN, key=repr):
        rows, n, k, dtype = key
        fields = configs.key_dict(key, K.FORM_KEY)
        if device != "cuda":
            form = K.choose_form(rows, n, k, dtype, _utils.sm_count(torch.device(device)))
            entries.append(configs.make_form_entry(K.FORM_TABLE_KERNEL, fields, form))
            continue
        from triton.testing import do_bench

        x, inp = torch.randn(rows, n, device=device, dtype=dtype), torch.randn(rows, k, device=device, dtype=dtype)
        weight = torch.randn(n, k, device=device, dtype=dtype) * k ** -0.5
        alpha = torch.full((1,), 0.5, device=device, dtype=dtype)
        out = torch.empty_like(x)
        timings = {}
        for form in K.FORMS:
            # the fused form's first call times its own candidates (tables are off here); do_bench's warm-up
            # absorbs that
            timings[form] = do_bench(lambda: op.launch_fwd(x, inp, weight, None, alpha, out=out, form=form),
                                     warmup=25, rep=100)
        best = min(timings, key=timings.get)
        entries.append(configs.make_form_entry(K.FORM_TABLE_KERNEL, fields, best, timings))
    return entries


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tune", description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir", help="folder for the table (created)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, toy shapes")
    ap.add_argument("--ops", help="comma list of benchmark ops (default: every op with priority cells)")
    ap.add_argument("--dtype", help="fp32, fp16 or bf16 (default: bf16 on CUDA, fp32 with --dry-run)")
    args = ap.parse_args(argv)

    from fastflamingo import configs

    os.environ[configs.ENV_VAR] = "off"  # time every candidate, whatever tables exist
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
        from fastflamingo.kernels import _interpreter

        _interpreter.make_strict_and_bf16_exact()
    import torch

    import fastflamingo

    if not args.dry_run and not torch.cuda.is_available():
        print("benchmarks.tune: no CUDA device (use --dry-run on a CPU)", file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    args.dtype = args.dtype or ("fp32" if args.dry_run else "bf16")
    if args.dry_run:
        torch.set_num_threads(1)
    from fastflamingo.kernels import _utils

    stats = _utils.CompileStats()
    plans = _plans(args, device)
    start = time.perf_counter()
    failures = 0
    backend = "triton" if args.dry_run else "auto"  # the dry run sends CPU tensors to the interpreted kernels
    with stats.installed(), fastflamingo.backend(backend):
        for plan in plans:
            t0 = time.perf_counter()
            try:
                _exercise(plan, device)
                status = "ok"
            except Exception as exc:  # keep going: one broken cell must not cost the others' tuning
                failures += 1
                first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
                status = f"FAILED {type(exc).__name__}: {first}"
                traceback.print_exc(file=sys.stderr)
            print(f"{plan.op.name:<16} {plan.case.label:<44} {time.perf_counter() - t0:6.1f}s  {status}", flush=True)
    wall = time.perf_counter() - start

    entries = collect_entries(timed_only=not args.dry_run)
    with fastflamingo.backend(backend):
        entries += tune_forms(device)
    identity = _identity(device)
    from .results import git_commit

    generated = {
        "tool": "python -m benchmarks.tune" + (" --dry-run" if args.dry_run else ""),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": git_commit(),
        "torch": torch.__version__,
        "triton": configs.triton_major_minor(),
        "fastflamingo": fastflamingo.__version__,
        "dtype": args.dtype,
        "cells": [f"{p.op.name}: {p.case.label}" for p in plans],
        "compiles": stats.compiled,
        "compile_cache_hits": stats.cache_hits,
        "compile_s": round(stats.seconds, 1),
        "wall_s": round(wall, 1),
    }
    table = configs.TunedTable(identity, {configs.key_string(e["kernel"], e["key"]): e for e in entries},
                               generated=generated)
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    path = table.save(out / identity.filename())

    print(f"\n{'kernel':<26} {'key':<70} {'best config':<20} {'ms':>8}  candidates")
    for e in entries:
        key = ",".join(f"{k}={v}" for k, v in e["key"].items())
        timings = e.get("timings", {})
        label = e.get("form") or (min(timings, key=timings.get) if timings else "-")
        ms = f"{e['ms']:8.4f}" if "ms" in e else f"{'-':>8}"
        print(f"{e['kernel']:<26} {key[:70]:<70} {label:<20} {ms}  {len(timings)}")
    print(f"\n{len(entries)} entries from {len(plans)} cells ({failures} failed) in {wall:.0f} s; "
          f"{stats.compiled} kernels compiled in {stats.seconds:.0f} s ({stats.cache_hits} from the cache) -> {path}")
    return 1 if failures or not plans else 0


if __name__ == "__main__":
    sys.exit(main())
