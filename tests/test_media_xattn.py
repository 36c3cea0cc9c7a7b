"""Triton masked media cross-attention (kernels/media_xattn.py, fastflamingo/ops/media_xattn.py).

On a CPU machine the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET=1); on a CUDA machine
the same tests run natively. Every result is compared with the dense float64 oracle ``fastflamingo.reference.media_xattn``
(scores, the visibility rule, exact-zero rows), computed from the inputs as rounded to the test dtype.
Outputs and gradients are launched into NaN-filled buffers, so every element is proven written.
"""
import os
import random
import subprocess
import sys

import pytest
import torch

from fastflamingo import reference as oracle
from fastflamingo.kernels._launch import DKDV_SPLITS
from fastflamingo.masks import ALL_PREVIOUS, IMMEDIATE, MediaMask, visible_media
from fastflamingo.ops import media_xattn as xattn_ops
from helpers import assert_close

pytestmark = pytest.mark.triton

# max |kernel - reference| / max |reference|, for (output, gradients); docs/testing.md, "Tolerances"
TOLERANCE = {
    torch.float32: (1e-4, 2e-4),
    torch.float16: (5e-3, 1e-2),
    torch.bfloat16: (3e-2, 6e-2),
}
SMALL_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}


@pytest.fixture(scope="module")
def kernels():
    pytest.importorskip("triton")
    from fastflamingo.kernels import media_xattn

    return media_xattn


# ----------------------------------------------------------------------------------------------------------------
# Reference and helpers
# ----------------------------------------------------------------------------------------------------------------


def visible_mask(text_time, num_media, latents, immediate):
    """(B, T, M*n) bool of the keys each token sees (fastflamingo.masks' rule, which test_api checks against the
    upstream masks)."""
    lo, hi = visible_media(text_time.to("cpu", torch.int64), num_media, immediate)
    key = torch.arange(num_media * latents)
    return (key >= lo[..., None] * latents) & (key < hi[..., None] * latents)


def reference(q, k, v, text_time, num_media, latents, immediate, scale, grad_out=None):
    """The float64 oracle's o and, with grad_out, (dq, dk, dv)."""
    qd, kd, vd = (t.detach().to("cpu", torch.float64).requires_grad_() for t in (q, k, v))
    out = oracle.media_xattn(qd, kd, vd, text_time.cpu(), num_media, immediate, scale)
    if grad_out is None:
        return out.detach(), None
    out.backward(grad_out.detach().to("cpu", torch.float64))
    return out.detach(), (qd.grad, kd.grad, vd.grad)


