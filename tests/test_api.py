"""Backend selection, the closed-form mask, input validation and import hygiene."""
import os
import subprocess
import sys

import pytest
import torch

import fastflamingo as ff
from fastflamingo import functional as F
from fastflamingo import masks
from fastflamingo.ops import torch_path
from fastflamingo.testing import random_media_locations
from helpers import assert_close


# ---------------------------------------------------------------------------------------------- backend selection


def test_backend_context_manager_and_env(monkeypatch):
    monkeypatch.delenv("FASTFLAMINGO_BACKEND", raising=False)
    assert ff.requested_backend() == "auto"
    monkeypatch.setenv("FASTFLAMINGO_BACKEND", "torch")
    assert ff.requested_backend() == "torch"
    with ff.backend("triton"):
        assert ff.requested_backend() == "triton"
        with ff.backend("auto"):
            assert ff.requested_backend() == "auto"
        assert ff.requested_backend() == "triton"
    assert ff.requested_backend() == "torch"
    monkeypatch.setenv("FASTFLAMINGO_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTFLAMINGO_BACKEND='cuda'.*auto, torch, triton"):
        ff.requested_backend()
    with pytest.raises(ValueError, match="backend='fast'"):
        with ff.backend("fast"):
            pass


def _attention_inputs(batch=2, num_text=9, num_media=2, latents=3, heads=2, head_dim=8, dtype=torch.float32):
    q = torch.randn(batch, num_text, heads, head_dim, dtype=dtype)
    k = torch.randn(batch, num_media * latents, heads, head_dim, dtype=dtype)
    v = torch.randn_like(k)
    ml = torch.zeros(batch, num_text, dtype=torch.bool)
    ml[:, [1, 5]] = True
    return q, k, v, masks.from_media_locations(ml, num_media)


def test_auto_uses_torch_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(torch_path, "_runs_path", lambda *a: calls.append(1) or a[0].new_zeros(a[0].shape))
    q, k, v, mask = _attention_inputs()
    with ff.backend("auto"):
        F.media_xattn(q, k, v, mask)
    assert calls == [1]


def test_explicit_triton_never_falls_back(monkeypatch):
    """Without the interpreter, CPU tensors cannot run the kernels: an explicit request raises with the reasons."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, mask = _attention_inputs()
    with ff.backend("triton"), pytest.raises(ff.BackendError, match="tensors are on cpu"):
        F.media_xattn(q, k, v, mask)
    dense = mask.visible()
    with ff.backend("triton"), pytest.raises(ff.BackendError, match="no closed form"):
        F.media_xattn(q, k, v, dense)


# ---------------------------------------------------------------------------------------------- the closed form


def upstream_mask(media_locations, num_media, latents, immediate, use_cached_media=False, num_text=None):
    """OpenFlamingo's text x media-token boolean mask (helpers.py:196-218), for comparison only."""
    if use_cached_media:
        text_time = media_locations.sum(-1, keepdim=True).expand(-1, num_text)
    else:
        text_time = media_locations.cumsum(-1)
    media_time = torch.arange(num_media).repeat_interleave(latents) + 1
    op = torch.eq if immediate else torch.ge
    return op(text_time[:, :, None], media_time[None, None, :])


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("immediate", [True, False])
def test_closed_form_equals_upstream_mask(seed, immediate):
    g = torch.Generator().manual_seed(seed)
    batch, num_text, num_media, latents = 3, int(torch.randint(1, 40, (1,), generator=g)), 4, 3
    ml = random_media_locations(batch, num_text, num_media + 2, generator=g)  # sometimes more <image> than media
    mask = masks.from_media_locations(ml, num_media, only_attend_immediate_media=immediate)
    dense = mask.visible().repeat_interleave(latents, dim=-1)
    assert torch.equal(dense, upstream_mask(ml, num_media, latents, immediate))
    # runs cover every token exactly once, in order, and agree with the per-token range
    lo, hi = mask.media_range()
    covered = torch.zeros(batch, num_text, dtype=torch.int32)
    for b, t0, t1, r_lo, r_hi in torch_path.runs(mask):
        rows = slice(None) if b is None else slice(b, b + 1)
        covered[rows, t0:t1] += 1
        assert (lo[rows, t0:t1] == r_lo).all() and (hi[rows, t0:t1] == r_hi).all()
    assert (covered == 1).all()


