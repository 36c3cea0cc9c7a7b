"""Op ``media_xattn``: the masked media cross-attention core (docs/performance.md, "Benchmark matrix", rows A and A').

Inputs are q (B, T, H, d) and media K/V (B, n_img * latents, H, d), as ``fastflamingo.functional`` takes them;
every provider gets the same tensors. Providers:

- ``upstream``: OpenFlamingo 2.0.1 ``MaskedCrossAttention.forward`` after the projections, line for line (einsum,
  ``masked_fill(-finfo.max)``, ``amax`` shift, softmax in the input dtype, zeroing of pre-image rows in immediate
  mode), including the mask construction it does on every call;
- ``sdpa`` (CPU) / ``sdpa-efficient``, ``sdpa-cudnn``, ``sdpa-math`` (CUDA, forced with ``sdpa_kernel``): dense
  (B, 1, T, keys) boolean mask built once (prep), rows that see nothing get every key and are zeroed after;
- ``flex`` / ``flex-128x64``: FlexAttention with the ``mask_mod`` of docs/performance.md ("FlexAttention") (compiled on CUDA; eager,
  forward only, on CPU); BlockMask build time is the prep time;
- ``flash-varlen`` / ``torch-varlen``: immediate mode as segment-to-segment varlen attention (one segment per
  (sample, image) with text); packing (gathering K/V per segment) is the prep time and the timed call is the
  kernel on packed tensors;
- ``fastflamingo``: ``functional.media_xattn`` (Triton on CUDA via ``auto``, the run-based PyTorch path
  on CPU); ``fastflamingo-torch`` forces the PyTorch path (CUDA only, to see what the kernel adds).
"""
from __future__ import annotations

import contextlib
import time
import warnings
from types import SimpleNamespace
from typing import List, Optional

import torch
import torch.nn.functional as F

import fastflamingo
from fastflamingo import masks as ff_masks

from . import flex, references, shapes
from .registry import Case, Op, Provider, Runner, register_op, register_provider

OP = "media_xattn"


# ------------------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------------------


def _case(model, batch, text, shots, mode, first_frac=0.0, passes=None, providers=None) -> Case:
    p = dict(model=model, batch=batch, text=text, shots=shots, mode=mode, first_frac=first_frac, **shapes.MODELS[model])
    case = Case(OP, p, _label(p), shots, providers=providers)
    if passes:
        case.passes = passes
    return case


def _label(p) -> str:
    return f"{p['model']} B{p['batch']} T{p['text']} S{p['shots']} {shapes.MODE_SHORT[p['mode']]}"


def cases(profile: str, shots: Optional[List[int]] = None) -> List[Case]:
    if profile in ("cpu", "quick"):
        default = (0, 32) if profile == "quick" else shapes.SHOTS
        return [_case("cpu", 1, shapes.CPU_TEXT, s, "immediate") for s in (shots or default)]
    if profile == "diagonal":
        return [
            _case(m, b, t, s, mode)
            for m in ("of", "idefics")
            for mode in shapes.MODES
            for b in shapes.BATCHES
            for s, t in shapes.DIAGONAL
            if not shots or s in shots
        ]
    if profile == "full":
        return [
            _case(m, b, t, s, mode)
            for m in ("of", "idefics")
            for mode in shapes.MODES
            for b in shapes.BATCHES
            for t in shapes.TEXTS
            for s in shapes.SHOTS
            if not shots or s in shots
        ]
    if profile == "priority":
        rivals = ["upstream", "sdpa-efficient", "sdpa-cudnn", "flex", "fastflamingo"]
        out = [
            _case(m, 16, t, s, "immediate", passes=("fwd", "fwd+bwd"), providers=rivals)
            for m in ("of", "idefics")
            for s, t in ((32, 4096), (4, 512))
        ]
        out.append(
            _case("idefics", 16, 2048, 16, "all_previous", passes=("fwd", "fwd+bwd"),
                  providers=["upstream", "sdpa-efficient", "sdpa-cudnn", "flex", "fastflamingo"])
        )
        return [c for c in out if not shots or c.shots in shots]
    raise ValueError(f"unknown profile {profile}")


def tiny(case: Case) -> Case:
    p = shapes.tiny_params(case.params)
    return Case(case.op, p, _label(p), case.shots, case.passes, case.providers)


# ------------------------------------------------------------------------------------------------------------
# Inputs, reference, work
# ------------------------------------------------------------------------------------------------------------


