"""fp32 references with fastflamingo semantics (a token that sees no media gets 0) that several ops check against:
the masked media cross-attention core (op ``media_xattn``) and, around it, OpenFlamingo's ``MaskedCrossAttention``
and ``GatedCrossAttentionBlock`` recomputed with an fp32 copy of the upstream module's weights (ops ``mca``,
``block``, ``media_decode``).
"""
from __future__ import annotations

import fastflamingo
from fastflamingo import reference as ff_reference

# above this many score elements the fp32 dense reference would not fit comfortably: use the run-based PyTorch
# path of fastflamingo in fp32 instead (independent of the Triton kernel it checks)
_DENSE_REFERENCE_MAX = 1 << 28


def media_xattn(q, k, v, mask, scale):
    """fp32 core output for q (B, T, H, d) on media K/V (B, keys, H, d) under a ``MediaMask``."""
    q, k, v = (t.detach().float() for t in (q, k, v))
    batch, text, heads, _ = q.shape
    if batch * heads * text * k.shape[1] > _DENSE_REFERENCE_MAX:
        with fastflamingo.backend("torch"):
            return fastflamingo.functional.media_xattn(q, k, v, mask, scale=scale)
    return ff_reference.media_xattn(q, k, v, mask.text_time, mask.num_media, mask.immediate, scale)


def masked_cross_attention(module, x, media, mask, p):
    """An fp32 upstream ``MaskedCrossAttention`` (``module``) on x (B, T, dim) and media (B, images, latents,
    dim_visual); ``p``: the case's heads, head_dim and latents."""
    batch, text = x.shape[:2]
    q = module.to_q(module.norm(x)).view(batch, text, p["heads"], p["head_dim"])
    kv = module.to_kv(media.reshape(batch, -1, media.shape[-1]))
    k, v = kv.chunk(2, dim=-1)
    shape = (batch, kv.shape[1], p["heads"], p["head_dim"])
    out = media_xattn(q, k.reshape(shape), v.reshape(shape), mask, p["head_dim"] ** -0.5)
    return module.to_out(out.reshape(batch, text, -1))


def gated_block(module, x, media, mask, p):
    """An fp32 upstream ``GatedCrossAttentionBlock``: the tanh-gated cross-attention, then the tanh-gated
    feed-forward, each added to its input."""
    x = masked_cross_attention(module.attn, x, media, mask, p) * module.attn_gate.tanh() + x
    return module.ff(x) * module.ff_gate.tanh() + x
