"""Every row of the README's bad-input table: the input, the exception and the start of its message.

Bad input gets a ValueError or TypeError that names the argument and its shape or dtype, raised before any
computation (never torch's RuntimeError from inside an op), and nothing the caller passed is modified.
"""
import pytest
import torch

import fastflamingo as ff
from fastflamingo import functional, masks
from fastflamingo.models.idefics import IdeficsCrossAttention, IdeficsGatedCrossAttentionLayer

BLOCK = dict(dim=16, dim_visual=12, dim_head=4, heads=2)
IDEFICS = dict(hidden_size=16, num_attention_heads=2, intermediate_size=24, qk_layer_norms=False,
               vision_config=dict(embed_dim=12))


def block(*args, **kwargs):
    return ff.GatedCrossAttentionBlock(**BLOCK)(*args, **kwargs)


def x(*shape, dtype=torch.float32):
    return torch.randn(*(shape or (2, 5, 16))).to(dtype)


def media(*shape, dtype=torch.float32):
    return torch.randn(*(shape or (2, 3, 4, 12))).to(dtype)


def locations(batch=2, text=5):
    return torch.zeros(batch, text, dtype=torch.bool)


def resampler(inputs):
    return ff.PerceiverResampler(dim=8, depth=1, dim_head=4, heads=2, num_latents=3, max_num_media=2,
                                 max_num_frames=1)(inputs)


def attention_inputs():
    q, k = torch.randn(2, 9, 2, 8), torch.randn(2, 6, 2, 8)
    mask = masks.from_media_locations(torch.tensor([[True] + [False] * 8] * 2), 2)
    return q, k, k.clone(), mask


def xattn(**change):
    q, k, v, mask = attention_inputs()
    args = dict(q=q, k=k, v=v, mask=mask)
    args.update(change)
    kwargs = {key: args.pop(key) for key in list(args) if key not in ("q", "k", "v", "mask")}
    return functional.media_xattn(args["q"], args["k"], args["v"], args["mask"], **kwargs)


def perceiver(heads=4, kv_heads=1, kv_latents_heads=None, **kwargs):
    """functional.perceiver_attn on N=2, 3 latents, 7 media tokens, head_dim 8."""
    kv_latents_heads = kv_heads if kv_latents_heads is None else kv_latents_heads
    q = torch.randn(2, 3, heads, 8)
    k_media, k_latents = torch.randn(2, 7, kv_heads, 8), torch.randn(2, 3, kv_latents_heads, 8)
    return functional.perceiver_attn(q, k_media, k_media.clone(), k_latents, k_latents.clone(), **kwargs)


def idefics_layer(hidden=None, images=None, mask="default", gate="default"):
    layer = IdeficsGatedCrossAttentionLayer(IDEFICS)
    hidden = torch.randn(2, 5, 16) if hidden is None else hidden
    images = torch.randn(2, 6, 12) if images is None else images
    if isinstance(mask, str):
        mask = torch.zeros(2, 1, 5, 6)
    if isinstance(gate, str):
        gate = torch.ones(2, 5)
    return layer(hidden, None, images, image_attention_mask=mask, cross_attention_gate=gate)


def with_backend(name, call):
    with ff.backend(name):
        return call()


def idefics_attention(hidden, images):
    return IdeficsCrossAttention(IDEFICS)(hidden, images, torch.zeros(2, 1, 5, 6))


