"""Helpers shared by the kernel families of ``fastflamingo.kernels``: interpreter detection, dtype maps, stride
fixing, launch-config selection (a tiny explicit autotuner) and the ahead-of-time compile registry entry type.

This module imports triton; ``fastflamingo.kernels`` itself (``__init__``) does not.
"""
from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Callable, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import triton
from triton.runtime.errors import OutOfResources

# Read once at import: ``@triton.jit`` decides interpreted vs compiled when the decorator runs, so a later change
# of the environment would not change the kernels anyway (and reading triton.knobs inside code that torch.compile
# traces breaks the graph).
INTERPRET: bool = bool(triton.knobs.runtime.interpret)

LOG2E = 1.4426950408889634

TORCH_TO_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def head_block(head_dim: int) -> int:
    """Tile width for a head dimension: the next power of two, at least 16 (``tl.dot`` needs K >= 16)."""
    return max(16, next_power_of_2(head_dim))


def dot_precision(dtype: torch.dtype, allow_tf32: Optional[bool] = None) -> str:
    """``tl.dot``'s input precision for inputs of ``dtype``. fp32 follows ``torch.get_float32_matmul_precision()``
    (``allow_tf32`` None), like torch's own matmuls: "highest" (torch's default) keeps exact IEEE products, so fp32
    results agree with an fp32 reference to ~1e-6; "high" or "medium" allow TF32 tensor cores (about three decimal
    digits). fp16/bf16 use tensor cores regardless of this setting."""
    if dtype != torch.float32:
        return "tf32"
    if allow_tf32 is None:
        allow_tf32 = torch.get_float32_matmul_precision() != "highest"
    return "tf32" if allow_tf32 else "ieee"


def aot_dot_precisions(dtype: torch.dtype) -> Tuple[str, ...]:
    """Every ``DOT_PRECISION`` a launch with inputs of ``dtype`` may compile (what ``fastflamingo.aot`` checks)."""
    return ("ieee", "tf32") if dtype == torch.float32 else ("tf32",)


def length_bucket(n: int) -> int:
    """Next power of two (at most 2**16)."""
    return min(next_power_of_2(max(int(n), 1)), 1 << 16)


def size_class(n: int, bounds: Sequence[int]) -> int:
    """Autotune-key class of a size that changes with the prompt or the batch: the first of the increasing
    ``bounds`` that is >= n, or ``2 * bounds[-1]`` above them all. A few classes per key, so new prompt lengths or
    image counts reuse the launch configs chosen for their class instead of timing the candidates again."""
    n = int(n)
    for bound in bounds:
        if n <= bound:
            return int(bound)
    return 2 * int(bounds[-1])


# SM count assumed under the interpreter (no device to ask): small, so default launches stay cheap on CPU.
INTERPRETER_SM_COUNT = 4


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a host-side property query, cached; no stream work)."""
    if INTERPRET or device.type != "cuda":
        return INTERPRETER_SM_COUNT
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


# ----------------------------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------------------------

ConfigLike = Union[triton.Config, Mapping[str, int]]


def as_config(config: ConfigLike, default_warps: int = 4, default_stages: int = 2) -> triton.Config:
    """Accept a ``triton.Config`` or a plain mapping ``{"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4}``."""
    if isinstance(config, triton.Config):
        return config
    kwargs = dict(config)
    num_warps = int(kwargs.pop("num_warps", default_warps))
    num_stages = int(kwargs.pop("num_stages", default_stages))
    return triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages)


def config_label(config: triton.Config) -> str:
    blocks = "x".join(f"{k.replace('BLOCK_', '')}{v}" for k, v in sorted(config.kwargs.items()))
    return f"{blocks}-w{config.num_warps}-s{config.num_stages}"


