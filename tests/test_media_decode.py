"""Decode kernels of masked media cross-attention (kernels/media_decode.py, fastflamingo/ops/media_decode.py), their
dispatch in fastflamingo/functional.py, and the all-previous decode branch of the PyTorch path
(fastflamingo/ops/torch_path.py).

On a CPU machine the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET=1); on a CUDA machine
the same tests run natively, plus the CUDA-graph capture test. Every result is compared with a dense float64
reference written here from the mask rule, computed from the inputs as rounded to the test dtype. Outputs are
launched into NaN-filled buffers, so every element is proven written.
"""
import random

import pytest
import torch

from fastflamingo import reference as oracle
from fastflamingo.kernels._launch import DECODE_SPLITS
from fastflamingo.ops import media_decode as decode_ops
from fastflamingo.ops import media_xattn as xattn_ops
from helpers import assert_close
from fastflamingo.masks import ALL_PREVIOUS, IMMEDIATE, MediaMask, visible_media

# max |kernel - reference| / max |reference| per dtype; docs/testing.md, "Tolerances"
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
MODES = [pytest.param(True, id="immediate"), pytest.param(False, id="all_previous")]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]


@pytest.fixture(scope="module")
def decode():
    pytest.importorskip("triton")
    from fastflamingo.kernels import media_decode

    return media_decode


# ----------------------------------------------------------------------------------------------------------------
# Reference and helpers
# ----------------------------------------------------------------------------------------------------------------


def visible_keys(text_time, num_media, latents, immediate):
    """(B, T, M*n) bool of the keys each token sees (fastflamingo.masks' rule, which test_api checks against the
    upstream masks)."""
    lo, hi = visible_media(text_time.to("cpu", torch.int64), num_media, immediate)
    key = torch.arange(num_media * latents)
    return (key >= lo[..., None] * latents) & (key < hi[..., None] * latents)


def reference(q, k, v, text_time, num_media, latents, immediate, scale):
    """The float64 oracle; tokens that see no key get exactly 0."""
    qd, kd, vd = (t.detach().to("cpu", torch.float64) for t in (q, k, v))
    return oracle.media_xattn(qd, kd, vd, text_time.cpu(), num_media, immediate, scale)