def nan_like(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def make_inputs(device, batch, num_text, heads, head_dim, num_keys, dtype, *, fused_kv=False, strided_q=False,
                seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(device)

    if strided_q:  # q is a slice of a fused (q, something) projection: head stride 2 * head_dim
        q = randn(batch, num_text, heads, 2 * head_dim)[..., :head_dim]
    else:
        q = randn(batch, num_text, heads, head_dim)
    if fused_kv:  # k, v are views of one fused K/V projection: token stride 2 * heads * head_dim
        inner = heads * head_dim
        kv = randn(batch, num_keys, 2 * inner)
        k = kv[..., :inner].view(batch, num_keys, heads, head_dim)
        v = kv[..., inner:].view(batch, num_keys, heads, head_dim)
    else:
        k = randn(batch, num_keys, heads, head_dim)
        v = randn(batch, num_keys, heads, head_dim)
    return q, k, v


def run_case(kernels, device, *, text_time, heads, head_dim, num_media, latents, dtype, immediate, config=None,
             fused_kv=False, strided_q=False, grad="random", backward=True, seed=0, dkdv_splits=None):
    """Forward (and backward) of one case into NaN-poisoned buffers, compared with the float64 reference."""
    batch, num_text = text_time.shape
    num_keys = num_media * latents
    q, k, v = make_inputs(device, batch, num_text, heads, head_dim, num_keys, dtype, fused_kv=fused_kv,
                          strided_q=strided_q, seed=seed)
    if fused_kv:
        assert k.stride(1) == 2 * heads * head_dim
    text_time = text_time.to(device)
    scale = head_dim ** -0.5
    fwd_tol, bwd_tol = TOLERANCE[dtype]

    out = nan_like(q.shape, dtype, device)
    lse = nan_like((batch, heads, num_text), torch.float32, device)
    o, lse_out = xattn_ops.launch_fwd(q, k, v, text_time, num_media, latents, immediate, scale, config=config,
                                         out=out, lse=lse)
    assert o.data_ptr() == out.data_ptr() and lse_out.data_ptr() == lse.data_ptr()
    seen = visible_mask(text_time, num_media, latents, immediate).any(-1)  # (B, T)

    grad_out = None
    if backward:
        gen = torch.Generator().manual_seed(seed + 1)
        if grad == "expanded":  # the same gradient for every token: stride 0 along the text
            grad_out = torch.randn(batch, 1, heads, head_dim, generator=gen).to(dtype).to(device)
            grad_out = grad_out.expand(batch, num_text, heads, head_dim)
        elif grad == "ones":  # the gradient of .sum(): stride 0 everywhere, including head_dim
            grad_out = torch.ones((), dtype=dtype, device=device).expand(batch, num_text, heads, head_dim)
        else:
            grad_out = torch.randn(batch, num_text, heads, head_dim, generator=gen).to(dtype).to(device)
    ref_o, ref_grads = reference(q, k, v, text_time, num_media, latents, immediate, scale, grad_out)

    assert_close(o, ref_o, fwd_tol, "o")
    o_cpu, lse_cpu = o.detach().cpu(), lse.cpu()
    assert (o_cpu[~seen] == 0).all(), "tokens that see no media must get exactly 0"
    assert torch.isinf(lse_cpu.transpose(1, 2)[~seen]).all() and torch.isfinite(lse_cpu.transpose(1, 2)[seen]).all()
    if not backward:
        return

    dq, dk, dv = (nan_like(t.shape, dtype, device) for t in (q, k, v))
    grads = xattn_ops.launch_bwd(grad_out, q, k, v, o, lse, text_time, num_media, latents, immediate, scale,
                                    config=config, dq=dq, dk=dk, dv=dv, dkdv_splits=dkdv_splits)
    assert all(g.data_ptr() == b.data_ptr() for g, b in zip(grads, (dq, dk, dv)))
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(got, want, bwd_tol, name)
    assert (dq.cpu()[~seen] == 0).all(), "tokens that see no media must get a zero gradient"
    key_seen = visible_mask(text_time, num_media, latents, immediate).any(1)  # (B, L)
    assert (dk.cpu()[~key_seen] == 0).all() and (dv.cpu()[~key_seen] == 0).all()
    return grads


def cumsum_time(batch, num_text, image_positions):
    """text_time = cumsum of <image> flags at the given positions (the same for every sample)."""
    flags = torch.zeros(batch, num_text, dtype=torch.int32)
    flags[:, list(image_positions)] = 1
    return flags.cumsum(1, dtype=torch.int32)


# ----------------------------------------------------------------------------------------------------------------
# Edge cases
# ----------------------------------------------------------------------------------------------------------------

MODES = [pytest.param(True, id="immediate"), pytest.param(False, id="all_previous")]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]


@pytest.mark.parametrize("immediate", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_text_before_first_media(kernels, device, dtype, immediate):
    text_time = cumsum_time(2, 77, [20, 45, 60])
    run_case(kernels, device, text_time=text_time, heads=2, head_dim=64, num_media=3, latents=64, dtype=dtype,
             immediate=immediate)


@pytest.mark.parametrize("dtype,immediate,splits", [
    pytest.param(torch.float32, True, 2, id="fp32-immediate-2"),
    pytest.param(torch.float32, False, 5, id="fp32-all_previous-5"),
    pytest.param(torch.bfloat16, False, 3, id="bf16-all_previous-3"),
])
def test_dkdv_token_splits(kernels, device, dtype, immediate, splits):
    """The dK/dV token loop cut into splits (fp32 partials summed in split order): exact against the fp64
    reference, including a media no token sees, text before the first media and more splits than some media have
    token blocks; bitwise repeatable."""
    text_time = cumsum_time(1, 45, [12, 30])  # three media, the third seen by nothing
    config = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    dq, dk, dv = run_case(kernels, device, text_time=text_time, heads=1, head_dim=32, num_media=3, latents=16,
                          dtype=dtype, immediate=immediate, config=config, dkdv_splits=splits)
    q, k, v = make_inputs(device, 1, 45, 1, 32, 48, dtype, seed=0)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    o, lse = xattn_ops.launch_fwd(q, k, v, text_time.to(device), 3, 16, immediate, 32 ** -0.5, config=config)
    first = xattn_ops.launch_bwd(grad_out, q, k, v, o, lse, text_time.to(device), 3, 16, immediate, 32 ** -0.5,
                                 config=config, dkdv_splits=splits)
    again = xattn_ops.launch_bwd(grad_out, q, k, v, o, lse, text_time.to(device), 3, 16, immediate, 32 ** -0.5,
                                 config=config, dkdv_splits=splits)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_dkdv_split_count_fills_the_gpu(kernels):
    """Shapes only: split when the grid is under two waves of SMs, never more than the token blocks allow."""
    assert kernels.dkdv_splits(programs=1000, num_tokens=4096, num_media=1, immediate=True, block_m=32, sms=132) == 1
    one_image = kernels.dkdv_splits(programs=8, num_tokens=2048, num_media=1, immediate=True, block_m=32, sms=132)
    assert one_image == DKDV_SPLITS.max_splits  # batch 1, one image, 8 heads: 8 programs for 264 SM slots
    assert kernels.dkdv_splits(programs=8, num_tokens=40, num_media=1, immediate=True, block_m=32, sms=132) == 1
    assert kernels.dkdv_splits(programs=64, num_tokens=1024, num_media=32, immediate=True, block_m=16, sms=132) == 1


@pytest.mark.parametrize("immediate", MODES)
@pytest.mark.parametrize("num_text", [1, 63, 111])
def test_text_lengths_media_at_position_zero(kernels, device, num_text, immediate):
    text_time = cumsum_time(2, num_text, [p for p in (0, 30, 70) if p < num_text])
    run_case(kernels, device, text_time=text_time, heads=2, head_dim=32, num_media=3, latents=64,
             dtype=torch.float32, immediate=immediate, config={"BLOCK_M": 32, "BLOCK_N": 32})


@pytest.mark.parametrize("immediate", MODES)
@pytest.mark.parametrize("head_dim", [40, 96, 128])
def test_head_dims_padded(kernels, device, head_dim, immediate):
    text_time = cumsum_time(1, 50, [3, 27])
    run_case(kernels, device, text_time=text_time, heads=2, head_dim=head_dim, num_media=2, latents=64,
             dtype=torch.float16, immediate=immediate)


@pytest.mark.parametrize("immediate", MODES)
@pytest.mark.parametrize("latents", [64, 80, 128])
def test_latents_per_media(kernels, device, latents, immediate):
    """80 latents: key tiles that do not divide a media; 128: video (frames * 64)."""
    text_time = cumsum_time(2, 40, [0, 11, 25])
    run_case(kernels, device, text_time=text_time, heads=1, head_dim=32, num_media=3, latents=latents,
             dtype=torch.float32, immediate=immediate, config={"BLOCK_M": 16, "BLOCK_N": 32})


@pytest.mark.parametrize("immediate", MODES)
def test_more_image_tokens_than_media(kernels, device, immediate):
    """text_time past num_media: immediate sees nothing, all-previous sees every media."""
    text_time = cumsum_time(2, 60, [5, 15, 25, 35, 45])
    assert int(text_time.max()) == 5
    run_case(kernels, device, text_time=text_time, heads=2, head_dim=32, num_media=3, latents=32,
             dtype=torch.float32, immediate=immediate, config=SMALL_BLOCKS)


@pytest.mark.parametrize("immediate", MODES)
@pytest.mark.parametrize("config", [None, SMALL_BLOCKS], ids=["default", "blocks16"])
def test_non_monotone_text_time(kernels, device, immediate, config):
    """IDEFICS resets text_time to 0 after an end-of-sequence token; also negative and out-of-range values.
    Many short runs overflow the run-aligned schedule: the plain-tile fallback must still be exact."""
    pattern = [0, 0, 1, 1, 1, 2, 2, 0, 0, 3, 3, 1, 2, 3, -1, 4, 4, 2, 0, 1] * 4
    text_time = torch.tensor([pattern, pattern[::-1]], dtype=torch.int32)
    run_case(kernels, device, text_time=text_time, heads=2, head_dim=32, num_media=3, latents=16,
             dtype=torch.float32, immediate=immediate, config=config)


@pytest.mark.parametrize("immediate", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_strided_views_and_expanded_grad(kernels, device, dtype, immediate):
    """k, v are views of a fused K/V projection, q a head-strided slice, grad_output expanded (stride 0)."""
    text_time = cumsum_time(2, 45, [4, 20])
    run_case(kernels, device, text_time=text_time, heads=2, head_dim=32, num_media=2, latents=64, dtype=dtype,
             immediate=immediate, fused_kv=True, strided_q=True, grad="expanded")


@pytest.mark.parametrize("immediate", MODES)
def test_fully_expanded_grad(kernels, device, immediate):
    """The gradient of o.sum() has stride 0 along head_dim too: the launcher copies it."""
    text_time = cumsum_time(1, 30, [2, 9])
    run_case(kernels, device, text_time=text_time, heads=2, head_dim=32, num_media=2, latents=32,
             dtype=torch.float16, immediate=immediate, grad="ones")


def test_per_sample_layouts_and_cached_media(kernels, device):
    """Different layouts per sample, one sample that sees nothing, and a decode-style expanded text_time."""
    text_time = torch.stack([
        cumsum_time(1, 40, [0, 13])[0],
        torch.zeros(40, dtype=torch.int32),
        torch.full((40,), 2, dtype=torch.int32),
    ])
    for immediate in (True, False):
        run_case(kernels, device, text_time=text_time, heads=1, head_dim=16, num_media=2, latents=32,
                 dtype=torch.float32, immediate=immediate)
    cached = torch.tensor([2, 1], dtype=torch.int32)[:, None].expand(2, 7)  # stride 0 along the text
    run_case(kernels, device, text_time=cached, heads=2, head_dim=32, num_media=2, latents=64,
             dtype=torch.float32, immediate=False)


@pytest.mark.parametrize("immediate", [
    pytest.param(True, id="immediate"),
    pytest.param(False, id="all_previous", marks=pytest.mark.slow_interpreter),  # every token sees 4160 keys
])
def test_long_text_many_media(kernels, device, immediate):
    """>= 32k tokens and > 256 media per sample (text_time up to 260), against the reference in token chunks."""
    num_text, num_media, latents, heads, head_dim = 32800, 260, 16, 1, 16
    gen = torch.Generator().manual_seed(0)
    positions = torch.randperm(num_text, generator=gen)[:num_media].sort().values
    text_time = cumsum_time(1, num_text, positions.tolist())
    q, k, v = make_inputs(device, 1, num_text, heads, head_dim, num_media * latents, torch.float32)
    grad_out = torch.randn(q.shape, generator=gen).to(device)
    scale = head_dim ** -0.5
    o, lse = xattn_ops.launch_fwd(q, k, v, text_time.to(device), num_media, latents, immediate, scale)
    dq, dk, dv = xattn_ops.launch_bwd(grad_out, q, k, v, o, lse, text_time.to(device), num_media, latents,
                                         immediate, scale)
    ref_o, ref_dq, ref_dk, ref_dv = [], [], 0.0, 0.0
    for chunk in torch.arange(num_text).split(2048):
        o_part, (dq_part, dk_part, dv_part) = reference(q[:, chunk], k, v, text_time[:, chunk], num_media, latents,
                                                         immediate, scale, grad_out[:, chunk])
        ref_o.append(o_part)
        ref_dq.append(dq_part)
        ref_dk, ref_dv = ref_dk + dk_part, ref_dv + dv_part
    assert_close(o, torch.cat(ref_o, 1), 1e-4, "o")
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), (torch.cat(ref_dq, 1), ref_dk, ref_dv)):
        assert_close(got, want, 2e-4, name)


# ----------------------------------------------------------------------------------------------------------------
# Seeded random sweep
# ----------------------------------------------------------------------------------------------------------------


def random_case(seed):
    rng = random.Random(seed)
    batch, heads = rng.choice([1, 1, 2]), rng.choice([1, 2])
    head_dim = rng.choice([16, 32, 40, 64])
    latents = rng.choice([16, 32, 48, 64, 80])
    num_media = rng.randint(1, 4)
    num_text = rng.choice([1, 2, rng.randint(3, 40), rng.randint(41, 96)])
    layout = rng.choice(["cumsum", "cumsum", "prefix", "at_zero", "too_many", "resets", "random", "constant"])
    rows = []
    for _ in range(batch):
        if layout in ("cumsum", "prefix", "at_zero", "too_many"):
            count = {"too_many": num_media + rng.randint(1, 2)}.get(layout, num_media)
            low = num_text // 3 if layout == "prefix" else 0
            flags = [0] * num_text
            for pos in rng.sample(range(low, num_text), min(count, num_text - low)):
                flags[pos] = 1
            if layout == "at_zero":
                flags[0] = 1
            row, total = [], 0
            for flag in flags:
                total += flag
                row.append(total)
        elif layout == "resets":  # IDEFICS: back to 0 after an end of sequence, then counting again
            row, current = [], 0
            for _ in range(num_text):
                r = rng.random()
                current = 0 if r < 0.05 else min(current + 1, num_media) if r < 0.15 else current
                row.append(current)
        elif layout == "random":
            row = [rng.randint(-1, num_media + 1) for _ in range(num_text)]
        else:
            row = [rng.randint(0, num_media)] * num_text
        rows.append(row)
    text_time = torch.tensor(rows, dtype=torch.int32)
    dtype = rng.choice([torch.float32, torch.float32, torch.float16, torch.bfloat16])
    config = rng.choice([None, None, None, {"BLOCK_M": 16, "BLOCK_N": 16}, {"BLOCK_M": 32, "BLOCK_N": 16},
                         {"BLOCK_M": 16, "BLOCK_N": 32}])
    return dict(text_time=text_time, heads=heads, head_dim=head_dim, num_media=num_media, latents=latents,
                dtype=dtype, immediate=rng.random() < 0.5, config=config, fused_kv=rng.random() < 0.25,
                grad=rng.choice(["random", "random", "random", "expanded"]), seed=seed)


@pytest.mark.parametrize("seed", range(200))
def test_random_sweep(kernels, device, seed):
    run_case(kernels, device, **random_case(seed))


# ----------------------------------------------------------------------------------------------------------------
# Device-side schedules (pure torch)
# ----------------------------------------------------------------------------------------------------------------


def brute_force_ranges(text_time, num_media, immediate):
    seen_media = visible_mask(text_time, num_media, 1, immediate)  # latents=1: one column per media
    first = torch.full((text_time.shape[0], num_media), text_time.shape[1], dtype=torch.int32)
    end = torch.zeros((text_time.shape[0], num_media), dtype=torch.int32)
    for b, t, m in seen_media.nonzero().tolist():
        first[b, m] = min(first[b, m], t)
        end[b, m] = max(end[b, m], t + 1)
    return first, end


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("block_m", [16, 64])
def test_schedules(kernels, seed, block_m):
    case = random_case(seed)
    text_time, num_media, immediate = case["text_time"], case["num_media"], case["immediate"]
    batch, num_text = text_time.shape
    lo, hi = visible_media(text_time, num_media, immediate)
    start, end = kernels.query_tile_schedule(lo, hi, num_media, block_m)
    assert start.shape == (batch, kernels.query_tile_slots(num_text, num_media, block_m))
    monotone = bool((text_time[:, 1:] >= text_time[:, :-1]).all())
    for b in range(batch):
        covered = torch.zeros(num_text, dtype=torch.int32)
        aligned = True
        for s, e in zip(start[b].tolist(), end[b].tolist()):
            if s >= e:
                continue
            assert e - s <= block_m
            covered[s:e] += 1
            aligned &= bool((lo[b, s:e] == lo[b, s]).all() and (hi[b, s:e] == hi[b, s]).all())
        assert (covered == 1).all(), "every token in exactly one tile"
        if monotone:  # cumsum layouts always fit the slots: every tile lies inside one run
            assert aligned
    first, stop = kernels.media_token_ranges(lo, hi, num_media, immediate)
    want_first, want_end = brute_force_ranges(text_time, num_media, immediate)
    seen = want_end > 0
    assert torch.equal(first[seen], want_first[seen]) and torch.equal(stop[seen], want_end[seen])
    assert (first[~seen] >= stop[~seen]).all(), "media seen by no token: empty token range"


# ----------------------------------------------------------------------------------------------------------------
# Custom ops, torch.compile, backend dispatch
# ----------------------------------------------------------------------------------------------------------------


def small_problem(device, dtype=torch.float32, requires_grad=True):
    text_time = cumsum_time(2, 24, [3, 12]).to(device)
    q, k, v = make_inputs(device, 2, 24, 2, 32, 2 * 32, dtype)
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v, text_time


@pytest.mark.parametrize("immediate", MODES)
def test_opcheck(kernels, device, immediate):

    q, k, v, text_time = small_problem(device)
    fwd = torch.ops.fastflamingo.media_xattn_fwd
    torch.library.opcheck(fwd.default, (q, k, v, text_time, 2, 32, immediate, 0.2))
    o, lse = fwd(q.detach(), k.detach(), v.detach(), text_time, 2, 32, immediate, 0.2)
    grad_out = torch.randn_like(o)
    torch.library.opcheck(torch.ops.fastflamingo.media_xattn_bwd.default,
                          (grad_out, q.detach(), k.detach(), v.detach(), o, lse, text_time, 2, 32, immediate, 0.2))
    key_mask = torch.arange(64, device=device).expand(2, 64) % 5 != 0  # the key-mask specialization
    key_mask[1, :32] = False
    torch.library.opcheck(fwd.default, (q, k, v, text_time, 2, 32, immediate, 0.2, 1, key_mask))
    o, lse = fwd(q.detach(), k.detach(), v.detach(), text_time, 2, 32, immediate, 0.2, 1, key_mask)
    torch.library.opcheck(torch.ops.fastflamingo.media_xattn_bwd.default,
                          (grad_out, q.detach(), k.detach(), v.detach(), o, lse, text_time, 2, 32, immediate, 0.2,
                           key_mask))


def _gated_block(xattn):
    def block(q, k, v, text_time, gate):
        out = xattn(q, k, v, text_time, 2, 32, False, 32 ** -0.5)
        return (q + torch.tanh(gate) * out).square().mean()

    return block


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile(kernels, device, compile_backend):
    block = _gated_block(xattn_ops.media_xattn)
    gate = torch.tensor(0.5, device=device, requires_grad=True)
    q, k, v, text_time = small_problem(device)
    compiled = torch.compile(block, backend=compile_backend, fullgraph=True)
    loss = compiled(q, k, v, text_time, gate)
    grads = torch.autograd.grad(loss, (q, k, v, gate))
    loss_eager = block(q, k, v, text_time, gate)
    grads_eager = torch.autograd.grad(loss_eager, (q, k, v, gate))
    torch.testing.assert_close(loss, loss_eager)
    for got, want in zip(grads, grads_eager):
        torch.testing.assert_close(got, want)
        assert not torch.isnan(got).any()


@pytest.mark.parametrize("mode", [IMMEDIATE, ALL_PREVIOUS])
def test_functional_dispatch_runs_the_kernel(kernels, device, monkeypatch, mode):
    """``backend("triton")`` sends functional.media_xattn through the kernels (on CPU: interpreted), and
    it matches the PyTorch path in value and gradient."""
    import fastflamingo
    from fastflamingo import functional

    calls = {"fwd": 0, "bwd": 0}
    original_fwd, original_bwd = xattn_ops.launch_fwd, xattn_ops.launch_bwd

    def spy_fwd(*args, **kwargs):
        calls["fwd"] += 1
        return original_fwd(*args, **kwargs)

    def spy_bwd(*args, **kwargs):
        calls["bwd"] += 1
        return original_bwd(*args, **kwargs)

    monkeypatch.setattr(xattn_ops, "launch_fwd", spy_fwd)
    monkeypatch.setattr(xattn_ops, "launch_bwd", spy_bwd)
    q, k, v, text_time = small_problem(device)
    mask = MediaMask(text_time, 2, mode)
    results = {}
    for name in ("triton", "torch"):
        with fastflamingo.backend(name):
            out = functional.media_xattn(q, k, v, mask)
            results[name] = (out, *torch.autograd.grad(out.square().sum(), (q, k, v)))
    assert calls == {"fwd": 1, "bwd": 1}
    for got, want in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_unsupported_reasons(device):
    from fastflamingo.ops.media_xattn import unsupported_reasons

    def tensors(dtype=torch.float16, head_dim=64, k_dtype=None):
        q = torch.zeros(1, 4, 2, head_dim, dtype=dtype)
        k = torch.zeros(1, 8, 2, head_dim, dtype=k_dtype or dtype)
        return q, k, k.clone()

    assert unsupported_reasons(*tensors()) == []
    assert unsupported_reasons(*tensors(torch.float32, 40)) == []
    assert any("float64" in r for r in unsupported_reasons(*tensors(torch.float64)))
    assert any("head_dim 256" in r for r in unsupported_reasons(*tensors(head_dim=256)))
    assert any("head_dim 8" in r for r in unsupported_reasons(*tensors(head_dim=8)))
    assert any("different dtypes" in r for r in unsupported_reasons(*tensors(k_dtype=torch.float32)))


def test_kernels_are_interpreted_under_interpret(kernels):
    """Guards against something importing the kernels before conftest set TRITON_INTERPRET."""
    import triton

    from conftest import INTERPRET

    from fastflamingo.kernels import _attention

    jitted = [kernels._media_xattn_fwd_kernel, _attention.attention_bwd_preprocess_kernel,
              kernels._media_xattn_bwd_dkdv_kernel, kernels._media_xattn_bwd_dq_kernel]
    interpreted = triton.runtime.interpreter.InterpretedFunction
    assert all(isinstance(fn, interpreted) == INTERPRET for fn in jitted)
    # one config under the interpreter; on the GPU the shipped list minus the 16-row tiles (a 128-token text)
    candidates = kernels.FWD_CHOOSER.candidates((64, 64, True, torch.bfloat16, 128, 4))
    long_text = [c for c in kernels.shipped_configs("fwd", torch.bfloat16, 64) if c.kwargs["BLOCK_M"] > 16]
    assert candidates == ([kernels.INTERPRETER_CONFIG] if INTERPRET else long_text)


def test_launcher_validates_outputs(kernels, device):
    q, k, v, text_time = small_problem(device, requires_grad=False)
    with pytest.raises(ValueError, match="out must be"):
        xattn_ops.launch_fwd(q, k, v, text_time, 2, 32, True, 0.1, out=torch.empty(3, device=device))
    with pytest.raises(ValueError, match="k, v must be"):
        xattn_ops.launch_fwd(q, k, v, text_time, 3, 32, True, 0.1)


def test_functional_entry_validates_once(kernels, device, monkeypatch):
    """Through fastflamingo.functional the arguments are checked once, at the entry: the custom ops launch the
    forward and the backward without the launchers' own checks (which serve direct calls)."""
    import fastflamingo
    from fastflamingo import functional

    q, k, v, text_time = small_problem(device)
    monkeypatch.setattr(xattn_ops, "_check_inputs", lambda *args: pytest.fail("validated a second time"))
    with fastflamingo.backend("triton"):
        functional.media_xattn(q, k, v, MediaMask(text_time, 2, IMMEDIATE)).sum().backward()
    assert q.grad is not None and k.grad is not None


@pytest.mark.gpu
def test_int64_offsets_beyond_2_31_elements(kernels, device):
    """Sample 1 of k/v starts past 2**31 elements (a wide fused projection): needs int64 batch offsets."""
    batch, num_text, heads, head_dim, num_media, latents = 2, 64, 1, 64, 256, 64
    num_keys = num_media * latents
    width = 1 + (2 ** 31) // (num_keys * head_dim)  # heads in the backing buffer, only the first one used
    big = torch.zeros(batch, num_keys, width, head_dim, dtype=torch.bfloat16, device=device)
    assert big.stride(0) * 1 >= 2 ** 31
    k = big[:, :, :heads]
    k.normal_()
    v = k.flip(-1)
    q = torch.randn(batch, num_text, heads, head_dim, dtype=torch.bfloat16, device=device)
    text_time = cumsum_time(batch, num_text, [0, 20, 40]).to(device) * 85  # media 85, 170, 255
    scale = head_dim ** -0.5
    o, _ = xattn_ops.launch_fwd(q, k, v, text_time, num_media, latents, True, scale)
    ref, _ = reference(q, k.contiguous(), v.contiguous(), text_time, num_media, latents, True, scale)
    assert_close(o, ref, TOLERANCE[torch.bfloat16][0], "o")


def test_imports_stay_light():
    """``import fastflamingo``, ``fastflamingo.kernels`` and the op module never import triton; the op module and its
    support check work with triton unavailable."""
    code = """
import sys
import fastflamingo, fastflamingo.kernels, fastflamingo.ops.media_xattn
assert "triton" not in sys.modules, "importing fastflamingo imported triton"
sys.modules["triton"] = None  # from here on, importing triton fails
import torch
from fastflamingo.ops.media_xattn import unsupported_reasons
t = torch.zeros(1, 4, 2, 32)
assert unsupported_reasons(t, t, t) == []
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------------------------------------------------------
# kv_group: K/V shared by groups of consecutive samples (beam search through the media cache)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("immediate", MODES)
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
def test_forward_kv_group_matches_repeated_kv(kernels, device, dtype, immediate):
    """Sample b reads K/V row b // kv_group: equal to the kernel on explicitly repeat_interleaved K/V (the same
    arithmetic, so bit-identical), and close to the float64 reference."""
    groups, r, heads, head_dim, num_media, latents = 2, 3, 2, 16, 3, 16
    text_time = cumsum_time(groups * r, 37, [0, 11, 25])
    text_time[1, :5] = 0  # beams may differ in their text
    q, k, v = make_inputs(device, groups * r, 37, heads, head_dim, num_media * latents, dtype)
    k, v = k[:groups], v[:groups]  # one K/V row per group
    text_time = text_time.to(device)
    scale = head_dim ** -0.5
    got, lse = xattn_ops.launch_fwd(q, k, v, text_time, num_media, latents, immediate, scale,
                                       config=SMALL_BLOCKS, kv_group=r)
    k_rep, v_rep = k.repeat_interleave(r, 0), v.repeat_interleave(r, 0)
    want, want_lse = xattn_ops.launch_fwd(q, k_rep, v_rep, text_time, num_media, latents, immediate, scale,
                                             config=SMALL_BLOCKS)
    assert torch.equal(got, want) and torch.equal(lse, want_lse)
    ref, _ = reference(q, k_rep, v_rep, text_time, num_media, latents, immediate, scale)
    assert_close(got, ref, TOLERANCE[dtype][0], "o")
    with pytest.raises(ValueError, match="kv_group must be >= 1 and divide the batch"):
        xattn_ops.launch_fwd(q, k, v, text_time, num_media, latents, immediate, scale, kv_group=4)
    with pytest.raises(ValueError, match="k, v must be"):  # the backward takes one K/V row per sample only
        xattn_ops.launch_bwd(got, q, k, v, got, lse, text_time, num_media, latents, immediate, scale)


def test_functional_kv_group_triton_prefill_and_grad(kernels, device):
    """backend("triton") with kv_group and more tokens than a decode step: the prefill kernel serves it with no
    K/V copy, matching the PyTorch path; with a gradient required it raises."""
    import fastflamingo
    from fastflamingo import functional

    r, num_media, latents = 2, 2, 16
    q, k, v = make_inputs(device, 2 * r, 20, 2, 16, num_media * latents, torch.float32, seed=4)
    k, v = k[:2], v[:2]
    mask = MediaMask(cumsum_time(2 * r, 20, [0, 9]), num_media, ALL_PREVIOUS)
    with torch.no_grad():
        with fastflamingo.backend("triton"):
            got = functional.media_xattn(q, k, v, mask, kv_group=r)
        with fastflamingo.backend("torch"):
            want = functional.media_xattn(q, k, v, mask, kv_group=r)
    assert_close(got, want.double().cpu(), TOLERANCE[torch.float32][0], "o")
    with fastflamingo.backend("triton"), pytest.raises(ValueError, match="inference only"):
        functional.media_xattn(q.requires_grad_(True), k, v, mask, kv_group=r)


# ----------------------------------------------------------------------------------------------------------------
# Key mask (padding over the keys, ANDed with the media rule): the reference and the PyTorch path
# ----------------------------------------------------------------------------------------------------------------


def key_padding(batch, num_media, latents, seed=0):
    """(batch, num_media * latents) bool: sample 0's second media wholly hidden and the rest random, sample 1
    unpadded, sample 2 fully padded, further samples right-padded per media."""
    gen = torch.Generator().manual_seed(seed + 50)
    mask = torch.rand(batch, num_media * latents, generator=gen) < 0.6
    mask[0, latents:2 * latents] = False
    if batch > 1:
        mask[1] = True
    if batch > 2:
        mask[2] = False
    for b in range(3, batch):
        mask[b] = (torch.arange(num_media * latents) % latents) < (latents + 1) // 2
    return mask


def masked_case(batch, num_text, num_media, latents, heads, head_dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    text_time = torch.randint(-1, num_media + 2, (batch, num_text), generator=gen, dtype=torch.int32)
    q, k, v = (torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
               for shape in ((batch, num_text, heads, head_dim), (batch, num_media * latents, heads, head_dim),
                             (batch, num_media * latents, heads, head_dim)))
    return text_time, q, k, v, key_padding(batch, num_media, latents, seed)


def looped_key_mask_oracle(q, k, v, text_time, num_media, immediate, scale, key_mask):
    """Per sample, token and head: softmax over the keys that are both in the token's media and unhidden,
    selected (not masked); 0 where none is. Independent of fastflamingo.reference's dense formulation."""
    latents = k.shape[1] // num_media
    lo, hi = visible_media(text_time, num_media, immediate)
    out = torch.zeros(q.shape, dtype=q.dtype)
    for b in range(q.shape[0]):
        for t in range(q.shape[1]):
            keys = torch.arange(lo[b, t] * latents, hi[b, t] * latents)
            keys = keys[key_mask[b, keys]]
            if keys.numel():
                for h in range(q.shape[2]):
                    p = torch.softmax(q[b, t, h] @ k[b, keys, h].T * scale, dim=-1)
                    out[b, t, h] = p @ v[b, keys, h]
    return out


