"""Stable specializations: a generate-like sweep compiles each kernel config a bounded number of times.

Triton compiles one variant per *specialization* of a launch: every integer argument is classified (== 1, a
multiple of 16, other) and every pointer by its 16-byte alignment, unless the kernel declares it
``do_not_specialize``. A kernel argument that changes with the prompt (text length, image count, batch, decode
token count, split count) would compile new variants as a user's prompts vary. This test walks a sweep like
``generate`` on many prompts (text 1..4096, media 0..64, batch 1..16 with and without beams, decode steps of 1..8
tokens, the training backward) through the launchers, and for every launch computes Triton's own specialization
with the binder ``JITFunction.run`` executes before compiling (for an sm_90 target: no GPU needed; the kernels are
recorded, not run). Per kernel and launch config (constexprs, warps, stages) at most 3 variants may appear; the
autotune keys stay within a few classes. ``docs/steady_state.md`` ("Specializations") explains the rules.
"""
import collections
import itertools

import pytest
import torch

pytestmark = pytest.mark.triton

HEADS, HEAD_DIM, LATENTS = 8, 64, 64
TEXTS = (1, 2, 3, 7, 9, 15, 16, 17, 31, 64, 100, 255, 256, 513, 1024, 2047, 4096)
MEDIA = (0, 1, 2, 3, 5, 8, 16, 17, 32, 64)
BATCHES = (1, 2, 3, 4, 8, 16)
MAX_VARIANTS = 3
# the autotune-key fields that change with the prompt or the batch, per chooser, and how many values they may take
CLASS_FIELDS = {"media_xattn_fwd": (4, 5), "media_xattn_bwd_dkdv": (4, 5), "media_xattn_bwd_dq": (4, 5),
                "gated_linear_fwd": (0,), "perceiver_fwd": (4,), "perceiver_bwd": (4,)}
MAX_KEY_CLASSES = 9