def make_inputs(device, batch, num_tokens, heads, head_dim, num_keys, dtype, *, fused_kv=True, seed=0):
    """q (B, Tq, H, D); k, v either views of one fused (B, keys, 2*H*D) K/V projection (token stride 2*H*D, as the
    drop-in modules cache them) or separate tensors."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(device)

    q = randn(batch, num_tokens, heads, head_dim)
    if fused_kv:
        inner = heads * head_dim
        kv = randn(batch, num_keys, 2 * inner)
        k = kv[..., :inner].view(batch, num_keys, heads, head_dim)
        v = kv[..., inner:].view(batch, num_keys, heads, head_dim)
        assert k.stride(1) == 2 * inner and not k.is_contiguous()
    else:
        k = randn(batch, num_keys, heads, head_dim)
        v = randn(batch, num_keys, heads, head_dim)
    return q, k, v


def run_case(decode, device, *, text_time, heads, head_dim, num_media, latents, dtype, immediate, config=None,
             num_splits=None, fused_kv=True, seed=0):
    """One decode launch into a NaN-poisoned output, against the float64 reference; returns the output."""
    batch, num_tokens = text_time.shape
    q, k, v = make_inputs(device, batch, num_tokens, heads, head_dim, num_media * latents, dtype,
                          fused_kv=fused_kv, seed=seed)
    text_time = text_time.to(device)
    scale = head_dim ** -0.5
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=device)
    o = decode_ops.launch(q, k, v, text_time, num_media, latents, immediate, scale, config=config,
                                num_splits=num_splits, out=out)
    assert o.data_ptr() == out.data_ptr()
    ref = reference(q, k, v, text_time, num_media, latents, immediate, scale)
    assert_close(o, ref, TOLERANCE[dtype], "o")
    seen = visible_keys(text_time, num_media, latents, immediate).any(-1)  # (B, Tq)
    assert (o.cpu()[~seen] == 0).all(), "tokens that see no media must get exactly 0"
    return o


# ----------------------------------------------------------------------------------------------------------------
# Kernel numerics
# ----------------------------------------------------------------------------------------------------------------

# Per sample: a token before any media (0), ordinary tokens, one past the last media (immediate: nothing; all-prev:
# every media), a negative value (IDEFICS-style reset) and a token right at the first media.
LAYOUT = torch.tensor([[0, 3, 5, 2], [6, 1, -1, 4]], dtype=torch.int32)


@pytest.mark.triton
@pytest.mark.parametrize("immediate", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 4])
def test_dtypes_and_tokens(decode, device, dtype, immediate, num_tokens):
    """Default config and split count; fused K/V views; 5 media of 64 latents."""
    run_case(decode, device, text_time=LAYOUT[:, :num_tokens], heads=2, head_dim=64, num_media=5, latents=64,
             dtype=dtype, immediate=immediate)


@pytest.mark.triton
@pytest.mark.parametrize("immediate", MODES)
@pytest.mark.parametrize("num_tokens", [2, 3])
@pytest.mark.parametrize("num_splits", [1, 2, 7, 64], ids=lambda s: f"splits{s}")
def test_forced_splits(decode, device, num_splits, num_tokens, immediate):
    """Split counts from one (the DIRECT path) to far more than the key tiles (empty splits must not count);
    80 latents with 16-key tiles: 5 tiles per media, so splits cut inside and across media."""
    text_time = LAYOUT[:, :num_tokens].clamp(max=6)
    run_case(decode, device, text_time=text_time, heads=1, head_dim=32, num_media=4, latents=80,
             dtype=torch.float32, immediate=immediate, config={"BLOCK_N": 16}, num_splits=num_splits)


@pytest.mark.triton
@pytest.mark.parametrize("immediate", MODES)
@pytest.mark.parametrize("head_dim", [40, 96, 128])
def test_head_dims_padded(decode, device, head_dim, immediate):
    run_case(decode, device, text_time=LAYOUT[:, :2], heads=2, head_dim=head_dim, num_media=3, latents=64,
             dtype=torch.float16, immediate=immediate, num_splits=3)


@pytest.mark.triton
@pytest.mark.parametrize("immediate", MODES)
@pytest.mark.parametrize("latents", [64, 80])
def test_latents_and_separate_kv(decode, device, latents, immediate):
    """Contiguous (non-fused) K/V, 80 latents: the default 64-key tile straddles media."""
    text_time = torch.tensor([[1, 2, 3], [3, 3, 3]], dtype=torch.int32)
    run_case(decode, device, text_time=text_time, heads=2, head_dim=32, num_media=3, latents=latents,
             dtype=torch.float32, immediate=immediate, fused_kv=False)


@pytest.mark.triton
@pytest.mark.parametrize("immediate", MODES)
def test_more_image_tokens_than_media_and_nothing_seen(decode, device, immediate):
    """text_time past num_media (immediate: nothing; all-previous: every media); a whole sample that sees
    nothing; a batch where no token sees anything at all (every split empty)."""
    text_time = torch.tensor([[4, 7], [0, 0]], dtype=torch.int32)
    o = run_case(decode, device, text_time=text_time, heads=2, head_dim=32, num_media=3, latents=32,
                 dtype=torch.float16, immediate=immediate, num_splits=3)
    assert (o[1] == 0).all()
    nothing = torch.tensor([[0], [-2]], dtype=torch.int32)
    o = run_case(decode, device, text_time=nothing, heads=1, head_dim=16, num_media=2, latents=16,
                 dtype=torch.float32, immediate=immediate, num_splits=2)
    assert (o == 0).all()


@pytest.mark.triton
@pytest.mark.parametrize("immediate", MODES)
def test_cached_media_text_time_expanded(decode, device, immediate):
    """OpenFlamingo decoding builds text_time as a stride-0 expansion of one value per sample."""
    text_time = torch.tensor([3, 1], dtype=torch.int32)[:, None].expand(2, 3)
    assert text_time.stride(1) == 0
    run_case(decode, device, text_time=text_time, heads=2, head_dim=64, num_media=3, latents=64,
             dtype=torch.bfloat16, immediate=immediate)


@pytest.mark.triton
@pytest.mark.parametrize("num_splits", [None, 37], ids=["default", "splits37"])
def test_many_media(decode, device, num_splits):
    """260 media of 64 latents (16640 keys) seen by one all-previous token: many key tiles over many splits; the
    immediate token of the same sample reads one media far into the cache (int64 key offsets)."""
    text_time = torch.tensor([[260, 7]], dtype=torch.int32)
    run_case(decode, device, text_time=text_time, heads=1, head_dim=16, num_media=260, latents=64,
             dtype=torch.float32, immediate=False, num_splits=num_splits)
    run_case(decode, device, text_time=torch.tensor([[259]], dtype=torch.int32), heads=1, head_dim=16,
             num_media=260, latents=64, dtype=torch.float32, immediate=True, num_splits=num_splits)


def random_case(seed):
    rng = random.Random(seed)
    num_media = rng.randint(1, 6)
    batch = rng.choice([1, 2, 3])
    num_tokens = rng.randint(1, 8)
    rows = []
    for _ in range(batch):
        kind = rng.choice(["cached", "step", "random"])
        if kind == "cached":  # every token after the prompt: one value
            rows.append([rng.randint(0, num_media)] * num_tokens)
        elif kind == "step":  # an <image> emitted inside the step: text_time grows by one
            at, base = rng.randint(0, num_tokens), rng.randint(0, num_media)
            rows.append([base + (t >= at) for t in range(num_tokens)])
        else:
            rows.append([rng.randint(-1, num_media + 1) for _ in range(num_tokens)])
    return dict(text_time=torch.tensor(rows, dtype=torch.int32), heads=rng.choice([1, 2]),
                head_dim=rng.choice([16, 32, 40, 64]), num_media=num_media, latents=rng.choice([16, 48, 64, 80]),
                dtype=rng.choice([torch.float32, torch.float16, torch.bfloat16]), immediate=rng.random() < 0.5,
                config=rng.choice([None, {"BLOCK_N": 16}, {"BLOCK_N": 32}]),
                num_splits=rng.choice([None, None, 1, 2, 3, 5]), fused_kv=rng.random() < 0.5, seed=seed)


@pytest.mark.triton
@pytest.mark.parametrize("seed", range(30))
def test_random_sweep(decode, device, seed):
    run_case(decode, device, **random_case(seed))


@pytest.mark.triton
def test_combine_ignores_empty_split_partials(decode, device):
    """An empty split (lse = -inf) contributes nothing even if its partial holds NaN; all-empty rows give 0."""
    heads, tokens, splits, head_dim = 1, 2, 5, 32
    o_part = torch.randn(heads, tokens, splits, head_dim, device=device)
    lse_part = torch.randn(heads, tokens, splits, device=device)
    o_part[0, 0, 1:4] = float("nan")
    lse_part[0, 0, 1:4] = float("-inf")
    o_part[0, 1] = float("nan")
    lse_part[0, 1] = float("-inf")
    out = torch.full((1, tokens, heads, head_dim), float("nan"), device=device)
    decode._media_decode_combine_kernel[(tokens, heads)](
        o_part, lse_part, out,
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse_part.stride(0), lse_part.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        heads, splits, HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_S=4)  # BLOCK_S < splits: two merge steps
    keep = [0, 4]
    weights = torch.softmax(lse_part[0, 0, keep].double().cpu() * torch.log(torch.tensor(2.0, dtype=torch.float64)),
                            dim=0)
    expected = (weights[:, None] * o_part[0, 0, keep].double().cpu()).sum(0)
    torch.testing.assert_close(out[0, 0, 0].double().cpu(), expected, atol=1e-6, rtol=1e-6)
    assert (out[0, 1] == 0).all()


# ----------------------------------------------------------------------------------------------------------------
# Host side: split choice from shapes, no host synchronisation
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.triton
def test_choose_splits(decode):
    choose = decode.choose_splits
    # immediate mode with 64 latents: one tile per token, never split
    assert choose(1, 8, 64, 64, 132) == 1
    # all-previous, OpenFlamingo B=1 H=8 33 media: 33 tiles, split to fill the SMs, at least 2 tiles each
    assert choose(1, 8, 33 * 64, 64, 132) == 17
    # enough (sample, head) programs already: no split
    assert choose(16, 64, 33 * 64, 64, 132) == 1
    # many SMs, one program, huge cache: capped
    assert choose(1, 1, 260 * 64, 64, 132) == DECODE_SPLITS.max_splits
    # partial fill: B*H = 64 programs on 132 SMs want 5 programs each
    assert choose(8, 8, 10 * 64, 64, 132) == 5
    assert choose(1, 1, 0, 64, 132) == 1


class _HostSyncGuard:
    """Makes tensor-to-host reads raise while on; the interpreter's own argument copies run with it off."""

    METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self, monkeypatch):
        self.on = False
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._guarded(name, original))
        if torch.cuda.is_available():
            original_sync = torch.cuda.synchronize
            monkeypatch.setattr(torch.cuda, "synchronize", self._guarded("synchronize", original_sync))

    def _guarded(self, name, original):
        guard = self

        def method(*args, **kwargs):
            if guard.on:
                raise AssertionError(f"host synchronisation in the launcher: Tensor.{name}")
            return original(*args, **kwargs)

        return method

    def unguarded(self, kernel):
        """Wrap a jitted kernel so its launch (under the interpreter: copies of the arguments) runs unguarded."""
        guard = self

        class Launch:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    was, guard.on = guard.on, False
                    try:
                        return kernel[grid](*args, **kwargs)
                    finally:
                        guard.on = was

                return launch

        return Launch()


