"""fastflamingo.reference restates upstream exactly, and the drop-ins equal it (fastflamingo semantics) in fp64."""
import pytest
import torch

import fastflamingo as ff
from fastflamingo import reference as ref
from fastflamingo.models import flamingo_pytorch as ffp
from fastflamingo.testing import random_media_locations
from helpers import assert_close
from upstream import flamingo_pytorch, of  # noqa: F401 (of is a fixture)


def _randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            if p.numel() == 1:
                p.uniform_(-0.9, 0.9)
            elif p.dim() == 1:
                p.normal_(1.0, 0.3)
    return module


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("immediate", [True, False], ids=["immediate", "all-previous"])
def test_reference_restates_open_flamingo_and_dropins_match_it(of, seed, immediate):
    g = torch.Generator().manual_seed(seed)
    batch, num_text, num_media, latents = 2, int(torch.randint(1, 40, (1,), generator=g)), 3, 4
    up = _randomize(of.GatedCrossAttentionBlock(dim=24, dim_visual=16, dim_head=8, heads=3,
                                                only_attend_immediate_media=immediate))
    x = torch.randn(batch, num_text, 24, generator=g)
    media = torch.randn(batch, num_media, latents, 16, generator=g)
    ml = random_media_locations(batch, num_text, num_media + 1, generator=g)  # sometimes one <image> too many
    cached = bool(seed % 2)
    xq = x[:, :2] if cached else x
    with torch.no_grad():
        expected = up(xq, media, ml, use_cached_media=cached)
        restated = ref.gated_cross_attention_block(up, xq, media, ml, cached)
    assert_close(restated, expected, 1e-6, "reference vs upstream")

    mine = ff.GatedCrossAttentionBlock(dim=24, dim_visual=16, dim_head=8, heads=3,
                                       only_attend_immediate_media=immediate).double()
    mine.load_state_dict(up.state_dict())
    up64 = up.double()
    with torch.no_grad():
        oracle = ref.gated_cross_attention_block(up64, xq.double(), media.double(), ml, cached, semantics="fastflamingo")
        assert_close(mine(xq.double(), media.double(), ml, use_cached_media=cached), oracle, 1e-12, "drop-in vs oracle")


def test_reference_perceiver_open_flamingo_and_flamingo_pytorch(of):
    torch.manual_seed(0)
    up = of.PerceiverResampler(dim=16, depth=2, dim_head=8, heads=2, num_latents=5, max_num_media=3, max_num_frames=2)
    x = torch.randn(2, 3, 2, 7, 16)
    with torch.no_grad():
        assert_close(ref.perceiver_resampler(up, x), up(x), 1e-6, "OpenFlamingo resampler")
    fp = flamingo_pytorch()
    up = fp.PerceiverResampler(dim=16, depth=2, dim_head=8, heads=2, num_latents=5)
    mine = ffp.PerceiverResampler(dim=16, depth=2, dim_head=8, heads=2, num_latents=5).double()
    mine.load_state_dict(up.state_dict())
    x = torch.randn(2, 3, 7, 16)
    with torch.no_grad():
        assert_close(ref.perceiver_resampler(up, x), up(x), 1e-6, "flamingo-pytorch resampler")
        assert_close(mine(x.double()), ref.perceiver_resampler(up.double(), x.double()), 1e-12, "drop-in")


@pytest.mark.parametrize("alpha_type,qk", [("float", False), ("vector", True)])
def test_reference_restates_idefics(alpha_type, qk):
    pytest.importorskip("transformers")
    from transformers.models.idefics.modeling_idefics import IdeficsGatedCrossAttentionLayer
    from transformers.models.idefics.perceiver import IdeficsPerceiverResampler

    from fastflamingo.testing import idefics_config
    from test_idefics import expand_like_idefics_model, processor_mask

    cfg = idefics_config(alpha_type=alpha_type, qk=qk, qk_perceiver=qk, alpha_initializer="ones")
    torch.manual_seed(0)
    up = _randomize(IdeficsGatedCrossAttentionLayer(cfg, layer_idx=0)).eval()
    image_mask = processor_mask(2, 15, 3, seed=1)
    additive, gate = expand_like_idefics_model(image_mask, 8)
    x, img = torch.randn(2, 15, 64), torch.randn(2, 3 * 8, 32)
    with torch.no_grad():
        expected = up(x, None, img, image_attention_mask=additive, cross_attention_gate=gate)
        restated = ref.idefics_gated_cross_attention_layer(up, x, img, additive, gate)
    assert_close(restated, expected, 1e-6, "IDEFICS layer")
    mine = ff.IdeficsGatedCrossAttentionLayer(cfg, layer_idx=0).double()
    mine.load_state_dict(up.state_dict())
    with torch.no_grad():
        up64 = up.double()
        additive64, gate64 = expand_like_idefics_model(image_mask, 8, torch.float64)
        oracle = ref.idefics_gated_cross_attention_layer(up64, x.double(), img.double(), additive64, gate64,
                                                         semantics="fastflamingo")
        out = mine(x.double(), None, img.double(), image_attention_mask=additive64, cross_attention_gate=gate64)
    # upstream's eager softmax runs in fp32 even on fp64 inputs, so the oracle carries fp32 rounding
    assert_close(out, oracle, 1e-6, "IDEFICS drop-in vs oracle")

    resampler = IdeficsPerceiverResampler(cfg, 32, 2, 2, 16, 8)
    context = torch.randn(3, 17, 32)
    with torch.no_grad():
        assert_close(ref.idefics_perceiver_resampler(resampler, context), resampler(context), 1e-6, "resampler")