def _binder(fn):
    """Triton's argument binder (with the specialization rules of the installed release) for a kernel that may be
    interpreted here."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    options = {k: v for k, v in getattr(fn, "kwargs", {}).items()
               if k in ("do_not_specialize", "do_not_specialize_on_alignment")}
    jit = fn if isinstance(fn, JITFunction) else JITFunction(fn.fn, **options)
    declared = tuple(p.name for p in jit.params if p.is_constexpr)
    return create_function_from_signature(jit.signature, jit.params, make_backend(GPUTarget("cuda", 90, 32))), declared


class Recorder:
    """Stands in for a kernel: records the specialization of each launch, runs nothing."""

    def __init__(self, name, fn, seen):
        self.name, self.seen = name, seen
        self.bind, self.declared = _binder(fn)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            params, specialization, options = self.bind(*args, **kwargs)
            names = list(params)
            config = tuple((n, params[n]) for n in self.declared) + tuple(sorted(options.items()))
            variant = tuple((n, s) for n, s in zip(names, specialization) if n not in self.declared)
            self.seen[(self.name, config)].add(variant)
        return launch


@pytest.fixture
def recorded(monkeypatch):
    from fastflamingo.kernels import _attention, _utils, gated_linear, media_decode, media_xattn, perceiver_attn

    seen = collections.defaultdict(set)
    for module in (media_xattn, media_decode, gated_linear, perceiver_attn, _attention):
        for name, fn in list(vars(module).items()):
            if name.endswith("_kernel"):
                monkeypatch.setattr(module, name, Recorder(name.strip("_"), fn, seen))
    keys = collections.defaultdict(set)
    choose = _utils.ConfigChooser.choose

    def recording_choose(self, key, run, *args, **kwargs):
        keys[self.name].add(key)
        return choose(self, key, run, *args, **kwargs)

    monkeypatch.setattr(_utils.ConfigChooser, "choose", recording_choose)
    return seen, keys


def _differences(variants):
    """The arguments whose specialization differs between the variants of one config."""
    rows = [dict(v) for v in variants]
    return {k: sorted({str(r[k]) for r in rows}) for k in rows[0] if len({str(r[k]) for r in rows}) > 1}


def _sweep_shapes():
    """(text, media, batch) cells: every text length with every media count, batches cycling, within a memory
    budget for the (unrun) inputs."""
    batches = itertools.cycle(BATCHES)
    for text, media in itertools.product(TEXTS, MEDIA):
        batch = next(batches)
        while batch > 1 and batch * max(text, media * LATENTS) > 1 << 15:
            batch //= 2
        yield text, media, batch


def _text_time(batch, text, media, generator):
    """cumsum of <image> flags at random places (a generate prompt's layout)."""
    flags = torch.rand(batch, text, generator=generator) < (media / max(text, 1))
    return flags.cumsum(1, dtype=torch.int32).clamp(max=max(media, 0))


def test_generate_sweep_compiles_few_variants(recorded, monkeypatch):
    from fastflamingo.kernels import media_decode as decode_kernels
    from fastflamingo.ops import gated_linear, media_decode, media_xattn, perceiver_attn

    seen, keys = recorded
    # the cuBLAS form's product is not what is measured here (and a real (32K, 8K) x (8K, 2K) CPU matmul per cell
    # would take the whole budget): an empty result of the right shape and layout
    monkeypatch.setattr(gated_linear.torch, "mm", lambda a, b: a.new_empty((a.shape[0], b.shape[1])))
    g = torch.Generator().manual_seed(0)
    dtype = torch.float16
    weights = {k_in: torch.empty(2048, k_in, dtype=dtype) for k_in in (512, 8192)}
    alpha = torch.empty(1, dtype=dtype)
    for text, media, batch in _sweep_shapes():
        for immediate in (True, False):
            q = torch.empty(batch, text, HEADS, HEAD_DIM, dtype=dtype)
            kv = torch.empty(batch, media * LATENTS, HEADS, 2 * HEAD_DIM, dtype=dtype)  # a fused projection
            k, v = kv[..., :HEAD_DIM], kv[..., HEAD_DIM:]
            text_time = _text_time(batch, text, media, g)
            # prefill forward, and the training backward
            o, lse = media_xattn.launch_fwd(q, k, v, text_time, media, LATENTS, immediate, 0.125)
            if text <= 1024:
                media_xattn.launch_bwd(o, q, k, v, o, lse, text_time, media, LATENTS, immediate, 0.125)
            # decode steps after this prompt: 1..8 new tokens, text_time expanded (cached media) or per token
            # (split counts as on an H100's 132 SMs: the interpreter's default of a few SMs rarely splits)
            splits = decode_kernels.choose_splits(batch, HEADS, LATENTS * (1 if immediate else media), 64, 132)
            for steps in (1, 2, 5, 8):
                qd = torch.empty(batch, steps, HEADS, HEAD_DIM, dtype=dtype)
                last = text_time[:, -1:]
                media_decode.launch(qd, k, v, last.expand(-1, steps), media, LATENTS, immediate, 0.125,
                                    num_splits=splits)
                media_decode.launch(qd, k, v, last.repeat(1, steps), media, LATENTS, immediate, 0.125,
                                    num_splits=splits)
        # beam search: r beams share one K/V row per sample
        for beams in (2, 3, 4):
            q = torch.empty(batch * beams, 1, HEADS, HEAD_DIM, dtype=dtype)
            kv = torch.empty(batch, media * LATENTS, HEADS, 2 * HEAD_DIM, dtype=dtype)
            tt = torch.full((batch * beams, 1), media, dtype=torch.int32)
            media_decode.launch(q, kv[..., :HEAD_DIM], kv[..., HEAD_DIM:], tt, media, LATENTS, True, 0.125,
                                kv_group=beams)
        # the gated projections of a block: prefill rows and decode rows, each form, OpenFlamingo's two K
        for rows, (k_in, w), form in itertools.product((batch * text, batch), weights.items(),
                                                       ("fused", "splitk", "cublas")):
            x = torch.empty(batch, rows // batch, 2048, dtype=dtype)
            inp = torch.empty(batch, rows // batch, k_in, dtype=dtype)
            gated_linear.launch_fwd(x, inp, w, None, alpha, None, form=form)
        # the resampler: one row per (sample, media), 257 patch tokens (a ViT-L/14 image) + 64 latents
        if media:
            lat = torch.empty(batch * media, LATENTS, HEADS, HEAD_DIM, dtype=dtype)
            patches = torch.empty(batch * media, 257, HEADS, HEAD_DIM, dtype=dtype)
            o, lse = perceiver_attn.launch_fwd(lat, patches, patches, lat, lat, 0.125)
            perceiver_attn.launch_bwd(o, lat, patches, patches, lat, lat, o, lse, 0.125)

    counts = {key: len(variants) for key, variants in seen.items()}
    launched = {name for name, _ in counts}
    assert {"media_xattn_fwd_kernel", "media_xattn_bwd_dkdv_kernel", "media_xattn_bwd_dq_kernel",
            "attention_bwd_preprocess_kernel", "media_decode_split_kernel", "media_decode_combine_kernel",
            "gated_linear_fwd_kernel", "gated_linear_epilogue_kernel", "perceiver_fwd_kernel",
            "perceiver_bwd_kernel"} <= launched
    report = "\n".join(f"{n} {dict(c)}: {len(seen[(n, c)])} {_differences(seen[(n, c)])}"
                       for n, c in sorted(seen, key=str))
    too_many = {key: count for key, count in counts.items() if count > MAX_VARIANTS}
    assert not too_many, f"more than {MAX_VARIANTS} variants:\n{report}"
    # and the autotune keys stay within a few classes per layer shape: the key fields that change with the prompt
    # or the batch (text / media / row classes) take at most MAX_KEY_CLASSES values together
    for name, found in keys.items():
        varying = CLASS_FIELDS[name]
        per_shape = collections.defaultdict(set)
        for key in found:
            per_shape[tuple(v for i, v in enumerate(key) if i not in varying)].add(tuple(key[i] for i in varying))
        for shape, classes in per_shape.items():
            assert len(classes) <= MAX_KEY_CLASSES, (name, shape, sorted(classes))
    print(report)
