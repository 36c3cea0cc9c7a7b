"""Timing and peak-memory measurement (docs/performance.md, "Protocol").

CUDA: ``triton.testing.do_bench`` (L2 flushed between reps) with quantiles [0.5, 0.2, 0.8]; the first call
(autotuning, ``torch.compile``) is timed on its own and reported as ``warmup_ms``, never mixed into the quantiles.
Peak memory is ``max_memory_allocated`` during one call minus ``memory_allocated`` before it.

CPU: a ``perf_counter`` loop after warm-up, for a fixed time budget per cell (at least ``MIN_REPS`` reps), same
quantiles. Peak memory is the growth of the process's peak resident set during one call: glibc is asked to return
free heap pages first (``malloc_trim``), the kernel's peak-RSS counter is reset (``/proc/self/clear_refs`` = 5,
Linux >= 4.0), the call runs, and ``VmHWM - VmRSS(before)`` is reported. This counts every page the call touched
(torch's CPU allocator does not cache, so freed tensors go back to glibc), including memory that was allocated
and freed within the call; threads' stacks and the small-allocation heap are noise below a megabyte.
"""
from __future__ import annotations

import ctypes
import dataclasses
import gc
import time
from typing import Callable, List, Optional

import torch

QUANTILES = (0.5, 0.2, 0.8)
MIN_REPS = 3
MAX_REPS = 1000


@dataclasses.dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    warmup_ms: float  # the first call alone (compile / autotune / lazy init)


def quantile(sorted_values: List[float], q: float) -> float:
    # linear interpolation, as torch.quantile / numpy default (do_bench uses torch.quantile)
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device: str, budget_s: float, grad_to_none=None) -> Timing:
    """Median / p20 / p80 of ``fn`` in ms. ``grad_to_none``: tensors whose ``.grad`` is reset before every rep
    (outside the timed region on CPU; do_bench does the same on CUDA)."""

    def reset_grads():
        for t in grad_to_none or ():
            t.grad = None

    reset_grads()
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    warmup_ms = (time.perf_counter() - start) * 1e3
    if device == "cuda":
        return _time_cuda(fn, budget_s, grad_to_none, warmup_ms)
    # CPU warm-up: one more call (allocator / thread pool steady state) unless the first call already ate the budget
    if warmup_ms < budget_s * 1e3 / 4:
        reset_grads()
        fn()
    times = []
    deadline = time.perf_counter() + budget_s
    while len(times) < MIN_REPS or (time.perf_counter() < deadline and len(times) < MAX_REPS):
        reset_grads()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    med, p20, p80 = (quantile(times, q) for q in QUANTILES)
    return Timing(med, p20, p80, len(times), warmup_ms)


def _time_cuda(fn, budget_s, grad_to_none, warmup_ms) -> Timing:
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        # warmup/rep are time budgets in ms; do_bench flushes L2 by writing a 256 MB buffer before each rep
        med, p20, p80 = do_bench(
            fn, warmup=25, rep=max(20, int(budget_s * 1e3)), grad_to_none=grad_to_none, quantiles=list(QUANTILES)
        )
        # do_bench does not return its rep count; estimate it from its own rule (rep budget / median)
        reps = max(1, int(max(20, budget_s * 1e3) / max(med, 1e-6)))
        return Timing(med, p20, p80, reps, warmup_ms)
    # no triton: CUDA events, no L2 flush (recorded in the note of the run's metadata)
    times = []
    for _ in range(max(MIN_REPS, 10)):
        for t in grad_to_none or ():
            t.grad = None
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    med, p20, p80 = (quantile(times, q) for q in QUANTILES)
    return Timing(med, p20, p80, len(times), warmup_ms)


# ------------------------------------------------------------------------------------------------------------
# Peak memory
# ------------------------------------------------------------------------------------------------------------

_LIBC = None


def _malloc_trim() -> None:
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_peak_supported() -> Optional[str]:
    """None when CPU peak-RSS measurement works here, else why not."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kb("VmHWM")
        return None
    except Exception as exc:
        return f"cannot reset/read peak RSS ({type(exc).__name__}: {exc})"


def peak_bytes(fn: Callable[[], object], device: str, before: Callable[[], None] = lambda: None) -> Optional[int]:
    """Extra memory at the peak of one ``fn()`` call over what was allocated just before it."""
    before()
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    if cpu_peak_supported() is not None:
        return None
    _malloc_trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status_kb("VmRSS")
    fn()
    peak = _status_kb("VmHWM")
    return max(0, peak - base) * 1024


