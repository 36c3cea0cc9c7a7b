"""What can be benchmarked: ops, the shape cases of each op, and the providers that implement it.

An op module (``ops_*.py``, listed in :mod:`benchmarks.catalog`, which imports them) calls :func:`register_op` with
an :class:`Op` and :func:`register_provider` for each implementation. A new kernel or baseline plugs in with one more
``register_provider`` call; the harness, the result files, the plots and the report pick it up by name. An op is
named by its stem where it has a kernel (``media_xattn``, ``mllama_decode``, ...), and by nothing else.

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


# op name -> Op, filled by the op modules as they are imported (benchmarks.catalog.load_all imports them all)
OPS: Dict[str, Op] = {}


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
