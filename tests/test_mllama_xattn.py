"""mllama cross-attention core: the closed-form mask, the prefill kernels (kernels/mllama_xattn.py through
fastflamingo/ops/mllama_xattn.py; interpreted on CPU, native on CUDA), the PyTorch path and the dispatch (the
decode kernel: test_mllama_decode.py).

Every result is compared with a float64 oracle written from the semantics (fastflamingo.models.mllama.reference: the
processor mask's meaning, or the additive mask as transformers adds it), computed from the inputs as rounded to the
test dtype. Kernel outputs and gradients are launched into NaN-filled buffers, so every element is proven written.
"""
import random

import pytest
import torch

import fastflamingo
from fastflamingo.models.mllama import mask as M
from fastflamingo.models.mllama import mllama_xattn, reference, torch_path
from mllama_cases import (P, TOLERANCE, T, additive_reference, assert_close, make_qkv, mixed_layout, nan_like,
                          prepare, processor_mask, random_rows)



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
        additive, flag = prepare(cam, P, torch.float32)
        recovered = M.from_additive_mask(additive, P, 4, flag, empty_rows)
        assert recovered is not None
        for name in ("img_start", "img_end", "image_keys"):
            assert torch.equal(getattr(recovered, name), getattr(closed, name)), name
        assert (recovered.has_all, recovered.max_runs) == (closed.has_all, closed.max_runs)


def test_masks_without_closed_form_are_refused():
    cam = mixed_layout()
    additive, _ = prepare(cam, P, torch.float32)
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
    assert refused(prepare(gap, P, torch.float32)[0])
    assert refused(prepare(not_prefix, P, torch.float32)[0])
    assert refused(additive, tokens_per_tile=P + 1)  # keys are not images x tiles x P
    assert M.from_cross_attention_mask(gap) is None


# ----------------------------------------------------------------------------------------------------------------
# Prefill kernels
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kernels():
    """The launchers (fastflamingo.ops.mllama_xattn); the kernels themselves need triton."""
    pytest.importorskip("triton")
    from fastflamingo.ops import mllama_xattn

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
    kernels.launch_fwd(q, k, v, *args, closed.image_stride, closed.max_runs, scale, config, out=o, lse=lse)
    grads = [nan_like(t.shape, dtype, device) for t in (q, k, v)]
    kernels.launch_bwd(do, q, k, v, o, lse, *args, closed.image_stride, closed.max_runs, scale, config,
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


def test_schedules_built_once_per_closed_mask(kernels, device, monkeypatch):
    """Two layers' forward and backward on one closed mask build the query tiles and the token ranges once (the
    layers of a model share the memoised closed mask); a new mask builds them again."""
    from fastflamingo.kernels import mllama_xattn as K

    calls = {"query_tiles": [], "image_token_ranges": []}  # (img_start, and the tile size for the query tiles)
    for name in calls:
        original = getattr(K, name)

        def counted(img_start, img_end, *sizes, _name=name, _original=original):
            calls[_name].append((img_start.data_ptr(),) + sizes[1:])
            return _original(img_start, img_end, *sizes)

        monkeypatch.setattr(K, name, counted)
    cam = mixed_layout()
    q, k, v = make_qkv(device, torch.float32, 2, cam.shape[1], 8, 2, 32, 2 * T * P, seed=2)
    masks = [M.from_cross_attention_mask(cam, P, "hf") for _ in range(2)]
    for closed in [masks[0], masks[0], masks[1]]:
        for _ in range(2):  # two layers
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            with fastflamingo.backend("triton"):
                mllama_xattn(*leaves, closed).sum().backward()
    # each (mask, tile size) once: the forward and dQ kernels share tiles of one size, the layers share everything
    for name, built in calls.items():
        assert len(built) == len(set(built)), (name, built)
    assert len(calls["image_token_ranges"]) == 2


# ----------------------------------------------------------------------------------------------------------------
# PyTorch path, dispatch, custom ops, torch.compile
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("empty_rows", M.EMPTY_ROWS)
def test_torch_path_matches_fp64(empty_rows):
    """Runs (closed form) and the dense path with the additive mask agree with the oracle, values and gradients;
    "zero" rows are exactly 0 on both."""
    cam = mixed_layout()
    additive, flag = prepare(cam, P, torch.float64)
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
    additive, _ = prepare(cam, P, torch.float32)
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
    torch.library.opcheck(ops.fwd_op, (q, k, v, *args), test_utils=("test_schema", "test_faketensor"))
    o, lse = ops.fwd_op(q.detach(), k.detach(), v.detach(), *args)
    torch.library.opcheck(ops.bwd_op, (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o, lse, *args),
                          test_utils=("test_schema", "test_faketensor"))
