"""fastflamingo.patch on whole models: the real OpenFlamingo ``Flamingo`` and flamingo-pytorch ``FlamingoPaLM``.

(IDEFICS models are covered in test_idefics.py.)
"""
import pytest
import torch
from torch import nn

import fastflamingo as ff
from fastflamingo.testing import tiny_flamingo_palm, tiny_open_flamingo
from helpers import assert_close
from upstream import flamingo_pytorch


@pytest.fixture
def flamingo():
    try:
        return tiny_open_flamingo(num_layers=4, cross_attn_every_n_layers=2)
    except ModuleNotFoundError as exc:
        pytest.skip(str(exc))


def _inputs(media_token, batch=2, num_text=24, num_images=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    vision_x = torch.randn(batch, num_images, 1, 3, 32, 32, generator=g)
    ids = torch.randint(0, 90, (batch, num_text), generator=g)
    ids[0, [0, 9, 17]] = media_token  # media at position 0
    ids[1, [5, 14]] = media_token  # text before the first image, and a padded (zero) third image
    vision_x[1, 2] = 0
    return vision_x, ids, torch.ones_like(ids)


def test_open_flamingo_patch_logits_generate_unpatch(flamingo):
    model, media_token, _ = flamingo
    vision_x, ids, mask = _inputs(media_token)
    params_before = {name: p for name, p in model.named_parameters()}
    keys_before = list(model.state_dict().keys())
    originals = list(model.lang_encoder.gated_cross_attn_layers)
    with torch.no_grad():
        logits_ref = model(vision_x, ids, attention_mask=mask).logits
        tokens_ref = model.generate(vision_x=vision_x, lang_x=ids, attention_mask=mask, max_new_tokens=8)
        beams_ref = model.generate(vision_x=vision_x, lang_x=ids, attention_mask=mask, max_new_tokens=5, num_beams=3)

    report = ff.patch(model)
    assert report.counts() == {"PerceiverResampler": 1, "GatedCrossAttentionBlock": 2}
    # each block is held three times (SEMANTICS 1.1): the list, the FlamingoLayer, and the state_dict alias
    for i, block in enumerate(model.lang_encoder.gated_cross_attn_layers):
        layer = model.lang_encoder.model.layers[i]
        assert layer.gated_cross_attn_layer is block
        if block is not None:
            assert isinstance(block, ff.GatedCrossAttentionBlock)
    assert isinstance(model.perceiver, ff.PerceiverResampler)
    assert list(model.state_dict().keys()) == keys_before
    for name, p in model.named_parameters():
        assert p is params_before[name], f"{name} is a new Parameter object"

    with torch.no_grad():
        logits = model(vision_x, ids, attention_mask=mask).logits
        tokens = model.generate(vision_x=vision_x, lang_x=ids, attention_mask=mask, max_new_tokens=8)
        beams = model.generate(vision_x=vision_x, lang_x=ids, attention_mask=mask, max_new_tokens=5, num_beams=3)
    assert_close(logits, logits_ref, 1e-5, "logits")
    assert torch.equal(tokens, tokens_ref)
    assert torch.equal(beams, beams_ref)

    assert ff.unpatch(model) == 3
    assert list(model.lang_encoder.gated_cross_attn_layers) == originals
    assert model.lang_encoder.model.layers[1].gated_cross_attn_layer is originals[1]
    assert not any(isinstance(m, ff.GatedCrossAttentionBlock) for m in model.modules())


def test_open_flamingo_training_gradients_match(flamingo):
    model, media_token, _ = flamingo
    model.train()
    vision_x, ids, mask = _inputs(media_token, seed=1)

    def step():
        model.zero_grad(set_to_none=True)
        out = model(vision_x, ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_ref, grads_ref = step()
    ff.patch(model)
    loss, grads = step()
    assert_close(loss, loss_ref, 1e-5, "loss")
    assert grads.keys() == grads_ref.keys()
    for name, g in grads_ref.items():
        assert_close(grads[name], g, 1e-4, f"grad {name}")


def test_patch_survives_optimizer_and_dtype_moves(flamingo):
    model, media_token, _ = flamingo
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ff.patch(model)
    model.to(torch.float64)  # parameters are converted in place, so the optimizer still holds them
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(id(p) in held for p in model.parameters())
    vision_x, ids, mask = _inputs(media_token)
    with torch.no_grad():
        out = model(vision_x.double(), ids, attention_mask=mask).logits
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
    ff.unpatch(model)
    assert model.perceiver.latents.dtype == torch.float64


@pytest.mark.parametrize("immediate", [True, False], ids=["immediate", "all-previous"])
def test_flamingo_palm_patch(immediate):
    pytest.importorskip("flamingo_pytorch")
    flamingo_pytorch()
    model = tiny_flamingo_palm(immediate=immediate)
    text = torch.randint(4, 50, (2, 20))
    text[:, [0, 11]] = 3
    images = torch.randn(2, 2, 3, 16, 16)
    videos = torch.randn(2, 2, 3, 3, 16, 16)
    with torch.no_grad():
        ref_images, ref_videos = model(text, images=images), model(text, videos=videos)
    report = ff.patch(model)
    assert report.counts() == {"PerceiverResampler": 1, "GatedCrossAttentionBlock": 2}
    with torch.no_grad():
        assert_close(model(text, images=images), ref_images, 1e-5, "image logits")
        assert_close(model(text, videos=videos), ref_videos, 1e-5, "video logits")
    ff.unpatch(model)


def test_patch_rejects_unsupported_models():
    with pytest.raises(TypeError, match="Supported models"):
        ff.patch(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(TypeError, match="nn.Module"):
        ff.patch("not a model")
