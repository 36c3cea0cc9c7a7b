"""mllama cross-attention core: the closed-form mask, the Triton kernels (kernels/mllama_xattn.py,
kernels/mllama_decode.py; interpreted on CPU, native on CUDA), the PyTorch path and the dispatch.

Every result is compared with a float64 oracle written from the semantics (fastflamingo.mllama.reference: the
processor mask's meaning, or the additive mask as transformers adds it), computed from the inputs as rounded to the
test dtype. Kernel outputs and gradients are launched into NaN-filled buffers, so every element is proven written.
"""
import random

import pytest
import torch

import fastflamingo
import helpers
from fastflamingo.mllama import mask as M
from fastflamingo.mllama import mllama_xattn, reference, torch_path
from mllama_cases import IMAGE, PAD, processor_mask, random_rows

# max |kernel - reference| / max |reference| for (output, gradients)
TOLERANCE = {torch.float32: (1e-4, 2e-4), torch.float16: (5e-3, 1e-2), torch.bfloat16: (3e-2, 6e-2)}
P, T = 7, 3  # tokens per tile (not a multiple of any kernel tile, like 1601), tiles per image


def _prepare(cam, tokens_per_tile, dtype):
    from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask

    return _prepare_cross_attention_mask(cam, num_vision_tokens=tokens_per_tile, dtype=dtype)


def assert_close(name, actual, expected, tol):
    """max |actual - expected| <= tol * max |expected| (exact when the reference is 0), no NaN (unwritten)."""
    helpers.assert_close(actual.detach().to("cpu", torch.float64), expected, tol, name)


def mixed_layout():
    """Two samples, 13 tokens, up to 2 images of up to 3 tiles: text before the first image (rows that see no
    image), a 1-tile image then a 3-tile image; consecutive images of 2 and 3 tiles; left padding."""
    rows = [[5, 6, IMAGE, 7, 8, 9, 10, IMAGE, 11, 12, 13, 14, 15],
            [PAD, PAD, IMAGE, IMAGE, 7, 8, 9, 10, 11, 12, 13, 14, 15]]
    return processor_mask(rows, [[1, 3], [2, 3]], T)


