"""Drop-in modules against the real OpenFlamingo 2.0.1 and flamingo-pytorch 0.1.2 modules (shared state_dict).

Forward and every gradient (inputs and each parameter) must match in fp32 to 1e-5 relative error, and in
fp16/bf16 stay within twice upstream's own low-precision error. The only rows allowed to differ are the documented
divergence: tokens that see no media (all-previous mode before the first image; more ``<image>`` tokens than
images), where upstream averages over all media and fastflamingo returns exactly zero.
"""
import copy

import pytest
import torch

import fastflamingo as ff
from fastflamingo.models import flamingo_pytorch as ffp
from helpers import assert_close, assert_lowp_close, grads_of
from upstream import flamingo_pytorch, of  # noqa: F401 (of is a fixture)


def divergent_rows(media_locations, num_text, num_media, immediate, use_cached_media):
    """Rows where upstream and fastflamingo differ by design (upstream: uniform over all media; ours: zero)."""
    if media_locations is None:
        return torch.zeros(1, num_text, dtype=torch.bool)
    if use_cached_media:
        text_time = media_locations.sum(-1, keepdim=True).expand(-1, num_text)
    else:
        text_time = media_locations.cumsum(-1)
    return text_time > num_media if immediate else text_time == 0


def locations(batch, num_text, positions):
    ml = torch.zeros(batch, num_text, dtype=torch.bool)
    for b, pos in enumerate(positions):
        ml[b, list(pos)] = True
    return ml


# (id, batch, text, num_media, latents, dim, dim_visual, heads, dim_head, positions per sample, cached)
CASES = [
    ("basic", 2, 24, 3, 5, 32, 24, 2, 16, [(2, 9, 17), (0, 11)], False),
    ("media-at-0", 2, 16, 2, 4, 32, 32, 2, 16, [(0, 8), (0,)], False),
    ("text-before-first", 2, 20, 2, 4, 32, 16, 2, 16, [(7, 15), (12,)], False),
    ("no-media-in-row", 2, 12, 2, 4, 32, 16, 2, 16, [(3, 7), ()], False),
    ("more-images-than-media", 1, 20, 2, 4, 32, 16, 2, 16, [(1, 5, 9, 14)], False),
    ("padded-images", 2, 20, 4, 4, 32, 16, 2, 16, [(1, 5), (3,)], False),
    ("T1", 2, 1, 2, 4, 32, 16, 2, 16, [(0,), ()], False),
    ("T63-hd40", 1, 63, 3, 8, 80, 48, 2, 40, [(5, 30, 50)], False),
    ("T111-hd96", 1, 111, 4, 6, 96, 64, 1, 96, [(0, 20, 60, 100)], False),
    ("video-frames", 2, 30, 2, 3 * 6, 32, 16, 2, 16, [(0, 15), (10,)], False),
    ("cached-decode", 2, 3, 3, 4, 32, 16, 2, 16, [(1, 6, 9), (2,)], True),
    ("cached-decode-no-image", 2, 2, 2, 4, 32, 16, 2, 16, [(), (4,)], True),
]
CASE_IDS = [c[0] for c in CASES]


def make_case(case, immediate, upstream_cls, mine_cls, dtype=torch.float32, fp_variant=False):
    _, batch, num_text, num_media, latents, dim, dim_visual, heads, dim_head, positions, cached = case
    if fp_variant:
        dim_visual = dim
    kwargs = dict(dim=dim, dim_head=dim_head, heads=heads, only_attend_immediate_media=immediate)
    if not fp_variant:
        kwargs["dim_visual"] = dim_visual
    up = upstream_cls(**kwargs)
    with torch.no_grad():
        for p in up.parameters():  # non-trivial gates and norms
            if p.numel() == 1 or p.dim() == 1:
                p.uniform_(-0.9, 0.9) if p.numel() == 1 else p.normal_(1.0, 0.2)
    mine = mine_cls(**kwargs)
    mine.load_state_dict(up.state_dict(), strict=True)
    loc_len = num_text if not cached else 12
    ml = locations(batch, loc_len, positions)
    x = torch.randn(batch, num_text, dim)
    media = torch.randn(batch, num_media, latents, dim_visual)
    return up.to(dtype), mine.to(dtype), x.to(dtype), media.to(dtype), ml, cached


