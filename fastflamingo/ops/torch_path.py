"""The PyTorch path of every op: what runs on CPU, and wherever the Triton kernels cannot serve the inputs.

Masked media cross-attention already exploits the mask's structure here: text is cut into *runs* of consecutive
tokens that see the same media (:func:`runs`), and each run attends only to its own media's latents with one fused
``scaled_dot_product_attention`` call; in immediate mode with many runs the runs are gathered into equal *chunks*
(:func:`chunks`) and served by one batched call. Nothing of size text x media-tokens is built, in the forward or the
backward pass. Both schedules are host-side lists derived once per mask and kept on it (``MediaMask.cached``), so
the layers sharing a mask pay for them once. ``docs/design.md`` describes the schedules. While tracing
(``torch.compile`` / ``torch.export``) a host-side schedule would break the graph, so the attention then runs as one
SDPA call with a key mask built on device (:func:`_key_mask_path`, docs/compile.md).
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F

from .._backend import DECODE_MAX_TOKENS
from ..masks import MediaMask, Run, zero_unseen


# --------------------------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------------------------


def runs(mask: MediaMask) -> List[Run]:
    """Stretches of consecutive tokens that see the same media range (host-side: one read of the mask, then
    cached on it, so the layers sharing the mask build the list once).

    When every sample has the same mask the runs cover all samples at once (batch index ``None``).
    """

    def build() -> List[Run]:
        lo, hi = (x.cpu() for x in mask.media_range())
        batch, length = lo.shape
        if batch > 1 and bool((lo == lo[:1]).all()) and bool((hi == hi[:1]).all()):
            rows = [(None, lo[0], hi[0])]
        else:
            rows = [(b, lo[b], hi[b]) for b in range(batch)]
        out: List[Run] = []
        for b, lo_row, hi_row in rows:
            if length == 0:
                continue
            change = ((lo_row[1:] != lo_row[:-1]) | (hi_row[1:] != hi_row[:-1])).nonzero().flatten() + 1
            starts = [0] + change.tolist()
            ends = starts[1:] + [length]
            lo_list, hi_list = lo_row.tolist(), hi_row.tolist()
            out += [(b, s, e, lo_list[s], hi_list[s]) for s, e in zip(starts, ends)]
        return out

    return mask.cached("torch_path.runs", build)


def chunks(mask: MediaMask, batch: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Immediate mode as one batched attention: the tokens of each run, cut into chunks of at most ``size``
    tokens, each chunk paired with the one media its tokens see.

    Returns ``(token_index, media_index, size)``: ``token_index`` (chunks, size) holds flat token indices
    ``b * text + t`` (padding slots point at ``batch * text``, one past the end), ``media_index`` (chunks,)
    holds flat media indices ``b * num_media + m``. Tokens that see nothing are in no chunk. Cached on the mask.
    """
    if not mask.immediate:
        raise ValueError("chunks() describes the immediate mode only")

    def build():
        seen = [r for r in runs(mask) if r[4] > r[3]]
        num_text = mask.text_time.shape[1]
        longest = max((t1 - t0 for _, t0, t1, _, _ in seen), default=1)
        # chunks as long as the longest run (rounded up to a power of two), at most 64 tokens: one chunk per
        # image at Flamingo's usual spacing, and little padding for decode steps (runs of one token)
        size = min(64, 1 << (longest - 1).bit_length())
        tokens, media = [], []
        for b, t0, t1, lo, _ in seen:
            for sample in (range(batch) if b is None else (b,)):
                for start in range(t0, t1, size):
                    stop = min(start + size, t1)
                    row = list(range(sample * num_text + start, sample * num_text + stop))
                    tokens.append(row + [batch * num_text] * (size - len(row)))
                    media.append(sample * mask.num_media + lo)
        device = mask.text_time.device
        token_index = torch.tensor(tokens, dtype=torch.long).reshape(-1, size).to(device)
        media_index = torch.tensor(media, dtype=torch.long).to(device)
        return token_index, media_index, size

    return mask.cached(("torch_path.chunks", batch), build)


# --------------------------------------------------------------------------------------------------------------
# Masked media cross-attention
# --------------------------------------------------------------------------------------------------------------