@pytest.mark.parametrize("immediate", MODES)
def test_reference_key_mask_matches_looped_oracle(immediate):
    text_time, q, k, v, key_mask = masked_case(4, 11, 3, 5, 2, 8, torch.float64)
    want = looped_key_mask_oracle(q, k, v, text_time, 3, immediate, 0.4, key_mask)
    assert_close(oracle.media_xattn(q, k, v, text_time, 3, immediate, 0.4, key_mask=key_mask), want, 1e-12)
    lse = oracle.media_xattn_lse(q, k, text_time, 3, immediate, 0.4, key_mask=key_mask)
    seen = want.abs().sum((-1, -2)) > 0  # (B, T)
    assert torch.isinf(lse.transpose(1, 2)[~seen]).all() and torch.isfinite(lse.transpose(1, 2)[seen]).all()


def _torch_path_vs_reference(text_time, q, k, v, key_mask, num_media, immediate, scale, dtype, mask_form="closed"):
    from fastflamingo import backend, functional

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    mask = MediaMask(text_time, num_media, IMMEDIATE if immediate else ALL_PREVIOUS)
    if mask_form == "dense":  # a boolean (batch, text, media) tensor: the general (no closed form) path
        mask = mask.visible()
    with backend("torch"):
        out = functional.media_xattn(*leaves, mask, scale=scale, key_mask=key_mask)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    out.backward(grad_out.to(dtype))
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = oracle.media_xattn(*ref, text_time, num_media, immediate, scale, key_mask=key_mask)
    want.backward(grad_out)
    fwd_tol, bwd_tol = TOLERANCE.get(dtype, (1e-12, 1e-12))
    assert out.dtype == dtype
    assert_close(out, want, fwd_tol, "o")
    for name, leaf, r in zip(("dq", "dk", "dv"), leaves, ref):
        assert_close(leaf.grad, r.grad, bwd_tol, name)
    return out.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("num_text", [pytest.param(3, id="decode-length"), pytest.param(29, id="prefill-length")])
