"""Tables from result files: the console table printed at the end of a run, and the README's markdown table.

``python -m benchmarks.report`` prints a markdown table (and, with ``--plot``, redraws the charts) from the latest
result file of each device among the files committed under ``benchmarks/results/`` (``--any`` also takes
uncommitted files; ``FILE ...`` picks files explicitly).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from . import results as R

COLUMNS = [
    ("op", "op"), ("case", "shape"), ("dtype", "dtype"), ("pass", "pass"), ("provider", "provider"),
    ("median_ms", "median ms"), ("p20_p80", "p20-p80 ms"), ("speedup_vs_upstream", "x upstream"),
    ("speedup_vs_best_other", "x best other"), ("peak_mb", "peak MB"), ("gbps", "GB/s"), ("tflops", "TFLOP/s"),
    ("status", "status"),
]


def _fmt(value, key) -> str:
    if value is None or value == "":
        return "-"
    if key.startswith("speedup"):
        return f"{value:.2f}x"
    if key in ("median_ms",):
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    if key in ("peak_mb",):
        return f"{value:.1f}"
    if key in ("gbps",):
        return f"{value:.0f}" if value >= 10 else f"{value:.2f}"
    if key in ("tflops",):
        return f"{value:.2f}" if value < 10 else f"{value:.0f}"
    return str(value)


def _cells(row: Dict) -> List[str]:
    out = []
    for key, _ in COLUMNS:
        if key == "p20_p80":
            lo, hi = row.get("p20_ms"), row.get("p80_ms")
            out.append("-" if lo is None else f"{lo:.3g}-{hi:.3g}")
        elif key == "median_ms" and row.get("pass") == "gen" and row.get("tokens_per_s"):
            out.append(f"{row['tokens_per_s']:.1f} tok/s")
        elif key == "status":
            status = row.get("status", "")
            out.append(status if status == "ok" else f"{status}: {row.get('reason', '')[:60]}")
        else:
            out.append(_fmt(row.get(key), key))
    return out


def select(rows: Iterable[Dict], shots: Optional[List[int]] = None, passes: Optional[List[str]] = None,
           ops: Optional[List[str]] = None) -> List[Dict]:
    return [
        r for r in rows
        if (not shots or r.get("shots") in shots) and (not passes or r["pass"] in passes)
        and (not ops or r["op"] in ops)
    ]


def text_table(rows: List[Dict]) -> str:
    header = [h for _, h in COLUMNS]
    body = [_cells(r) for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    last_group = None
    for r, b in zip(rows, body):
        group = (r["op"], r["case"], r["dtype"], r["pass"])
        if last_group is not None and group[:2] != last_group[:2]:
            lines.append("")
        last_group = group
        lines.append("  ".join(c.ljust(w) for c, w in zip(b, widths)).rstrip())
    return "\n".join(lines)


def markdown_table(rows: List[Dict]) -> str:
    header = [h for _, h in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(c.replace("|", "/") for c in _cells(r)) + " |")
    return "\n".join(lines)


def describe(payload: Dict) -> str:
    m, c = payload["meta"], payload.get("calibration") or {}
    commit = (m.get("git_commit") or "?")[:10] + (" (dirty)" if m.get("git_dirty") else "")
    cal = ""
    if c:
        cal = (f"; measured ceilings: copy {c['copy_gbps']:.1f} GB/s, {c['gemm_dtype']} GEMM "
               f"{c['gemm_tflops']:.2f} TFLOP/s")
    return (f"{m['device_name']} | torch {m['torch']}, triton {m.get('triton')}, fastflamingo {m['fastflamingo']} | "
            f"commit {commit} | {m['date']}{cal}")


def latest_per_device(files: List[Path]) -> List[Path]:
    latest: Dict[str, Path] = {}
    for path in files:  # oldest first, so later files win
        try:
            latest[R.load(path)["meta"]["device_slug"]] = path
        except Exception:
            continue
    return list(latest.values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", help="result JSON files (default: latest committed file per device)")
    ap.add_argument("--any", action="store_true", help="also consider result files that are not committed")
    ap.add_argument("--shots", default=None, help="comma list of shots to show (default: all)")
    ap.add_argument("--pass", dest="passes", default=None, help="comma list of passes (default: all)")
    ap.add_argument("--ops", default=None, help="comma list of ops (default: all)")
    ap.add_argument("--plot", action="store_true", help="also redraw the PNG charts next to each result file")
    ap.add_argument("--text", action="store_true", help="a plain-text table (console) instead of markdown")
    args = ap.parse_args(argv)
    files = [Path(f) for f in args.files] or latest_per_device(R.result_files(committed_only=not args.any))
    if not files:
        print("no result files found (run `python -m benchmarks`; use --any for uncommitted files)", file=sys.stderr)
        return 1
    shots = [int(s) for s in args.shots.split(",")] if args.shots else None
    passes = args.passes.split(",") if args.passes else None
    ops = args.ops.split(",") if args.ops else None
    for path in files:
        payload = R.load(path)
        print(f"**{describe(payload)}** (`{path.name}`)\n")
        rows = select(payload["rows"], shots, passes, ops)
        print(text_table(rows) if args.text else markdown_table(rows))
        print()
        if args.plot:
            from .plot import plot_file

            for png in plot_file(path):
                print(f"![{png.stem}]({png.name})")
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