def make_inputs(case: Case, device: str, dtype: torch.dtype):
    p = case.params
    g = torch.Generator(device="cpu").manual_seed(0)
    num_media = p["shots"] + 1
    keys = num_media * p["latents"]

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_()

    q = rnd(p["batch"], p["text"], p["heads"], p["head_dim"])
    k = rnd(p["batch"], keys, p["heads"], p["head_dim"])
    v = rnd(p["batch"], keys, p["heads"], p["head_dim"])
    locations = shapes.media_locations(p["batch"], p["text"], num_media, p.get("first_frac", 0.0), device)
    mask = ff_masks.from_media_locations(
        locations, num_media, only_attend_immediate_media=p["mode"] == "immediate"
    )
    return SimpleNamespace(
        q=q, k=k, v=v, locations=locations, mask=mask, num_media=num_media, latents=p["latents"],
        scale=p["head_dim"] ** -0.5, immediate=p["mode"] == "immediate", leaves=[q, k, v],
    )


def dense_key_mask(mask, latents: int):
    """(B, T, keys) bool of the keys each token may see, and (B, T) whether it sees any."""
    visible = mask.visible()
    return visible.repeat_interleave(latents, dim=-1), visible.any(-1)


def reference(inputs, case):
    return references.media_xattn(inputs.q, inputs.k, inputs.v, inputs.mask, inputs.scale)


def keys_seen(mask, latents: int) -> int:
    lo, hi = mask.media_range()
    return int((hi - lo).clamp(min=0).sum()) * latents


def work(case: Case, pass_: str, dtype: torch.dtype):
    """Analytic useful FLOPs (only the keys each token may see) and minimal HBM bytes."""
    p = case.params
    num_media = p["shots"] + 1
    locations = shapes.media_locations(p["batch"], p["text"], num_media, p.get("first_frac", 0.0), "cpu")
    mask = ff_masks.from_media_locations(locations, num_media, only_attend_immediate_media=p["mode"] == "immediate")
    fwd_flops = 4 * p["heads"] * p["head_dim"] * keys_seen(mask, p["latents"])
    es = torch.tensor([], dtype=dtype).element_size()
    nq = p["batch"] * p["text"] * p["heads"] * p["head_dim"]
    nkv = p["batch"] * num_media * p["latents"] * p["heads"] * p["head_dim"]
    fwd_bytes = es * (2 * nq + 2 * nkv)  # read q, k, v; write o
    bwd_bytes = es * (4 * nq + 4 * nkv)  # read q, k, v, o, do; write dq, dk, dv
    return {
        "fwd": (fwd_flops, fwd_bytes),
        "bwd": (2.5 * fwd_flops, bwd_bytes),
        "fwd+bwd": (3.5 * fwd_flops, fwd_bytes + bwd_bytes),
    }.get(pass_, (None, None))


register_op(Op(OP, "masked media cross-attention core (q, media K/V -> out)", cases, make_inputs, reference, work, tiny))


def _media_rows(inputs):
    """Rows upstream gets right in all-previous mode (it averages all media for tokens that see none)."""
    return None if inputs.immediate else inputs.mask.text_time > 0


# ------------------------------------------------------------------------------------------------------------
# upstream: OpenFlamingo's code path
# ------------------------------------------------------------------------------------------------------------


def _build_upstream(inputs, case, device, dtype) -> Runner:
    q, k, v, locations = inputs.q, inputs.k, inputs.v, inputs.locations
    num_media, n, scale = inputs.num_media, inputs.latents, inputs.scale
    mask_op = torch.eq if inputs.immediate else torch.ge

    def forward():
        # open_flamingo/src/helpers.py MaskedCrossAttention.forward, from `q = q * self.scale` on; rearranges are
        # the same views ("b n (h d) -> b h n d" == transpose of our (b, n, h, d))
        qh, kh, vh = q.transpose(1, 2) * scale, k.transpose(1, 2), v.transpose(1, 2)
        sim = torch.einsum("... i d, ... j d -> ... i j", qh, kh)
        media_time = torch.arange(num_media, device=qh.device) + 1
        text_time = locations.cumsum(dim=-1)
        text_to_media_mask = mask_op(text_time[:, None, :, None], media_time.repeat_interleave(n)[None, None, None])
        sim = sim.masked_fill(~text_to_media_mask, -torch.finfo(sim.dtype).max)
        sim = sim - sim.amax(dim=-1, keepdim=True).detach()
        attn = sim.softmax(dim=-1)
        if inputs.immediate:
            attn = attn.masked_fill((text_time == 0)[:, None, :, None], 0.0)
        out = torch.einsum("... i j, ... j d -> ... i d", attn, vh)
        return out.transpose(1, 2)

    return Runner(forward, compare_rows=_media_rows(inputs))


register_provider(OP, Provider("upstream", "upstream", _build_upstream, description="OpenFlamingo einsum math"))


# ------------------------------------------------------------------------------------------------------------
# SDPA with a dense mask
# ------------------------------------------------------------------------------------------------------------


