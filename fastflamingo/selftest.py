"""``python -m fastflamingo.selftest``: does this installation compute the right thing on this GPU?

Runs every kernel family at every launch config it ships for this GPU's architecture, once each and forced (no
autotuning), at head sizes 64, 96 and 128, in bf16 plus one fp16 and one fp32 case per kernel; decode runs with
one split and with several. Every output buffer starts filled with NaN, so an element a kernel fails to write
shows up as NaN, and every result is compared with the PyTorch path of the same op in fp32. One line per (kernel,
config) with the largest relative error and ``ok`` or ``FAIL``; the exit status is 1 when anything failed.

    python -m fastflamingo.selftest                  # on a CUDA machine (~90 s, mostly first compiles, in parallel)
    python -m fastflamingo.selftest --dry-run        # the same list at toy sizes under the Triton interpreter (CPU)
    python -m fastflamingo.selftest --family media_decode --list

Where the cases come from: each kernel family named in ``fastflamingo.ops.KERNEL_FAMILIES`` declares its
checks in its own ops module, ``fastflamingo/ops/<family>.py`` (listed in ``fastflamingo.ops.families()``), as
``selftest_cases(toy: bool) -> list[Case]`` beside its launchers; ``toy`` asks for interpreter-sized shapes. A new
family plugs in by writing that function; nothing here changes. The helpers below (:func:`shipped`, :func:`randn`,
:func:`nan_like`, :func:`tolerance`) keep the families' declarations short and alike.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
import time
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch

# (name, kernel output, PyTorch-path reference) triples returned by a case.
Checks = List[Tuple[str, torch.Tensor, torch.Tensor]]


@dataclasses.dataclass
class Case:
    """One forced launch of one kernel at one config, and what its outputs must equal.

    ``kernel``: the kernel under test (the name ``fastflamingo.aot`` reports, e.g. ``media_xattn_bwd_dq``).
    ``config``: the config label (``M64xN64-w4-s3``). ``detail``: dtype, head size, mode, shape.
    ``run(device)``: builds fresh random inputs on ``device``, launches with the forced config into NaN-filled
    outputs and returns ``(name, output, reference)`` triples; the reference is the PyTorch path in fp32.
    ``tol``: the largest relative error (max |out - ref| / max |ref|) accepted.
    """

    kernel: str
    config: str
    detail: str
    run: Callable[[torch.device], Checks]
    tol: float


# ----------------------------------------------------------------------------------------------------------------
# Helpers for the families' declarations
# ----------------------------------------------------------------------------------------------------------------

_TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
SELFTEST_DTYPES = (torch.bfloat16,)  # every config; plus one case each in EXTRA_DTYPES
EXTRA_DTYPES = (torch.float16, torch.float32)
HEAD_DIMS = (64, 96, 128)
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def tolerance(dtype: torch.dtype, grad: bool = False) -> float:
    """Relative error allowed against an fp32 reference: fp32 1e-4 (IEEE products in the kernels), fp16 5e-3,
    bf16 3e-2; twice that for gradients (one more rounding of the incoming gradient)."""
    return _TOLERANCE[dtype] * (2 if grad else 1)


def one_config_plan(config_of: Callable[[torch.dtype, int, int], object]) -> Iterable[tuple]:
    """``(dtype, head_dim, config)`` for a family that ships one config per (dtype, head tile, architecture), given
    ``config_of(dtype, head_dim, arch)``: bf16 at every head size of :data:`HEAD_DIMS`, fp16 at 64, fp32 at 128."""
    for dtype, head_dims in ((torch.bfloat16, HEAD_DIMS), (torch.float16, (64,)), (torch.float32, (128,))):
        for head_dim in head_dims:
            for config in shipped(lambda arch: [config_of(dtype, head_dim, arch)]):
                yield dtype, head_dim, config


def decode_cases(kernel: str, config_of: Callable[[torch.dtype, int, int], object], variants: Sequence[tuple],
                 run: Callable[..., Checks], shape_label: str) -> List[Case]:
    """The cases of a split-key decode family: every ``(dtype, head_dim, config)`` of :func:`one_config_plan` x
    ``variants`` ``(splits, label, run keywords)``; ``run(device, config=, splits=, dtype=, head_dim=, **keywords)``.
    Several splits also exercise the combine kernel."""
    from .kernels._utils import config_label

    cases = []
    for dtype, head_dim, config in one_config_plan(config_of):
        for splits, label, keywords in variants:
            cases.append(Case(kernel + ("" if splits == 1 else "+combine"), config_label(config),
                              f"{dtype_name(dtype)} d{head_dim} {label} splits {splits} {shape_label}",
                              functools.partial(run, config=config, splits=splits, dtype=dtype, head_dim=head_dim,
                                                **keywords), tolerance(dtype)))
    return cases


def randn(*shape, dtype: torch.dtype, device, scale: float = 1.0) -> torch.Tensor:
    """Random normal values, drawn in fp32 then rounded to ``dtype``; the reference sees the rounded values."""
    return (torch.randn(*shape, device=device) * scale).to(dtype)


def nan_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer full of NaN (unit last stride): an element the kernel does not write stays NaN."""
    return torch.full_like(t, float("nan"), memory_format=torch.contiguous_format)


def shipped(configs_of: Callable[[int], Sequence]) -> list:
    """The configs a family forces, given ``configs_of(arch)`` (its shipped list for an architecture): this GPU's
    list on a GPU; under the interpreter (``--dry-run``) every architecture's list, each config once, in order."""
    from .kernels import _utils

    archs = _utils.ARCHS if _utils.INTERPRET else (_utils.device_arch(),)
    out, seen = [], set()
    for arch in archs:
        for config in configs_of(arch):
            label = _utils.config_label(config)
            if label not in seen:
                seen.add(label)
                out.append(config)
    return out


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES[dtype]


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
    from .ops import KERNEL_FAMILIES  # torch only: no triton import

    return tuple(KERNEL_FAMILIES)


def family_cases(family: str, toy: bool) -> List[Case]:
    """The family's ``selftest_cases(toy)`` from ``fastflamingo.ops.<family>``; [] when it declares none."""
    from . import ops

    declare = getattr(ops.families().get(family), "selftest_cases", None)
    return list(declare(toy)) if declare is not None else []


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
    from .kernels import _interpreter

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
              f"(fastflamingo/ops/{family}.py: selftest_cases)")
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


if __name__ == "__main__":
    sys.exit(main())