def media_xattn(q, k, v, mask, latents: int, scale: float, dropout_p: float = 0.0, kv_group: int = 1,
                key_mask=None):
    """The PyTorch path of :func:`fastflamingo.functional.media_xattn` (inputs already validated): picks the
    cheapest exact strategy for the mask. ``mask`` is a :class:`MediaMask` or a boolean (batch, text, media)
    tensor without closed form (dense SDPA). ``key_mask``: None or a boolean (batch of K/V, keys) tensor on q's
    device, True = visible, combined with the media rule."""
    if not isinstance(mask, MediaMask):
        return _dense_path(q, k, v, mask.to(q.device), latents, scale, dropout_p, kv_group, key_mask)
    mask = mask.to(q.device)
    if mask.text_time.is_meta:
        # meta tensors (a model built on the meta device, traced for shapes) have no data to read the schedules
        # from: the dense path is tensor ops only, so it gives the output's shape, dtype and autograd graph
        return _dense_path(q, k, v, mask.visible(), latents, scale, dropout_p, kv_group, key_mask)
    if key_mask is not None:
        # the run, chunk and window schedules attend to whole media; padded keys inside a media need a per-key
        # mask, which the single masked SDPA call takes as it is
        return _key_mask_path(q, k, v, mask, latents, scale, dropout_p, kv_group, key_mask)
    if torch.compiler.is_compiling():  # the schedules below read the mask on the host: not traceable
        return _key_mask_path(q, k, v, mask, latents, scale, dropout_p, kv_group)
    if q.shape[1] <= DECODE_MAX_TOKENS:
        # decode steps: no host-side schedule, so no host read of the mask (a decode step stays sync-free)
        if mask.immediate:
            return _window_path(q, k, v, mask, latents, scale, dropout_p, kv_group)
        # all previous: every token sees a key prefix, so one SDPA call with a tokens x keys mask per sample replaces
        # the run loop; its new tokens come after every media of the prompt, so they see (nearly) all keys anyway
        return _key_mask_path(q, k, v, mask, latents, scale, dropout_p, kv_group)
    if mask.immediate and len(runs(mask)) > _FEW_RUNS:
        return _chunks_path(q, k, v, mask, latents, scale, dropout_p, kv_group)
    if kv_group > 1:
        return _runs_forward_grouped(q, k, v, runs(mask), latents, scale, dropout_p, kv_group)
    return _runs_path(q, k, v, mask, latents, scale, dropout_p)


# With this many runs or fewer (e.g. a single image: every token sees it) one SDPA call per run on views of q, k, v
# beats gathering the runs into chunks, which copies q and the used K/V once.
_FEW_RUNS = 4


