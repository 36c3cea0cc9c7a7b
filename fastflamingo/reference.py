"""Pure-PyTorch references: upstream's math restated step by step. Test oracles, not the fast path.

Each function takes a module with upstream's parameter names (an upstream module or a fastflamingo drop-in: their
state_dicts are interchangeable) plus the inputs, and computes what upstream computes, in upstream's order: the
``-finfo.max`` fill, the detached ``amax`` shift, the zeroed rows, the fused ``to_kv`` split, norm placement,
GELU / ReLU / SwiGLU MLPs, float and vector alphas, IDEFICS' additive ``finfo.min`` mask and fp32 softmax.

``semantics="upstream"`` reproduces upstream exactly, including its one quirk: a text token that sees no media
gets a uniform average over all media (all-previous mode before the first image; more ``<image>`` tokens than
images in immediate mode). ``semantics="fastflamingo"`` gives such tokens an attention output of exactly zero,
which is what fastflamingo computes (README, "Semantics note"). Everything else is identical.

The last section restates the three ops in the kernels' own layout (``media_xattn``, ``perceiver_attn``,
``gated_linear``): dense, differentiable, in the dtype of their inputs (call them with fp64 tensors). They are the
oracles of the kernel tests, the self-test and the benchmarks' correctness gate.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .masks import visible_media

SEMANTICS = ("upstream", "fastflamingo")


def _check_semantics(semantics: str) -> None:
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics={semantics!r}; expected one of {SEMANTICS}")


def text_time(media_locations: torch.Tensor, num_text: int, use_cached_media: bool = False) -> torch.Tensor:
    """OpenFlamingo's 1-based media index per text token (helpers.py:196-205)."""
    if use_cached_media:
        return media_locations.count_nonzero(dim=1)[:, None].expand(-1, num_text)
    return media_locations.cumsum(dim=-1)


def flamingo_attention(q, k, v, media_locations, num_media, latents, immediate, *, use_cached_media=False,
                       semantics="upstream"):
    """OpenFlamingo / flamingo-pytorch attention core on (B, H, T, D) queries already multiplied by the scale and
    (B, H, M*n, D) keys/values; returns (B, H, T, D)."""
    _check_semantics(semantics)
    sim = torch.einsum("...id,...jd->...ij", q, k)
    if media_locations is None:
        attn = (sim - sim.amax(dim=-1, keepdim=True).detach()).softmax(dim=-1)
        return torch.einsum("...ij,...jd->...id", attn, v)
    tt = text_time(media_locations, q.shape[-2], use_cached_media)
    media_time = torch.arange(num_media, device=q.device).repeat_interleave(latents) + 1
    op = torch.eq if immediate else torch.ge
    allowed = op(tt[:, None, :, None], media_time[None, None, None, :])
    sim = sim.masked_fill(~allowed, -torch.finfo(sim.dtype).max)
    attn = (sim - sim.amax(dim=-1, keepdim=True).detach()).softmax(dim=-1)
    if immediate:
        attn = attn.masked_fill((tt == 0)[:, None, :, None], 0.0)
    if semantics == "fastflamingo":
        attn = attn.masked_fill(~allowed.any(-1, keepdim=True), 0.0)
    return torch.einsum("...ij,...jd->...id", attn, v)


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., n, h*d) -> (..., h, n, d), head-major like einops' ``(h d)``."""
    return t.unflatten(-1, (heads, -1)).transpose(-2, -3)


