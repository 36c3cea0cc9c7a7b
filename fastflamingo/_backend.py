"""Backend selection: which implementation serves an op.

``auto`` (the default) uses the Triton kernels for CUDA tensors when triton imports and the inputs are supported,
and the PyTorch path otherwise. ``torch`` always uses the PyTorch path. ``triton`` always uses the kernels and
raises :class:`BackendError` listing the reasons when it cannot serve the inputs; it never falls back silently.
Under ``TRITON_INTERPRET=1`` an explicit ``triton`` request runs the kernels on CPU tensors (that is how the
kernels are tested without a GPU).

The choice comes from, in order: the innermost ``with fastflamingo.backend(name):`` block of the calling thread
(per thread, like ``torch.no_grad``), then the ``FASTFLAMINGO_BACKEND`` environment variable, then ``auto``.

Under ``torch.compile`` / ``torch.export`` the choice is read once, when a function is traced, and becomes a guard of
the compiled code: both sources are read in a form Dynamo traces and guards on (a ``threading.local`` attribute and
an entry of the environment's dict, see :func:`environ`), so entering another ``fastflamingo.backend(...)`` block or
changing ``FASTFLAMINGO_BACKEND`` between compiled calls recompiles instead of reusing a stale choice. (A
``ContextVar``, which this module used before, cannot be traced: every op broke the graph.)
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Callable, Iterable, Iterator, List, Optional

import torch

BACKENDS = ("auto", "torch", "triton")
# Decode steps (at most this many new query tokens per sample) take the decode paths: the split-key Triton kernel,
# and one masked SDPA call on the PyTorch path. Shared so both backends switch at the same length.
DECODE_MAX_TOKENS = 8
_ENV_VAR = "FASTFLAMINGO_BACKEND"

# The innermost ``fastflamingo.backend(...)`` block of each thread, as attribute ``name`` (absent outside any block).
# Read with getattr(..., None): Dynamo guards on that form, but not on a class-level default of a threading.local
# subclass (torch 2.13), which would leave compiled code with a stale choice.
_override = threading.local()


def environ(name: str) -> Optional[str]:
    """``os.environ.get(name)``, in a form whose value Dynamo guards on.

    Dynamo guards on an environment variable that is set when a function is traced, but not on one that is unset
    (torch 2.13: no guard is installed for the missing key of ``os.environ``), so a variable set after tracing would
    be ignored. The dict behind ``os.environ`` gets a "key present / absent" guard, so it is read directly where
    CPython has it.
    """
    data = getattr(os.environ, "_data", None)
    if not isinstance(data, dict):  # not CPython's os._Environ: the plain read (unguarded when unset)
        return os.environ.get(name)
    raw = data.get(os.environ.encodekey(name))
    return None if raw is None else os.environ.decodevalue(raw)


class BackendError(RuntimeError):
    """An explicitly requested backend cannot serve the inputs; the message lists why."""


def _check_name(name: str, source: str) -> str:
    name = str(name).strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"{source}={name!r} is not a fastflamingo backend; choose one of {', '.join(BACKENDS)}")
    return name


def requested_backend() -> str:
    """The backend asked for right now: context manager, then environment, then ``auto``."""
    name = getattr(_override, "name", None)
    if name is not None:
        return name
    env = environ(_ENV_VAR)
    return _check_name(env, _ENV_VAR) if env else "auto"


@contextlib.contextmanager
def backend(name: str) -> Iterator[str]:
    """Force a backend inside a ``with`` block of the calling thread: ``with fastflamingo.backend("torch"): ...``."""
    previous, _override.name = getattr(_override, "name", None), _check_name(name, "backend")
    try:
        yield _override.name
    finally:
        if previous is None:  # back to "no block" exactly, which the compiled code traced outside any block
            del _override.name
        else:
            _override.name = previous


def interpret_mode() -> bool:
    """True when the Triton interpreter is on (kernels then run on CPU tensors)."""
    return (environ("TRITON_INTERPRET") or "0").strip().lower() in ("1", "true", "on", "yes")


_TRITON_STATE: Optional[tuple] = None


def triton_import_error() -> Optional[str]:
    """None when triton imports, else the reason it does not."""
    global _TRITON_STATE
    if torch.compiler.is_compiling() and sys.modules.get("triton") is not None:
        # torch.compile has imported triton already (torch._dynamo does when it can). Reading the cache below in
        # traced code would guard on it, and its first write, replayed after the graph ran, would fail that guard.
        return None
    if _TRITON_STATE is None:
        try:
            import triton  # noqa: F401

            _TRITON_STATE = (None,)
        except Exception as exc:  # ImportError, or a broken install raising anything else
            _TRITON_STATE = (f"triton does not import ({type(exc).__name__}: {exc})",)
    return _TRITON_STATE[0]


def device_reasons(tensors: Iterable[torch.Tensor]) -> List[str]:
    """Why the Triton kernels cannot run on these tensors' devices (empty list: they can)."""
    reasons = []
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        reasons.append(f"tensors are on different devices: {sorted(str(d) for d in devices)}")
    for dev in devices:
        if dev.type == "cuda":
            continue
        if dev.type == "cpu" and interpret_mode():
            continue
        reasons.append(f"tensors are on {dev} (the Triton kernels need CUDA, or TRITON_INTERPRET=1 for CPU tensors)")
    return reasons


def interpreter_bf16_reasons(tensors: Iterable[torch.Tensor]) -> List[str]:
    """bf16 ``tl.dot`` is wrong under the Triton interpreter (it multiplies raw bf16 bits, triton-lang/triton#11584)
    unless the fix of ``fastflamingo.kernels._interpreter`` is in place (the tests and the selftest's dry run
    install it): refuse bf16 CPU tensors there."""
    if not interpret_mode() or not any(t is not None and t.dtype == torch.bfloat16 and t.device.type == "cpu"
                                       for t in tensors):
        return []
    try:
        from triton.runtime import interpreter
    except Exception:  # triton missing or broken: triton_import_error() reports that
        return []
    if getattr(interpreter.InterpreterBuilder.create_dot, "_bf16_fixed", False):
        return []
    return ["bf16 under the Triton interpreter needs the bf16 tl.dot fix of fastflamingo.kernels._interpreter "
            "(the interpreter multiplies raw bf16 bits: triton-lang/triton#11584)"]


def choose(op: str, tensors: Iterable[torch.Tensor], input_reasons: Callable[[], List[str]]) -> str:
    """Pick ``"torch"`` or ``"triton"`` for one call of ``op``.

    ``input_reasons`` lists what the kernels do not support about these particular inputs (dtype, head size, ...);
    it is only called when the Triton path is still a candidate.
    """
    name = requested_backend()
    if name == "torch":
        return "torch"
    tensors = [t for t in tensors if t is not None]
    if name == "auto":
        if not tensors or any(t.device.type != "cuda" for t in tensors):
            return "torch"
        if triton_import_error() is not None or input_reasons():
            return "torch"
        return "triton"
    reasons = []
    err = triton_import_error()
    if err is not None:
        reasons.append(err)
    reasons += device_reasons(tensors)
    reasons += input_reasons()
    if reasons:
        raise BackendError(
            f"fastflamingo backend 'triton' cannot run {op}:\n  - " + "\n  - ".join(reasons)
            + "\nUse backend 'auto' or 'torch' (FASTFLAMINGO_BACKEND / fastflamingo.backend(...)) for these inputs."
        )
    return "triton"
