"""Triton Perceiver-resampler attention (kernels/perceiver_attn.py, fastflamingo/ops/perceiver_attn.py).

On a CPU machine the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET=1); on a CUDA machine
the same tests run natively. Results are compared with a float64 reference (concatenated keys, plain softmax)
computed from the inputs as rounded to the test dtype. Outputs and gradients are launched into NaN-filled buffers,
so every element is proven written.
"""
import pytest
import torch

import fastflamingo
from fastflamingo import functional
from fastflamingo import reference as oracle
from fastflamingo.kernels._launch import PERCEIVER_SPLITS
from fastflamingo.ops import perceiver_attn as tp
from helpers import assert_close

pytestmark = pytest.mark.triton

# max |kernel - reference| / max |reference|, for (output, gradients); docs/testing.md, "Tolerances"
TOLERANCE = {
    torch.float32: (1e-4, 2e-4),
    torch.float16: (5e-3, 1e-2),
    torch.bfloat16: (3e-2, 6e-2),
}
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]
GRAD_NAMES = ("dq", "dk_media", "dv_media", "dk_latents", "dv_latents")


@pytest.fixture(scope="module")
def kernels():
    pytest.importorskip("triton")
    from fastflamingo.kernels import perceiver_attn

    return perceiver_attn


def reference(q, k_media, v_media, k_latents, v_latents, scale, grad_out):
    """float64 attention of q over the concatenated [media; latents] keys; returns o and the five gradients."""
    ts = [t.detach().to("cpu", torch.float64).requires_grad_() for t in (q, k_media, v_media, k_latents, v_latents)]
    out = oracle.perceiver_attn(*ts, scale)
    out.backward(grad_out.detach().to("cpu", torch.float64))
    return out.detach(), [t.grad for t in ts]


def nan_like(t, dtype=None):
    return torch.full(t.shape, float("nan"), dtype=dtype or t.dtype, device=t.device)


def make_inputs(device, num, latents, media_tokens, heads, head_dim, dtype, *, fused_kv=False, seed=0):
    """q and the four K/V sources; with ``fused_kv`` they are views of fused projections as in the drop-ins
    (``kv[..., :inner].view(...)``: token stride 2 * heads * head_dim) and q is a head-strided slice."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(device)

    inner = heads * head_dim
    if not fused_kv:
        return (randn(num, latents, heads, head_dim), randn(num, media_tokens, heads, head_dim),
                randn(num, media_tokens, heads, head_dim), randn(num, latents, heads, head_dim),
                randn(num, latents, heads, head_dim))
    q = randn(num, latents, heads, 2 * head_dim)[..., :head_dim]
    kv_media, kv_latents = randn(num, media_tokens, 2 * inner), randn(num, latents, 2 * inner)

    def split(kv):
        shape = (num, kv.shape[1], heads, head_dim)
        return kv[..., :inner].view(shape), kv[..., inner:].view(shape)

    (k_media, v_media), (k_latents, v_latents) = split(kv_media), split(kv_latents)
    assert k_media.stride(1) == 2 * inner and q.stride(2) == 2 * head_dim
    return q, k_media, v_media, k_latents, v_latents


def run_case(kernels, device, *, num=2, latents=64, media_tokens=37, heads=2, head_dim=64, dtype=torch.float32,
             config=None, fused_kv=False, grad="random", seed=0, splits=None):
    inputs = make_inputs(device, num, latents, media_tokens, heads, head_dim, dtype, fused_kv=fused_kv, seed=seed)
    q = inputs[0]
    scale = head_dim ** -0.5
    fwd_tol, bwd_tol = TOLERANCE[dtype]
    out = nan_like(q)
    lse = torch.full((num, heads, latents), float("nan"), device=device)
    o, lse_out = tp.launch_fwd(*inputs, scale, config=config, out=out, lse=lse, splits=splits)
    assert o.data_ptr() == out.data_ptr() and lse_out.data_ptr() == lse.data_ptr()

    gen = torch.Generator().manual_seed(seed + 1)
    if grad == "ones":  # the gradient of .sum(): stride 0 everywhere
        grad_out = torch.ones((), dtype=dtype, device=device).expand(q.shape)
    elif grad == "expanded":  # one gradient per (media, head): stride 0 along the latents
        grad_out = torch.randn(num, 1, heads, head_dim, generator=gen).to(dtype).to(device).expand(q.shape)
    else:
        grad_out = torch.randn(q.shape, generator=gen).to(dtype).to(device)
    ref_o, ref_grads = reference(*inputs, scale, grad_out)
    assert_close(o, ref_o, fwd_tol, "o")
    keys = torch.cat((inputs[1], inputs[3]), 1).to("cpu", torch.float64)
    ref_lse = torch.logsumexp(torch.einsum("nlhd,nkhd->nhlk", q.to("cpu", torch.float64), keys) * scale, dim=-1)
    assert_close(lse, ref_lse, 1e-5 if dtype == torch.float32 else 1e-3, "lse")

    buffers = [nan_like(t) for t in inputs]
    grads = tp.launch_bwd(grad_out, *inputs, o, lse, scale, config=config, dq=buffers[0],
                                  dk_media=buffers[1], dv_media=buffers[2], dk_latents=buffers[3],
                                  dv_latents=buffers[4], splits=splits)
    assert all(g.data_ptr() == b.data_ptr() for g, b in zip(grads, buffers))
    for name, got, want in zip(GRAD_NAMES, grads, ref_grads):
        assert_close(got, want, bwd_tol, name)
    return o, lse, grads


# ----------------------------------------------------------------------------------------------------------------
# Kernel cases
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_openflamingo_shape_video_frames(kernels, device, dtype):
    """64 latents over two frames of 257 tokens (P = 514), head_dim 64, K/V as views of a fused projection."""
    run_case(kernels, device, num=1, latents=64, media_tokens=2 * 257, heads=1, head_dim=64, dtype=dtype,
             fused_kv=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [40, 96])
def test_head_dims_padded(kernels, device, head_dim, dtype):
    """40 and IDEFICS' 96 are padded (to 64, 128) with masked loads."""
    run_case(kernels, device, num=2, latents=24, media_tokens=47, heads=2, head_dim=head_dim, dtype=dtype)


