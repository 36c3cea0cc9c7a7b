"""Tuned launch configurations as data: one JSON table per (GPU name, compute capability, Triton major.minor).

A kernel family picks its launch config through a ``ConfigChooser`` (``fastflamingo/kernels/_utils.py``): on the
first call with a new autotune key it times every surviving candidate. When a table in this folder names the GPU
the call runs on (``torch.cuda.get_device_name``, its compute capability and the installed Triton's major.minor)
and holds an entry for the chooser's kernel and key, that entry is used with no timing at all. The tables are
written by ``python -m benchmarks.tune OUTDIR`` on the GPU itself and committed here.

A table file::

    {"format": 1,
     "device": {"name": "NVIDIA H200", "capability": [9, 0], "triton": "3.6"},
     "generated": {...provenance: date, commit, versions, compile count and time...},
     "entries": [{"kernel": "media_xattn_fwd",
                  "key": {"dtype": "bf16", "head_dim": 128, "immediate": true, "latents": 64,
                          "text_bucket": 4096, "media_bucket": 32},
                  "config": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
                  "ms": 0.41, "timings": {"M64xN64-w4-s3": 0.41, ...}}, ...]}

``key`` holds the chooser's autotune key by field name (dtype, head_dim, mode, length buckets, ...). An entry is
only honoured when its config is one of the candidates the chooser would time for that key (the shipped list of
the running architecture), so a stale or foreign table can never launch a config that ``fastflamingo.aot`` did not
check; such an entry is ignored and the key is autotuned as usual.

``FASTFLAMINGO_TUNED_CONFIGS``: extra table files or folders (``os.pathsep``-separated) searched before this
folder; ``off`` (or ``0``) disables tables altogether. Importing this module needs only the standard library and
torch (triton is imported only to read its version, when a CUDA device is looked up).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

FORMAT = 1
TABLE_DIR = Path(__file__).resolve().parent
ENV_VAR = "FASTFLAMINGO_TUNED_CONFIGS"
_DISABLED = ("0", "off", "false", "no", "none")
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclasses.dataclass(frozen=True)
class DeviceIdentity:
    """What a table is keyed by: the GPU's name as CUDA reports it, its compute capability, Triton major.minor."""

    name: str
    capability: Tuple[int, int]
    triton: str

    def as_json(self) -> Dict[str, Any]:
        return {"name": self.name, "capability": list(self.capability), "triton": self.triton}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "DeviceIdentity":
        return cls(str(data["name"]), tuple(int(c) for c in data["capability"]), str(data["triton"]))

    def filename(self) -> str:
        """``nvidia-h200-sm90-triton3.6.json``: the name under which ``benchmarks.tune`` writes the table."""
        slug = re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-") or "gpu"
        return f"{slug}-sm{self.capability[0]}{self.capability[1]}-triton{self.triton}.json"

    def __str__(self) -> str:
        return f"{self.name} (sm_{self.capability[0]}{self.capability[1]}, triton {self.triton})"


def triton_major_minor() -> Optional[str]:
    try:
        import triton
    except Exception:
        return None
    match = re.match(r"(\d+)\.(\d+)", triton.__version__)
    return f"{match.group(1)}.{match.group(2)}" if match else triton.__version__


def device_identity(device: torch.device) -> Optional[DeviceIdentity]:
    """The identity a table must name to serve ``device``; None for a non-CUDA device (the interpreter, CPU)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    triton = triton_major_minor()
    if triton is None:
        return None
    return DeviceIdentity(torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index)), triton)


# ----------------------------------------------------------------------------------------------------------------
# Keys and configs as JSON
# ----------------------------------------------------------------------------------------------------------------


def key_value(value: Any) -> Any:
    """A JSON-able form of one autotune-key field (dtypes by their short name)."""
    if isinstance(value, torch.dtype):
        return _DTYPE_NAMES.get(value, str(value).replace("torch.", ""))
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


def key_dict(key: Sequence[Any], names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """An autotune key tuple as a dict by field name (``k0``, ``k1``, ... for a chooser without names)."""
    key = tuple(key)
    if names is None or len(names) != len(key):
        names = [f"k{i}" for i in range(len(key))]
    return {name: key_value(value) for name, value in zip(names, key)}


def key_string(kernel: str, key: Mapping[str, Any]) -> str:
    """Canonical text of (kernel, key): what a lookup matches on."""
    return kernel + "|" + json.dumps(dict(key), sort_keys=True, separators=(",", ":"))


def config_dict(config) -> Dict[str, int]:
    """A ``triton.Config`` (or a plain mapping) as ``{"BLOCK_M": .., ..., "num_warps": .., "num_stages": ..}``."""
    if isinstance(config, Mapping):
        return {str(k): int(v) for k, v in config.items()}
    out = {str(k): int(v) for k, v in config.kwargs.items()}
    out.update(num_warps=int(config.num_warps), num_stages=int(config.num_stages))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TunedTable:
    """One table file: the device it was tuned on and its entries by (kernel, key)."""

    identity: DeviceIdentity
    entries: Dict[str, Dict[str, Any]]
    path: Optional[Path] = None
    generated: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def lookup(self, kernel: str, key: Mapping[str, Any]) -> Optional[Dict[str, int]]:
        entry = self.entries.get(key_string(kernel, key))
        return None if entry is None or "config" not in entry else dict(entry["config"])

    def lookup_form(self, kernel: str, key: Mapping[str, Any]) -> Optional[str]:
        """The ``form`` of a form entry (the gated projection's choice among its kernels), or None."""
        entry = self.entries.get(key_string(kernel, key))
        return None if entry is None else entry.get("form")

    def __len__(self) -> int:
        return len(self.entries)

    def as_json(self) -> Dict[str, Any]:
        entries = sorted(self.entries.values(), key=lambda e: key_string(e["kernel"], e["key"]))
        return {"format": FORMAT, "device": self.identity.as_json(), "generated": self.generated,
                "entries": entries}

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.as_json(), indent=1) + "\n")
        return path