@pytest.mark.triton
@pytest.mark.parametrize("immediate", MODES)
def test_launcher_makes_no_host_sync(decode, device, monkeypatch, immediate):
    """After a warm-up, a decode launch (DIRECT and split+combine) and the op-level call read nothing back from
    the device: every Tensor-to-host conversion raises while the launcher's host code runs."""
    guard = _HostSyncGuard(monkeypatch)
    monkeypatch.setattr(decode, "_media_decode_split_kernel", guard.unguarded(decode._media_decode_split_kernel))
    monkeypatch.setattr(decode, "_media_decode_combine_kernel", guard.unguarded(decode._media_decode_combine_kernel))
    text_time = torch.tensor([[2, 3], [0, 1]], dtype=torch.int64, device=device)  # int64: converted on device
    q, k, v = make_inputs(device, 2, 2, 2, 32, 3 * 32, torch.float32)
    ref = reference(q, k, v, text_time, 3, 32, immediate, 0.2)
    for splits in (1, 3):
        decode_ops.launch(q, k, v, text_time, 3, 32, immediate, 0.2, num_splits=splits)  # warm-up
    guard.on = True
    with pytest.raises(AssertionError, match="host synchronisation"):
        torch.ones(1).item()  # the guard is live: the launches below would fail the same way
    outs = [decode_ops.launch(q, k, v, text_time, 3, 32, immediate, 0.2, num_splits=s) for s in (1, 3)]
    with torch.no_grad():
        outs.append(decode_ops.media_decode(q, k, v, text_time, 3, 32, immediate, 0.2))
    guard.on = False
    for o in outs:
        assert_close(o, ref, TOLERANCE[torch.float32], "o")