@pytest.mark.parametrize("latents", [1, 5, 100, 128])
def test_latent_counts(kernels, device, latents):
    """Non-power-of-two latent counts; 100 and 128 need two query tiles of 64 (fp32 dK/dV partials)."""
    run_case(kernels, device, num=1, latents=latents, media_tokens=33, heads=2, head_dim=32, dtype=torch.float16)


@pytest.mark.parametrize("config", [{"BLOCK_M": 16, "BLOCK_N": 16}, {"BLOCK_M": 32, "BLOCK_N": 64}],
                         ids=["16x16", "32x64"])
def test_small_tiles_ragged_tails(kernels, device, config):
    """Several query tiles and key tiles with ragged tails in both sources."""
    run_case(kernels, device, num=2, latents=37, media_tokens=50, heads=2, head_dim=16, dtype=torch.float32,
             config=config, fused_kv=True)


@pytest.mark.parametrize("media_tokens", [0, 1])
def test_tiny_media(kernels, device, media_tokens):
    """No media tokens (latents attend to themselves only) and a single one."""
    run_case(kernels, device, num=3, latents=8, media_tokens=media_tokens, heads=1, head_dim=8, dtype=torch.float32)


@pytest.mark.parametrize("grad", ["ones", "expanded"])
def test_expanded_grad_output(kernels, device, grad):
    run_case(kernels, device, num=2, latents=16, media_tokens=20, heads=2, head_dim=32, dtype=torch.bfloat16,
             grad=grad)


def test_large_scores_stay_finite(kernels, device):
    """Scores of +-1e3 (a fp32 softmax without max subtraction would overflow): output and grads stay exact."""
    q, km, vm, kl, vl = make_inputs(device, 1, 16, 40, 1, 32, torch.float32)
    q = q * 30.0
    o, lse = tp.launch_fwd(q, km, vm, kl, vl, 1.0)
    grad_out = torch.randn_like(q)
    ref_o, ref_grads = reference(q, km, vm, kl, vl, 1.0, grad_out)
    assert_close(o, ref_o, 1e-4, "o")
    for name, got, want in zip(GRAD_NAMES, tp.launch_bwd(grad_out, q, km, vm, kl, vl, o, lse, 1.0),
                               ref_grads):
        assert_close(got, want, 1e-3, name)