def run(module, x, media, ml, cached, weights, fp_variant=False):
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    media = media.detach().clone().requires_grad_(True)
    kwargs = {} if fp_variant else {"use_cached_media": cached}
    out = module(x, media, ml, **kwargs)
    (out.float() * weights).sum().backward()
    return out, grads_of(module, x, media)


@pytest.mark.parametrize("immediate", [True, False], ids=["immediate", "all-previous"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gated_block_matches_open_flamingo_fp32(of, case, immediate):
    up, mine, x, media, ml, cached = make_case(case, immediate, of.GatedCrossAttentionBlock, ff.GatedCrossAttentionBlock)
    num_text, num_media = x.shape[1], media.shape[1]
    div = divergent_rows(ml, num_text, num_media, immediate, cached).expand(x.shape[0], -1)
    weights = torch.randn(x.shape) * (~div)[..., None]  # the loss ignores rows that differ by design
    out_up, grads_up = run(up, x, media, ml, cached, weights)
    out_me, grads_me = run(mine, x, media, ml, cached, weights)
    assert_close(out_me[~div], out_up[~div], 1e-5, "output")
    for name, g in grads_up.items():
        assert_close(grads_me[name], g, 1e-5, f"grad {name}")
    if div.any():  # divergent rows: the attention branch is exactly zero, only the feed-forward branch remains
        with torch.no_grad():
            expected = x + up.ff(x) * up.ff_gate.tanh()
        assert_close(out_me[div], expected[div], 1e-6, "rows without media")


@pytest.mark.parametrize("immediate", [True, False], ids=["immediate", "all-previous"])
@pytest.mark.parametrize("case", CASES[:4] + CASES[7:10], ids=CASE_IDS[:4] + CASE_IDS[7:10])
def test_masked_cross_attention_flamingo_pytorch_fp32(case, immediate):
    fp = flamingo_pytorch()
    up, mine, x, media, ml, _ = make_case(
        case, immediate, fp.MaskedCrossAttention, ffp.MaskedCrossAttention, fp_variant=True
    )
    div = divergent_rows(ml, x.shape[1], media.shape[1], immediate, False).expand(x.shape[0], -1)
    weights = torch.randn(x.shape) * (~div)[..., None]
    out_up, grads_up = run(up, x, media, ml, False, weights, fp_variant=True)
    out_me, grads_me = run(mine, x, media, ml, False, weights, fp_variant=True)
    assert_close(out_me[~div], out_up[~div], 1e-5, "output")
    assert (out_me[div] == 0).all(), "a token that sees no media must get exactly zero"
    for name, g in grads_up.items():
        assert_close(grads_me[name], g, 1e-5, f"grad {name}")


def test_no_media_locations_attends_to_everything(of):
    """flamingo-pytorch (and OpenFlamingo with use_cached_media=True) apply no mask without media_locations."""
    up, mine, x, media, _, _ = make_case(CASES[0], True, flamingo_pytorch().MaskedCrossAttention,
                                         ffp.MaskedCrossAttention, fp_variant=True)
    assert_close(mine(x, media), up(x, media), 1e-5, "media_locations=None")
    up, mine, x, media, _, _ = make_case(CASES[0], True, of.MaskedCrossAttention, ff.MaskedCrossAttention)
    assert_close(mine(x, media, None, True), up(x, media, None, True), 1e-5, "cached, media_locations=None")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("immediate", [True, False], ids=["immediate", "all-previous"])
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[7]], ids=[CASES[0][0], CASES[2][0], CASES[7][0]])
def test_gated_block_low_precision(of, case, immediate, dtype):
    up32, mine32, x, media, ml, cached = make_case(case, immediate, of.GatedCrossAttentionBlock, ff.GatedCrossAttentionBlock)
    div = divergent_rows(ml, x.shape[1], media.shape[1], immediate, cached).expand(x.shape[0], -1)
    weights = torch.randn(x.shape) * (~div)[..., None]
    ref_out, ref_grads = run(up32, x, media, ml, cached, weights)
    up_lp = copy.deepcopy(up32).to(dtype)
    out_up, grads_up = run(up_lp, x.to(dtype), media.to(dtype), ml, cached, weights)
    out_me, grads_me = run(mine32.to(dtype), x.to(dtype), media.to(dtype), ml, cached, weights)
    assert out_me.dtype == out_up.dtype
    assert_lowp_close(out_me[~div], ref_out[~div], out_up[~div], "output")
    for name, g in ref_grads.items():
        assert_lowp_close(grads_me[name], g, grads_up[name], f"grad {name}", atol=2e-3)


