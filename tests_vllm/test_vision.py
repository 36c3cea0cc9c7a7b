"""fastflamingo.vllm.vision: transformers' Mllama vision tower with the padding-split attention equals the same
tower with transformers' SDPA and L x L mask (no engine needed)."""
import copy

import pytest
import torch

from fastflamingo.vllm import vision


def _tower(max_tiles=4, image_size=56, patch_size=14):
    from transformers import MllamaVisionConfig
    from transformers.models.mllama.modeling_mllama import MllamaVisionModel

    ratios = [[1, 1], [1, 2], [2, 1], [1, 3], [3, 1], [1, 4], [2, 2], [4, 1]]
    config = MllamaVisionConfig(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                                intermediate_size=64, image_size=image_size, patch_size=patch_size,
                                max_num_tiles=max_tiles, supported_aspect_ratios=ratios,
                                intermediate_layers_indices=[0], vision_output_dim=64)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = MllamaVisionModel(config).eval()
    with torch.no_grad():  # upstream initialises the gates to 0: open them, so that every part counts
        for name, param in model.named_parameters():
            if "gate" in name or "embedding" in name:
                param.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("tiles", [[1, 3], [4, 2], [2]])
def test_padding_split_attention_equals_transformers(tiles):
    vision.install()
    upstream = _tower()
    ours = copy.deepcopy(upstream)
    ours.config._attn_implementation = vision.ATTENTION
    images, max_tiles = len(tiles), upstream.config.max_num_tiles
    gen = torch.Generator().manual_seed(sum(tiles))
    pixels = torch.randn(1, images, max_tiles, 3, 56, 56, generator=gen)
    mask = torch.zeros(1, images, max_tiles, dtype=torch.long)
    for i, n in enumerate(tiles):
        mask[0, i, :n] = 1
        pixels[0, i, n:] = 0  # the processor pads with zero tiles
    ids = torch.tensor([[{1: 1, 2: 2, 3: 4, 4: 6}[n] for n in tiles]])
    with torch.no_grad():
        want = upstream(pixel_values=pixels, aspect_ratio_ids=ids, aspect_ratio_mask=mask).last_hidden_state
        with vision.padding_only():
            got = ours(pixel_values=pixels, aspect_ratio_ids=ids, aspect_ratio_mask=mask).last_hidden_state
        outside = ours(pixel_values=pixels, aspect_ratio_ids=ids, aspect_ratio_mask=mask).last_hidden_state
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    assert torch.allclose(outside, want, atol=1e-5, rtol=1e-5)  # outside the block: transformers' 4D mask


def test_mask_function_is_transformers_outside_the_block():
    vision.install()
    from transformers.models.mllama import modeling_mllama

    ratio_mask = torch.tensor([[1, 1, 0, 0]])
    full = modeling_mllama._prepare_aspect_ratio_attention_mask(ratio_mask, 17, 24, torch.float32)
    assert full.shape == (1, 1, 96, 96)
    assert torch.equal(full, modeling_mllama._prepare_aspect_ratio_attention_mask.__wrapped__(ratio_mask, 17, 24,
                                                                                              torch.float32))
    with vision.padding_only():
        pad = modeling_mllama._prepare_aspect_ratio_attention_mask(ratio_mask, 17, 24, torch.float32)
    # the padding is exactly the tokens whose mask entries transformers sets: pad_i * pad_j * finfo.min
    assert pad.shape == (1, 96)
    assert torch.equal(full[0, 0] != 0, pad[0][:, None] & pad[0][None, :])