class ConfigChooser:
    """Pick a launch config per autotune key; benchmark on first use when more than one candidate survives pruning.

    ``triton.autotune`` cannot be used here because the host-side tile schedule depends on the block sizes: the
    schedule has to be rebuilt for each candidate, so the candidates are timed through a caller-provided
    ``run(config)`` that does everything that depends on the config. Under the interpreter the candidate list has
    one entry and nothing is timed. Warm up every shape before CUDA-graph capture: timing cannot be captured.
    """

    def __init__(self, name: str, configs: Sequence[triton.Config],
                 prune: Optional[Callable[[List[triton.Config], tuple], List[triton.Config]]] = None):
        self.name = name
        self.configs = list(configs)
        self.prune = prune
        self.cache: Dict[Hashable, triton.Config] = {}
        self._lock = threading.Lock()

    def candidates(self, key: tuple) -> List[triton.Config]:
        kept = self.prune(list(self.configs), key) if self.prune else list(self.configs)
        return kept or list(self.configs)

    def choose(self, key: tuple, run: Callable[[triton.Config], None]) -> triton.Config:
        with self._lock:
            if key in self.cache:
                return self.cache[key]
        candidates = self.candidates(key)
        if len(candidates) == 1:
            best = candidates[0]
        else:
            from triton.testing import do_bench

            timings = []
            for config in candidates:
                try:
                    timings.append((do_bench(lambda: run(config), warmup=5, rep=20), config))
                except OutOfResources:  # a config the device cannot hold: skip it
                    continue
            if not timings:
                raise RuntimeError(f"{self.name}: no launch configuration fits this device for key {key}")
            best = min(timings, key=lambda item: item[0])[1]
        with self._lock:
            self.cache[key] = best
        return best


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile registry (consumed by ``python -m fastflamingo.aot``)
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AotVariant:
    """One compile of one kernel: the ``triton.compile`` inputs plus a label for the report.

    ``signature`` maps every argument name to its type string (``"*bf16"``, ``"i32"``, ``"fp32"``, ``"constexpr"``);
    ``constexprs`` gives the constexpr values; ``aligned`` names the arguments the runtime would see as multiples of
    16 (pointers and typical strides), so the compile matches what a real launch specializes to.
    """

    kernel: str
    fn: object
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    num_warps: int
    num_stages: int
    aligned: Tuple[str, ...]
    label: str

    def attrs(self) -> Dict[Tuple[int, ...], list]:
        names = list(self.fn.arg_names)
        return {(names.index(a),): [["tt.divisibility", 16]] for a in self.aligned}


def not_specialized_args(fn) -> Tuple[str, ...]:
    """Names of the arguments a kernel declares ``do_not_specialize`` or ``do_not_specialize_on_alignment``
    (compiled or interpreted): none of them is ever specialized as a multiple of 16."""
    names = list(fn.arg_names)
    found = []
    for option in ("do_not_specialize", "do_not_specialize_on_alignment"):
        listed = getattr(fn, option, None)
        if listed is None:  # an InterpretedFunction keeps the decorator's arguments
            listed = getattr(fn, "kwargs", {}).get(option)
        found += [names[x] if isinstance(x, int) else x for x in listed or ()]
    return tuple(found)


def pointer_type(dtype_name: str) -> str:
    return "*" + dtype_name


def make_aot_variant(kernel: str, fn, *, pointers: Mapping[str, str], constexprs: Mapping[str, object],
                     config: triton.Config, label: str, floats: Sequence[str] = (),
                     unaligned: Sequence[str] = (), aligned_ints: Sequence[str] = ()) -> AotVariant:
    """Build an :class:`AotVariant` from a kernel's argument names.

    ``pointers`` maps pointer arguments to element types (``"bf16"``); ``floats`` are fp32 scalars; every other
    non-constexpr argument is an i32. Pointers and ``stride_*`` arguments are marked 16-aligned (what a launch with
    ordinary contiguous or fused-projection tensors specializes to) except those in ``unaligned`` and those the kernel
    declares ``do_not_specialize`` (never specialized at run time); ``aligned_ints`` names other integers that are
    multiples of 16 at every launch.
    """
    signature, aligned = {}, []
    not_specialized = not_specialized_args(fn)
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointer_type(pointers[name])
        elif name in floats:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
        if (name not in constexprs and name not in unaligned and name not in not_specialized
                and (name in pointers or name.startswith("stride_") or name in aligned_ints)):
            aligned.append(name)
    return AotVariant(kernel=kernel, fn=fn, signature=signature, constexprs=dict(constexprs),
                      num_warps=config.num_warps, num_stages=config.num_stages, aligned=tuple(aligned),
                      label=label)