def _sdpa(q, k, v, scale, dropout_p, attn_mask=None):
    """SDPA on (batch, tokens, heads, head_dim) views; returns the same layout."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask, dropout_p=dropout_p, scale=scale
    )
    return out.transpose(1, 2)


def attend_to_no_keys(q, k, v):
    """Every query attending to zero keys: exact zeros of shape (batch, text, heads, head_dim_v), computed from q,
    k and v (products over an empty key axis), so q, k, v and every parameter that produced them get a gradient
    (exactly zero), as upstream's masked softmax gives them. Zeros built from v alone would leave the query
    projection and its norm with ``.grad is None``, and DDP then waits for a gradient that a rank whose batch has
    no image never produces."""
    scores = q.transpose(1, 2) @ k[:, :0].permute(0, 2, 3, 1)  # (batch, heads, text, 0)
    return (scores @ v[:, :0].transpose(1, 2)).transpose(1, 2)


def _runs_forward(q, k, v, runs, latents: int, scale: float, dropout_p: float):
    """One SDPA call per run of tokens that see the same media: no mask, no text x media-token matrix."""
    batch, num_text, heads, _ = q.shape
    pieces = []
    for b, t0, t1, lo, hi in runs:
        rows = slice(None) if b is None else slice(b, b + 1)
        if hi <= lo:
            pieces.append(attend_to_no_keys(q[rows, t0:t1], k[rows], v[rows]))
            continue
        keys = slice(lo * latents, hi * latents)
        pieces.append(_sdpa(q[rows, t0:t1], k[rows, keys], v[rows, keys], scale, dropout_p))
    if not pieces:  # no text tokens
        return attend_to_no_keys(q, k, v)
    if runs[0][0] is None:  # one set of runs shared by all samples: concatenate along text
        return torch.cat(pieces, dim=1)
    # per-sample runs, ordered sample-major: concatenate along text, then split back into samples
    return torch.cat(pieces, dim=1).reshape(batch, num_text, heads, v.shape[-1])


def fold_groups(x: torch.Tensor, r: int) -> torch.Tensor:
    """(B, T, ...) -> (B // r, r * T, ...): the r query rows that share one K/V row become one longer query row
    (attention treats every query token independently), so one SDPA call reads each shared K/V row once. A view
    when x's batch stride is T times its token stride (a projection's output), else a copy of x (queries only)."""
    return x.unflatten(0, (x.shape[0] // r, r)).flatten(1, 2)


def unfold_groups(x: torch.Tensor, r: int) -> torch.Tensor:
    """Inverse of :func:`fold_groups`: (B // r, r * T, ...) -> (B, T, ...)."""
    return x.unflatten(1, (r, x.shape[1] // r)).flatten(0, 1)


def _runs_forward_grouped(q, k, v, runs, latents: int, scale: float, dropout_p: float, r: int):
    """:func:`_runs_forward` with K/V shared by groups of r consecutive query rows (``kv_group``; no grad).
    Per-sample runs index K/V row ``b // r``; shared runs (the same runs for every sample) fold each group's r
    query rows into one (see :func:`fold_groups`)."""
    batch, num_text, heads, _ = q.shape
    head_dim_v = v.shape[-1]
    shared = bool(runs) and runs[0][0] is None
    pieces = []
    for b, t0, t1, lo, hi in runs:
        rows = batch if b is None else 1
        if hi <= lo:
            pieces.append(q.new_zeros(rows, t1 - t0, heads, head_dim_v))
            continue
        keys = slice(lo * latents, hi * latents)
        if b is None:
            folded = fold_groups(q[:, t0:t1], r)
            pieces.append(unfold_groups(_sdpa(folded, k[:, keys], v[:, keys], scale, dropout_p), r))
        else:
            g = b // r
            pieces.append(_sdpa(q[b:b + 1, t0:t1], k[g:g + 1, keys], v[g:g + 1, keys], scale, dropout_p))
    if not pieces:  # no text tokens
        return q.new_zeros(batch, 0, heads, head_dim_v)
    if shared:
        return torch.cat(pieces, dim=1)
    return torch.cat(pieces, dim=1).reshape(batch, num_text, heads, head_dim_v)


class _RunsAttention(torch.autograd.Function):
    """Run-by-run attention with a recomputing backward.

    Plain autograd through per-run slices would, for every run, materialise a zero tensor of the full size of q, k
    and v in the slice backward (quadratic in the number of runs). Here the backward recomputes each run's
    attention on its own slices (cheap: the forward is a fraction of the backward) and writes the gradients
    straight into one buffer per input; overlapping key ranges (all-previous mode) accumulate.
    """

    @staticmethod
    def forward(ctx, q, k, v, runs, latents, scale):
        ctx.save_for_backward(q, k, v)
        ctx.runs, ctx.latents, ctx.scale = runs, latents, scale
        with torch.no_grad():
            return _runs_forward(q, k, v, runs, latents, scale, 0.0)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        latents = ctx.latents
        for b, t0, t1, lo, hi in ctx.runs:
            if hi <= lo:
                continue  # tokens that see nothing: gradient exactly zero
            rows = slice(None) if b is None else slice(b, b + 1)
            keys = slice(lo * latents, hi * latents)
            with torch.enable_grad():
                qs, ks, vs = (t.detach().requires_grad_(True) for t in (q[rows, t0:t1], k[rows, keys], v[rows, keys]))
                out = _sdpa(qs, ks, vs, ctx.scale, 0.0)
                gq, gk, gv = torch.autograd.grad(out, (qs, ks, vs), grad_out[rows, t0:t1])
            dq[rows, t0:t1] = gq
            dk[rows, keys] += gk
            dv[rows, keys] += gv
        return dq, dk, dv, None, None, None


def _runs_path(q, k, v, mask: MediaMask, latents: int, scale: float, dropout_p: float):
    mask_runs = runs(mask)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if dropout_p or not needs_grad or len(mask_runs) <= _FEW_RUNS:
        # inference; dropout (whose random mask a recomputing backward could not replay); or so few runs that the
        # slice backward's full-size zero tensors cost less than recomputing the forward: plain autograd
        return _runs_forward(q, k, v, mask_runs, latents, scale, dropout_p)
    return _RunsAttention.apply(q, k, v, mask_runs, latents, scale)


def _key_mask_path(q, k, v, mask: MediaMask, latents: int, scale: float, dropout_p: float, kv_group: int = 1,
                   key_mask=None):
    """One SDPA call with a (batch, text, keys) boolean key mask built on device from the closed form: token ``t``
    sees keys ``[lo * latents, hi * latents)`` (and of those only the ones ``key_mask`` keeps). No host read and no
    data-dependent Python decision, so this is the path while tracing (torch.compile / torch.export: the run and
    chunk schedules are host-side lists), and the path of key-masked calls, at the price of visiting every key."""
    lo, hi = mask.media_range()  # (batch, text) int32; lo >= hi: nothing visible
    num_keys = k.shape[1]
    if num_keys == 0:
        if kv_group > 1:  # inference only: no graph to keep
            return q.new_zeros(q.shape[0], q.shape[1], v.shape[2], v.shape[3])
        return attend_to_no_keys(q, k, v)
    key = torch.arange(num_keys, device=q.device)
    allowed = (key >= (lo * latents)[..., None]) & (key < (hi * latents)[..., None])  # (batch, text, keys)
    return _masked_sdpa(q, k, v, allowed, hi > lo, scale, dropout_p, kv_group, key_mask)


def _masked_sdpa(q, k, v, allowed, sees, scale: float, dropout_p: float, kv_group: int, key_mask=None):
    """SDPA where token ``t`` of sample ``b`` sees the keys ``allowed[b, t]`` (batch, text, keys), ANDed with
    ``key_mask[b // kv_group]`` when given (``sees`` (batch, text) is then recomputed from the result). Tokens that
    see nothing attend to every key (a finite softmax, no NaN in the forward or backward) and are then set to
    exactly 0. ``kv_group`` r > 1: the r query rows sharing a K/V row are folded into one (:func:`fold_groups`),
    with their key masks."""
    if key_mask is not None:
        r = kv_group
        allowed = (allowed.unflatten(0, (-1, r)) & key_mask[:, None, None, :]).flatten(0, 1)
        sees = allowed.any(-1)
    attn_mask = allowed | ~sees[..., None]
    if kv_group > 1:
        out = _sdpa(fold_groups(q, kv_group), k, v, scale, dropout_p,
                    attn_mask=fold_groups(attn_mask, kv_group)[:, None])
        out = unfold_groups(out, kv_group)
    else:
        out = _sdpa(q, k, v, scale, dropout_p, attn_mask=attn_mask[:, None])
    return zero_unseen(out, sees)


def _window_path(q, k, v, mask: MediaMask, latents: int, scale: float, dropout_p: float, kv_group: int = 1):
    """Immediate mode for a few tokens per sample (decode steps): each token sees exactly the ``latents`` keys of one
    media, gathered per token by index (computed on the device: no host read) and attended without a mask; tokens
    that see nothing get exact zeros. ``kv_group`` r > 1: sample b's keys come from K/V row b // r. Autograd goes
    through index_select, whose backward is linear in the sizes."""
    batch, num_text, heads, head_dim = q.shape
    head_dim_v = v.shape[-1]
    lo, hi = mask.media_range()  # (batch, text) int32; lo == hi: nothing visible
    sees = hi > lo
    num_keys = k.shape[1]
    rows = torch.arange(batch, device=q.device) // kv_group  # the K/V row of each sample
    first = rows[:, None] * num_keys + torch.where(sees, lo, torch.zeros_like(lo)) * latents  # (batch, text)
    index = (first[..., None] + torch.arange(latents, device=q.device)).flatten()  # (batch * text * latents,)
    window_k = k.reshape(-1, heads, head_dim).index_select(0, index).view(batch * num_text, latents, heads, head_dim)
    window_v = v.reshape(-1, heads, head_dim_v).index_select(0, index).view(batch * num_text, latents, heads,
                                                                          head_dim_v)
    out = _sdpa(q.reshape(batch * num_text, 1, heads, head_dim), window_k, window_v, scale, dropout_p)
    out = out.view(batch, num_text, heads, head_dim_v)
    return zero_unseen(out, sees)


def _chunks_path(q, k, v, mask: MediaMask, latents: int, scale: float, dropout_p: float,
                 kv_group: int = 1):
    """Immediate mode in one SDPA call: every chunk of a run attends to its own media's ``latents`` keys (all of
    them valid, so no mask at all). Gathers copy q once and each used media's K/V once; the result is scattered
    back, and tokens that see nothing keep exact zeros. Autograd goes through index_select / index_copy, whose
    backward is linear in the tensor sizes. ``kv_group`` r > 1: sample b's media come from K/V row b // r."""
    batch, num_text, heads, head_dim = q.shape
    token_index, media_index, size = chunks(mask, batch)
    head_dim_v = v.shape[-1]
    flat_q = torch.cat((q.reshape(batch * num_text, heads, head_dim), q.new_zeros(1, heads, head_dim)))
    chunk_q = flat_q.index_select(0, token_index.flatten()).view(-1, size, heads, head_dim)
    num_media = mask.num_media
    kv_rows = k.shape[0]
    if kv_group > 1:
        # media_index is sample * num_media + m (m < num_media): remap to the shared K/V row (sample // r)
        media_index = media_index // (num_media * kv_group) * num_media + media_index % num_media
    chunk_k = k.reshape(kv_rows * num_media, latents, heads, head_dim).index_select(0, media_index)
    chunk_v = v.reshape(kv_rows * num_media, latents, heads, head_dim_v).index_select(0, media_index)
    chunk_out = _sdpa(chunk_q, chunk_k, chunk_v, scale, dropout_p)
    out = q.new_zeros(batch * num_text + 1, heads, head_dim_v)
    out = out.index_copy(0, token_index.flatten(), chunk_out.reshape(-1, heads, head_dim_v))
    return out[:-1].view(batch, num_text, heads, head_dim_v)


def _dense_path(q, k, v, allowed: torch.Tensor, latents: int, scale: float, dropout_p: float,
                kv_group: int = 1, key_mask=None):
    """General (batch, text, media) boolean mask: dense SDPA mask (ANDed with ``key_mask``); rows that see nothing
    are exactly 0. ``kv_group`` r > 1: the r query rows sharing a K/V row are folded into one."""
    allowed_keys = allowed.repeat_interleave(latents, dim=-1)  # (batch, text, keys)
    return _masked_sdpa(q, k, v, allowed_keys, allowed.any(-1), scale, dropout_p, kv_group, key_mask)


# --------------------------------------------------------------------------------------------------------------
# Perceiver attention and the gated projection
# --------------------------------------------------------------------------------------------------------------


def perceiver_attn(q, k_media, v_media, k_latents, v_latents, scale: float, key_mask=None):
    """One fused SDPA over the concatenated keys. The concatenation copies only the projected K/V (media tokens +
    latents rows), which is small next to the projections that produce them.

    ``key_mask``: None or a boolean (N, media_tokens) tensor on q's device, True = visible; the latents are always
    visible. Grouped-query attention (K/V with fewer heads than q): each KV head's group of query heads is folded
    into its query tokens (a copy of q), so one SDPA call reads every KV head once and K/V are never repeated."""
    k = torch.cat((k_media, k_latents), dim=1)
    v = torch.cat((v_media, v_latents), dim=1)
    attn_mask = None
    if key_mask is not None:
        visible = torch.cat((key_mask, key_mask.new_ones(q.shape[:2])), dim=1)  # (N, media_tokens + L)
        attn_mask = visible[:, None, None, :]
    group = q.shape[2] // k.shape[2]
    if group == 1:
        return _sdpa(q, k, v, scale, 0.0, attn_mask)
    num, latents = q.shape[:2]
    # (N, L, Hkv * group, D) -> (N, Hkv, group * L, D): query head h = kv_head * group + g
    folded = q.unflatten(2, (k.shape[2], group)).permute(0, 2, 3, 1, 4).flatten(2, 3)
    out = F.scaled_dot_product_attention(folded, k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask,
                                         scale=scale)
    return out.unflatten(2, (group, latents)).permute(0, 3, 1, 2, 4).flatten(2, 3)


def gated_residual(x, h, alpha, row_gate=None):
    """``x + tanh(alpha) * h``, ``h`` zeroed (a select: NaN/inf never leak) where ``row_gate == 0``; the dtype is
    upstream's promotion of ``h * alpha.tanh() + x``."""
    if row_gate is not None:
        h = h.masked_fill((row_gate == 0)[..., None], 0.0)
    return h * alpha.tanh() + x


def gated_linear(x, inp, weight, bias, alpha, row_gate=None):
    """``x + tanh(alpha) * rowgate(inp @ weight^T + bias)`` unfused."""
    return gated_residual(x, F.linear(inp, weight, bias), alpha, row_gate)