# ----------------------------------------------------------------------------------------------------------------
# Custom op and dispatch
# ----------------------------------------------------------------------------------------------------------------


def _spy(monkeypatch, module, name, calls):
    original = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)


@pytest.mark.triton
@pytest.mark.parametrize("mode", [IMMEDIATE, ALL_PREVIOUS])
def test_functional_dispatch(decode, device, monkeypatch, mode):
    """backend("triton"): no_grad with one token runs the decode kernels; with grad, or with more tokens than
    DECODE_MAX_TOKENS, the prefill kernel. All agree with the PyTorch path."""
    import fastflamingo
    from fastflamingo import _backend, functional

    calls = []
    _spy(monkeypatch, decode_ops, "launch", calls)
    _spy(monkeypatch, xattn_ops, "launch_fwd", calls)
    limit = _backend.DECODE_MAX_TOKENS

    def problem(num_tokens):
        q, k, v = make_inputs(device, 2, num_tokens, 2, 32, 3 * 32, torch.float32, seed=num_tokens)
        text_time = torch.tensor([[3] * num_tokens, [0] + [1] * (num_tokens - 1)], dtype=torch.int32)
        return q, k, v, MediaMask(text_time.to(device), 3, mode)

    q, k, v, mask = problem(1)
    with torch.no_grad():
        with fastflamingo.backend("torch"):
            want = functional.media_xattn(q, k, v, mask)
        with fastflamingo.backend("triton"):
            got = functional.media_xattn(q, k, v, mask)
    assert calls == ["launch"]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)

    calls.clear()
    q.requires_grad_(True)
    with fastflamingo.backend("triton"):
        got = functional.media_xattn(q, k, v, mask)
    assert calls == ["launch_fwd"] and got.requires_grad
    torch.testing.assert_close(got.detach(), want, atol=2e-5, rtol=2e-5)

    calls.clear()
    q, k, v, mask = problem(limit + 1)
    with torch.no_grad(), fastflamingo.backend("triton"):
        got = functional.media_xattn(q, k, v, mask)
    assert calls == ["launch_fwd"]
    with torch.no_grad(), fastflamingo.backend("torch"):
        torch.testing.assert_close(got, functional.media_xattn(q, k, v, mask), atol=2e-5, rtol=2e-5)

    calls.clear()
    q, k, v, mask = problem(limit)
    with torch.no_grad(), fastflamingo.backend("triton"):
        functional.media_xattn(q, k, v, mask)
    assert calls == ["launch"]