@pytest.mark.parametrize("mask_form", ["closed", "dense"])
@pytest.mark.parametrize("immediate", MODES)
@pytest.mark.parametrize("dtype", [pytest.param(torch.float64, id="fp64"), *DTYPES])
def test_torch_path_key_mask(dtype, immediate, mask_form, num_text):
    """functional.media_xattn(key_mask=...) on the PyTorch path against the fp64 oracle: output and gradients;
    tokens whose visible keys are all hidden (and every token of the fully padded sample) get exactly 0 and pass
    no gradient; hidden keys get zero dK/dV."""
    text_time, q, k, v, key_mask = masked_case(4, num_text, 3, 7, 2, 40, dtype, seed=num_text)
    out, (dq, dk, dv) = _torch_path_vs_reference(text_time, q, k, v, key_mask, 3, immediate, 0.3, dtype, mask_form)
    assert (out[2] == 0).all() and (dq[2] == 0).all(), "the fully padded sample sees nothing"
    assert (dk[~key_mask] == 0).all() and (dv[~key_mask] == 0).all()


def test_torch_path_key_mask_with_kv_group():
    """kv_group r: the key mask has K/V's batch and sample b uses row b // r, like K and V (inference only)."""
    from fastflamingo import backend, functional

    text_time, q, k, v, key_mask = masked_case(6, 13, 2, 5, 3, 16, torch.float32, seed=7)
    r = 2
    k, v, key_mask = k[::r], v[::r], key_mask[::r]  # one K/V row (and mask row) per group of r samples
    mask = MediaMask(text_time, 2, ALL_PREVIOUS)
    with torch.no_grad(), backend("torch"):
        got = functional.media_xattn(q, k, v, mask, kv_group=r, key_mask=key_mask)
        dense = functional.media_xattn(q, k, v, mask.visible(), kv_group=r, key_mask=key_mask)
    want = oracle.media_xattn(q.double(), k.double().repeat_interleave(r, 0), v.double().repeat_interleave(r, 0),
                              text_time, 2, False, 16 ** -0.5, key_mask=key_mask.repeat_interleave(r, 0))
    assert_close(got, want, 1e-5, "closed form")
    assert_close(dense, want, 1e-5, "dense mask")