def _sdpa_builder(backend_name: Optional[str]):
    def build(inputs, case, device, dtype) -> Runner:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        start = time.perf_counter()
        keymask, sees = dense_key_mask(inputs.mask.to(device), inputs.latents)
        attn_mask = (keymask | ~sees[..., None])[:, None]  # (B, 1, T, keys); empty rows see all, zeroed below
        keep = sees[:, :, None, None]
        if device == "cuda":
            torch.cuda.synchronize()
        prep_ms = (time.perf_counter() - start) * 1e3
        backend = getattr(SDPBackend, backend_name) if backend_name else None
        q, k, v, scale = inputs.q, inputs.k, inputs.v, inputs.scale

        def forward():
            qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            if backend is None:
                out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=attn_mask, scale=scale)
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("error", UserWarning)  # "backend X not used because ..." becomes the skip reason
                    with sdpa_kernel(backend):
                        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=attn_mask, scale=scale)
            return torch.where(keep, out.transpose(1, 2), out.new_zeros(()))

        return Runner(forward, prep_ms=prep_ms, prep_bytes=attn_mask.numel() * attn_mask.element_size() + keep.numel())

    return build


register_provider(OP, Provider("sdpa", "baseline", _sdpa_builder(None), devices=("cpu",),
                               description="SDPA + dense bool mask (default dispatch)"))
for _name, _backend in (("sdpa-efficient", "EFFICIENT_ATTENTION"), ("sdpa-cudnn", "CUDNN_ATTENTION"),
                        ("sdpa-math", "MATH")):
    register_provider(OP, Provider(_name, "baseline", _sdpa_builder(_backend), devices=("cuda",),
                                   description=f"SDPA + dense bool mask, sdpa_kernel({_backend})"))


# ------------------------------------------------------------------------------------------------------------
# FlexAttention
# ------------------------------------------------------------------------------------------------------------