@pytest.mark.triton
def test_opcheck(decode, device):
    q, k, v = make_inputs(device, 2, 2, 2, 32, 2 * 32, torch.float32)
    text_time = torch.tensor([[1, 2], [0, 2]], dtype=torch.int32, device=device)
    for immediate in (True, False):
        torch.library.opcheck(torch.ops.fastflamingo.media_decode.default,
                              (q, k, v, text_time, 2, 32, immediate, 0.2))


@pytest.mark.triton
def test_torch_compile_decode_step(decode, device, monkeypatch):
    """A compiled no-grad decode step calls the decode op as one opaque node (fullgraph: no graph break)."""
    calls = []
    _spy(monkeypatch, decode_ops, "launch", calls)
    q, k, v = make_inputs(device, 2, 1, 2, 32, 3 * 32, torch.float32)
    text_time = torch.tensor([[3], [1]], dtype=torch.int32, device=device)

    def step(q, k, v, text_time):
        return torch.tanh(decode_ops.media_decode(q, k, v, text_time, 3, 32, False, 0.2)) + q

    with torch.no_grad():
        got = torch.compile(step, backend="aot_eager", fullgraph=True)(q, k, v, text_time)
        want = step(q, k, v, text_time)
    assert calls == ["launch", "launch"]
    torch.testing.assert_close(got, want)


@pytest.mark.triton
def test_kernels_are_interpreted_under_interpret(decode):
    """Guards against something importing the kernels before conftest set TRITON_INTERPRET."""
    import triton

    from conftest import INTERPRET

    interpreted = triton.runtime.interpreter.InterpretedFunction
    for fn in (decode._media_decode_split_kernel, decode._media_decode_combine_kernel):
        assert isinstance(fn, interpreted) == INTERPRET


@pytest.mark.triton
def test_aot_variants_cover_shipped_configs(decode):
    """Every (dtype, head tile) config the launcher can pick on a GPU is in the AOT registry, DIRECT and split."""
    seen = {(v.kernel, v.signature["Q"], v.constexprs["BLOCK_D"], v.constexprs["BLOCK_N"], v.constexprs["DIRECT"],
             v.constexprs["IMMEDIATE"], v.num_warps, v.num_stages)
            for v in decode.aot_variants() if v.kernel == "media_decode_split"}
    names = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
    for dtype, name in names.items():
        for head_dim in (64, 128):
            c = decode.shipped_config(dtype, head_dim)
            for direct in (True, False):
                for immediate in (True, False):
                    assert ("media_decode_split", name, head_dim, c.kwargs["BLOCK_N"], direct, immediate,
                            c.num_warps, c.num_stages) in seen
    assert any(v.kernel == "media_decode_combine" for v in decode.aot_variants())