def make_qkv(device, dtype, batch, num_text, heads, kv_heads, head_dim, num_keys, seed=0):
    """q as a strided view (every other head of a wider projection), k/v as transposed views of a
    (batch, keys, kv_heads, head_dim) projection: the kernels take any strides."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, num_text, 2 * heads, head_dim, generator=g)[:, :, ::2]
    kv = torch.randn(batch, num_keys, 2, kv_heads, head_dim, generator=g)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def nan_like(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------------------------
# The closed form
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("empty_rows", M.EMPTY_ROWS)
def test_closed_form_of_processor_masks(empty_rows):
    """400 random prompts through transformers' processor code: every mask has the closed form, it means what the
    processor mask means, and it is recovered identically from the expanded additive mask a layer receives."""
    rng = random.Random(0)
    for _ in range(50):
        rows, tiles = random_rows(rng, batch=8, length=rng.randint(1, 24), max_images=4, max_tiles=4)
        if not any(tiles):
            continue
        cam = processor_mask(rows, tiles, 4)
        closed = M.from_cross_attention_mask(cam, P, empty_rows)
        assert closed is not None
        assert torch.equal(closed.visible(), reference.visible_keys(cam, P, empty_rows))
        additive, flag = _prepare(cam, P, torch.float32)
        recovered = M.from_additive_mask(additive, P, 4, flag, empty_rows)
        assert recovered is not None
        for name in ("img_start", "img_end", "image_keys"):
            assert torch.equal(getattr(recovered, name), getattr(closed, name)), name
        assert (recovered.has_all, recovered.max_runs) == (closed.has_all, closed.max_runs)


def test_masks_without_closed_form_are_refused():
    cam = mixed_layout()
    additive, _ = _prepare(cam, P, torch.float32)
    assert M.from_additive_mask(additive, P, T) is not None

    def refused(mask, tokens_per_tile=P, max_tiles=T):
        return M.from_additive_mask(mask, tokens_per_tile, max_tiles) is None

    soft = additive.clone()
    soft[0, 0, 5, 3] = -2.0  # a soft bias
    not_constant = additive.clone()
    not_constant[0, 0, 5, 1] = torch.finfo(torch.float32).min  # one key of a visible tile blocked
    gap = torch.zeros(1, 2, 3, T, dtype=torch.long)
    gap[0, 0, 0, 0] = 1
    gap[0, 1, [0, 2], 0] = 1  # a row that sees images 0 and 2 but not 1
    not_prefix = torch.zeros(1, 2, 1, T, dtype=torch.long)
    not_prefix[0, :, 0, 1] = 1  # tile 1 without tile 0
    blocked_row = additive.clone()
    blocked_row[1, 0, 6] = torch.finfo(torch.float32).min  # a row that sees nothing (upstream: uniform average)
    assert refused(soft) and refused(not_constant) and refused(blocked_row)
    assert refused(_prepare(gap, P, torch.float32)[0])
    assert refused(_prepare(not_prefix, P, torch.float32)[0])
    assert refused(additive, tokens_per_tile=P + 1)  # keys are not images x tiles x P
    assert M.from_cross_attention_mask(gap) is None


def test_decode_units_skip_padded_tiles():
    cam = mixed_layout()[:, -1:]  # the last row: what every decode step repeats
    additive, flag = _prepare(cam, P, torch.float32)
    units, count, unit_len = M.decode_units(additive, 2 * T * P, P, 2, "cpu")
    assert unit_len == P and count.tolist() == [3, 5]  # sample 0: image 1 (3 tiles); sample 1: images 0 and 1
    assert units[0, :3].tolist() == [3, 4, 5] and units[1, :5].tolist() == [0, 1, 3, 4, 5]
    # hf: a row that sees no image sees every tile; zero mode: it is ignored
    empty = torch.zeros(1, 1, 1, 2 * T * P)
    assert M.decode_units(empty, 2 * T * P, P, 1, "cpu")[1].tolist() == [2 * T]
    assert M.decode_units(empty, 2 * T * P, P, 1, "cpu", torch.zeros(1, 1, 1, 1))[1].tolist() == [0]
    # a key count that is not a multiple of the tile: one unit of every key
    assert M.decode_units(None, 20, P, 1, "cpu")[1:] == (torch.tensor([1], dtype=torch.int32), 20)


# ----------------------------------------------------------------------------------------------------------------
# Prefill kernels
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kernels():
    pytest.importorskip("triton")
    from fastflamingo.kernels import mllama_xattn

    return mllama_xattn


PREFILL_CASES = [(torch.float32, 1), (torch.float32, 2), (torch.float32, 4), (torch.float16, 2),
                 (torch.bfloat16, 4)]


@pytest.mark.triton
@pytest.mark.parametrize("empty_rows", M.EMPTY_ROWS)
@pytest.mark.parametrize("dtype,group", PREFILL_CASES, ids=[f"{str(d)[6:]}-g{g}" for d, g in PREFILL_CASES])
def test_prefill_kernels_match_fp64(kernels, device, dtype, group, empty_rows):
    """Forward and backward with forced small tiles (several query tiles per run, partial key tiles at every image
    end, 24-wide heads padded to 32) against the float64 oracle; NaN-filled outputs."""
    cam = mixed_layout()
    closed = M.from_cross_attention_mask(cam, P, empty_rows)
    visible = reference.visible_keys(cam, P, empty_rows)
    batch, num_text, kv_heads, head_dim = 2, cam.shape[1], 2, 24
    heads = kv_heads * group
    q, k, v = make_qkv(device, dtype, batch, num_text, heads, kv_heads, head_dim, 2 * T * P)
    do = torch.randn(batch, num_text, heads, head_dim, device=device).to(dtype)
    args = tuple(t.to(device) for t in (closed.img_start, closed.img_end, closed.image_keys))
    scale = head_dim ** -0.5
    config = {"ROWS": 16, "BLOCK_N": 16}
    o = nan_like(q.shape, dtype, device)
    lse = nan_like((batch, heads, num_text), torch.float32, device)
    kernels.mllama_xattn_fwd(q, k, v, *args, closed.image_stride, closed.max_runs, scale, config, out=o, lse=lse)
    grads = [nan_like(t.shape, dtype, device) for t in (q, k, v)]
    kernels.mllama_xattn_bwd(do, q, k, v, o, lse, *args, closed.image_stride, closed.max_runs, scale, config,
                             dq=grads[0], dk=grads[1], dv=grads[2])
    want, want_grads = reference.attention(q, k, v, visible, scale, grad_out=do)
    tol_o, tol_g = TOLERANCE[dtype]
    assert_close("o", o, want, tol_o)
    for name, got, ref in zip(("dq", "dk", "dv"), grads, want_grads):
        assert_close(name, got, ref, tol_g)
    seen = visible.any(-1)
    assert torch.isinf(lse.cpu()).transpose(1, 2).eq(~seen[..., None]).all()  # +inf exactly where nothing is seen


@pytest.mark.triton
def test_prefill_default_config_and_autograd(kernels, device):
    """The op boundary (custom op + autograd) at the default launch config, through ``mllama_xattn``."""
    cam = mixed_layout()
    closed = M.from_cross_attention_mask(cam, P, "hf")
    q, k, v = make_qkv(device, torch.float32, 2, cam.shape[1], 8, 2, 32, 2 * T * P, seed=1)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    do = torch.randn(q.shape, device=device)
    with fastflamingo.backend("triton"):
        out = mllama_xattn(q, k, v, closed)
    out.backward(do)
    want, want_grads = reference.attention(q, k, v, reference.visible_keys(cam, P, "hf"), 32 ** -0.5, do)
    assert_close("o", out, want, 1e-4)
    for name, got, ref in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), want_grads):
        assert_close(name, got, ref, 2e-4)


# ----------------------------------------------------------------------------------------------------------------
# Decode kernel
# ----------------------------------------------------------------------------------------------------------------


def additive_reference(q, k, v, additive, scale):
    """transformers' attention in float64: softmax(scale q k^T + mask) v, GQA by repetition."""
    qd, kd, vd = (t.detach().to("cpu", torch.float64) for t in (q, k, v))
    group = q.shape[2] // k.shape[1]
    scores = torch.einsum("bshd,bhkd->bhsk", qd, kd.repeat_interleave(group, 1)) * scale
    if additive is not None:
        scores = scores + additive.to("cpu", torch.float64)
    return torch.einsum("bhsk,bhkd->bshd", torch.softmax(scores, -1), vd.repeat_interleave(group, 1))