def _merge(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(-2, -3).flatten(-2)


def feed_forward(ff, x):
    """``Sequential(LayerNorm, Linear, GELU, Linear)``."""
    return ff[3](ff[2](ff[1](ff[0](x))))


def masked_cross_attention(module, x, media, media_locations=None, use_cached_media=False, *, semantics="upstream"):
    """OpenFlamingo ``MaskedCrossAttention.forward`` (flamingo-pytorch: ``use_cached_media=False``)."""
    heads = module.heads
    num_media, latents = media.shape[1:3]
    q = _heads(module.to_q(module.norm(x)), heads) * module.scale
    k, v = module.to_kv(media.flatten(1, 2)).chunk(2, dim=-1)
    out = flamingo_attention(q, _heads(k, heads), _heads(v, heads), media_locations, num_media, latents,
                             module.only_attend_immediate_media, use_cached_media=use_cached_media,
                             semantics=semantics)
    return module.to_out(_merge(out))


def gated_cross_attention_block(module, x, media, media_locations=None, use_cached_media=False, *,
                                semantics="upstream"):
    """``x = attn(x) * tanh(attn_gate) + x; x = ff(x) * tanh(ff_gate) + x``."""
    attended = masked_cross_attention(module.attn, x, media, media_locations, use_cached_media, semantics=semantics)
    x = attended * module.attn_gate.tanh() + x
    return feed_forward(module.ff, x) * module.ff_gate.tanh() + x


def perceiver_attention(module, x, latents):
    """OpenFlamingo / flamingo-pytorch ``PerceiverAttention``: keys are ``cat(norm(x), norm(latents))``."""
    x = module.norm_media(x)
    latents = module.norm_latents(latents)
    q = _heads(module.to_q(latents), module.heads) * module.scale
    k, v = module.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
    sim = torch.einsum("...id,...jd->...ij", q, _heads(k, module.heads))
    attn = (sim - sim.amax(dim=-1, keepdim=True).detach()).softmax(dim=-1)
    return module.to_out(_merge(torch.einsum("...ij,...jd->...id", attn, _heads(v, module.heads))))


def perceiver_resampler(module, x):
    """OpenFlamingo (x: (b, T, F, v, D), optional ``frame_embs`` / ``media_time_embs``) or flamingo-pytorch
    (x: (b, n, D) or (b, T, n, D), ``media_pos_emb``) resampler."""
    if hasattr(module, "media_pos_emb"):
        if x.dim() == 3:
            x = x[:, None]
        x = x + module.media_pos_emb[: x.shape[1]]
    else:
        b, T, frames, v = x.shape[:4]
        if getattr(module, "frame_embs", None) is not None:
            x = x + module.frame_embs[:frames][:, None, :]
        x = x.flatten(2, 3)
        if getattr(module, "media_time_embs", None) is not None:
            x = x + module.media_time_embs[:T]
    latents = module.latents.expand(x.shape[0], x.shape[1], *module.latents.shape)
    for attn, ff in module.layers:
        latents = perceiver_attention(attn, x, latents) + latents
        latents = feed_forward(ff, latents) + latents
    return module.norm(latents)


# ---------------------------------------------------------------------------------------------------- IDEFICS


def idefics_rms_norm(norm, hidden_states):
    """``IdeficsRMSNorm``: variance in fp32, cast back to the weight's half dtype."""
    variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + norm.variance_epsilon)
    if norm.weight.dtype in (torch.float16, torch.bfloat16):
        hidden_states = hidden_states.to(norm.weight.dtype)
    return norm.weight * hidden_states


def idefics_cross_attention(attn, hidden_states, image_hidden_states, image_attention_mask, *,
                            semantics="upstream"):
    """``IdeficsAttention`` (cross) with eager attention: fp32 softmax of ``q k^T * scale + mask``."""
    _check_semantics(semantics)
    heads = attn.num_heads
    q = _heads(attn.q_proj(hidden_states), heads)
    k = _heads(attn.k_proj(image_hidden_states), heads)
    v = _heads(attn.v_proj(image_hidden_states), heads)
    if attn.qk_layer_norms:
        q = idefics_rms_norm(attn.q_layer_norm, q)
        k = idefics_rms_norm(attn.k_layer_norm, k)
    scores = torch.matmul(q, k.transpose(-1, -2)) * attn.scaling
    if image_attention_mask is not None:
        scores = scores + image_attention_mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if semantics == "fastflamingo" and image_attention_mask is not None:
        blocked = image_attention_mask == torch.finfo(image_attention_mask.dtype).min
        probs = probs.masked_fill(blocked.all(-1, keepdim=True), 0.0)
    return attn.o_proj(_merge(torch.matmul(probs, v)))


def idefics_gated_cross_attention_layer(layer, hidden_states, image_hidden_states, image_attention_mask,
                                        cross_attention_gate, *, semantics="upstream"):
    """``IdeficsGatedCrossAttentionLayer.forward`` in eval mode (dropout off)."""
    residual = hidden_states
    h = idefics_cross_attention(layer.cross_attn, idefics_rms_norm(layer.input_layernorm, hidden_states),
                                image_hidden_states, image_attention_mask, semantics=semantics)
    h = h.masked_fill((cross_attention_gate == 0)[:, :, None], 0.0)
    hidden_states = residual + torch.tanh(layer.alpha_cross_attn) * h
    residual = hidden_states
    normed = idefics_rms_norm(layer.post_attention_layernorm, hidden_states)
    mlp = layer.mlp
    h = mlp.down_proj(mlp.act_fn(mlp.gate_proj(normed)) * mlp.up_proj(normed))
    return residual + torch.tanh(layer.alpha_dense) * h


def idefics_perceiver_resampler(module, context):
    """``IdeficsPerceiverResampler``: keys ``cat(LN(context), LN(latents))`` through separate k/v projections,
    optional per-head LayerNorm on q and k, ReLU MLP."""
    latents = module.latents.repeat(context.shape[0], 1, 1)
    for attn, ff in module.blocks:
        c = attn.context_layer_norm(context)
        lat = attn.latents_layer_norm(latents)
        q = _heads(attn.q_proj(lat), attn.n_heads)
        kv_input = torch.cat([c, lat], dim=-2)
        k = _heads(attn.k_proj(kv_input), attn.n_heads)
        v = _heads(attn.v_proj(kv_input), attn.n_heads)
        if attn.qk_layer_norms:
            q = attn.q_layer_norm(q)
            k = attn.k_layer_norm(k)
        scores = torch.einsum("...id,...jd->...ij", q * attn.qk_scale, k)
        probs = (scores - scores.amax(dim=-1, keepdim=True).detach()).softmax(dim=-1)
        latents = attn.output_proj(_merge(torch.einsum("...ij,...jd->...id", probs, v))) + latents
        latents = ff.c_proj(ff.act(ff.fc(ff.ln(latents)))) + latents
    return module.layer_norm(latents)


