"""``python -m benchmarks``: the fastflamingo benchmark suite.

Default on CPU: the core cross-attention ``media_xattn`` and the whole ``MaskedCrossAttention`` module ``mca`` at 0,
4, 8, 16, 32 shots, 2048 text tokens, fp32, a few minutes on 2 cores. Default on CUDA: the realistic diagonal of
docs/performance.md for every op in bf16; ``--full`` for the grid, ``--priority`` for the priority cells,
``--dry-run`` for the same code paths at toy sizes on CPU. An op with a kernel is named by its stem
(``media_xattn``, ``media_decode``, ``perceiver_attn``, ``gated_linear``, ``mllama_xattn``, ``mllama_decode``).

Every run calibrates the device (copy GB/s, GEMM TFLOP/s), then writes
``benchmarks/results/<device>-<date>-<commit>.json|.csv`` (or into ``--out``) and prints a table.
"""
from __future__ import annotations

import argparse
import fnmatch
import sys
import time
from pathlib import Path

import torch

from . import catalog, report, shapes
from . import results as R
from .calibrate import calibrate
from .harness import Harness, Plan, Progress


def _csv(value):
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", help="comma list of ops (default: the device's default ops; see --list)")
    ap.add_argument("--providers", help="comma list of providers or patterns such as 'flex*' (default: every provider "
                    "available on the device, or the case's own list)")
    ap.add_argument("--exclude-providers", help="comma list of providers or patterns to leave out, e.g. 'flex*,compile*'")
    ap.add_argument("--shots", help="comma list of shot counts, e.g. 0,4,32")
    ap.add_argument("--dtype", help="comma list of fp32,fp16,bf16 (default: fp32 on CPU, bf16 on CUDA)")
    ap.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    ap.add_argument("--passes", help="comma list of fwd,bwd,fwd+bwd,gen (default: each case's passes)")
    ap.add_argument("--quick", action="store_true", help="fewer shapes (0 and 32 shots), shorter time budget")
    ap.add_argument("--full", action="store_true", help="the full grid (docs/performance.md) instead of the realistic diagonal")
    ap.add_argument("--priority", action="store_true", help="the priority cells of docs/performance.md (device check)")
    ap.add_argument("--dry-run", action="store_true", help="same code paths at toy sizes, forced onto the CPU")
    ap.add_argument("--budget", type=float, help="seconds of timing per cell (default: 0.4 CPU, 0.1 CUDA)")
    ap.add_argument("--deadline", type=float, help="stop measuring after this many seconds (rows say skipped)")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness gate")
    ap.add_argument("--plot", action="store_true", help="write PNG charts next to the results")
    ap.add_argument("--out", help="directory for the result files (default: benchmarks/results/)")
    ap.add_argument("--table-shots", help="shots shown in the final table (default: the largest run)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads for CPU runs (default: torch's choice)")
    ap.add_argument("--list", action="store_true", help="list ops and providers, then exit")
    return ap.parse_args(argv)


def _list(ops) -> None:
    for name, op in ops.items():
        print(f"{name}: {op.description} (default on: {', '.join(op.default_devices) or 'opt-in'})")
        for p in op.providers.values():
            print(f"    {p.name:22s} {p.kind:12s} {p.description} [{', '.join(p.devices)}]")
    for module, err in catalog.LOAD_ERRORS.items():
        print(f"(op module {module} failed to import: {err})")


def build_plans(args, ops, device):
    if args.dry_run:
        profile = "priority" if args.priority else "quick" if args.quick else ("cpu" if device == "cpu" else "diagonal")
    elif args.priority:
        profile = "priority"
    elif args.full:
        profile = "full"
    elif args.quick:
        profile = "quick"
    else:
        profile = "cpu" if device == "cpu" else "diagonal"
    wanted_ops = _csv(args.ops) or []
    if wanted_ops:
        unknown = [o for o in wanted_ops if o not in ops]
        if unknown:
            raise SystemExit(f"unknown op(s) {unknown}; known: {', '.join(ops)}")
        selected = [ops[o] for o in wanted_ops]
    elif args.priority:  # every op; each op's "priority" profile holds its priority cells (docs/performance.md) (or none)
        selected = list(ops.values())
    else:
        selected = [op for op in ops.values() if device in op.default_devices]
    dtype_names = _csv(args.dtype) or (["fp32"] if device == "cpu" else ["bf16"])
    dtypes = [shapes.DTYPES[d] for d in dtype_names]
    shots = [int(s) for s in _csv(args.shots)] if args.shots else None
    wanted_providers = _csv(args.providers)
    excluded = _csv(args.exclude_providers) or []
    plans = []
    for op in selected:
        for case in op.cases(profile, shots):
            if args.dry_run:
                case = op.tiny(case)
            if wanted_providers:
                names = [n for n in op.providers if any(fnmatch.fnmatchcase(n, w) for w in wanted_providers)]
            elif case.providers is not None:
                names = [p for p in case.providers if p in op.providers]
            else:
                names = [n for n, p in op.providers.items() if device in p.devices]
            names = [n for n in names if not any(fnmatch.fnmatchcase(n, x) for x in excluded)]
            for dtype in dtypes:
                plans.append(Plan(op, case, dtype, [op.providers[n] for n in names]))
    return profile, plans


def main(argv=None) -> int:
    args = parse_args(argv)
    ops = catalog.load_all()
    if args.list:
        _list(ops)
        return 0
    device = "cpu" if args.dry_run else (args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    for module, err in catalog.LOAD_ERRORS.items():
        print(f"warning: op module {module} failed to import: {err}", file=sys.stderr)
    # toy shapes gain nothing from intra-op threads, and on a shared machine OpenMP barriers then wait for
    # descheduled threads (ms per op): the dry run uses one thread unless told otherwise
    threads = args.threads or (1 if args.dry_run else None)
    if threads:
        torch.set_num_threads(threads)
    profile, plans = build_plans(args, ops, device)
    if not plans:
        raise SystemExit("nothing to run for these options (see --list)")
    budget = args.budget or (0.05 if args.dry_run else 0.25 if args.quick else 0.4 if device == "cpu" else 0.1)
    start = time.monotonic()
    meta = R.metadata(device, ["python -m benchmarks", *(sys.argv[1:] if argv is None else argv)])
    meta.update(profile=profile, dry_run=args.dry_run, budget_s=budget)
    out_dir = Path(args.out) if args.out else R.RESULTS_DIR
    result = R.ResultFile(meta, out_dir)
    print(f"fastflamingo benchmarks: {meta['device_name']}, torch {meta['torch']}, profile {profile}, "
          f"{len(plans)} shape x dtype plans -> {result.json_path}", file=sys.stderr)

    cal_dtype = shapes.DTYPES[(_csv(args.dtype) or ["bf16"])[0]] if device == "cuda" else torch.float32
    result.calibration = calibrate(device, cal_dtype, tiny=args.dry_run)
    c = result.calibration
    print(f"calibration: copy {c['copy_gbps']:.1f} GB/s, {c['gemm_dtype']} GEMM {c['gemm_n']}^3 "
          f"{c['gemm_tflops']:.3f} TFLOP/s", file=sys.stderr)
    result.save()

    deadline = None if args.deadline is None else start + args.deadline
    harness = Harness(device, budget, result, c, deadline, check=not args.no_check, passes=_csv(args.passes))
    harness.progress = Progress(sum(harness.count(p) for p in plans))
    for plan in plans:
        harness.run(plan)
    harness.progress.close()
    result.meta["wall_s"] = round(time.monotonic() - start, 1)
    result.save()

    rows = result.rows
    table_shots = [int(s) for s in _csv(args.table_shots)] if args.table_shots else None
    if table_shots is None:
        xs = [r["shots"] for r in rows if r["op"] != "gated_linear"]
        table_shots = [max(xs)] if xs else None
    shown = [r for r in rows if r["op"] == "gated_linear" or not table_shots
             or r["shots"] in table_shots]
    print()
    print(report.describe({"meta": result.meta, "calibration": c}))
    print(report.text_table(shown))
    print(f"\nresults: {result.json_path}\n         {result.csv_path}")
    if args.plot:
        from .plot import plot_file

        for png in plot_file(result.json_path):
            print(f"plot:    {png}")
    print(f"wall time: {result.meta['wall_s']:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