# ----------------------------------------------------------------------------------------------------------------
# CUDA graphs (GPU only)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("immediate", MODES)
def test_cuda_graph_capture(decode, device, immediate):
    """Capture one decode step (op level, so a split+combine launch in all-previous mode and a DIRECT launch in
    immediate mode) after warm-up; replay with new q and text_time copied into the static inputs."""
    batch, heads, head_dim, num_media, latents = 2, 4, 64, 33, 64
    q, k, v = make_inputs(device, batch, 1, heads, head_dim, num_media * latents, torch.bfloat16)
    text_time = torch.tensor([[33], [5]], dtype=torch.int32, device=device)
    scale = head_dim ** -0.5

    def step():
        with torch.no_grad():
            return decode_ops.media_decode(q, k, v, text_time, num_media, latents, immediate, scale)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    visible = latents if immediate else num_media * latents
    splits = decode.choose_splits(batch, heads, visible, decode.shipped_config(q.dtype, head_dim).kwargs["BLOCK_N"],
                                  decode.sm_count(q.device))
    assert (splits == 1) == immediate  # immediate: one DIRECT launch; all-previous: split + combine
    for seed in (1, 2):
        gen = torch.Generator().manual_seed(seed)
        q.copy_(torch.randn(q.shape, generator=gen).to(torch.bfloat16))
        text_time.copy_(torch.tensor([[seed * 7], [seed]], dtype=torch.int32, device=device))
        graph.replay()
        torch.cuda.synchronize()
        eager = step()
        torch.testing.assert_close(static_out, eager, atol=0, rtol=0)
        assert_close(static_out, reference(q, k, v, text_time, num_media, latents, immediate, scale), TOLERANCE[torch.bfloat16], "o")


# ----------------------------------------------------------------------------------------------------------------
# PyTorch path: all-previous decode as one batched SDPA with a key mask
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_torch_path_all_previous_decode(device, monkeypatch, seed):
    """1..4 tokens per sample, values <= 0 and past num_media: fp64 value and gradients, exact zeros, and the
    batched branch really is the one that ran (the run-list builder is never called)."""
    import fastflamingo
    from fastflamingo import functional

    gen = torch.Generator().manual_seed(seed)
    batch, num_tokens, heads, head_dim, num_media, latents = 3, 1 + seed % 4, 2, 16, 4, 8
    text_time = torch.randint(-1, num_media + 2, (batch, num_tokens), generator=gen, dtype=torch.int32)
    text_time[0] = 0  # a sample that sees nothing
    q = torch.randn(batch, num_tokens, heads, head_dim, generator=gen).to(device).requires_grad_()
    kv = torch.randn(batch, num_media * latents, 2 * heads * head_dim, generator=gen).to(device).requires_grad_()
    k = kv[..., : heads * head_dim].view(batch, -1, heads, head_dim)
    v = kv[..., heads * head_dim:].view(batch, -1, heads, head_dim)
    mask = MediaMask(text_time.to(device), num_media, ALL_PREVIOUS)

    def no_runs(mask):
        raise AssertionError("the per-sample run loop ran instead of the batched decode branch")

    from fastflamingo.ops import torch_path

    monkeypatch.setattr(torch_path, "runs", no_runs)
    with fastflamingo.backend("torch"):
        out = functional.media_xattn(q, k, v, mask)
    qd = q.detach().double().cpu().requires_grad_()
    kvd = kv.detach().double().cpu().requires_grad_()
    kd = kvd[..., : heads * head_dim].view(batch, -1, heads, head_dim)
    vd = kvd[..., heads * head_dim:].view(batch, -1, heads, head_dim)
    ref = reference(qd, kd, vd, text_time, num_media, latents, False, head_dim ** -0.5)
    assert_close(out, ref, 1e-5, "o")
    seen = visible_keys(text_time, num_media, latents, False).any(-1)
    assert (out.detach().cpu()[~seen] == 0).all()
    # gradients against fp64 autograd through the same dense oracle
    ref_out = oracle.media_xattn(qd, kd, vd, text_time, num_media, False, head_dim ** -0.5)
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    gq, gkv = torch.autograd.grad(out, (q, kv), grad.to(out.dtype).to(device))
    rq, rkv = torch.autograd.grad(ref_out, (qd, kvd), grad)
    assert_close(gq, rq, 1e-5, "dq")
    assert_close(gkv, rkv, 1e-5, "dkv")
    assert (gq.cpu()[~seen] == 0).all()


