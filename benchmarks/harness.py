"""The measuring loop: for each case and dtype, build the inputs once, then for each provider build it, check its
output against the fp32 reference (the correctness gate), and time + measure memory for each pass.

Passes:

- ``fwd``: inference forward under ``torch.no_grad()``;
- ``bwd``: backward alone (the graph is built outside the timed region, ``retain_graph=True``);
- ``fwd+bwd``: a training step's forward and backward;
- extra passes a runner declares (``gen``: end-to-end generation).

The backward passes use one fixed random cotangent per case. A failed gate still gets timed (so a broken kernel
is visible) but its rows say ``status = mismatch`` and never count as the best provider.
"""
from __future__ import annotations

import dataclasses
import gc
import sys
import time
import traceback
from typing import Dict, List, Optional, Sequence

import torch

from . import shapes
from .registry import Case, Op, Provider, Runner
from .timing import peak_bytes, time_call

# relative L2 error ||out - ref|| / ||ref|| allowed by the correctness gate; upstream computes its softmax in the
# input dtype, so bf16 needs the most room
TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}


@dataclasses.dataclass
class Plan:
    op: Op
    case: Case
    dtype: torch.dtype
    providers: List[Provider]


class Progress:
    """One status line, rewritten in place on a terminal and printed line by line into a log file."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.done, self.stream = total, 0, stream
        self.start = time.monotonic()
        self.tty = stream.isatty()

    def update(self, text: str, step: int = 0) -> None:
        self.done += step
        elapsed = time.monotonic() - self.start
        line = f"[{self.done:4d}/{self.total}] {elapsed:6.1f}s  {text}"
        if self.tty:
            self.stream.write("\r" + line[:150].ljust(150))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
        self.stream.flush()


def _error_reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _status_of(exc: BaseException) -> str:
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return "oom"
    if isinstance(exc, (NotImplementedError, ImportError)) or any(
        m in str(exc) for m in ("No available kernel", "No viable backend")
    ):
        return "skipped"
    if isinstance(exc, UserWarning):  # sdpa_kernel warnings turned into errors: the backend rejected the inputs
        return "skipped"
    return "error"


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def rel_error(out, ref, rows) -> float:
    out = out.detach().float()
    if rows is not None:
        out, ref = out[rows], ref[rows]
    denom = ref.norm()
    diff = (out - ref).norm()
    if not torch.isfinite(diff):
        return float("inf")
    return float(diff / denom) if denom > 0 else float(diff)


class Harness:
    def __init__(self, device: str, budget_s: float, result_file, calibration: Dict, deadline: Optional[float],
                 check: bool = True, passes: Optional[Sequence[str]] = None, progress: Optional[Progress] = None):
        self.device = device
        self.budget_s = budget_s
        self.results = result_file
        self.calibration = calibration
        self.deadline = deadline
        self.check = check
        self.passes = passes
        self.progress = progress

    # -- rows ---------------------------------------------------------------------------------------------
    def _row(self, plan: Plan, provider: Provider, pass_: str, **fields) -> Dict:
        case = plan.case
        row = {
            "op": plan.op.name,
            "provider": provider.name,
            "provider_kind": provider.kind,
            "pass": pass_,
            "case": case.label,
            "shots": case.shots,
            "mode": case.params.get("mode"),
            "params": case.params,
            "dtype": shapes.DTYPE_NAMES[plan.dtype],
            "status": "ok",
            "reason": "",
        }
        row.update(fields)
        if row.get("median_ms") and pass_ in ("fwd", "bwd", "fwd+bwd"):
            flops, nbytes = plan.op.work(case, pass_, plan.dtype)
            seconds = row["median_ms"] * 1e-3
            if nbytes:
                row["gbps"] = nbytes / seconds / 1e9
                if self.calibration.get("copy_gbps"):
                    row["pct_copy_bw"] = 100 * row["gbps"] / self.calibration["copy_gbps"]
            if flops:
                row["tflops"] = flops / seconds / 1e12
                if self.calibration.get("gemm_tflops"):
                    row["pct_gemm"] = 100 * row["tflops"] / self.calibration["gemm_tflops"]
        self.results.rows.append(row)
        return row

    def _passes(self, plan: Plan, runner: Optional[Runner]) -> List[str]:
        passes = list(plan.case.passes)
        if runner is not None:
            passes += [p for p in runner.extra_passes if p not in passes]
        if self.passes:
            passes = [p for p in passes if p in self.passes]
        return passes

    def _skip_all(self, plan, provider, status, reason, runner=None):
        for pass_ in self._passes(plan, runner):
            self._row(plan, provider, pass_, status=status, reason=reason)
            self._tick(plan, provider, pass_, status)

    def _tick(self, plan, provider, pass_, status=""):
        if self.progress:
            self.progress.update(f"{plan.op.name}/{provider.name} {plan.case.label} {shapes.DTYPE_NAMES[plan.dtype]} "
                                 f"{pass_} {status}", step=1)

    def count(self, plan: Plan) -> int:
        return len(plan.providers) * len(self._passes(plan, None))

    # -- the loop -----------------------------------------------------------------------------------------
    def run(self, plan: Plan) -> None:
        op, case, dtype, device = plan.op, plan.case, plan.dtype, self.device
        if self._past_deadline():
            for provider in plan.providers:
                self._skip_all(plan, provider, "skipped", "time budget of the run exhausted (--deadline)")
            self.results.save()
            return
        try:
            torch.manual_seed(0)
            inputs = op.make_inputs(case, device, dtype)
            ref = op.reference(inputs, case) if (self.check and op.reference) else None
        except Exception as exc:
            reason = f"inputs/reference: {_error_reason(exc)}"
            for provider in plan.providers:
                self._skip_all(plan, provider, _status_of(exc), reason)
            self.results.save()
            _free(device)
            return
        for provider in plan.providers:
            self._run_provider(plan, provider, inputs, ref)
            self.results.save()
            _free(device)
        del inputs, ref
        _free(device)

    def _past_deadline(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def _run_provider(self, plan: Plan, provider: Provider, inputs, ref) -> None:
        device, dtype = self.device, plan.dtype
        reason = provider.unavailable(device, dtype)
        if reason:
            self._skip_all(plan, provider, "skipped", reason)
            return
        if self._past_deadline():
            self._skip_all(plan, provider, "skipped", "time budget of the run exhausted (--deadline)")
            return
        runner = None
        try:
            if self.progress:
                self.progress.update(f"{plan.op.name}/{provider.name} {plan.case.label}: build + check")
            runner = provider.build(inputs, plan.case, device, dtype)
            status, err, first_ms = "ok", None, None
            if ref is not None and runner.check:
                with torch.no_grad():
                    start = time.perf_counter()
                    out = runner.forward()  # the very first call: compile / autotune / lazy init land here
                    if device == "cuda":
                        torch.cuda.synchronize()
                    first_ms = (time.perf_counter() - start) * 1e3
                    if runner.unpack is not None:
                        out = runner.unpack(out)
                    err = rel_error(out, ref, runner.compare_rows)
                    del out
                if not err <= TOLERANCE[dtype]:
                    status = "mismatch"
        except Exception as exc:
            if _status_of(exc) == "error":
                traceback.print_exc(limit=3, file=sys.stderr)
            self._skip_all(plan, provider, _status_of(exc), f"build/check: {_error_reason(exc)}")
            if runner is not None and runner.close:
                runner.close()
            return
        note = runner.note
        if provider.kind == "fastflamingo":  # which Triton kernels actually ran (none: the PyTorch path served)
            kernels = sorted(m.rsplit(".", 1)[1] for m in sys.modules if m.startswith("fastflamingo.kernels."))
            note = f"{note}; triton kernels loaded: {', '.join(kernels) or 'none'}".lstrip("; ")
        common = dict(rel_err=err, prep_ms=runner.prep_ms, note=note, first_call_ms=first_ms,
                      prep_mb=None if runner.prep_bytes is None else runner.prep_bytes / 2**20)
        reason = f"rel_err {err:.2e} > {TOLERANCE[dtype]:.0e}" if status == "mismatch" else ""
        leaves = runner.leaves if runner.leaves is not None else getattr(inputs, "leaves", [])
        try:
            for pass_ in self._passes(plan, runner):
                if self._past_deadline():
                    self._row(plan, provider, pass_, status="skipped", reason="time budget of the run exhausted")
                    self._tick(plan, provider, pass_, "skipped")
                    continue
                try:
                    fields = self._measure(runner, pass_, leaves)
                    # an extra pass may carry its own verdict (e2e-of3b: generated tokens differ from upstream's)
                    row_status, row_reason = fields.pop("status", "ok"), fields.pop("reason", "")
                    if status != "ok" or row_status == "ok":
                        row_status, row_reason = status, reason
                    self._row(plan, provider, pass_, status=row_status, reason=row_reason, **common, **fields)
                    self._tick(plan, provider, pass_, row_status)
                except Exception as exc:
                    st = _status_of(exc)
                    if st == "error":
                        traceback.print_exc(limit=3, file=sys.stderr)
                    self._row(plan, provider, pass_, status=st, reason=f"{pass_}: {_error_reason(exc)}", **common)
                    self._tick(plan, provider, pass_, st)
                    _free(device)
        finally:
            if runner.close:
                runner.close()

    def _measure(self, runner: Runner, pass_: str, leaves) -> Dict:
        device = self.device
        if pass_ in runner.extra_passes:
            return runner.extra_passes[pass_]()

        def clear():
            for t in leaves:
                t.grad = None

        if pass_ == "fwd":
            def fn():
                with torch.no_grad():
                    return runner.forward()
            timing = time_call(fn, device, self.budget_s)
            peak = peak_bytes(fn, device)
        else:
            out = runner.forward()
            if not out.requires_grad:
                raise NotImplementedError("output does not require grad (no backward for this provider)")
            gen = torch.Generator(device="cpu").manual_seed(1)
            cot = torch.randn(out.shape, generator=gen).to(device=out.device, dtype=out.dtype)
            if pass_ == "bwd":
                def fn():
                    out.backward(cot, retain_graph=True)
            else:
                del out

                def fn():
                    runner.forward().backward(cot)
            timing = time_call(fn, device, self.budget_s, grad_to_none=leaves)
            peak = peak_bytes(fn, device, before=clear)
            clear()
            out = None
        return dict(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, reps=timing.reps,
                    warmup_ms=timing.warmup_ms, peak_mb=None if peak is None else peak / 2**20)