def _flex_builder(block_size):
    def build(inputs, case, device, dtype) -> Runner:
        from torch.nn.attention.flex_attention import create_block_mask

        text_time = inputs.mask.text_time.to(device)
        kv_media = (torch.arange(inputs.num_media * inputs.latents, device=device) // inputs.latents + 1).int()
        if inputs.immediate:
            def mask_mod(b, h, q_idx, kv_idx):
                return text_time[b, q_idx] == kv_media[kv_idx]
        else:
            def mask_mod(b, h, q_idx, kv_idx):
                return text_time[b, q_idx] >= kv_media[kv_idx]
        batch, text = text_time.shape
        keys = inputs.k.shape[1]
        kwargs = {} if block_size is None else {"BLOCK_SIZE": block_size}
        start = time.perf_counter()
        block_mask = create_block_mask(mask_mod, batch, None, text, keys, device=device, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        prep_ms = (time.perf_counter() - start) * 1e3
        attend, note = flex.attention(device)
        q, k, v, scale = inputs.q, inputs.k, inputs.v, inputs.scale
        if device != "cuda":
            # CPU flex raises on inputs that require grad (it has no backward there): time the forward on detached
            # views; the backward passes then report "no backward" and are skipped
            q, k, v = q.detach(), k.detach(), v.detach()

        def forward():
            out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask, scale=scale)
            return out.transpose(1, 2)

        sparsity = getattr(block_mask, "sparsity", None)
        if callable(sparsity):
            note += f"; block sparsity {sparsity():.1f}%"
        return Runner(forward, prep_ms=prep_ms, note=note)

    return build


register_provider(OP, Provider("flex", "baseline", _flex_builder(None), flex.unavailable,
                               description="FlexAttention, BlockMask 128x128"))
register_provider(OP, Provider("flex-128x64", "baseline", _flex_builder((128, 64)), flex.unavailable,
                               devices=("cuda",), description="FlexAttention, BlockMask (128, 64)"))


# ------------------------------------------------------------------------------------------------------------
# varlen (immediate mode only): flash-attn and torch.nn.attention.varlen
# ------------------------------------------------------------------------------------------------------------


def _pack_segments(inputs, device):
    """One varlen segment per (sample, image) that has text: q rows = its tokens, K/V rows = its latents.

    Tokens that see no media are dropped (no zero-length KV segments, see docs/performance.md, "Varlen attention") and written as
    zeros when unpacking.
    """
    tt = inputs.mask.text_time.to(device).long()
    batch, text = tt.shape
    n, num_media = inputs.latents, inputs.num_media
    valid = (tt >= 1) & (tt <= num_media)
    seg = torch.where(valid, torch.arange(batch, device=device)[:, None] * num_media + tt - 1, -1)
    counts = torch.bincount(seg[valid], minlength=batch * num_media)
    used = counts.nonzero().flatten()  # (sample, image) ids with text, in sample-major, image order
    cu_q = torch.zeros(len(used) + 1, dtype=torch.int32, device=device)
    cu_q[1:] = counts[used].cumsum(0)
    cu_k = (torch.arange(len(used) + 1, device=device, dtype=torch.int32) * n)
    kv_rows = ((used % num_media)[:, None] * n + torch.arange(n, device=device)).flatten()
    kv_batch = (used // num_media).repeat_interleave(n)
    heads, d = inputs.q.shape[2:]
    with torch.no_grad():
        qp = inputs.q[valid].detach().clone().requires_grad_()  # boolean index: sample-major, text order
        kp = inputs.k[kv_batch, kv_rows].detach().clone().requires_grad_()
        vp = inputs.v[kv_batch, kv_rows].detach().clone().requires_grad_()
    max_q = int(counts.max()) if len(used) else 0
    return SimpleNamespace(q=qp, k=kp, v=vp, cu_q=cu_q, cu_k=cu_k, max_q=max_q, max_k=n, valid=valid)


def _varlen_builder(kind):
    def build(inputs, case, device, dtype) -> Runner:
        if not inputs.immediate:
            raise NotImplementedError("varlen attention expresses immediate mode only (all-previous needs KV duplication)")
        if kind == "flash":
            from flash_attn import flash_attn_varlen_func as attend_fn

            def attend(p):
                return attend_fn(p.q, p.k, p.v, p.cu_q, p.cu_k, p.max_q, p.max_k, softmax_scale=inputs.scale)
        else:
            from torch.nn.attention.varlen import varlen_attn

            def attend(p):
                return varlen_attn(p.q, p.k, p.v, p.cu_q, p.cu_k, p.max_q, p.max_k, scale=inputs.scale)

        start = time.perf_counter()
        packed = _pack_segments(inputs, device)
        if device == "cuda":
            torch.cuda.synchronize()
        prep_ms = (time.perf_counter() - start) * 1e3
        shape = inputs.q.shape

        def unpack(out_packed):
            out = out_packed.new_zeros(shape)
            out[packed.valid] = out_packed
            return out

        return Runner(lambda: attend(packed), prep_ms=prep_ms, note="timed call on packed tensors", unpack=unpack,
                      leaves=[packed.q, packed.k, packed.v])

    return build


def _flash_unavailable(device, dtype):
    if device != "cuda":
        return "flash-attn needs CUDA"
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "flash-attn is not installed"
    if dtype == torch.float32:
        return "flash-attn has no fp32 kernels"
    return None


def _torch_varlen_unavailable(device, dtype):
    if device != "cuda":
        return "torch varlen_attn needs CUDA"
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    if dtype == torch.float32:
        return "varlen_attn (flash) has no fp32 kernels"
    return None


register_provider(OP, Provider("flash-varlen", "baseline", _varlen_builder("flash"), _flash_unavailable,
                               devices=("cuda",), description="flash_attn_varlen_func, immediate mode"))
register_provider(OP, Provider("torch-varlen", "baseline", _varlen_builder("torch"), _torch_varlen_unavailable,
                               devices=("cuda",), description="torch.nn.attention.varlen.varlen_attn, immediate mode"))


# ------------------------------------------------------------------------------------------------------------
# fastflamingo
# ------------------------------------------------------------------------------------------------------------


def _fastflamingo_builder(backend_name):
    def build(inputs, case, device, dtype) -> Runner:
        from fastflamingo import functional as FF
        from fastflamingo.ops import torch_path

        q, k, v, scale = inputs.q, inputs.k, inputs.v, inputs.scale
        start = time.perf_counter()
        mask = inputs.mask.to(device)
        torch_path.runs(mask)  # the PyTorch path's run list is built once per batch and shared by the layers (prep)
        prep_ms = (time.perf_counter() - start) * 1e3

        def forward():
            # None: the backend selected around the benchmark (auto by default; benchmarks.tune's dry run: triton)
            with fastflamingo.backend(backend_name) if backend_name else contextlib.nullcontext():
                return FF.media_xattn(q, k, v, mask, scale=scale)

        return Runner(forward, prep_ms=prep_ms, note=f"backend={backend_name or fastflamingo.requested_backend()}")

    return build


register_provider(OP, Provider("fastflamingo", "fastflamingo", _fastflamingo_builder(None),
                               description="fastflamingo.functional.media_xattn (auto backend)"))
register_provider(OP, Provider("fastflamingo-torch", "fastflamingo", _fastflamingo_builder("torch"), devices=("cuda",),
                               description="fastflamingo PyTorch path forced on CUDA"))
