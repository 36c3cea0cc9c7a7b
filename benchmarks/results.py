"""Result rows with provenance, speedups, and the JSON / CSV files under ``benchmarks/results/``.

One run = one ``<device-slug>-<YYYYmmdd-HHMMSS>-<commit>`` pair of files. The JSON holds the metadata (device,
versions, commit + dirty flag, calibration) and every row; the CSV repeats the metadata on each row in
Liger-Kernel's column layout (``kernel_name, kernel_provider, kernel_operation_mode, metric_name, ...``, one row
per metric), followed by our extra columns. The files are rewritten after every cell so a run that is killed
still leaves its data.

Speedups only compare rows of the same file, hence of the same device: one run never spans two devices.
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Dict, List, Optional

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent


def _git(*args) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> Optional[str]:
    """The checkout's commit; a tree copied without .git (a lent GPU machine) names it in FASTFLAMINGO_GIT_COMMIT."""
    return _git("rev-parse", "HEAD") or os.environ.get("FASTFLAMINGO_GIT_COMMIT")


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48]


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:
        return None


def metadata(device: str, argv: List[str]) -> Dict:
    import fastflamingo

    commit = git_commit()
    status = _git("status", "--porcelain", "--untracked-files=no")
    now = _dt.datetime.now().astimezone()
    name = device_name(device)
    meta = {
        "device": device,
        "device_name": name,
        "device_slug": slug(name.split("(")[0] if device == "cpu" else name),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "fastflamingo": fastflamingo.__version__,
        "python": platform.python_version(),
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
        "date": now.isoformat(timespec="seconds"),
        "argv": argv,
        "cpu_threads": torch.get_num_threads(),
    }
    if device == "cuda":
        meta["cuda"] = torch.version.cuda
        meta["cudnn"] = torch.backends.cudnn.version()
        props = torch.cuda.get_device_properties(0)
        meta["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        meta["sm_count"] = props.multi_processor_count
    return meta


def run_stem(meta: Dict) -> str:
    stamp = _dt.datetime.fromisoformat(meta["date"]).strftime("%Y%m%d-%H%M%S")
    commit = (meta.get("git_commit") or "nogit")[:8] + ("-dirty" if meta.get("git_dirty") else "")
    return f"{meta['device_slug']}-{stamp}-{commit}"


def cell_key(row: Dict) -> tuple:
    """Rows that compete with each other: same op, shape, dtype and pass (and, by construction, device)."""
    return (row["op"], row["case"], row["dtype"], row["pass"])


def add_speedups(rows: List[Dict]) -> None:
    """Fill ``speedup_vs_upstream`` and ``speedup_vs_best_other`` (+ which provider that was) in place.

    Only rows that ran and passed the correctness gate compete; ``bound`` providers are references, not rivals.
    """
    groups: Dict[tuple, List[Dict]] = {}
    for r in rows:
        groups.setdefault(cell_key(r), []).append(r)
    for group in groups.values():
        valid = [r for r in group if r["status"] == "ok" and r.get("median_ms")]
        upstream = [r for r in valid if r["provider_kind"] == "upstream"]
        for r in group:
            r["speedup_vs_upstream"] = None
            r["speedup_vs_best_other"] = None
            r["best_other"] = None
            if r not in valid:
                continue
            if upstream and r["provider_kind"] != "upstream":
                r["speedup_vs_upstream"] = upstream[0]["median_ms"] / r["median_ms"]
            others = [o for o in valid if o is not r and o["provider_kind"] != "bound"]
            if others and r["provider_kind"] != "bound":
                best = min(others, key=lambda o: o["median_ms"])
                r["speedup_vs_best_other"] = best["median_ms"] / r["median_ms"]
                r["best_other"] = best["provider"]


# Liger-Kernel's benchmark CSV columns, then ours
LIGER_COLUMNS = [
    "kernel_name", "kernel_provider", "kernel_operation_mode", "metric_name", "metric_unit", "x_name", "x_label",
    "x_value", "y_value_50", "y_value_20", "y_value_80", "extra_benchmark_config_str", "gpu_name", "timestamp",
    "liger_version",
]
EXTRA_COLUMNS = [
    "device", "device_slug", "torch_version", "triton_version", "git_commit", "git_dirty", "case", "dtype",
    "provider_kind", "status", "reason", "rel_err", "reps", "first_call_ms", "warmup_ms", "prep_ms", "prep_mb",
    "speedup_vs_upstream", "speedup_vs_best_other", "best_other", "gbps", "tflops", "pct_copy_bw", "pct_gemm", "note",
]


def _csv_rows(meta: Dict, rows: List[Dict]):
    for r in rows:
        common = {
            "kernel_name": r["op"],
            "kernel_provider": r["provider"],
            "kernel_operation_mode": r["pass"],
            "x_name": "shots",
            "x_label": "shots (images - 1)",
            "x_value": r["shots"],
            "extra_benchmark_config_str": json.dumps(r["params"], sort_keys=True),
            "gpu_name": meta["device_name"],
            "timestamp": meta["date"],
            "liger_version": meta["fastflamingo"],  # the version column holds fastflamingo's version
            "device": meta["device"],
            "device_slug": meta["device_slug"],
            "torch_version": meta["torch"],
            "triton_version": meta["triton"],
            "git_commit": meta["git_commit"],
            "git_dirty": meta["git_dirty"],
        }
        common.update({k: r.get(k) for k in EXTRA_COLUMNS if k in r})
        if r["pass"] == "gen":
            metrics = [("tokens_per_s", "tok/s", (r.get("tokens_per_s"),) * 3)]
        else:
            metrics = [("speed", "ms", (r.get("median_ms"), r.get("p20_ms"), r.get("p80_ms")))]
        metrics.append(("memory", "MB", (r.get("peak_mb"),) * 3))
        for name, unit, (y50, y20, y80) in metrics:
            yield dict(common, metric_name=name, metric_unit=unit, y_value_50=y50, y_value_20=y20, y_value_80=y80)


class ResultFile:
    """The JSON + CSV pair of one run; ``save()`` rewrites both from the rows so far."""

    def __init__(self, meta: Dict, out_dir: Path = RESULTS_DIR):
        self.meta = meta
        self.rows: List[Dict] = []
        self.calibration: Dict = {}
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = run_stem(meta)
        self.json_path = out_dir / f"{stem}.json"
        self.csv_path = out_dir / f"{stem}.csv"

    def save(self) -> None:
        add_speedups(self.rows)
        payload = {"meta": self.meta, "calibration": self.calibration, "rows": self.rows}
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=1, default=str))
        tmp.replace(self.json_path)
        with open(self.csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=LIGER_COLUMNS + EXTRA_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for row in _csv_rows(self.meta, self.rows):
                writer.writerow(row)


def load(path) -> Dict:
    return json.loads(Path(path).read_text())


def result_files(directory: Path = RESULTS_DIR, committed_only: bool = False) -> List[Path]:
    """Result JSONs, oldest first; ``committed_only`` keeps those tracked by git (read-only query)."""
    files = sorted(directory.glob("*.json"), key=lambda p: (load_date(p), p.name))
    if committed_only:
        tracked = _git("ls-files", str(directory))
        names = set(Path(t).name for t in (tracked or "").splitlines())
        files = [p for p in files if p.name in names]
    return files


def load_date(path: Path) -> str:
    try:
        return load(path)["meta"]["date"]
    except Exception:
        return ""
