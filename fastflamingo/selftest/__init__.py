"""``python -m fastflamingo.selftest``: does this installation compute the right thing on this GPU?

Runs every kernel family at every launch config it ships for this GPU's architecture, once each and forced (no
autotuning), at head sizes 64, 96 and 128, in bf16 plus one fp16 and one fp32 case per kernel; decode runs with
one split and with several. Every output buffer starts filled with NaN, so an element a kernel fails to write
shows up as NaN, and every result is compared with the PyTorch path of the same op in fp32. One line per (kernel,
config) with the largest relative error and ``ok`` or ``FAIL``; the exit status is 1 when anything failed.

    python -m fastflamingo.selftest                  # on a CUDA machine (~90 s, mostly first compiles, in parallel)
    python -m fastflamingo.selftest --dry-run        # the same list at toy sizes under the Triton interpreter (CPU)
    python -m fastflamingo.selftest --family media_decode --list

Where the cases come from: each kernel family named in ``fastflamingo.ops.KERNEL_FAMILIES`` declares its checks
in the module of this package with its stem, ``fastflamingo/selftest/<stem>.py``, as ``cases(toy: bool) ->
list[Case]``; ``toy`` asks for interpreter-sized shapes. The selftest sits above everything it checks: the launchers
of ``fastflamingo.ops`` know nothing of it, of the references it compares with or of the model families whose masks
it borrows. A new family adds its module and its line in :func:`family_modules`; ``case.py`` holds :class:`Case`
and the helpers that keep the declarations short and alike.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch

from .case import Case


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| in fp64 (absolute when the reference is all zeros); inf for NaN."""
    if actual.shape != expected.shape:
        return float("inf")
    if actual.numel() == 0:
        return 0.0
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if torch.isnan(a).any():
        return float("nan")
    scale = e.abs().max().item()
    diff = (a - e).abs().max().item()
    return diff / scale if scale > 0 else diff


# ----------------------------------------------------------------------------------------------------------------
# Collecting and running
# ----------------------------------------------------------------------------------------------------------------


def families() -> Tuple[str, ...]:
    from ..ops import KERNEL_FAMILIES  # torch only: no triton import

    return tuple(KERNEL_FAMILIES)


def family_modules() -> dict:
    """``{stem: module declaring its cases}`` for every kernel family that has one."""
    from . import gated_linear, media_decode, media_xattn, mllama_decode, mllama_xattn, perceiver_attn

    modules = {"media_xattn": media_xattn, "perceiver_attn": perceiver_attn, "gated_linear": gated_linear,
               "media_decode": media_decode, "mllama_xattn": mllama_xattn, "mllama_decode": mllama_decode}
    return {name: modules[name] for name in families() if name in modules}


def family_cases(family: str, toy: bool) -> List[Case]:
    """The family's ``cases(toy)`` from ``fastflamingo.selftest.<family>``; [] when it declares none."""
    module = family_modules().get(family)
    return list(module.cases(toy)) if module is not None else []


def collect(selected: Sequence[str], toy: bool) -> Tuple[List[Case], List[str]]:
    """Every case of the selected families (all when empty), and the families that declare none."""
    names = families()
    unknown = sorted(set(selected) - set(names))
    if unknown:
        raise SystemExit(f"unknown kernel families {unknown}; known: {list(names)}")
    cases, missing = [], []
    for family in names:
        if selected and family not in selected:
            continue
        found = family_cases(family, toy)
        cases += found
        if not found:
            missing.append(family)
    return cases, missing


@dataclasses.dataclass
class Outcome:
    index: int
    kernel: str
    config: str
    detail: str
    err: float
    tol: float
    worst: str
    seconds: float
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.err == self.err and self.err <= self.tol  # NaN fails

    def line(self) -> str:
        if self.error:
            verdict, err = f"FAIL {self.error}", "-"
        else:
            verdict = "ok" if self.ok else ("FAIL (NaN: an output element was not written)" if self.err != self.err
                                            else f"FAIL ({self.worst})")
            err = f"{self.err:.1e}"
        return (f"{self.kernel:<26} {self.config:<20} {self.detail:<32} max err {err:>7} (tol {self.tol:.0e}) "
                f"{self.seconds:5.1f}s  {verdict}")


def run_case(index: int, case: Case, device: torch.device) -> Outcome:
    torch.manual_seed(1000 + index)
    start = time.perf_counter()
    err, worst, error = 0.0, "", None
    try:
        for name, actual, expected in case.run(device):
            e = rel_err(actual, expected)
            if e != e or e > err or not worst:
                err, worst = e, name
            if e != e:
                break
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:  # a launch failure (out of resources, compile error) is a failed check, not a crash
        lines = str(exc).strip().splitlines()
        error = f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:200]
    return Outcome(index, case.kernel, case.config, case.detail, err, case.tol, worst,
                   time.perf_counter() - start, error)


def _prepare_dry_run() -> None:
    """The interpreter has to be on before any kernel module is imported (``@triton.jit`` decides then)."""
    os.environ["TRITON_INTERPRET"] = "1"
    from ..kernels import _interpreter

    _interpreter.make_strict_and_bf16_exact()


