"""Helpers shared by the kernel families of ``fastflamingo.kernels``: interpreter detection, dtype maps, launch-config
selection (a tiny explicit autotuner that reads tuned tables first), per-architecture config lists, a compile
counter, and the ahead-of-time compile registry (launches described by their arguments).

This module imports triton; ``fastflamingo.kernels`` itself (a namespace package: no ``__init__``) does not.
"""
from __future__ import annotations

if not __name__.startswith("fastflamingo.kernels."):  # kernels/ has no __init__.py on purpose (kernels/README.md)
    raise ImportError(f"{__name__}: the Triton kernels are imported as fastflamingo.kernels.<module>, never as a "
                      "top-level 'kernels' (that name is Hugging Face's package, which transformers imports)")

import contextlib
import dataclasses
import functools
import threading
import warnings
from typing import Callable, Dict, Hashable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import triton
from triton.runtime.errors import OutOfResources

# Read once at import: ``@triton.jit`` decides interpreted vs compiled when the decorator runs, so a later change
# of the environment would not change the kernels anyway (and reading triton.knobs inside code that torch.compile
# traces breaks the graph).
INTERPRET: bool = bool(triton.knobs.runtime.interpret)

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * LOG2E): the kernels' softmax runs in the exp2 domain
LN2 = 0.6931471805599453  # log(x) = log2(x) * LN2

TORCH_TO_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def head_block(head_dim: int) -> int:
    """Tile width for a head dimension: the next power of two, at least 16 (``tl.dot`` needs K >= 16)."""
    return max(16, next_power_of_2(head_dim))


def table_key(dtype: torch.dtype, head_dim: int) -> Tuple[str, int]:
    """How the families' shipped config tables are keyed: the input precision ("fp32", or "lowp" for 16-bit inputs,
    which run on tensor cores) and the head tile (64 or 128: BLOCK_D sizes the registers)."""
    return ("fp32" if dtype == torch.float32 else "lowp"), (64 if head_block(head_dim) <= 64 else 128)


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


# Classes of the text length in the attention families' autotune keys (up to 64 tokens, up to 1024, longer): one
# scheme for every family, so a new prompt length reuses its class's config and warm-up runs one length per class.
TEXT_CLASSES = (64, 1024)


def text_class(num_tokens: int) -> int:
    return size_class(num_tokens, TEXT_CLASSES)


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


# Every chooser, in creation order: ``benchmarks.tune`` writes their timings as a tuned table; ``fastflamingo.warmup``
# and the tests read their statistics.
CHOOSERS: List["ConfigChooser"] = []


class ConfigChooser:
    """Pick a launch config per autotune key: from the tuned table of this GPU when it has the key, else by timing
    every candidate that survives pruning, on first use.

    ``triton.autotune`` cannot be used here because the host-side tile schedule depends on the block sizes: the
    schedule has to be rebuilt for each candidate, so the candidates are timed through a caller-provided
    ``run(config)`` that does everything that depends on the config. ``key_names`` name the key's fields in the
    tuned tables (``fastflamingo/configs/``); a table entry is used, with zero timings, only when its config is one
    of the key's candidates (the shipped list of this architecture), so a stale table cannot launch an unchecked
    config. Under the interpreter the candidate list has one entry: nothing is looked up or timed. Warm up every
    shape before CUDA-graph capture (``fastflamingo.warmup``): timing cannot be captured.
    """

    def __init__(self, name: str, configs: Sequence[triton.Config],
                 prune: Optional[Callable[[List[triton.Config], tuple], List[triton.Config]]] = None,
                 key_names: Optional[Sequence[str]] = None):
        self.name = name
        self.configs = list(configs)
        self.prune = prune
        self.key_names = tuple(key_names) if key_names is not None else None
        self.cache: Dict[Hashable, triton.Config] = {}
        self.timings: Dict[Hashable, Dict[str, float]] = {}  # key -> {config label: ms}, for the keys timed here
        self.sources: Dict[Hashable, str] = {}  # key -> "single", "table" or "timed"
        self._lock = threading.Lock()
        CHOOSERS.append(self)

    def candidates(self, key: tuple) -> List[triton.Config]:
        kept = self.prune(list(self.configs), key) if self.prune else list(self.configs)
        return kept or list(self.configs)

    def _from_table(self, key: tuple, candidates: List[triton.Config], device) -> Optional[triton.Config]:
        from .. import configs as tables

        table = tables.table_for(tables.device_identity(device)) if device is not None else None
        if table is None:
            return None
        fields = tables.key_dict(key, self.key_names)
        wanted = table.lookup(self.name, fields)
        if wanted is None:
            return None
        for config in candidates:
            if tables.config_dict(config) == wanted:
                return config
        warnings.warn(f"{self.name}: the tuned table's config {wanted} for {fields} is not a candidate of this "
                      f"build ({table.path}); timing the candidates instead", UserWarning, stacklevel=3)
        return None

    def choose(self, key: tuple, run: Callable[[triton.Config], None], device=None) -> triton.Config:
        """The config for ``key``; ``device`` (where the launch runs) selects the tuned table."""
        with self._lock:
            if key in self.cache:
                return self.cache[key]
        candidates = self.candidates(key)
        timings: Dict[str, float] = {}
        best, source = (candidates[0], "single") if len(candidates) == 1 else (
            self._from_table(key, candidates, device), "table")
        if best is None:
            from triton.testing import do_bench

            scored = []
            for config in candidates:
                try:
                    ms = do_bench(lambda: run(config), warmup=5, rep=20)
                except OutOfResources:  # a config the device cannot hold: skip it
                    continue
                scored.append((ms, config))
                timings[config_label(config)] = ms
            if not scored:
                raise RuntimeError(f"{self.name}: no launch configuration fits this device for key {key}")
            best, source = min(scored, key=lambda item: item[0])[1], "timed"
        with self._lock:
            self.cache[key] = best
            self.sources[key] = source
            if timings:
                self.timings[key] = timings
        return best

    def stats(self) -> Dict[str, int]:
        """How many keys a single candidate, the tuned table, or timing decided."""
        out = {"single": 0, "table": 0, "timed": 0}
        for source in self.sources.values():
            out[source] += 1
        return out