def test_torch_path_all_previous_decode_nothing_visible(device):
    """Every token before the first media: exact zeros (no key at all to attend), still differentiable."""
    import fastflamingo
    from fastflamingo import functional

    q = torch.randn(2, 1, 2, 16, device=device, requires_grad=True)
    k = torch.randn(2, 3 * 8, 2, 16, device=device, requires_grad=True)
    v = torch.randn(2, 3 * 8, 2, 16, device=device, requires_grad=True)
    mask = MediaMask(torch.zeros(2, 1, dtype=torch.int32, device=device), 3, ALL_PREVIOUS)
    with fastflamingo.backend("torch"):
        out = functional.media_xattn(q, k, v, mask)
    assert out.shape == q.shape and (out == 0).all() and out.requires_grad
    gq, gk, gv = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True, materialize_grads=True)
    assert (gq == 0).all() and (gk == 0).all() and (gv == 0).all()


@pytest.mark.triton
@pytest.mark.parametrize("num_splits", [1, 3], ids=["direct", "split"])
@pytest.mark.parametrize("immediate", MODES)
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
def test_kv_group_matches_repeated_kv(decode, device, dtype, immediate, num_splits):
    """kv_group r: sample b reads cached K/V row b // r (beam search shares one projection per sample); equals the
    launch on explicitly repeat_interleaved K/V and the float64 reference."""
    groups, r, heads, head_dim, num_media, latents = 2, 3, 2, 16, 3, 16
    text_time = torch.tensor([[3, 1], [2, 3], [0, 1], [3, 3], [1, 2], [2, 0]], dtype=torch.int32).to(device)
    q, k, v = make_inputs(device, groups * r, 2, heads, head_dim, num_media * latents, dtype)
    k, v = k[:groups], v[:groups]
    scale = head_dim ** -0.5
    got = decode_ops.launch(q, k, v, text_time, num_media, latents, immediate, scale, num_splits=num_splits,
                                  kv_group=r)
    k_rep, v_rep = k.repeat_interleave(r, 0), v.repeat_interleave(r, 0)
    want = decode_ops.launch(q, k_rep, v_rep, text_time, num_media, latents, immediate, scale,
                                   num_splits=num_splits)
    assert torch.equal(got, want)
    assert_close(got, reference(q, k_rep, v_rep, text_time, num_media, latents, immediate, scale), TOLERANCE[dtype], "o")


@pytest.mark.triton
def test_functional_kv_group_decode_dispatch(decode, device):
    """backend("triton"), a decode step with kv_group: the decode kernel serves it, matching the PyTorch path."""
    import fastflamingo
    from fastflamingo import functional

    r, num_media, latents = 3, 2, 16
    q, k, v = make_inputs(device, 2 * r, 1, 2, 16, num_media * latents, torch.float32, seed=5)
    k, v = k[:2], v[:2]
    mask = MediaMask(torch.tensor([[1], [2], [2], [0], [1], [2]], dtype=torch.int32), num_media, IMMEDIATE)
    with torch.no_grad():
        with fastflamingo.backend("triton"):
            got = functional.media_xattn(q, k, v, mask, kv_group=r)
        with fastflamingo.backend("torch"):
            want = functional.media_xattn(q, k, v, mask, kv_group=r)
    assert_close(got, want.double().cpu(), TOLERANCE[torch.float32], "o")


# ----------------------------------------------------------------------------------------------------------------
# Key mask (KEY_MASK: padding over the cached keys, ANDed with the media rule)
# ----------------------------------------------------------------------------------------------------------------


def key_padding(batch, num_keys, latents, seed=0):
    """(batch, keys) bool: random for sample 0 (its second media wholly hidden), none hidden for sample 1, every
    key for sample 2, the second half of each media for the others."""
    mask = torch.rand(batch, num_keys, generator=torch.Generator().manual_seed(seed + 70)) < 0.6
    mask[0, latents:2 * latents] = False
    mask[1:2] = True
    mask[2:3] = False
    mask[3:] = (torch.arange(num_keys) % latents) < latents // 2
    return mask