DECODE_CASES = [(torch.float32, 4, 1, 1), (torch.float32, 1, 3, 3), (torch.bfloat16, 4, 1, 2),
                (torch.float16, 2, 2, 5)]


@pytest.mark.triton
@pytest.mark.parametrize("dtype,group,tokens,splits", DECODE_CASES,
                         ids=[f"{str(d)[6:]}-g{g}-t{t}-s{s}" for d, g, t, s in DECODE_CASES])
def test_decode_kernel_matches_fp64(device, dtype, group, tokens, splits):
    """Reads the cache layout in place with the additive mask: hf rows that see no image (all keys), partial tiles,
    an all-blocked row (upstream: uniform average), a soft bias, a batch-1 (stride-0) mask; split counts 1..5."""
    pytest.importorskip("triton")
    from fastflamingo.kernels import mllama_decode

    cam = mixed_layout()[:, -tokens:].clone()
    cam[0, 0] = 0  # sample 0's first decode token sees no image
    additive, _ = _prepare(cam, P, dtype)
    additive = additive.to(device)
    if tokens > 1:
        additive[1, 0, 1] = torch.finfo(dtype).min  # a row that sees nothing at all
        additive[0, 0, -1, :5] = -1.5  # a soft bias
    batch, heads, head_dim = 2, 2 * group, 32
    q, k, v = make_qkv(device, dtype, batch, tokens, heads, 2, head_dim, 2 * T * P, seed=2)
    units, count, unit_len = M.decode_units(additive, 2 * T * P, P, batch, device)
    scale = head_dim ** -0.5
    out = nan_like(q.shape, dtype, device)
    mllama_decode.mllama_decode_fwd(q, k, v, additive[:, 0], units, count, unit_len, scale, {"BLOCK_N": 16},
                                    num_splits=splits, out=out)
    assert_close("o", out, additive_reference(q, k, v, additive, scale), TOLERANCE[dtype][0])
    # one mask row shared by the batch (stride 0), and no mask at all
    shared = additive[:1].expand(batch, -1, -1, -1)
    units, count, unit_len = M.decode_units(shared, 2 * T * P, P, batch, device)
    got = mllama_decode.mllama_decode_fwd(q, k, v, shared[:, 0], units, count, unit_len, scale, num_splits=splits)
    assert_close("o shared mask", got, additive_reference(q, k, v, shared, scale), TOLERANCE[dtype][0])
    units, count, unit_len = M.decode_units(None, 2 * T * P, P, batch, device)
    got = mllama_decode.mllama_decode_fwd(q, k, v, None, units, count, unit_len, scale, num_splits=splits)
    assert_close("o no mask", got, additive_reference(q, k, v, None, scale), TOLERANCE[dtype][0])