@dataclasses.dataclass
class CompileStats:
    """Kernels compiled while installed as Triton's compilation listener (cache hits counted apart)."""

    compiled: int = 0
    cache_hits: int = 0
    seconds: float = 0.0

    def __call__(self, *, src, metadata, metadata_group, times, cache_hit, **_) -> None:
        if cache_hit:
            self.cache_hits += 1
            return
        self.compiled += 1
        micros = getattr(times, "ir_initialization", 0) + sum(t for _, t in getattr(times, "lowering_stages", ()))
        self.seconds += (micros + getattr(times, "store_results", 0)) / 1e6

    @contextlib.contextmanager
    def installed(self) -> Iterator["CompileStats"]:
        previous = triton.knobs.compilation.listener
        triton.knobs.compilation.listener = self
        try:
            yield self
        finally:
            triton.knobs.compilation.listener = previous


# ----------------------------------------------------------------------------------------------------------------
# Architectures
# ----------------------------------------------------------------------------------------------------------------

# The architectures with their own config lists (``fastflamingo.aot`` compiles each list for its architecture).
ARCHS = (80, 90)
# Marks for a config-table row that ships on one architecture only (see :func:`per_arch`).
SM80, SM90 = frozenset({80}), frozenset({90})
# Register budget of a shipped config. ptxas may use 255, but a config that needs more than 240 under one Triton
# release is one release away from spilling: 3.6 -> 3.9 moved 18 configs at 250-255 registers over the edge.
MAX_REGISTERS = 240


def arch_of(capability: Sequence[int]) -> int:
    """The config list of a device with this compute capability: 90 from Hopper on, 80 before."""
    return 90 if int(capability[0]) >= 9 else 80


@functools.lru_cache(maxsize=None)
def _cuda_arch(index: int) -> int:
    return arch_of(torch.cuda.get_device_capability(index))


def device_arch(device: Optional[torch.device] = None) -> int:
    """Config-list architecture of ``device`` (default: the current CUDA device); 90 under the interpreter and
    without a CUDA device (the selftest's dry run then checks the sm_90 lists)."""
    if INTERPRET or not torch.cuda.is_available():
        return 90
    device = torch.device("cuda") if device is None else torch.device(device)
    if device.type != "cuda":
        return 90
    return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())


def per_arch(table: Mapping[Hashable, Sequence[tuple]], make: Callable[..., triton.Config]
             ) -> Dict[Tuple[Hashable, int], List[triton.Config]]:
    """``{(key, arch): [configs]}`` from a table whose rows are a config's parameters, optionally followed by the
    architectures that ship it (``(64, 64, 4, 3, {90})``: sm_90 only, e.g. a config that spills on sm_80)."""
    out = {}
    for key, rows in table.items():
        for arch in ARCHS:
            out[(key, arch)] = [make(*row[:-1]) if isinstance(row[-1], (set, frozenset)) else make(*row)
                                for row in rows if not isinstance(row[-1], (set, frozenset)) or arch in row[-1]]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile registry (consumed by ``python -m fastflamingo.aot``)