@pytest.mark.triton
@pytest.mark.parametrize("num_splits", [1, 3, 8], ids=["direct", "split", "more-splits-than-tiles"])
@pytest.mark.parametrize("immediate", MODES)
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")])
def test_key_mask(decode, device, dtype, immediate, num_splits):
    """Odd shapes (20 latents over 16-key tiles, head_dim 24, 3 tokens with text_time 0, past the last media and
    negative): a token whose visible keys are all hidden, and every token of the fully padded sample 2, get
    exactly 0; the rest equal the float64 oracle with the key mask, whatever the split count (a split may see no
    unhidden key)."""
    num_media, latents = 4, 20
    text_time = torch.tensor([[2, 4, 3], [0, 5, 1], [4, 1, 2], [-1, 3, 4]], dtype=torch.int32)
    q, k, v = make_inputs(device, 4, 3, 2, 24, num_media * latents, dtype, seed=3)
    key_mask = key_padding(4, num_media * latents, latents)
    scale = 24 ** -0.5
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=device)
    decode_ops.launch(q, k, v, text_time.to(device), num_media, latents, immediate, scale,
                      config={"BLOCK_N": 16}, num_splits=num_splits, out=out, key_mask=key_mask.to(device))
    qd, kd, vd = (t.detach().to("cpu", torch.float64) for t in (q, k, v))
    want = oracle.media_xattn(qd, kd, vd, text_time, num_media, immediate, scale, key_mask=key_mask)
    assert_close(out, want, TOLERANCE[dtype], "o")
    seen = torch.isfinite(oracle.media_xattn_lse(qd, kd, text_time, num_media, immediate, scale, key_mask=key_mask))
    out = out.cpu()
    assert (out[~seen.transpose(1, 2)] == 0).all() and (out[2] == 0).all()
    assert (out[0, 0] == 0).all() == immediate  # immediate: token 0 sees only media 2, hidden for sample 0


@pytest.mark.triton
@pytest.mark.parametrize("num_splits", [1, 3], ids=["direct", "split"])
def test_key_mask_with_kv_group(decode, device, num_splits):
    """kv_group 2: sample b reads K/V row and key-mask row b // 2; equal to the launch on repeat_interleaved K/V
    and mask."""
    r, num_media, latents = 2, 3, 16
    text_time = torch.tensor([[3, 1], [2, 3], [0, 1], [3, 3], [1, 2], [2, 0]], dtype=torch.int32).to(device)
    q, k, v = make_inputs(device, 6, 2, 2, 16, num_media * latents, torch.float32, seed=6)
    k, v = k[::r], v[::r]
    key_mask = key_padding(3, num_media * latents, latents, seed=1).to(device)
    got = decode_ops.launch(q, k, v, text_time, num_media, latents, False, 0.25, num_splits=num_splits, kv_group=r,
                            key_mask=key_mask)
    rep = [t.repeat_interleave(r, 0) for t in (k, v, key_mask)]
    want = decode_ops.launch(q, *rep[:2], text_time, num_media, latents, False, 0.25, num_splits=num_splits,
                             key_mask=rep[2])
    assert torch.equal(got, want)
    ref = oracle.media_xattn(*(t.cpu().double() for t in (q, rep[0], rep[1])), text_time.cpu(), num_media, False,
                             0.25, key_mask=rep[2].cpu())
    assert_close(got, ref, TOLERANCE[torch.float32], "o")


@pytest.mark.triton
def test_key_mask_opcheck(decode, device):
    q, k, v = make_inputs(device, 2, 2, 2, 32, 2 * 32, torch.float32)
    text_time = torch.tensor([[1, 2], [0, 2]], dtype=torch.int32, device=device)
    key_mask = key_padding(2, 64, 32).to(device)
    torch.library.opcheck(torch.ops.fastflamingo.media_decode.default,
                          (q, k, v, text_time, 2, 32, False, 0.2, 1, key_mask))