@pytest.mark.parametrize("splits,config,dtype", [
    (2, None, torch.float32),  # one media tile + one latent tile: a split per source
    (3, {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}, torch.float32),  # splits across sources
    (4, {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}, torch.bfloat16),  # + several query tiles
], ids=["2-splits", "3-splits-mixed-tiles", "4-splits-bf16-query-tiles"])
def test_key_splits(kernels, device, splits, config, dtype):
    """The key tiles cut into splits (forward partials merged by their LSEs, dQ partials summed, both in split
    order): exact against the fp64 reference and bitwise repeatable."""
    args = dict(num=2, latents=40, media_tokens=37, heads=1, head_dim=32, dtype=dtype, config=config, splits=splits)
    first = run_case(kernels, device, **args)
    again = run_case(kernels, device, **args)
    assert torch.equal(first[0], again[0]) and all(torch.equal(a, b) for a, b in zip(first[2], again[2]))


def test_key_split_count(kernels):
    """Shapes only: split a grid under two waves of SMs, at most one split per two key tiles."""
    assert kernels.key_splits(programs=2048, media_tokens=257, latents=64, block_n=64, sms=132) == 1
    assert kernels.key_splits(programs=16, media_tokens=257, latents=64, block_n=64, sms=132) == 3  # 6 tiles
    assert kernels.key_splits(programs=16, media_tokens=4096, latents=64, block_n=64, sms=132) == PERCEIVER_SPLITS.max_splits
    with pytest.raises(ValueError, match="splits must be in"):
        q = torch.zeros(1, 8, 1, 16)
        tp.launch_fwd(q, q, q, q, q, 0.25, splits=3)


def test_deterministic(kernels, device):
    inputs = make_inputs(device, 2, 100, 30, 2, 32, torch.float16)
    o, lse = tp.launch_fwd(*inputs, 0.2)
    grad_out = torch.randn_like(o)
    first = tp.launch_bwd(grad_out, *inputs, o, lse, 0.2)
    second = tp.launch_bwd(grad_out, *inputs, o, lse, 0.2)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_gpu_candidates_cover_latents(kernels):
    """On the GPU the autotuner only times configs whose query tile covers all latents (L <= 128: each K/V byte
    is read once), and the largest query tile beyond that."""
    for kind in ("fwd", "bwd"):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for head_dim in (64, 96):
                for latents in (8, 64, 100, 128, 300):
                    for specialization in ((), (1, False), (4, False), (1, True), (4, True)):
                        key = (head_dim, dtype, latents, 256, 4096) + specialization
                        specialized = kernels.is_specialized(key)
                        largest = max(c.kwargs["BLOCK_M"]
                                      for c in kernels.shipped_configs(kind, dtype, head_dim, specialized=specialized))
                        kept = kernels.gpu_candidates(kind, key)
                        assert kept
                        for c in kept:
                            assert c.kwargs["BLOCK_M"] >= min(latents, largest) or c.kwargs["BLOCK_M"] == largest
                            assert c.kwargs["BLOCK_M"] < 2 * max(latents, 16)


def test_specialized_configs_leave_out_failed_compiles(kernels):
    """The grouped-query / key-mask kernels pick from their own lists at head tile 128 (16-bit inputs), which
    leave out the configs whose specialized compile spills or passes 240 registers (fastflamingo.aot under Triton
    3.6 and 3.9), and keep a config for every power-of-two query tile up to 64 on both architectures."""
    from fastflamingo.kernels._utils import config_label

    failed = {("fwd", 80): {"M32xN64-w4-s3"}, ("fwd", 90): {"M32xN64-w4-s3", "M64xN64-w4-s3"},
              ("bwd", 80): {"M64xN32-w8-s2"}, ("bwd", 90): {"M64xN32-w8-s2", "M16xN64-w8-s2", "M128xN16-w8-s2"}}
    for (kind, arch), bad in failed.items():
        for dtype in (torch.float16, torch.bfloat16):
            configs = kernels.shipped_configs(kind, dtype, 96, arch, specialized=True)
            labels = [config_label(c) for c in configs]
            assert not bad & set(labels), (kind, arch, labels)
            assert {16, 32, 64} <= {c.kwargs["BLOCK_M"] for c in configs}
            assert set(labels) <= {config_label(c) for c in kernels.shipped_configs(kind, dtype, 96, arch)} | {
                "M32xN32-w4-s3"}
        key = (96, torch.bfloat16, 64, 256, 4096)
        assert kernels.is_specialized(key + (4, False)) and kernels.is_specialized(key + (1, True))
        assert not kernels.is_specialized(key) and not kernels.is_specialized(key + (1, False))
    # head tile 64 has no list of its own: the plain one
    assert kernels.shipped_configs("fwd", torch.bfloat16, 64, 80, specialized=True) == kernels.shipped_configs(
        "fwd", torch.bfloat16, 64, 80)