def test_torch_path_key_mask_gradcheck():
    from fastflamingo import backend, functional

    text_time, q, k, v, key_mask = masked_case(3, 5, 2, 3, 2, 4, torch.float64, seed=3)
    mask = MediaMask(text_time, 2, IMMEDIATE)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    with backend("torch"):
        assert torch.autograd.gradcheck(lambda *ts: functional.media_xattn(*ts, mask, key_mask=key_mask), leaves)


def test_key_mask_all_visible_equals_no_key_mask():
    """An all-True (or all-ones integer) key mask changes nothing but the path."""
    from fastflamingo import functional

    text_time, q, k, v, _ = masked_case(3, 17, 3, 4, 2, 16, torch.float32, seed=4)
    mask = MediaMask(text_time, 3, IMMEDIATE)
    plain = functional.media_xattn(q, k, v, mask)
    ones = torch.ones(k.shape[:2], dtype=torch.int64)
    torch.testing.assert_close(functional.media_xattn(q, k, v, mask, key_mask=ones), plain, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Key mask on the Triton kernels (KEY_MASK: the prefill forward, dK/dV and dQ kernels)
# ----------------------------------------------------------------------------------------------------------------


def run_key_mask_case(device, text_time, q, k, v, key_mask, num_media, immediate, dtype, config, dkdv_splits=None):
    """Forward and backward of the kernels with ``key_mask`` into NaN-poisoned buffers, against the float64 oracle
    on the same (rounded) inputs; returns (o, lse, (dq, dk, dv)) on the CPU."""
    latents = k.shape[1] // num_media
    scale = q.shape[-1] ** -0.5
    q, k, v, text_time, mask_dev = (t.to(device) for t in (q, k, v, text_time, key_mask))
    out, lse = nan_like(q.shape, dtype, device), nan_like((q.shape[0], q.shape[2], q.shape[1]), torch.float32, device)
    xattn_ops.launch_fwd(q, k, v, text_time, num_media, latents, immediate, scale, config=config, out=out, lse=lse,
                         key_mask=mask_dev)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(11)).to(dtype).to(device)
    grads = [nan_like(t.shape, dtype, device) for t in (q, k, v)]
    xattn_ops.launch_bwd(grad_out, q, k, v, out, lse, text_time, num_media, latents, immediate, scale, config=config,
                         dq=grads[0], dk=grads[1], dv=grads[2], dkdv_splits=dkdv_splits, key_mask=mask_dev)
    ref = [t.detach().to("cpu", torch.float64).requires_grad_() for t in (q, k, v)]
    want = oracle.media_xattn(*ref, text_time.cpu(), num_media, immediate, scale, key_mask=key_mask)
    want.backward(grad_out.cpu().double())
    fwd_tol, bwd_tol = TOLERANCE[dtype]
    assert_close(out, want, fwd_tol, "o")
    for name, got, leaf in zip(("dq", "dk", "dv"), grads, ref):
        assert torch.isfinite(got.cpu()).all(), f"{name} is not finite"
        assert_close(got, leaf.grad, bwd_tol, name)
    want_lse = oracle.media_xattn_lse(*(t.cpu() for t in (q, k)), text_time.cpu(), num_media, immediate, scale,
                                      key_mask=key_mask)
    seen = torch.isfinite(want_lse)  # (B, H, T): a row with a visible key
    lse = lse.cpu()
    assert torch.isinf(lse[~seen]).all() and (lse[~seen] > 0).all(), "a row that sees no key saves LSE +inf"
    assert_close(lse[seen], want_lse[seen].double(), 1e-5, "lse")
    o, (dq, dk, dv) = out.cpu(), (g.cpu() for g in grads)
    unseen = ~seen.transpose(1, 2)  # (B, T, H)
    assert (o[unseen] == 0).all() and (dq[unseen] == 0).all(), "a row that sees no key gets exactly 0"
    assert (dk[~key_mask] == 0).all() and (dv[~key_mask] == 0).all(), "a hidden key gets zero dK/dV"
    return o, lse, (dq, dk, dv)