def test_cached_media_mask():
    ml = torch.tensor([[0, 1, 0, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    mask = masks.from_media_locations(ml, 3, use_cached_media=True, num_text=2)
    assert mask.text_time.tolist() == [[2, 2], [0, 0]]
    dense = mask.visible().repeat_interleave(2, -1)
    assert torch.equal(dense, upstream_mask(ml, 3, 2, True, use_cached_media=True, num_text=2))


def test_mask_is_shared_across_layers_and_invalidated_on_change():
    ml = torch.zeros(2, 6, dtype=torch.bool)
    ml[:, 2] = True
    a = masks.from_media_locations(ml, 1)
    assert masks.from_media_locations(ml, 1) is a  # same tensor, same version: one derivation per forward
    assert masks.from_media_locations(ml, 1, only_attend_immediate_media=False) is not a
    ml[:, 4] = True  # in-place change bumps the version counter
    assert masks.from_media_locations(ml, 2) is not a


def test_idefics_masks_to_closed_form():
    from fastflamingo.models.idefics import mask as image_mask

    one_hot = torch.tensor([[[0, 0], [1, 0], [1, 0], [0, 0], [0, 1]]])  # a reset after an end-of-sequence token
    mask = image_mask.from_image_attention_mask(one_hot)
    assert mask.mode == "immediate" and mask.text_time.tolist() == [[0, 1, 1, 0, 2]]
    prefix = torch.tensor([[[0, 0], [1, 0], [1, 1]]])
    mask = image_mask.from_image_attention_mask(prefix)
    assert mask.mode == "all_previous" and mask.text_time.tolist() == [[0, 1, 2]]
    general = torch.tensor([[[0, 1, 0], [1, 0, 1]]])
    assert isinstance(image_mask.from_image_attention_mask(general), torch.Tensor)
    additive = torch.where(one_hot.bool(), 0.0, torch.finfo(torch.float32).min)
    additive = additive.repeat_interleave(4, -1)[:, None]
    mask = image_mask.from_idefics_additive_mask(additive, 2, 4)
    assert mask.text_time.tolist() == [[0, 1, 1, 0, 2]]


# ---------------------------------------------------------------------------------------------- PyTorch path


def dense_reference(q, k, v, allowed_keys, scale):
    """fp64 attention with a dense key mask; rows with no key give exactly zero."""
    q, k, v = (t.double() for t in (q, k, v))
    scores = torch.einsum("bthd,bshd->bhts", q, k) * scale
    scores = scores.masked_fill(~allowed_keys[:, None], float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    return torch.einsum("bhts,bshd->bthd", probs, v)


@pytest.mark.parametrize("few_runs", [0, 10**6], ids=["chunked", "per-run"])
@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("immediate", [True, False])
def test_torch_path_matches_dense_fp64(seed, immediate, few_runs, monkeypatch):
    monkeypatch.setattr(torch_path, "_FEW_RUNS", few_runs)  # exercise both strategies of the PyTorch path
    g = torch.Generator().manual_seed(seed)
    batch, num_text, num_media, latents = 2, int(torch.randint(1, 50, (1,), generator=g)), 3, 5
    heads, head_dim = 2, 8
    q = torch.randn(batch, num_text, heads, head_dim, generator=g, requires_grad=True)
    kv = torch.randn(batch, num_media * latents, 2 * heads * head_dim, generator=g, requires_grad=True)
    k = kv[..., : heads * head_dim].view(batch, -1, heads, head_dim)  # strided views of a fused projection
    v = kv[..., heads * head_dim :].view(batch, -1, heads, head_dim)
    ml = random_media_locations(batch, num_text, num_media + 1, generator=g)
    mask = masks.from_media_locations(ml, num_media, only_attend_immediate_media=immediate)
    allowed = mask.visible().repeat_interleave(latents, -1)
    with ff.backend("torch"):
        out = F.media_xattn(q, k, v, mask)
    ref = dense_reference(q, k, v, allowed, head_dim**-0.5)
    assert_close(out, ref, 1e-5, "output")
    grad = torch.randn(out.shape, generator=g).expand_as(out)  # stride-0 style gradients
    gq, gkv = torch.autograd.grad(out, (q, kv), grad, materialize_grads=True)
    rq, rkv = torch.autograd.grad(ref, (q, kv), grad.double(), materialize_grads=True)
    assert_close(gq, rq, 1e-5, "dq")
    assert_close(gkv, rkv, 1e-5, "dkv")
    empty = ~allowed.any(-1)
    assert (out[empty] == 0).all() and (gq[empty] == 0).all()


def test_general_idefics_mask_on_torch_path():
    q, k, v, _ = _attention_inputs(num_media=3)
    allowed = torch.zeros(2, 9, 3, dtype=torch.bool)
    allowed[:, 2:, 0] = True
    allowed[:, 5:, 2] = True  # {0, 2}: no closed form
    allowed[1, 7] = False
    out = F.media_xattn(q, k, v, allowed)
    ref = dense_reference(q, k, v, allowed.repeat_interleave(3, -1), 8**-0.5)
    assert_close(out, ref, 1e-5, "general mask")
    assert (out[:, :2] == 0).all() and (out[1, 7] == 0).all()


def test_gated_residual_dtype_and_row_gate():
    x = torch.randn(2, 3, 4, dtype=torch.bfloat16)
    h = torch.randn(2, 3, 4, dtype=torch.bfloat16)
    alpha = torch.tensor([0.3])
    assert F.gated_residual(x, h, alpha).dtype == torch.float32  # as upstream's (1,)-shaped fp32 gate
    gate = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    out = F.gated_residual(x.float(), h.float(), torch.randn(1, 1, 4), row_gate=gate)
    assert torch.equal(out[gate == 0], x.float()[gate == 0])


def test_one_public_name_per_op():
    """No aliases: every public function of fastflamingo.functional is bound to one name, and __all__ lists them."""
    public = {name: obj for name, obj in vars(F).items()
              if not name.startswith("_") and callable(obj) and getattr(obj, "__module__", None) == F.__name__}
    assert sorted(public) == sorted(F.__all__)
    names_of = {}
    for name, obj in public.items():
        names_of.setdefault(id(obj), []).append(name)
    assert all(len(names) == 1 for names in names_of.values()), [n for n in names_of.values() if len(n) > 1]


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_get_clear_errors():
    block = ff.GatedCrossAttentionBlock(dim=16, dim_visual=12, dim_head=4, heads=2)
    x, media = torch.randn(2, 5, 16), torch.randn(2, 3, 4, 12)
    ml = torch.zeros(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, text, dim\), got \(5, 16\)"):
        block(x[0], media, ml)
    with pytest.raises(ValueError, match=r"media must have shape .* got \(2, 12, 12\)"):
        block(x, media.flatten(1, 2), ml)
    with pytest.raises(ValueError, match="media has batch size 1 but x has batch size 2"):
        block(x, media[:1], ml)
    with pytest.raises(ValueError, match="media has feature size 11 but the module expects 12"):
        block(x, media[..., :11], ml)
    with pytest.raises(ValueError, match="x has feature size 15"):
        block(x[..., :15], media, ml)
    with pytest.raises(ValueError, match="media_locations has 4 positions but x has 5 tokens"):
        block(x, media, ml[:, :4])
    with pytest.raises(ValueError, match="media_locations has batch size 1"):
        block(x, media, ml[:1])
    with pytest.raises(TypeError, match="media_locations must be a boolean tensor.*torch.int64"):
        block(x, media, ml.long())
    block(x[:, :2], media, ml, use_cached_media=True)  # decoding: lengths may differ
    resampler = ff.PerceiverResampler(dim=8, depth=1, dim_head=4, heads=2, num_latents=3, max_num_media=2,
                                      max_num_frames=1)
    with pytest.raises(ValueError, match="3 media per sample but the resampler has 2 time embeddings"):
        resampler(torch.randn(1, 3, 1, 5, 8))
    with pytest.raises(ValueError, match="2 frames per media but the resampler has 1 frame embeddings"):
        resampler(torch.randn(1, 2, 2, 5, 8))
    with pytest.raises(ValueError, match=r"x must have shape \(batch, num_media, frames, tokens, dim\)"):
        resampler(torch.randn(1, 2, 5, 8))
    q, k, v, mask = _attention_inputs()
    with pytest.raises(TypeError, match="q, k and v must share a dtype"):
        F.media_xattn(q.double(), k, v, mask)
    with pytest.raises(ValueError, match="not a multiple of the 2 media"):
        F.media_xattn(q, k[:, :5], v[:, :5], mask)
    with pytest.raises(ValueError, match=r"mask covers \(batch, text\) = \(2, 9\) but q has"):
        F.media_xattn(q[:, :4], k, v, mask)


# ---------------------------------------------------------------------------------------------- import hygiene


def test_import_without_triton_or_transformers():
    code = (
        "import sys\n"
        "for name in ('triton', 'transformers', 'open_flamingo', 'flamingo_pytorch'):\n"
        "    sys.modules[name] = None\n"
        "import torch, fastflamingo as ff\n"
        "block = ff.GatedCrossAttentionBlock(dim=16, dim_visual=8, dim_head=4, heads=2)\n"
        "ml = torch.zeros(1, 5, dtype=torch.bool); ml[0, 1] = True\n"
        "out = block(torch.randn(1, 5, 16), torch.randn(1, 2, 3, 8), ml)\n"
        "assert out.shape == (1, 5, 16)\n"
        "with ff.backend('triton'):\n"
        "    try:\n"
        "        block(torch.randn(1, 5, 16), torch.randn(1, 2, 3, 8), ml)\n"
        "    except ff.BackendError as e:\n"
        "        assert 'triton does not import' in str(e), e\n"
        "    else:\n"
        "        raise SystemExit('explicit triton request fell back silently')\n"
        "assert 'triton' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print('ok')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# ---------------------------------------------------------------------------------------------- kv_group (beams)


def _grouped_inputs(groups, r, num_text, num_media, latents=3, heads=2, head_dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = groups * r
    q = torch.randn(batch, num_text, heads, head_dim, generator=g)
    # K/V as one fused projection (views), like the modules produce
    kv = torch.randn(groups, num_media * latents, heads, 2 * head_dim, generator=g)
    return q, kv[..., :head_dim], kv[..., head_dim:]


def _shared_text_time(groups, r, num_text, num_media, immediate, seed=0):
    """Per-sample text_time (beams of a sample may differ in their text), 1-based media index per token."""
    g = torch.Generator().manual_seed(seed)
    tt = torch.randint(0, num_media + 1, (groups * r, num_text), generator=g).sort(dim=1).values
    return masks.MediaMask(tt.to(torch.int32), num_media, masks.IMMEDIATE if immediate else masks.ALL_PREVIOUS)


def _check_grouped(q, k, v, mask, r, path, monkeypatch):
    """kv_group=r equals attention against explicitly repeat_interleaved K/V, and takes the expected path."""
    calls = []
    original = getattr(torch_path, path)

    def spy(*args, **kwargs):
        calls.append(path)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch_path, path, spy)
    with ff.backend("torch"), torch.no_grad():
        got = F.media_xattn(q, k, v, mask, kv_group=r)
        monkeypatch.setattr(torch_path, path, original)
        ref = F.media_xattn(q, k.repeat_interleave(r, 0), v.repeat_interleave(r, 0), mask)
    assert calls, f"{path} did not serve the grouped call"
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("r", [2, 3])
def test_kv_group_chunks_path(r, monkeypatch):
    num_media = 3
    q, k, v = _grouped_inputs(2, r, 20, num_media)
    tt = torch.zeros(2 * r, 20, dtype=torch.int32)
    for b in range(2 * r):  # many runs (> _FEW_RUNS), different per sample: the chunked path
        tt[b] = torch.tensor([0, 1, 2, 3, 1, 2, 3, 2, 1, 3] * 2)[(torch.arange(20) + b) % 20]
    mask = masks.MediaMask(tt, num_media, masks.IMMEDIATE)
    assert len(torch_path.runs(mask)) > torch_path._FEW_RUNS
    _check_grouped(q, k, v, mask, r, "_chunks_path", monkeypatch)


@pytest.mark.parametrize("shared", [True, False], ids=["shared_runs", "per_sample_runs"])
@pytest.mark.parametrize("immediate", [True, False], ids=["immediate", "all_previous"])
def test_kv_group_runs_path(shared, immediate, monkeypatch):
    num_media, num_text = 2, 12
    if shared:  # same text_time in every sample: runs shared by the batch (b is None)
        r, groups = 3, 2
        row = torch.tensor([0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2], dtype=torch.int32)
        tt = row.expand(groups * r, -1).contiguous()
    else:  # per-sample runs, few enough (<= _FEW_RUNS) that immediate mode is not chunked
        r, groups = 2, 1
        tt = torch.tensor([[1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2], [0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2]],
                          dtype=torch.int32)
    q, k, v = _grouped_inputs(groups, r, num_text, num_media, seed=1)
    mask = masks.MediaMask(tt, num_media, masks.IMMEDIATE if immediate else masks.ALL_PREVIOUS)
    assert len(torch_path.runs(mask)) <= torch_path._FEW_RUNS or not immediate
    assert (torch_path.runs(mask)[0][0] is None) == shared
    _check_grouped(q, k, v, mask, r, "_runs_forward_grouped", monkeypatch)


@pytest.mark.parametrize("num_text", [1, 4])
def test_kv_group_prefix_path(num_text, monkeypatch):
    r = 2
    q, k, v = _grouped_inputs(3, r, num_text, 3, seed=2)
    mask = _shared_text_time(3, r, num_text, 3, immediate=False, seed=2)
    mask.text_time[0] = 0  # a sample that sees nothing stays exactly 0
    _check_grouped(q, k, v, mask, r, "_key_mask_path", monkeypatch)
    with ff.backend("torch"), torch.no_grad():
        assert torch.equal(F.media_xattn(q, k, v, mask, kv_group=r)[0], torch.zeros_like(q[0]))


@pytest.mark.parametrize("num_text", [1, 3])
def test_window_path_decode_immediate(num_text, monkeypatch):
    """Immediate-mode decode on the PyTorch path gathers each token's own latents on the device (no host
    schedule): forward and gradients match the fp64 reference, tokens that see nothing (0, or past the last
    media) are exactly 0, and grouped K/V (kv_group) equals repeated K/V."""
    from fastflamingo import reference

    num_media, latents, heads, head_dim = 3, 5, 2, 8
    g = torch.Generator().manual_seed(7)
    tt = torch.tensor([[0, 1, 3][:num_text], [2, 4, 2][:num_text], [3, 3, 1][:num_text], [1, 0, 0][:num_text]],
                      dtype=torch.int32)
    mask = masks.MediaMask(tt, num_media, masks.IMMEDIATE)
    q = torch.randn(4, num_text, heads, head_dim, generator=g, requires_grad=True)
    k = torch.randn(4, num_media * latents, heads, head_dim, generator=g, requires_grad=True)
    v = torch.randn(4, num_media * latents, heads, head_dim, generator=g, requires_grad=True)
    calls = []
    original = torch_path._window_path
    monkeypatch.setattr(torch_path, "_window_path", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    with ff.backend("torch"):
        out = F.media_xattn(q, k, v, mask)
    assert calls
    ref = reference.media_xattn(q.double(), k.double(), v.double(), tt, num_media, True)
    assert_close(out, ref, 1e-5, "out")
    blind = (tt == 0) | (tt > num_media)
    assert blind.any() and bool((out.detach()[blind] == 0).all())
    grad = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad.double())
    for name, a, b in zip("qkv", got, want):
        assert_close(a, b, 1e-5, f"d{name}")
    r = 2
    qg, kg, vg = _grouped_inputs(2, r, num_text, num_media, latents=latents, seed=4)
    _check_grouped(qg, kg, vg, masks.MediaMask(tt, num_media, masks.IMMEDIATE), r, "_window_path", monkeypatch)


def test_kv_group_dense_path(monkeypatch):
    r, num_media, num_text = 2, 3, 7
    q, k, v = _grouped_inputs(2, r, num_text, num_media, seed=3)
    allowed = torch.rand(2 * r, num_text, num_media, generator=torch.Generator().manual_seed(3)) > 0.5
    allowed[1, 2] = False  # a token that sees nothing
    _check_grouped(q, k, v, allowed, r, "_dense_path", monkeypatch)


def test_kv_group_no_media_and_validation():
    q = torch.randn(4, 5, 2, 8)
    k = v = torch.zeros(2, 0, 2, 8)
    mask = masks.MediaMask(torch.zeros(4, 5, dtype=torch.int32), 0, masks.IMMEDIATE)
    with ff.backend("torch"), torch.no_grad():
        out = F.media_xattn(q, k, v, mask, kv_group=2)
    assert out.shape == q.shape and not out.any()
    q, k, v = _grouped_inputs(2, 2, 6, 2)
    mask = masks.MediaMask(torch.ones(4, 6, dtype=torch.int32), 2, masks.IMMEDIATE)
    with pytest.raises(ValueError, match="kv_group 3"):
        F.media_xattn(q, k, v, mask, kv_group=3)
    with pytest.raises(ValueError, match="kv_group must be >= 1"):
        F.media_xattn(q, k, v, mask, kv_group=0)
    for not_an_int in (2.0, True):
        with pytest.raises(TypeError, match="kv_group must be an int >= 1"):
            F.media_xattn(q, k, v, mask, kv_group=not_an_int)
    with pytest.raises(ValueError, match="inference only"):
        F.media_xattn(q.requires_grad_(True), k, v, mask, kv_group=2)
    with torch.no_grad():  # no graph recorded: allowed even though q requires grad
        F.media_xattn(q, k, v, mask, kv_group=2)