# ----------------------------------------------------------------------------------------------------------------
# Custom op boundary: opcheck, autograd, torch.compile, dispatch
# ----------------------------------------------------------------------------------------------------------------


def test_opcheck(device):

    inputs = [t.requires_grad_() for t in make_inputs(device, 2, 5, 9, 2, 16, torch.float32, seed=3)]
    torch.library.opcheck(tp.fwd_op, (*inputs, 0.25))
    with torch.no_grad():
        o, lse = tp.fwd_op(*inputs, 0.25)
    detached = [t.detach() for t in inputs]
    torch.library.opcheck(tp.bwd_op, (torch.randn_like(o), *detached, o, lse, 0.25))


def test_functional_backend_triton_gradients(device):
    """fastflamingo.functional.perceiver_attn with backend('triton'): every input's gradient, with fused
    K/V views (their gradients land in the fused projection's output)."""
    inputs = make_inputs(device, 2, 12, 30, 2, 24, torch.float32, fused_kv=True, seed=5)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    grad_out = torch.randn(inputs[0].shape, device=device)
    with fastflamingo.backend("triton"):
        out = functional.perceiver_attn(*leaves)
    out.backward(grad_out)
    ref_o, ref_grads = reference(*inputs, 24 ** -0.5, grad_out)
    assert_close(out, ref_o, 1e-4, "o")
    for name, leaf, want in zip(GRAD_NAMES, leaves, ref_grads):
        assert_close(leaf.grad, want, 2e-4, name)


def test_torch_compile_aot_eager(device):

    def f(q, km, vm, kl, vl):
        return (tp.perceiver_attn(q, km, vm, kl, vl, 0.3) * 2.0).sum()

    inputs = make_inputs(device, 2, 8, 12, 2, 16, torch.float32, seed=7)
    eager = [t.detach().clone().requires_grad_() for t in inputs]
    compiled = [t.detach().clone().requires_grad_() for t in inputs]
    f(*eager).backward()
    torch.compile(f, backend="aot_eager", fullgraph=True)(*compiled).backward()
    for name, a, b in zip(GRAD_NAMES, compiled, eager):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_unsupported_reasons(device):

    q, km, vm, kl, vl = make_inputs(device, 1, 4, 6, 2, 16, torch.float32)
    assert tp.unsupported_reasons(q, km, vm, kl, vl) == []
    assert any("dtype" in r for r in tp.unsupported_reasons(q.double(), km, vm, kl, vl))
    big = torch.zeros(1, 4, 2, 160, device=device)
    assert any("head_dim" in r for r in tp.unsupported_reasons(big, big[:, :3], big[:, :3], big, big))
    assert any("k_latents" in r for r in tp.unsupported_reasons(q, km, vm, kl[:, :3], vl[:, :3]))
    assert any("4-D" in r for r in tp.unsupported_reasons(q[0], km, vm, kl, vl))
    one_kv = [t[:, :, :1] for t in (km, vm, kl, vl)]  # 2 query heads on 1 KV head, with a key mask: supported
    assert tp.unsupported_reasons(q, *one_kv, key_mask=torch.ones(1, 6, dtype=torch.bool, device=device)) == []


# ----------------------------------------------------------------------------------------------------------------
# Drop-ins with backend("triton") against the real upstream modules
# ----------------------------------------------------------------------------------------------------------------


def _module_grads(module, x):
    out = module(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(11)).to(out.device)
    (out * weights).sum().backward()
    grads = {"input": x.grad}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    return out.detach(), grads


