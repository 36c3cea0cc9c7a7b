"""PNG charts of one result file: per op (and per fixed shape family: model, batch, mode, dtype), speedup vs
upstream and peak memory vs number of shots, one line per provider, one row of panels per pass.

Charts go next to the result file: ``<result-stem>-<op>-<family>.png``. One file = one device, so a chart never
mixes devices.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List

from . import results as R


def _family(row: Dict) -> str:
    p = row["params"]
    parts = [str(p.get("model", ""))]
    if "batch" in p:
        parts.append(f"B{p['batch']}")
    if row["op"] == "gated_linear":
        parts.append(f"M{p.get('m')}")
    if p.get("mode"):
        parts.append(p["mode"])
    parts.append(row["dtype"])
    return " ".join(parts)


def plot_file(path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    payload = R.load(path)
    R.add_speedups(payload["rows"])
    meta = payload["meta"]
    groups: Dict[tuple, List[Dict]] = {}
    for r in payload["rows"]:
        if r["status"] != "ok" or r.get("median_ms") is None:
            continue
        groups.setdefault((r["op"], _family(r)), []).append(r)
    written = []
    for (op, family), rows in sorted(groups.items()):
        shots = sorted({r["shots"] for r in rows})
        if len(shots) < 2 and op != "gated_linear":
            continue  # a single point per line says nothing a table does not
        passes = [p for p in ("fwd", "bwd", "fwd+bwd", "gen") if any(r["pass"] == p for r in rows)]
        providers = sorted({r["provider"] for r in rows})
        color = {prov: f"C{i % 10}" for i, prov in enumerate(providers)}  # same colour in every panel
        fig, axes = plt.subplots(len(passes), 2, figsize=(11, 3.2 * len(passes)), squeeze=False)
        for i, pass_ in enumerate(passes):
            ax_speed, ax_mem = axes[i]
            for prov in providers:
                pts = sorted((r["shots"], r) for r in rows if r["pass"] == pass_ and r["provider"] == prov)
                if not pts:
                    continue
                xs = [s for s, _ in pts]
                if pass_ == "gen":
                    ys = [r.get("tokens_per_s") for _, r in pts]
                else:
                    ys = [1.0 if r["provider_kind"] == "upstream" else r.get("speedup_vs_upstream") for _, r in pts]
                if any(y is not None for y in ys):
                    ax_speed.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", label=prov,
                                  color=color[prov])
                mem = [r.get("peak_mb") for _, r in pts]
                if any(m for m in mem):  # log axis: a zero growth is drawn as a gap
                    ax_mem.plot(xs, [m if m else float("nan") for m in mem], marker="o", label=prov,
                                color=color[prov])
            ax_speed.set_ylabel("tokens/s" if pass_ == "gen" else "speedup vs upstream (x)")
            ax_speed.set_title(f"{op} {pass_}: {'decode throughput' if pass_ == 'gen' else 'speedup'}")
            ax_mem.set_ylabel("peak memory (MB)")
            ax_mem.set_title(f"{op} {pass_}: peak memory over inputs")
            for ax in (ax_speed, ax_mem):
                ax.set_xlabel("shots (images - 1)")
                ax.set_xticks(shots)
                ax.grid(True, alpha=0.3)
            if pass_ != "gen":
                ax_speed.set_yscale("log")
            ax_mem.set_yscale("log")
            ax_speed.legend(fontsize=8)
        fig.suptitle(f"{op} | {family} | {meta['device_name']} | torch {meta['torch']} | "
                     f"{(meta.get('git_commit') or '?')[:8]}{' dirty' if meta.get('git_dirty') else ''}", fontsize=9)
        fig.tight_layout()
        out = path.with_name(f"{path.stem}-{op}-{re.sub(r'[^A-Za-z0-9]+', '_', family).strip('_')}.png")
        fig.savefig(out, dpi=90)
        plt.close(fig)
        written.append(out)
    return written