def test_gate_dtype_promotion_matches_upstream(of):
    """bf16 activations with the fp32 (1,) gates: upstream promotes the block output to fp32 (SEMANTICS 1.5)."""
    up, mine, x, media, ml, _ = make_case(CASES[0], True, of.GatedCrossAttentionBlock, ff.GatedCrossAttentionBlock)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_up, out_me = up(x, media, ml), mine(x, media, ml)
    assert out_me.dtype == out_up.dtype == torch.float32
    assert_close(out_me, out_up, 3e-2, "autocast output")


def test_state_dict_round_trip_both_ways(of):
    up = of.GatedCrossAttentionBlock(dim=32, dim_visual=24, dim_head=8, heads=4)
    mine = ff.GatedCrossAttentionBlock(dim=32, dim_visual=24, dim_head=8, heads=4)
    assert list(mine.state_dict()) == list(up.state_dict())
    mine.load_state_dict(up.state_dict(), strict=True)
    with torch.no_grad():
        for p in mine.parameters():
            p.add_(1.0)
    up.load_state_dict(mine.state_dict(), strict=True)
    for (name, a), b in zip(up.state_dict().items(), mine.state_dict().values()):
        assert torch.equal(a, b), name
    res_up = of.PerceiverResampler(dim=16, depth=2, dim_head=8, heads=2, num_latents=4, max_num_media=3, max_num_frames=2)
    res_me = ff.PerceiverResampler(dim=16, depth=2, dim_head=8, heads=2, num_latents=4, max_num_media=3, max_num_frames=2)
    assert list(res_me.state_dict()) == list(res_up.state_dict())
    res_me.load_state_dict(res_up.state_dict(), strict=True)
    res_up.load_state_dict(res_me.state_dict(), strict=True)


@pytest.mark.parametrize(
    "frames,tokens,embs", [(1, 9, False), (2, 7, True), (3, 5, True)], ids=["image", "video2", "video3"]
)
def test_perceiver_resampler_matches_open_flamingo(of, frames, tokens, embs):
    kwargs = dict(dim=32, depth=2, dim_head=8, heads=4, num_latents=6)
    if embs:
        kwargs.update(max_num_media=3, max_num_frames=3)
    up = of.PerceiverResampler(**kwargs)
    mine = ff.PerceiverResampler(**kwargs)
    mine.load_state_dict(up.state_dict(), strict=True)
    x = torch.randn(2, 3, frames, tokens, 32)
    weights = torch.randn(2, 3, 6, 32)
    results = []
    for module in (up, mine):
        xi = x.clone().requires_grad_(True)
        out = module(xi)
        (out * weights).sum().backward()
        results.append((out, grads_of(module, xi)))
    (out_up, g_up), (out_me, g_me) = results
    assert_close(out_me, out_up, 1e-5, "output")
    for name, g in g_up.items():
        assert_close(g_me[name], g, 1e-5, f"grad {name}")


@pytest.mark.parametrize("shape", [(2, 9, 32), (2, 3, 9, 32)], ids=["3d", "4d"])
def test_flamingo_pytorch_resampler(shape):
    fp = flamingo_pytorch()
    up = fp.PerceiverResampler(dim=32, depth=2, dim_head=8, heads=4, num_latents=5, num_media_embeds=4)
    mine = ffp.PerceiverResampler(dim=32, depth=2, dim_head=8, heads=4, num_latents=5, num_media_embeds=4)
    mine.load_state_dict(up.state_dict(), strict=True)
    x = torch.randn(shape)
    assert_close(mine(x), up(x), 1e-5, "resampler")
    with pytest.raises(ValueError, match="num_media_embeds"):
        mine(torch.randn(1, 5, 9, 32))  # upstream crashes with a shape error for more than 4 media


def test_perceiver_attention_matches(of):
    up = of.PerceiverAttention(dim=32, dim_head=8, heads=4)
    mine = ff.PerceiverAttention(dim=32, dim_head=8, heads=4)
    mine.load_state_dict(up.state_dict(), strict=True)
    x, lat = torch.randn(2, 3, 11, 32), torch.randn(2, 3, 5, 32)
    assert_close(mine(x, lat), up(x, lat), 1e-5, "perceiver attention")