def test_openflamingo_perceiver_resampler(device):
    try:
        from fastflamingo.testing import load_open_flamingo
        of = load_open_flamingo().helpers
    except ModuleNotFoundError as exc:
        pytest.skip(str(exc))
    kwargs = dict(dim=32, depth=2, dim_head=16, heads=2, num_latents=6, max_num_media=2, max_num_frames=2)
    up = of.PerceiverResampler(**kwargs).to(device)
    mine = fastflamingo.PerceiverResampler(**kwargs).to(device)
    mine.load_state_dict(up.state_dict(), strict=True)
    x = torch.randn(2, 2, 2, 9, 32, device=device)  # 2 media of 2 frames of 9 tokens: P = 18
    out_up, g_up = _module_grads(up, x.clone().requires_grad_())
    with fastflamingo.backend("triton"):
        out_me, g_me = _module_grads(mine, x.clone().requires_grad_())
    assert_close(out_me, out_up.double().cpu(), 1e-5, "output")
    for name, g in g_up.items():
        assert_close(g_me[name], g.double().cpu(), 1e-4, f"grad {name}")


@pytest.mark.parametrize("qk", [True, False], ids=["qk-layernorm", "plain"])
def test_idefics_perceiver_resampler(device, qk):
    pytest.importorskip("transformers")
    from transformers import IdeficsConfig
    from transformers.models.idefics import perceiver as hf_perceiver

    from fastflamingo.models import idefics as ffi

    cfg = IdeficsConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                        vision_config=dict(embed_dim=32, image_size=32, patch_size=8, num_hidden_layers=1,
                                           num_attention_heads=4, intermediate_size=64),
                        perceiver_config=dict(use_resampler=True, resampler_n_latents=8, resampler_depth=2,
                                              resampler_n_heads=2, resampler_head_dim=24,
                                              qk_layer_norms_perceiver=qk))
    args = (cfg, 32, 2, 2, 24, 8)  # embed_dim, depth, heads, head_dim, latents
    up = hf_perceiver.IdeficsPerceiverResampler(*args).to(device)
    mine = ffi.IdeficsPerceiverResampler(*args).to(device)
    mine.load_state_dict(up.state_dict(), strict=True)
    context = torch.randn(4, 17, 32, device=device)  # 2 samples x 2 images x (16 patches + CLS)
    out_up, g_up = _module_grads(up, context.clone().requires_grad_())
    with fastflamingo.backend("triton"):
        out_me, g_me = _module_grads(mine, context.clone().requires_grad_())
    assert_close(out_me, out_up.double().cpu(), 1e-5, "output")
    largest = max(g.abs().max().item() for g in g_up.values())
    for name, g in g_up.items():
        if name.endswith("k_layer_norm.bias"):  # analytically zero: both sides are rounding noise
            assert g_me[name].abs().max() <= 1e-5 * largest
            continue
        assert_close(g_me[name], g.double().cpu(), 1e-4, f"grad {name}")


# ----------------------------------------------------------------------------------------------------------------
# Key padding mask and grouped-query attention: the reference and the PyTorch path
# ----------------------------------------------------------------------------------------------------------------

# (N, latents, media_tokens, heads, kv_heads, head_dim)
MASKED_SHAPES = [
    pytest.param(3, 64, 37, 16, 4, 96, id="idefics2-16q-4kv-d96"),
    pytest.param(4, 7, 13, 4, 1, 24, id="4q-1kv-d24"),
    pytest.param(3, 5, 9, 3, 3, 40, id="mha-d40"),
    pytest.param(3, 1, 2, 2, 1, 8, id="one-latent-two-tokens"),
]