@pytest.mark.parametrize("dkdv_splits", [1, 2])
@pytest.mark.parametrize("immediate", MODES)
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")])
def test_key_mask_kernels_match_the_oracle(kernels, device, dtype, immediate, dkdv_splits):
    """Random key masks ANDed with the media rule, odd shapes (24 latents over 16-key tiles, 37 tokens, head_dim
    24 padded to 32, text_time out of range and non-monotone): sample 0 has a media wholly hidden, sample 1 none,
    sample 2 every key (all of its rows exactly 0, gradients finite and equal to the reference's), sample 3 half of
    each media."""
    text_time, q, k, v, key_mask = masked_case(4, 37, 3, 24, 2, 24, dtype, seed=21)
    o, _, _ = run_key_mask_case(device, text_time, q, k, v, key_mask, 3, immediate, dtype, SMALL_BLOCKS,
                                dkdv_splits)
    assert (o[2] == 0).all(), "the fully padded sample sees nothing"


@pytest.mark.parametrize("immediate", MODES)
def test_key_mask_with_run_aligned_tiles_and_interpreter_config(kernels, device, immediate):
    """A cumsum layout (run-aligned query tiles, media-aligned key tiles) at the interpreter's own config, with
    tokens before the first media and a media whose keys are all hidden for one sample."""
    text_time = cumsum_time(3, 50, [4, 20, 33])
    _, q, k, v, key_mask = masked_case(3, 50, 3, 16, 2, 32, torch.float32, seed=5)
    key_mask[1, 16:32] = False  # sample 1: media 2 hidden; its tokens see nothing in immediate mode
    o, _, _ = run_key_mask_case(device, text_time, q, k, v, key_mask, 3, immediate, torch.float32, None)
    if immediate:
        assert (o[1, 20:33] == 0).all()