def _header(device: torch.device, dry_run: bool) -> str:
    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:
        triton_version = f"missing ({type(exc).__name__})"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        where = f"{p.name} sm_{p.major}{p.minor}"
    else:
        where = "CPU, Triton interpreter, toy sizes" if dry_run else "CPU"
    return f"fastflamingo selftest: {where}; torch {torch.__version__}, triton {triton_version}"


def _run_shard(cases: List[Case], shard: Tuple[int, int], device: torch.device) -> Iterable[Outcome]:
    k, n = shard
    for index, case in enumerate(cases):
        if index % n == k:
            yield run_case(index, case, device)


def _run_parallel(args, jobs: int, report: Callable[[Outcome], None]) -> List[Outcome]:
    """``jobs`` worker processes, each running every ``jobs``-th case and reporting JSON lines: the first compiles,
    most of a cold run's time, happen in parallel. ``report`` sees each outcome as it arrives (a run stopped by a
    time limit still shows what it checked)."""
    import queue
    import threading

    base = [sys.executable, "-m", "fastflamingo.selftest", *(["--dry-run"] if args.dry_run else [])]
    if args.family:
        base += ["--family", *args.family]
    procs = [subprocess.Popen(base + ["--shard", f"{k}/{jobs}"], stdout=subprocess.PIPE, text=True)
             for k in range(jobs)]
    arrived: "queue.Queue" = queue.Queue()

    def read(proc) -> None:
        for line in proc.stdout:
            if line.startswith("{"):
                arrived.put(Outcome(**json.loads(line)))
        if proc.wait() not in (0, 1):
            arrived.put(Outcome(-1, "worker", "-", f"shard exit {proc.returncode}", float("nan"), 0.0, "", 0.0,
                                f"worker process failed with exit status {proc.returncode}"))
        arrived.put(None)

    for proc in procs:
        threading.Thread(target=read, args=(proc,), daemon=True).start()
    outcomes, running = [], len(procs)
    try:
        while running:
            outcome = arrived.get()
            if outcome is None:
                running -= 1
                continue
            outcomes.append(outcome)
            report(outcome)
    except KeyboardInterrupt:  # a time limit: stop the workers, keep what was checked
        for proc in procs:
            proc.kill()
        print(f"interrupted: {len(outcomes)} checks done", flush=True)
    return sorted(outcomes, key=lambda o: o.index)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastflamingo.selftest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="the same cases at toy sizes under the Triton interpreter on the CPU")
    parser.add_argument("--family", nargs="*", default=[], help="only these kernel families")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--jobs", type=int, default=None,
                        help="worker processes (default: 8 on CUDA, 2 with --dry-run; at most one per core)")
    parser.add_argument("--shard", help=argparse.SUPPRESS)  # "k/n": a worker of --jobs (JSON lines out)
    args = parser.parse_args(argv)

    if args.dry_run:
        _prepare_dry_run()
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("fastflamingo.selftest: no CUDA device; `--dry-run` runs the same cases under the Triton interpreter",
              file=sys.stderr)
        return 2

    cases, missing = collect(args.family, toy=args.dry_run)
    if args.shard:
        k, n = (int(x) for x in args.shard.split("/"))
        failed = False
        for outcome in _run_shard(cases, (k, n), device):
            print(json.dumps(dataclasses.asdict(outcome)), flush=True)
            failed |= not outcome.ok
        return int(failed)

    print(_header(device, args.dry_run), flush=True)
    for family in missing:
        print(f"warning: kernel family {family} declares no selftest cases "
              f"(fastflamingo/selftest/{family}.py: cases)")
    if args.list:
        for case in cases:
            print(f"{case.kernel:<26} {case.config:<20} {case.detail}")
        print(f"{len(cases)} cases")
        return 0

    start = time.perf_counter()
    jobs = args.jobs if args.jobs is not None else min(2 if args.dry_run else 8, os.cpu_count() or 1)
    jobs = max(1, min(jobs, len(cases)))
    outcomes: List[Outcome] = []
    if jobs == 1:
        try:
            for outcome in _run_shard(cases, (0, 1), device):
                print(outcome.line(), flush=True)
                outcomes.append(outcome)
        except KeyboardInterrupt:  # a time limit: keep what was checked
            print(f"interrupted: {len(outcomes)} checks done", flush=True)
    else:
        outcomes = _run_parallel(args, jobs, lambda outcome: print(outcome.line(), flush=True))
    failed = [o for o in outcomes if not o.ok]
    lost = len(cases) - len([o for o in outcomes if o.index >= 0])
    print(f"\n{len(outcomes)} checks of {len(cases)} cases in {time.perf_counter() - start:.0f} s "
          f"({jobs} process{'es' if jobs > 1 else ''}): "
          + ("all ok" if not failed and not lost else f"{len(failed)} FAILED" + (f", {lost} not run" if lost else "")))
    return 1 if failed or lost or not cases else 0