def grouped_inputs(num, latents, media_tokens, heads, kv_heads, head_dim, dtype=torch.float64, seed=0):
    """q (N, L, H, D) and the four K/V sources with kv_heads heads, fp64 values rounded to ``dtype``."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    return (randn(num, latents, heads, head_dim), randn(num, media_tokens, kv_heads, head_dim),
            randn(num, media_tokens, kv_heads, head_dim), randn(num, latents, kv_heads, head_dim),
            randn(num, latents, kv_heads, head_dim))


def padding_mask(num, media_tokens, seed=0):
    """(N, media_tokens) bool: sample 0 fully padded, sample 1 unpadded, sample 2 right-padded, the rest random."""
    gen = torch.Generator().manual_seed(seed + 100)
    mask = torch.rand(num, media_tokens, generator=gen) < 0.6
    mask[0] = False
    if num > 1:
        mask[1] = True
    if num > 2:
        mask[2] = torch.arange(media_tokens) < (media_tokens + 1) // 2
    return mask


def looped_oracle(q, k_media, v_media, k_latents, v_latents, scale, key_mask):
    """Per sample and query head: plain softmax attention over the visible media tokens (selected, not masked)
    and the latents of KV head h // group. Independent of fastflamingo.reference's einsum formulation."""
    num, latents, heads, _ = q.shape
    group = heads // k_media.shape[2]
    out = torch.empty(q.shape[:3] + (v_media.shape[-1],), dtype=q.dtype)
    for n in range(num):
        seen = key_mask[n] if key_mask is not None else torch.ones(k_media.shape[1], dtype=torch.bool)
        for h in range(heads):
            g = h // group
            k = torch.cat((k_media[n, seen, g], k_latents[n, :, g]))
            v = torch.cat((v_media[n, seen, g], v_latents[n, :, g]))
            out[n, :, h] = torch.softmax(q[n, :, h] @ k.T * scale, dim=-1) @ v
    return out


@pytest.mark.parametrize("num,latents,media_tokens,heads,kv_heads,head_dim", MASKED_SHAPES)
def test_reference_masked_grouped_matches_looped_oracle(num, latents, media_tokens, heads, kv_heads, head_dim):
    inputs = grouped_inputs(num, latents, media_tokens, heads, kv_heads, head_dim)
    key_mask = padding_mask(num, media_tokens)
    scale = 0.7 * head_dim ** -0.5
    want = looped_oracle(*inputs, scale, key_mask)
    assert_close(oracle.perceiver_attn(*inputs, scale, key_mask=key_mask), want, 1e-12, "masked")
    assert_close(oracle.perceiver_attn(*inputs, scale), looped_oracle(*inputs, scale, None), 1e-12, "unmasked")


def _torch_path_and_reference(inputs, key_mask, scale, grad_out, mask_arg=None):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    with fastflamingo.backend("torch"):
        out = functional.perceiver_attn(*leaves, scale=scale, key_mask=key_mask if mask_arg is None else mask_arg)
    out.backward(grad_out.to(out.dtype))
    ref_o, ref_grads = reference_masked(inputs, scale, key_mask, grad_out)
    return out, [t.grad for t in leaves], ref_o, ref_grads


def reference_masked(inputs, scale, key_mask, grad_out):
    """fp64 oracle output and gradients of the five inputs."""
    ts = [t.detach().to(torch.float64).requires_grad_() for t in inputs]
    out = oracle.perceiver_attn(*ts, scale, key_mask=key_mask)
    out.backward(grad_out.to(torch.float64))
    return out.detach(), [t.grad for t in ts]


@pytest.mark.parametrize("num,latents,media_tokens,heads,kv_heads,head_dim", MASKED_SHAPES)
@pytest.mark.parametrize("dtype", [pytest.param(torch.float64, id="fp64"), *DTYPES])
def test_torch_path_key_mask_and_groups(num, latents, media_tokens, heads, kv_heads, head_dim, dtype):
    """The PyTorch path (functional, backend torch) against the fp64 oracle: output and every gradient, with
    fully padded, unpadded, right-padded and randomly padded samples. Hidden media tokens get exactly zero dK/dV."""
    inputs = grouped_inputs(num, latents, media_tokens, heads, kv_heads, head_dim, dtype, seed=1)
    key_mask = padding_mask(num, media_tokens, seed=1)
    grad_out = torch.randn(num, latents, heads, head_dim, generator=torch.Generator().manual_seed(2)).to(dtype)
    out, grads, ref_o, ref_grads = _torch_path_and_reference(inputs, key_mask, 0.9 * head_dim ** -0.5, grad_out)
    fwd_tol, bwd_tol = TOLERANCE.get(dtype, (1e-12, 1e-12))
    assert out.dtype == dtype and out.shape == inputs[0].shape
    assert_close(out, ref_o, fwd_tol, "o")
    for name, got, want in zip(GRAD_NAMES, grads, ref_grads):
        assert got.shape == want.shape and got.dtype == dtype, name
        assert_close(got, want, bwd_tol, name)
    hidden = ~key_mask
    assert (grads[1][hidden] == 0).all() and (grads[2][hidden] == 0).all(), "hidden tokens must get zero dK/dV"