# ------------------------------------------------------------------------------- ops in the kernels' layout


def media_xattn(q, k, v, text_time, num_media: int, immediate: bool, scale: Optional[float] = None,
                key_mask: Optional[torch.Tensor] = None):
    """Masked media cross-attention, dense: q (B, T, H, D), k/v (B, num_media * n, H, D) media-major, ``text_time``
    (B, T). Token t sees keys ``[lo * n, hi * n)`` with ``(lo, hi) = visible_media(text_time)``, and of those only
    the keys that ``key_mask`` (B, keys), nonzero = visible, keeps; a token that sees nothing gets exactly 0
    (fastflamingo semantics). Differentiable; no NaN in the forward or backward pass."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    allowed = _media_keys_allowed(q, k, text_time, num_media, immediate, key_mask)
    probs = visible_softmax(torch.einsum("bthd,bkhd->bhtk", q, k) * scale, allowed[:, None])
    return torch.einsum("bhtk,bkhd->bthd", probs, v)


def _media_keys_allowed(q, k, text_time, num_media: int, immediate: bool, key_mask=None) -> torch.Tensor:
    """(B, T, keys) bool: the keys each token sees, the media rule AND the key mask."""
    latents = k.shape[1] // num_media if num_media else 0
    lo, hi = visible_media(text_time.to(q.device), num_media, immediate)
    key = torch.arange(k.shape[1], device=q.device)
    allowed = (key >= lo[..., None] * latents) & (key < hi[..., None] * latents)  # (B, T, keys)
    if key_mask is not None:
        allowed = allowed & (key_mask.to(q.device) != 0)[:, None, :]
    return allowed


def visible_softmax(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax of ``scores`` over the keys ``allowed`` (broadcast to ``scores``, keys last); a row that sees no key
    gets all-zero probabilities, so its attention output is exactly 0 (fastflamingo semantics), with no NaN in the
    forward or backward pass (its scores are never all ``-inf``)."""
    seen = allowed.any(-1, keepdim=True)
    scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(~seen, 0.0)
    return torch.softmax(scores, dim=-1).masked_fill(~seen, 0.0)


def media_xattn_lse(q, k, text_time, num_media: int, immediate: bool, scale: Optional[float] = None,
                    key_mask: Optional[torch.Tensor] = None):
    """Log-sum-exp (natural log) of each token's visible scaled scores, (B, H, T) in fp32: what the forward kernel
    saves for the backward pass. ``-inf`` where a token sees nothing."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    allowed = _media_keys_allowed(q, k, text_time, num_media, immediate, key_mask)
    scores = torch.einsum("bthd,bkhd->bhtk", q.float(), k.float()) * scale
    return scores.masked_fill(~allowed[:, None], float("-inf")).logsumexp(-1)


def perceiver_attn(q, k_media, v_media, k_latents, v_latents, scale: Optional[float] = None,
                   key_mask: Optional[torch.Tensor] = None):
    """Latents q (N, L, H, D) attend to ``[media; latents]`` keys and values (N, M + L, Hkv, D), concatenated here.
    Grouped-query attention when Hkv < H: query head ``h`` reads KV head ``h // (H // Hkv)``. ``key_mask`` (N, M),
    nonzero = visible, hides media tokens; the latents are always visible."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k, v = torch.cat((k_media, k_latents), 1), torch.cat((v_media, v_latents), 1)
    grouped = q.unflatten(2, (k.shape[2], -1))  # (N, L, Hkv, group, D): head h = kv_head * group + g
    scores = torch.einsum("nlhgd,nkhd->nhglk", grouped, k) * scale
    if key_mask is not None:
        latents_seen = torch.ones(q.shape[:2], dtype=torch.bool, device=q.device)
        visible = torch.cat(((key_mask != 0).to(q.device), latents_seen), 1)  # (N, M + L)
        scores = scores.masked_fill(~visible[:, None, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("nhglk,nkhd->nlhgd", probs, v).flatten(2, 3)


def gated_linear(x, inp, weight, bias, alpha, row_gate=None):
    """Upstream's gated branch: ``h.masked_fill(row_gate == 0, 0) * alpha.tanh() + x`` with ``h = linear(inp)``."""
    h = F.linear(inp, weight, bias)
    if row_gate is not None:
        h = h.masked_fill((row_gate == 0)[..., None], 0.0)
    return h * alpha.tanh() + x


__all__ = [
    "media_xattn",
    "perceiver_attn",
    "gated_linear",
    "text_time",
    "flamingo_attention",
    "feed_forward",
    "masked_cross_attention",
    "gated_cross_attention_block",
    "perceiver_attention",
    "perceiver_resampler",
    "idefics_rms_norm",
    "idefics_cross_attention",
    "idefics_gated_cross_attention_layer",
    "idefics_perceiver_resampler",
]