def make_entry(kernel: str, key: Mapping[str, Any], config, ms: Optional[float] = None,
               timings: Optional[Mapping[str, float]] = None) -> Dict[str, Any]:
    entry = {"kernel": kernel, "key": dict(key), "config": config_dict(config)}
    if ms is not None:
        entry["ms"] = round(float(ms), 5)
    if timings:
        entry["timings"] = {label: round(float(t), 5) for label, t in timings.items()}
    return entry


def make_form_entry(kernel: str, key: Mapping[str, Any], form: str,
                    timings: Optional[Mapping[str, float]] = None) -> Dict[str, Any]:
    """An entry that names a form (which of an op's kernels serves the key) instead of a launch config."""
    entry: Dict[str, Any] = {"kernel": kernel, "key": dict(key), "form": str(form)}
    if timings:
        entry["ms"] = round(float(timings[form]), 5)
        entry["timings"] = {name: round(float(t), 5) for name, t in timings.items()}
    return entry


def parse_table(data: Mapping[str, Any], path: Optional[Path] = None) -> TunedTable:
    """Validate a table's JSON; ValueError naming the file and the problem otherwise."""
    where = f"tuned config table {path}" if path else "tuned config table"
    if not isinstance(data, Mapping) or data.get("format") != FORMAT:
        raise ValueError(f"{where}: expected a JSON object with \"format\": {FORMAT}")
    try:
        identity = DeviceIdentity.from_json(data["device"])
        entries = {}
        for entry in data.get("entries", []):
            kernel, key = str(entry["kernel"]), dict(entry["key"])
            if "form" in entry:  # a form entry: no launch config
                entries[key_string(kernel, key)] = dict(entry, kernel=kernel, key=key, form=str(entry["form"]))
                continue
            config = config_dict(entry["config"])
            if "num_warps" not in config or "num_stages" not in config:
                raise ValueError(f"entry for {kernel} {key} lacks num_warps / num_stages")
            entries[key_string(kernel, key)] = dict(entry, kernel=kernel, key=key, config=config)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {type(exc).__name__}: {exc}") from None
    return TunedTable(identity, entries, path, dict(data.get("generated", {})))


def load_table(path) -> TunedTable:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"tuned config table {path}: {type(exc).__name__}: {exc}") from None
    return parse_table(data, path)


def search_paths() -> List[Path]:
    """Table files in lookup order: ``FASTFLAMINGO_TUNED_CONFIGS`` entries first, then this folder."""
    env = os.environ.get(ENV_VAR, "").strip()
    if env.lower() in _DISABLED:
        return []
    roots = [Path(p) for p in env.split(os.pathsep) if p] + [TABLE_DIR]
    files: List[Path] = []
    for root in roots:
        if root.is_dir():
            files += sorted(root.glob("*.json"))
        elif root.suffix == ".json":
            files.append(root)
    return files


def tables_enabled() -> bool:
    return os.environ.get(ENV_VAR, "").strip().lower() not in _DISABLED


def all_tables(paths: Optional[Iterable[Path]] = None) -> List[TunedTable]:
    """Every readable table on the search path (an unreadable file raises: a broken table is a bug to fix)."""
    return [load_table(p) for p in (search_paths() if paths is None else paths)]


def merged_table(identity: DeviceIdentity, paths: Optional[Iterable[Path]] = None) -> Optional[TunedTable]:
    """The entries of every table naming ``identity`` (an earlier file on the search path wins a key), or None."""
    matching = [t for t in all_tables(paths) if t.identity == identity]
    if not matching:
        return None
    entries: Dict[str, Dict[str, Any]] = {}
    for table in reversed(matching):
        entries.update(table.entries)
    return TunedTable(identity, entries, matching[0].path, matching[0].generated)


_CACHE: Dict[DeviceIdentity, Optional[TunedTable]] = {}
_LOCK = threading.Lock()
_GENERATION = [0]  # bumped by clear_cache: lookups memoised elsewhere key on it


def generation() -> int:
    return _GENERATION[0]


def table_for(identity: Optional[DeviceIdentity]) -> Optional[TunedTable]:
    """The (cached) merged table for a device identity; None without one or with tables switched off."""
    if identity is None or not tables_enabled():
        return None
    with _LOCK:
        if identity not in _CACHE:
            _CACHE[identity] = merged_table(identity)
        return _CACHE[identity]


def clear_cache() -> None:
    """Forget the tables read so far (after writing a table or changing ``FASTFLAMINGO_TUNED_CONFIGS``)."""
    with _LOCK:
        _CACHE.clear()
        _GENERATION[0] += 1


__all__ = [
    "DeviceIdentity", "TunedTable", "ENV_VAR", "TABLE_DIR", "device_identity", "key_dict", "key_string",
    "config_dict", "make_entry", "make_form_entry", "parse_table", "load_table", "search_paths", "all_tables",
    "merged_table", "table_for", "clear_cache", "generation", "tables_enabled", "triton_major_minor",
]