def test_torch_path_integer_and_float_masks_are_nonzero_visible():
    inputs = grouped_inputs(3, 4, 6, 4, 2, 16, torch.float32, seed=3)
    key_mask = padding_mask(3, 6, seed=3)
    weights = torch.where(key_mask, torch.tensor(2.5), torch.tensor(0.0))  # nonzero, not only 1
    grad_out = torch.randn(3, 4, 4, 16)
    as_bool = functional.perceiver_attn(*inputs, key_mask=key_mask)
    for mask_arg in (key_mask.long(), key_mask.to(torch.uint8), weights, key_mask.double()):
        before = mask_arg.clone()
        out, grads, ref_o, ref_grads = _torch_path_and_reference(inputs, key_mask, 16 ** -0.5, grad_out, mask_arg)
        assert torch.equal(out.detach(), as_bool), mask_arg.dtype
        assert torch.equal(mask_arg, before), "the caller's mask must not be modified"


def test_torch_path_gradcheck_masked_grouped():
    """torch.autograd.gradcheck (fp64 finite differences) through the PyTorch path: 4 query heads on 2 KV heads,
    one fully padded sample, one partly padded."""
    inputs = [t.requires_grad_() for t in grouped_inputs(2, 3, 5, 4, 2, 6, seed=4)]
    key_mask = torch.tensor([[False] * 5, [True, False, True, True, False]])
    with fastflamingo.backend("torch"):
        assert torch.autograd.gradcheck(
            lambda *ts: functional.perceiver_attn(*ts, scale=0.8, key_mask=key_mask), inputs)


def test_unmasked_mha_torch_path_unchanged():
    """Without a mask and with as many KV heads as query heads the PyTorch path is the one SDPA call it was."""
    inputs = grouped_inputs(2, 6, 11, 3, 3, 16, torch.float32, seed=5)
    k, v = torch.cat(inputs[1::2], 1), torch.cat(inputs[2::2], 1)
    want = torch.nn.functional.scaled_dot_product_attention(
        inputs[0].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    with fastflamingo.backend("torch"):
        assert torch.equal(functional.perceiver_attn(*inputs), want)


def test_grouped_path_reads_kv_in_place(monkeypatch):
    """Grouped-query attention never repeats K/V per query head: SDPA receives K/V with kv_heads heads (the
    concatenated [media; latents] rows, nothing larger)."""
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((tuple(q.shape), tuple(k.shape), tuple(v.shape)))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    inputs = grouped_inputs(2, 64, 37, 16, 4, 96, torch.float32, seed=6)
    with fastflamingo.backend("torch"):
        functional.perceiver_attn(*inputs, key_mask=padding_mask(2, 37))
    assert seen == [((2, 4, 4 * 64, 96), (2, 4, 37 + 64, 96), (2, 4, 37 + 64, 96))]


def test_auto_backend_runs_torch_for_key_mask_and_groups(monkeypatch):
    """backend auto on these CPU tensors: the PyTorch path, kernel launchers untouched."""
    from fastflamingo.ops import torch_path

    calls = []
    real = torch_path.perceiver_attn
    monkeypatch.setattr(torch_path, "perceiver_attn", lambda *a: calls.append(a) or real(*a))
    inputs = grouped_inputs(2, 3, 5, 4, 2, 8, torch.float32)
    functional.perceiver_attn(*inputs, key_mask=padding_mask(2, 5))
    assert len(calls) == 1 and calls[0][-1].dtype == torch.bool


# ----------------------------------------------------------------------------------------------------------------
# Key padding mask and grouped-query attention: the kernels
# ----------------------------------------------------------------------------------------------------------------


def run_masked_case(device, *, num=3, latents=20, media_tokens=37, heads=4, kv_heads=2, head_dim=24,
                    dtype=torch.float32, config=None, splits=None, masked=True, seed=0):
    """launch_fwd / launch_bwd with a key mask and grouped K/V into NaN-poisoned buffers, against the fp64 oracle.
    Hidden media tokens must get exactly zero dK/dV."""
    inputs = [t.to(device) for t in grouped_inputs(num, latents, media_tokens, heads, kv_heads, head_dim, dtype,
                                                   seed=seed)]
    key_mask = padding_mask(num, media_tokens, seed=seed).to(device) if masked else None
    scale = head_dim ** -0.5
    fwd_tol, bwd_tol = TOLERANCE[dtype]
    q = inputs[0]
    out, lse = nan_like(q), nan_like(q[..., 0].transpose(1, 2), torch.float32)
    o, lse = tp.launch_fwd(*inputs, scale, config, out=out, lse=lse, splits=splits, key_mask=key_mask)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype).to(device)
    ref_o, ref_grads = reference_masked([t.cpu() for t in inputs], scale, None if key_mask is None else key_mask.cpu(),
                                        grad_out.cpu())
    assert_close(o, ref_o, fwd_tol, "o")
    buffers = [nan_like(t) for t in inputs]
    grads = tp.launch_bwd(grad_out, *inputs, o, lse, scale, config, dq=buffers[0], dk_media=buffers[1],
                          dv_media=buffers[2], dk_latents=buffers[3], dv_latents=buffers[4], splits=splits,
                          key_mask=key_mask)
    for name, got, want in zip(GRAD_NAMES, grads, ref_grads):
        assert_close(got, want, bwd_tol, name)
    if key_mask is not None:
        hidden = ~key_mask.cpu()
        assert (grads[1].cpu()[hidden] == 0).all() and (grads[2].cpu()[hidden] == 0).all()
    return o, grads