def test_key_mask_all_visible_is_bitwise_the_plain_kernel(kernels, device):
    """An all-True key mask gives exactly the output, LSE and gradients of the kernels without one: the mask only
    removes keys."""
    text_time, q, k, v, _ = masked_case(2, 29, 2, 16, 2, 16, torch.float32, seed=8)
    q, k, v, text_time = (t.to(device) for t in (q, k, v, text_time))
    ones = torch.ones(k.shape[:2], dtype=torch.bool, device=device)
    results = []
    for key_mask in (None, ones):
        o, lse = xattn_ops.launch_fwd(q, k, v, text_time, 2, 16, False, 0.25, config=SMALL_BLOCKS, key_mask=key_mask)
        grads = xattn_ops.launch_bwd(torch.ones_like(o), q, k, v, o, lse, text_time, 2, 16, False, 0.25,
                                     config=SMALL_BLOCKS, key_mask=key_mask)
        results.append((o, lse, *grads))
    for got, want in zip(*results):
        assert torch.equal(got, want)


@pytest.mark.parametrize("immediate", MODES)
def test_key_mask_with_kv_group(kernels, device, immediate):
    """kv_group 2: query sample b reads K/V row and key-mask row b // 2 (the forward; grouped K/V is inference
    only), equal to the kernel on repeat_interleaved K/V and mask, and to the oracle."""
    r = 2
    text_time, q, k, v, key_mask = masked_case(6, 23, 3, 16, 2, 16, torch.float32, seed=13)
    k, v, key_mask = k[::r], v[::r], key_mask[::r]  # one K/V row (and mask row) per group of r samples
    q, k, v, text_time, mask_dev = (t.to(device) for t in (q, k, v, text_time, key_mask))
    got, lse = xattn_ops.launch_fwd(q, k, v, text_time, 3, 16, immediate, 0.25, config=SMALL_BLOCKS, kv_group=r,
                                    key_mask=mask_dev)
    rep = [t.repeat_interleave(r, 0) for t in (k, v, mask_dev)]
    want, want_lse = xattn_ops.launch_fwd(q, rep[0], rep[1], text_time, 3, 16, immediate, 0.25, config=SMALL_BLOCKS,
                                          key_mask=rep[2])
    assert torch.equal(got, want) and torch.equal(lse, want_lse)
    ref = oracle.media_xattn(q.cpu().double(), rep[0].cpu().double(), rep[1].cpu().double(), text_time.cpu(), 3,
                             immediate, 0.25, key_mask=rep[2].cpu())
    assert_close(got, ref, TOLERANCE[torch.float32][0], "o")
    with pytest.raises(ValueError, match=r"key_mask must be bool \(3, 48\)"):  # the mask has K/V's batch
        xattn_ops.launch_fwd(q, k, v, text_time, 3, 16, immediate, 0.25, kv_group=r, key_mask=rep[2])