# ----------------------------------------------------------------------------------------------------------------


def constexpr_names(fn) -> Tuple[str, ...]:
    """The ``tl.constexpr`` parameters of a kernel, compiled (``JITFunction``) or interpreted."""
    if hasattr(fn, "params"):
        return tuple(p.name for p in fn.params if p.is_constexpr)
    import inspect

    return tuple(p.name for p in inspect.signature(fn.fn).parameters.values() if "constexpr" in str(p.annotation))


_POINTER_TYPES = {**TORCH_TO_TRITON_DTYPE, torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8"}


@dataclasses.dataclass(frozen=True)
class AotVariant:
    """One launch of one kernel as its launcher makes it, for ``python -m fastflamingo.aot``.

    ``args`` holds every kernel argument by name as the launcher passes it at a representative shape: meta tensors
    (the launcher's dtypes and strides, 16-byte aligned like any fresh allocation) for pointers, the integer sizes
    and strides, the float scalars and the constexprs. ``fastflamingo.aot`` derives the specialization from them
    with Triton's own rules (:func:`runtime_specialization`: integers that are multiples of 16 or equal to 1,
    aligned pointers), so it compiles the kernel a GPU launch at that shape compiles. ``archs``: the architectures
    whose config list ships this config.
    """

    kernel: str
    fn: object
    args: Dict[str, object]
    num_warps: int
    num_stages: int
    label: str
    archs: Tuple[int, ...] = ARCHS

    @property
    def constexprs(self) -> Dict[str, object]:
        return {name: self.args[name] for name in constexpr_names(self.fn)}

    @property
    def signature(self) -> Dict[str, str]:
        """Argument types by name (``*bf16``, ``i32``, ``fp32``, ``constexpr``), specialization aside."""
        constexprs = set(constexpr_names(self.fn))
        out = {}
        for name in self.fn.arg_names:
            value = self.args[name]
            if name in constexprs or value is None:  # Triton binds a None argument as a constant
                out[name] = "constexpr"
            elif isinstance(value, torch.Tensor):
                out[name] = "*" + _POINTER_TYPES[value.dtype]
            elif isinstance(value, float):
                out[name] = "fp32"
            else:
                out[name] = "i64" if abs(int(value)) >= 2**31 else "i32"
        return out


def meta_tensor(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """A storage-free tensor with the shape, dtype and contiguous strides a launcher would pass."""
    return torch.empty(tuple(shape), dtype=dtype, device="meta")


def named_strides(names: Sequence[str], t: torch.Tensor) -> Dict[str, int]:
    """``{"stride_qb": q.stride(0), ...}``: a tensor's leading strides under the kernel's argument names."""
    return dict(zip(names, t.stride()))


def aot_launch(kernel: str, fn, args: Mapping[str, object], config: triton.Config, label: str,
               archs: Sequence[int] = ARCHS) -> AotVariant:
    """An :class:`AotVariant` from the arguments a launch passes (``config.kwargs`` join them as constexprs); a
    ValueError names missing or unknown arguments."""
    args = dict(args, **config.kwargs)
    missing = [name for name in fn.arg_names if name not in args]
    unknown = sorted(set(args) - set(fn.arg_names))
    if missing or unknown:
        raise ValueError(f"{kernel} AOT variant {label!r}: missing arguments {missing}, unknown {unknown}")
    return AotVariant(kernel, fn, args, config.num_warps, config.num_stages, label, tuple(archs))


def runtime_specialization(fn, args: Mapping[str, object], num_warps: int, num_stages: int, arch: int):
    """``(target, signature, constexprs, attrs, options)`` exactly as ``fn[grid](**args)`` specializes on a GPU of
    compute capability ``arch``, by Triton's own binder (the code ``JITFunction.run`` executes before compiling): the
    divisibility and equal-to-1 rules are those of the installed release. Triton 3.6 to 3.9 share this code path;
    a release that changes it fails here with a clear AttributeError/TypeError in ``python -m fastflamingo.aot``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(args, num_warps=num_warps, num_stages=num_stages, debug=False,
                  instrumentation_mode=triton.knobs.compilation.instrumentation_mode)
    bound, specialization, options = binder(**kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return target, signature, constexprs, attrs, options.__dict__