@pytest.mark.parametrize("dtype", DTYPES[:2])
def test_kernels_idefics2_shape_key_mask_gqa(kernels, device, dtype):
    """IDEFICS2's resampler: 64 latents, 16 query heads on 4 KV heads, head_dim 96 (padded to 128), padded
    samples (one fully, one not at all)."""
    run_masked_case(device, num=3, latents=64, media_tokens=37, heads=16, kv_heads=4, head_dim=96, dtype=dtype)


@pytest.mark.parametrize("masked", [True, False], ids=["key-mask", "no-mask"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 1), (3, 3), (6, 2)], ids=["4q-1kv", "mha", "6q-2kv"])
def test_kernels_small_tiles_key_splits(kernels, device, heads, kv_heads, masked):
    """Several query tiles (fp32 dK/dV partials per tile and group member), several key splits (a split may see
    only hidden tokens: it must weigh 0 in the combine), ragged tails."""
    run_masked_case(device, num=3, latents=21, media_tokens=45, heads=heads, kv_heads=kv_heads, head_dim=40,
                    config={"BLOCK_M": 16, "BLOCK_N": 16}, splits=4, masked=masked, seed=heads)


def test_kernels_key_mask_deterministic(kernels, device):
    first = run_masked_case(device, latents=33, config={"BLOCK_M": 16, "BLOCK_N": 16}, splits=2, seed=3)
    second = run_masked_case(device, latents=33, config={"BLOCK_M": 16, "BLOCK_N": 16}, splits=2, seed=3)
    assert torch.equal(first[0], second[0]) and all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


def test_functional_backend_triton_key_mask_gqa(device):
    """functional.perceiver_attn(key_mask=integer mask) with backend('triton'): the kernels run (no BackendError),
    and output and every gradient match the PyTorch path on the same inputs."""
    inputs = [t.to(device) for t in grouped_inputs(2, 9, 14, 8, 2, 32, torch.float32, seed=8)]
    key_mask = padding_mask(2, 14, seed=8).to(device).long()
    results = []
    for name in ("triton", "torch"):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        with fastflamingo.backend(name):
            out = functional.perceiver_attn(*leaves, key_mask=key_mask)
        out.backward(torch.ones_like(out))
        results.append([out.detach()] + [t.grad for t in leaves])
    for name, a, b in zip(("o",) + GRAD_NAMES, *results):
        assert_close(a, b.double(), 2e-4, name)


def test_opcheck_key_mask_gqa(device):
    inputs = [t.to(device).requires_grad_() for t in grouped_inputs(2, 5, 9, 4, 2, 16, torch.float32, seed=9)]
    key_mask = padding_mask(2, 9, seed=9).to(device)
    torch.library.opcheck(tp.fwd_op, (*inputs, 0.25, key_mask))
    with torch.no_grad():
        o, lse = tp.fwd_op(*inputs, 0.25, key_mask)
    detached = [t.detach() for t in inputs]
    torch.library.opcheck(tp.bwd_op, (torch.randn_like(o), *detached, o, lse, 0.25, key_mask))