def _saved_bytes(fn, module):
    """Bytes of the distinct storages autograd saves for the backward pass while ``fn()`` runs, the module's own
    parameters aside (they are not activations: they exist anyway)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


@pytest.mark.parametrize("autocast", [False, True])
def test_feed_forward_recomputes_gelu_instead_of_keeping_it(of, autocast):
    """The drop-in FeedForward matches upstream's (forward, input and weight gradients; fp32, and bf16 autocast) and
    keeps less for the backward pass: the GELU output (tokens x dim * mult), and under autocast also the low-precision
    copy of the out-projection's weight (the backward casts it again)."""
    torch.manual_seed(0)
    dim, mult, shape = 24, 4, (3, 7, 24)
    ours = ff.FeedForward(dim, mult)
    theirs = of.FeedForward(dim, mult)
    theirs.load_state_dict(ours.state_dict())
    results = {}
    for name, module in (("ours", ours), ("theirs", theirs)):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, saved = _saved_bytes(lambda: module(x), module)
        out.float().square().sum().backward()
        results[name] = (out, saved, grads_of(module, x))
    (out, saved, grads), (ref, ref_saved, ref_grads) = results["ours"], results["theirs"]
    assert out.dtype == ref.dtype
    rtol = 2e-2 if autocast else 1e-6
    assert_close(out, ref, rtol, "out")
    for key in ref_grads:
        assert grads[key].dtype == ref_grads[key].dtype, key
        assert_close(grads[key], ref_grads[key], rtol, key)
    gelu_out = 3 * 7 * dim * mult * (2 if autocast else 4)
    weight_copy = dim * mult * dim * 2 if autocast else 0
    assert ref_saved - saved == gelu_out + weight_copy, (ref_saved, saved)


def test_feed_forward_with_a_hook_runs_as_written():
    """A forward hook on the GELU or the out-projection (or a replaced GELU) keeps the plain Sequential path."""
    module = ff.FeedForward(16, 2)
    calls = []
    module[3].register_forward_hook(lambda m, args, out: calls.append(out.shape))
    x = torch.randn(2, 5, 16, requires_grad=True)
    module(x).sum().backward()
    assert calls == [(2, 5, 16)] and not module.gelu_and_out_fusable()
    module = ff.FeedForward(16, 2)
    module[2] = torch.nn.GELU(approximate="tanh")
    assert not module.gelu_and_out_fusable()
    torch.testing.assert_close(module(x), module[3](torch.nn.functional.gelu(module[1](module[0](x)), approximate="tanh")))


def test_gated_block_keeps_no_gelu_output_for_backward():
    """On the PyTorch path the block's feed-forward keeps its pre-activation only (the GELU output is recomputed in
    the backward pass): one (tokens x dim * mult) tensor less than the same block run layer by layer (a no-op hook
    on ff[3] forces that), with the same output and gradients."""
    torch.manual_seed(0)
    dim, mult = 32, 4
    block = ff.GatedCrossAttentionBlock(dim=dim, dim_visual=24, dim_head=16, heads=2, ff_mult=mult)
    with torch.no_grad():
        block.attn_gate.fill_(0.5)
        block.ff_gate.fill_(-0.3)
    x = torch.randn(2, 9, dim, requires_grad=True)
    media = torch.randn(2, 2, 4, 24)
    ml = locations(2, 9, [(0, 5), (3,)])
    results = []
    for plain in (False, True):
        handle = block.ff[3].register_forward_hook(lambda *args: None) if plain else None
        out, saved = _saved_bytes(lambda: block(x, media, media_locations=ml), block)
        out.square().sum().backward()
        results.append((out.detach(), saved, {k: v.clone() for k, v in grads_of(block, x).items()}))
        block.zero_grad(set_to_none=True)
        x.grad = None
        if handle is not None:
            handle.remove()
    (out, saved, grads), (ref, ref_saved, ref_grads) = results
    assert_close(out, ref, 1e-6, "out")
    for key in ref_grads:
        assert_close(grads[key], ref_grads[key], 1e-6, key)
    assert ref_saved - saved == 2 * 9 * dim * mult * 4, (ref_saved, saved)