# (row id, call, exception, message start) -- the README table lists the same rows in the same order
ROWS = [
    ("x not a tensor", lambda: block([[0.0]], media(), locations()), TypeError,
     "x must be a torch.Tensor, got list"),
    ("x integer", lambda: block(torch.ones(2, 5, 16, dtype=torch.long), media(), locations()), TypeError,
     "x must be a floating-point tensor, got dtype torch.int64"),
    ("x wrong rank", lambda: block(x(5, 16), media(), locations()), ValueError,
     r"x must have shape \(batch, text, dim\), got \(5, 16\)"),
    ("x wrong width", lambda: block(x(2, 5, 15), media(), locations()), ValueError,
     r"x has feature size 15 but the module expects 16 \(\(batch, text, dim\)\)"),
    ("x dtype vs weights", lambda: block(x(dtype=torch.bfloat16), media(), locations()), TypeError,
     "x has dtype torch.bfloat16 but to_q.weight is torch.float32: convert the input or the module with"),
    ("media dtype vs weights", lambda: block(x(), media(dtype=torch.float64), locations()), TypeError,
     "media has dtype torch.float64 but to_kv.weight is torch.float32"),
    ("media wrong rank", lambda: block(x(), media(2, 12, 12), locations()), ValueError,
     r"media must have shape \(batch, num_media, latents, dim_visual\), got \(2, 12, 12\)"),
    ("media batch", lambda: block(x(), media(1, 3, 4, 12), locations()), ValueError,
     "media has batch size 1 but x has batch size 2"),
    ("media_locations not bool", lambda: block(x(), media(), locations().long()), TypeError,
     "media_locations must be a boolean tensor .*, got dtype torch.int64"),
    ("media_locations length", lambda: block(x(), media(), locations(2, 4)), ValueError,
     "media_locations has 4 positions but x has 5 tokens"),
    ("media_locations batch", lambda: block(x(), media(), locations(1, 5)), ValueError,
     "media_locations has batch size 1 but x has batch size 2"),
    ("resampler: more media than time embeddings", lambda: resampler(torch.randn(1, 3, 1, 5, 8)), ValueError,
     "x has 3 media per sample but the resampler has 2 time embeddings"),
    ("resampler: more frames than frame embeddings", lambda: resampler(torch.randn(1, 2, 2, 5, 8)), ValueError,
     "x has 2 frames per media but the resampler has 1 frame embeddings"),
    ("IDEFICS hidden_states width", lambda: idefics_layer(hidden=torch.randn(2, 5, 15)), ValueError,
     "hidden_states has feature size 15 but the module expects 16"),
    ("IDEFICS image_hidden_states dtype", lambda: idefics_attention(torch.randn(2, 5, 16),
                                                                    torch.randn(2, 6, 12).double()), TypeError,
     "image_hidden_states has dtype torch.float64 but k_proj.weight is torch.float32"),
    ("IDEFICS image_hidden_states missing", lambda: IdeficsGatedCrossAttentionLayer(IDEFICS)(
        torch.randn(2, 5, 16), None, None, cross_attention_gate=torch.ones(2, 5)), ValueError,
     "`image_hidden_states` is required"),
    ("IDEFICS cross_attention_gate missing", lambda: idefics_layer(gate=None), ValueError,
     "`cross_attention_gate` is required"),
    ("IDEFICS image_attention_mask shape", lambda: idefics_layer(mask=torch.zeros(2, 1, 5, 7)), ValueError,
     r"image_attention_mask must have shape \(batch, 1, text, images \* latents\) = \(2, 1, 5, 6\), got"),
    ("IDEFICS image_attention_mask integer", lambda: idefics_layer(mask=torch.zeros(2, 1, 5, 6, dtype=torch.long)),
     TypeError, "image_attention_mask must be an additive float mask .* got dtype torch.int64"),
    ("q, k, v dtypes", lambda: xattn(q=attention_inputs()[0].double()), TypeError,
     "q, k and v must share a dtype"),
    ("q integer", lambda: xattn(q=torch.ones(2, 9, 2, 8, dtype=torch.long)), TypeError,
     "q must be a floating-point tensor, got dtype torch.int64"),
    ("keys not a multiple of the media", lambda: xattn(k=torch.randn(2, 5, 2, 8), v=torch.randn(2, 5, 2, 8)),
     ValueError, "k has 5 keys, which is not a multiple of the 2 media of the mask"),
    ("mask shape", lambda: xattn(q=torch.randn(2, 4, 2, 8)), ValueError,
     r"mask covers \(batch, text\) = \(2, 9\) but q has \(batch, text\) = \(2, 4\)"),
    ("mask type", lambda: xattn(mask=torch.zeros(2, 9)), TypeError,
     "mask must be a fastflamingo.masks.MediaMask or a boolean"),
    ("kv_group < 1", lambda: xattn(kv_group=0), ValueError, "kv_group must be >= 1, got 0"),
    ("kv_group > 1 with autograd", lambda: xattn(q=torch.randn(4, 9, 2, 8, requires_grad=True), kv_group=2),
     ValueError, "kv_group > 1 is inference only"),
    ("media_xattn key_mask shape", lambda: xattn(key_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError,
     r"key_mask must have shape \(batch of k, keys\) = \(2, 6\), got \(2, 5\) \(dtype torch.bool\)"),
    ("media_xattn key_mask complex", lambda: xattn(key_mask=torch.ones(2, 6, dtype=torch.complex64)), TypeError,
     "key_mask must be bool, integer or floating .* got dtype torch.complex64"),
    ("media_xattn key_mask with q's batch under kv_group", lambda: xattn(
        k=torch.randn(1, 6, 2, 8), v=torch.randn(1, 6, 2, 8), kv_group=2, key_mask=torch.ones(2, 6)), ValueError,
     r"key_mask must have shape \(batch of k, keys\) = \(1, 6\), got \(2, 6\)"),
    ("perceiver_attn key_mask shape", lambda: perceiver(key_mask=torch.ones(2, 6)), ValueError,
     r"key_mask must have shape \(N, media_tokens\) = \(2, 7\), got \(2, 6\) \(dtype torch.float32\)"),
    ("perceiver_attn key_mask not a tensor", lambda: perceiver(key_mask=[[True] * 7] * 2), TypeError,
     "key_mask must be None or a torch.Tensor"),
    ("perceiver_attn heads not a multiple of KV heads", lambda: perceiver(heads=4, kv_heads=3), ValueError,
     "q has 4 heads, not a multiple of the 3 KV heads of k_media / k_latents"),
    ("perceiver_attn KV heads of media and latents differ", lambda: perceiver(kv_latents_heads=2), ValueError,
     "k_media and k_latents must share their .KV. heads"),
    ("MediaMask mode", lambda: masks.MediaMask(torch.zeros(1, 3, dtype=torch.long), 2, "previous"), ValueError,
     "mode='previous'; expected one of"),
    ("MediaMask text_time rank", lambda: masks.MediaMask(torch.zeros(3, dtype=torch.long), 2, "immediate"),
     ValueError, r"text_time must be \(batch, text\), got shape \(3,\)"),
    ("MediaMask text_time float", lambda: masks.MediaMask(torch.zeros(1, 3), 2, "immediate"), TypeError,
     "text_time must be an integer tensor"),
    ("backend name", lambda: with_backend("cuda", lambda: None), ValueError,
     "backend='cuda' is not a fastflamingo backend; choose one of auto, torch, triton"),
    ("explicit triton it cannot serve", lambda: with_backend("triton", lambda: xattn(dropout_p=0.1)),
     ff.BackendError, "fastflamingo backend 'triton' cannot run media_xattn"),
    ("patch: not a module", lambda: ff.patch("model"), TypeError, "fastflamingo.patch expects an nn.Module"),
    ("patch: nothing to patch", lambda: ff.patch(torch.nn.Linear(2, 2)), TypeError,
     "fastflamingo.patch found nothing to patch in Linear"),
]


@pytest.mark.parametrize("call,error,message", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_row(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_dtype_mixes_upstream_accepts_are_accepted():
    """Autocast makes mixed dtypes legal (it casts each projection's input), as upstream."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert block(x(dtype=torch.bfloat16), media(), locations()).shape == (2, 5, 16)


def test_huge_text_time_saturates_instead_of_wrapping():
    """int64 text_time is converted to int32 without wrapping: 2**32 + 1 used to behave like 1."""
    text_time = torch.tensor([[2**32 + 1, 2**31, -2**40, 1, 3, 0]])
    for mode, expected in (("immediate", [[0, 0], [0, 0], [0, 0], [1, 0], [0, 0], [0, 0]]),
                           ("all_previous", [[1, 1], [1, 1], [0, 0], [1, 0], [1, 1], [0, 0]])):
        visible = masks.MediaMask(text_time, 2, mode).visible()
        assert visible.int().tolist() == [expected], mode
    assert text_time[0, 0] == 2**32 + 1  # the caller's tensor is untouched