@pytest.mark.parametrize("num_text", [pytest.param(3, id="decode"), pytest.param(29, id="prefill")])
@pytest.mark.parametrize("mode", [IMMEDIATE, ALL_PREVIOUS])
def test_functional_key_mask_on_triton_matches_the_torch_path(kernels, device, monkeypatch, mode, num_text):
    """backend("triton") with key_mask (integer 0/1, as callers pass it): decode-length calls without a gradient
    take the split-key decode kernel, the others the prefill kernels; output and gradients equal the PyTorch
    path's, and the fully padded sample gets exactly 0."""
    import fastflamingo
    from fastflamingo import functional
    from fastflamingo.ops import media_decode as decode_ops

    calls = {"decode": 0, "prefill": 0}

    def spy(name, launcher):
        def launch(*args, **kwargs):
            assert kwargs["key_mask"] is not None
            calls[name] += 1
            return launcher(*args, **kwargs)
        return launch

    monkeypatch.setattr(decode_ops, "launch", spy("decode", decode_ops.launch))
    monkeypatch.setattr(xattn_ops, "launch_fwd", spy("prefill", xattn_ops.launch_fwd))
    text_time, q, k, v, key_mask = masked_case(4, num_text, 3, 16, 2, 16, torch.float32, seed=num_text)
    q, k, v = (t.to(device) for t in (q, k, v))
    mask = MediaMask(text_time.to(device), 3, mode)
    key_mask = key_mask.to(torch.int64).to(device)
    results = {}
    for name in ("triton", "torch"):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        with fastflamingo.backend(name):
            with torch.no_grad():
                plain = functional.media_xattn(q, k, v, mask, key_mask=key_mask)
            out = functional.media_xattn(*leaves, mask, key_mask=key_mask)
        results[name] = (plain, out, *torch.autograd.grad(out.square().sum(), leaves))
    for got, want in zip(results["triton"], results["torch"]):
        assert_close(got, want.double(), 2e-5, "triton vs torch")
    assert (results["triton"][0][2] == 0).all() and (results["triton"][1][2] == 0).all()
    decode = num_text <= fastflamingo._backend.DECODE_MAX_TOKENS
    assert calls == ({"decode": 1, "prefill": 1} if decode else {"decode": 0, "prefill": 2})


def test_autotune_key_separates_the_key_mask_specialization(kernels):
    q = torch.empty(2, 100, 4, 64, dtype=torch.bfloat16)
    plain, masked = kernels.autotune_key(q, 3, 64, True), kernels.autotune_key(q, 3, 64, True, True)
    assert plain != masked and len(plain) == len(kernels.AUTOTUNE_KEY) == len(masked)
    assert dict(zip(kernels.AUTOTUNE_KEY, masked))["key_mask"] is True
