"""What can be benchmarked: ops, the shape cases of each op, and the providers that implement it.

An op module (``ops_*.py``) calls :func:`register_op` with an :class:`Op` and :func:`register_provider` for each
implementation. A new kernel or baseline plugs in with one more ``register_provider`` call; the harness, the
result files, the plots and the report pick it up by name.

Provider kinds, used for speedups:

- ``upstream``: the real OpenFlamingo / IDEFICS math, the denominator of "speedup vs upstream";
- ``baseline``: another public way to compute the same thing (SDPA, FlexAttention, flash-attn varlen, compile);
- ``fastflamingo``: this library;
- ``bound``: not a competitor but a speed-of-light reference (e.g. the GEMM alone); never "best other".
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence

PASSES = ("fwd", "bwd", "fwd+bwd")
KINDS = ("upstream", "baseline", "fastflamingo", "bound")


@dataclasses.dataclass
class Case:
    """One shape of one op. ``params`` is everything the op needs to build inputs; ``shots`` is the x axis."""

    op: str
    params: Dict[str, Any]
    label: str
    shots: int
    passes: Sequence[str] = PASSES
    providers: Optional[Sequence[str]] = None  # restrict providers for this case (priority cells); None = all


@dataclasses.dataclass
class Runner:
    """A provider bound to one set of inputs.

    ``forward()`` computes the op and returns one tensor (the thing compared to the reference and, for the
    backward passes, differentiated with a fixed random cotangent). Work done once per batch and reused across
    layers (a dense mask, a BlockMask, varlen packing) happens in ``Provider.build`` and is reported as
    ``prep_ms`` / ``prep_bytes``, not in the timed call.
    """

    forward: Callable[[], Any]
    prep_ms: Optional[float] = None
    prep_bytes: Optional[int] = None
    note: str = ""
    # rows of the output to compare with the reference (bool over the leading dims); None = all rows
    compare_rows: Any = None
    # extra passes that are not fwd/bwd (e2e generation): name -> callable(rep) returning a dict of metrics
    extra_passes: Dict[str, Callable[[], Dict[str, float]]] = dataclasses.field(default_factory=dict)
    # tensors whose .grad is reset between backward reps; None = the op inputs' ``leaves``
    leaves: Optional[list] = None
    # maps forward()'s output to the reference layout (varlen packing); None = identity
    unpack: Optional[Callable[[Any], Any]] = None
    # False for speed-of-light references that do not compute the op (GEMM alone)
    check: bool = True
    # called when the harness is done with this provider (undo a patch, free a model)
    close: Optional[Callable[[], None]] = None


@dataclasses.dataclass
class Provider:
    name: str
    kind: str
    build: Callable[..., Runner]  # build(inputs, case, device, dtype) -> Runner
    # None when usable on this device/dtype, else the reason it is skipped
    unavailable: Callable[[str, Any], Optional[str]] = lambda device, dtype: None
    description: str = ""
    devices: Sequence[str] = ("cpu", "cuda")  # devices where the provider runs by default (--providers overrides)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"provider {self.name}: kind {self.kind!r} not in {KINDS}")


@dataclasses.dataclass
class Op:
    """An op: shapes (``cases``), inputs, the fp32 reference, and analytic work for the roofline.

    - ``cases(profile)`` -> list of :class:`Case`; profiles: ``cpu`` (default on CPU), ``diagonal`` (default on
      CUDA, docs/performance.md, "Benchmark matrix"), ``full`` (grid), ``priority`` (docs/performance.md, "Priority cells"), ``quick``.
    - ``tiny(case)`` -> the same case at toy sizes (``--dry-run``).
    - ``make_inputs(case, device, dtype)`` -> an object with a ``leaves`` list (tensors/parameters that receive
      gradients; cleared between backward reps).
    - ``reference(inputs, case)`` -> fp32 output with fastflamingo semantics (rows without media are 0).
    - ``work(case, pass_, dtype)`` -> (flops, bytes), either may be None.
    """

    name: str
    description: str
    cases: Callable[[str], List[Case]]
    make_inputs: Callable[..., Any]
    reference: Optional[Callable[..., Any]] = None
    work: Callable[..., tuple] = lambda case, pass_, dtype: (None, None)
    tiny: Callable[[Case], Case] = lambda case: case
    default_devices: Sequence[str] = ("cpu", "cuda")  # ops run by default on these devices
    providers: Dict[str, Provider] = dataclasses.field(default_factory=dict)


OPS: Dict[str, Op] = {}
_LOADED = False
LOAD_ERRORS: Dict[str, str] = {}
# Op names before the one-stem-per-op rename: accepted by --ops and read from older result files.
ALIASES = {"xattn": "media_xattn", "decode": "media_decode", "gate": "gated_linear", "perceiver_core": "perceiver_attn"}


def canonical(name: str) -> str:
    """The current name of an op (``xattn`` -> ``media_xattn``); other names unchanged."""
    return ALIASES.get(name, name)


def register_op(op: Op) -> Op:
    if op.name in OPS:
        raise ValueError(f"op {op.name} registered twice")
    OPS[op.name] = op
    return op


def register_provider(op_name: str, provider: Provider) -> Provider:
    op = OPS[op_name]
    if provider.name in op.providers:
        raise ValueError(f"provider {provider.name} registered twice for op {op_name}")
    op.providers[provider.name] = provider
    return provider


def _op_modules():
    """The op modules, each imported on first use; a module that fails to import is reported, not fatal."""

    def ops_media_xattn():
        from . import ops_media_xattn  # noqa: F401

    def ops_media_decode():
        from . import ops_media_decode  # noqa: F401

    def ops_perceiver_attn():
        from . import ops_perceiver_attn  # noqa: F401

    def ops_gated_linear():
        from . import ops_gated_linear  # noqa: F401

    def ops_modules():
        from . import ops_modules  # noqa: F401

    def ops_resampler():
        from . import ops_resampler  # noqa: F401

    def ops_e2e():
        from . import ops_e2e  # noqa: F401

    def ops_mllama_xattn():
        from . import ops_mllama_xattn  # noqa: F401

    def ops_mllama_decode():
        from . import ops_mllama_decode  # noqa: F401

    def ops_train():
        from . import ops_train  # noqa: F401

    return (ops_media_xattn, ops_media_decode, ops_perceiver_attn, ops_gated_linear, ops_modules, ops_resampler,
            ops_e2e, ops_mllama_xattn, ops_mllama_decode, ops_train)


def load_all() -> Dict[str, Op]:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for load in _op_modules():
            try:
                load()
            except Exception as exc:  # keep the other ops usable
                LOAD_ERRORS[load.__name__] = f"{type(exc).__name__}: {exc}"
    return OPS