# ----------------------------------------------------------------------------------------------------------------
# PyTorch path, dispatch, custom ops, torch.compile
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("empty_rows", M.EMPTY_ROWS)
def test_torch_path_matches_fp64(empty_rows):
    """Runs (closed form) and the dense path with the additive mask agree with the oracle, values and gradients;
    "zero" rows are exactly 0 on both."""
    cam = mixed_layout()
    additive, flag = _prepare(cam, P, torch.float64)
    visible = reference.visible_keys(cam, P, empty_rows)
    q, k, v = (t.requires_grad_() for t in make_qkv("cpu", torch.float64, 2, cam.shape[1], 8, 2, 16, 2 * T * P))
    do = torch.randn(q.shape, dtype=torch.float64)
    want, want_grads = reference.attention(q, k, v, visible, 0.25, do)
    runs = torch_path.runs(q, k, v, M.from_cross_attention_mask(cam, P, empty_rows), 0.25)
    zero_rows = (flag[:, 0, :, 0] == 0) if empty_rows == "zero" else None
    dense = torch_path.dense(q, k, v, additive, 0.25, zero_rows=zero_rows)
    for name, out in (("runs", runs), ("dense", dense)):
        grads = torch.autograd.grad(out, (q, k, v), do)
        assert_close(name, out, want, 1e-12)
        for g_name, got, ref in zip(("dq", "dk", "dv"), grads, want_grads):
            assert_close(f"{name} {g_name}", got, ref, 1e-12)


def test_dispatch(device, monkeypatch):
    """auto on CPU tensors: the PyTorch path; an explicit triton request with a mask that has no closed form raises
    BackendError instead of falling back; a soft bias runs densely, exactly as transformers."""
    cam = mixed_layout()
    additive, _ = _prepare(cam, P, torch.float32)
    q, k, v = make_qkv("cpu", torch.float32, 2, cam.shape[1], 4, 2, 16, 2 * T * P)
    soft = additive.clone()
    soft[:, :, :, :3] = -1.0
    out = mllama_xattn(q, k, v, soft, tokens_per_tile=P, max_tiles=T)
    assert_close("soft", out, additive_reference(q, k, v, soft, 0.25), 1e-5)
    if device == "cpu":
        pytest.importorskip("triton")
        with fastflamingo.backend("triton"), pytest.raises(fastflamingo.BackendError, match="closed form"):
            mllama_xattn(q.requires_grad_(), k, v, soft, tokens_per_tile=P, max_tiles=T)
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        mllama_xattn(q, k, v, additive[:, :, :3])
    with pytest.raises(ValueError, match="not a multiple"):
        mllama_xattn(q[:, :, :3], k, v, additive)


@pytest.mark.triton
def test_opcheck(device):
    from fastflamingo.ops import mllama_xattn as ops

    cam = mixed_layout()
    closed = M.from_cross_attention_mask(cam, P, "hf")
    q, k, v = make_qkv(device, torch.float32, 2, cam.shape[1], 4, 2, 16, 2 * T * P)
    q, k, v = (t.contiguous().requires_grad_() for t in (q, k, v))
    args = (closed.img_start.to(device), closed.img_end.to(device), closed.image_keys.to(device),
            closed.image_stride, closed.max_runs, 0.25)
    torch.library.opcheck(ops.mllama_xattn_fwd, (q, k, v, *args), test_utils=("test_schema", "test_faketensor"))
    o, lse = ops.mllama_xattn_fwd(q.detach(), k.detach(), v.detach(), *args)
    torch.library.opcheck(ops.mllama_xattn_bwd, (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o, lse,
                                                 *args), test_utils=("test_schema", "test_faketensor"))
    additive = _prepare(cam[:, -1:], P, torch.float32)[0].to(device)
    units, count, unit_len = M.decode_units(additive, 2 * T * P, P, 2, device)
    torch.library.opcheck(ops.mllama_xattn_decode, (q[:, :1].detach(), k.detach(), v.detach(), additive[:, 0],
                                                    units, count, unit_len, 0.25),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_torch_compile_decode_step(device, backend):
    """A decode step through ``mllama_xattn`` compiles with fullgraph=True (no host synchronisation, no graph
    break): the decode op on Triton, the dense path on PyTorch."""
    if backend == "triton" and device == "cpu":
        pytest.importorskip("triton")
    cam = mixed_layout()[:, -1:]
    additive = _prepare(cam, P, torch.float32)[0].to(device)
    q, k, v = make_qkv(device, torch.float32, 2, 1, 4, 2, 16, 2 * T * P)

    def step(q, k, v, mask):
        return torch.tanh(mllama_xattn(q, k, v, mask, tokens_per_tile=P, max_tiles=T)) + q

    with torch.no_grad(), fastflamingo.backend(backend):
        got = torch.compile(step, backend="aot_eager", fullgraph=True)(q, k, v, additive)
        want = step(q, k, v, additive)
    torch.testing.assert_close(got, want)
