"""Llama 3.2 Vision (transformers ``models/mllama``) cross-attention cells, shared by the ops ``mllama_xattn``
(prefill: the layer and the core; ops_mllama_xattn.py) and ``mllama_decode`` (the decode step; ops_mllama_decode.py),
which register them. Three kinds of cells:

- ``layer``: one ``MllamaCrossAttentionDecoderLayer`` (RMSNorm, q/k/v projections with q/k norms, GQA attention over
  the projected vision states, ``o_proj`` + tanh gate, RMSNorm + SwiGLU MLP * row flag + tanh gate), prefill;
- ``core``: the attention alone, q (B, T, H, D) on K/V in the cache layout (B, Hkv, keys, D) with the additive
  (B, 1, T, keys) mask transformers builds;
- ``decode``: one new token per sample through the layer, K/V read from a ``DynamicCache`` filled by a prefill, a
  fresh mask tensor per call (the model rebuilds it every step).

Providers: ``upstream-sdpa`` (transformers' layer / ``sdpa_attention_forward``: repeats K/V per query group when
there is a mask; the denominator), ``upstream-eager`` (``eager_attention_forward``), ``flex`` (core only:
FlexAttention with a ``mask_mod`` from the closed-form mask and ``enable_gqa``; BlockMask build = prep; eager and
forward-only on CPU), ``fastflamingo`` (the drop-in layer / ``fastflamingo.models.mllama.mllama_xattn``, ``empty_rows="hf"``,
i.e. transformers' semantics; the closed-form mask is derived once per forward for every cross layer, so its cost is
``prep_ms`` and the timed calls reuse it), ``fastflamingo-zero`` (``empty_rows="zero"``, only where some row sees no
image; compared on the rows that see one), ``fastflamingo-attn`` (layer cells: transformers' own layer with
``attn_implementation="fastflamingo"`` after ``fastflamingo.hf.register()``; the closed form, with the tile sizes
inferred from the mask, is its ``prep_ms``), ``fastflamingo-loaded`` (layer cells: the layer transformers itself builds
while ``fastflamingo.dropins()`` is active, i.e. the load-time drop-in: the same class and speed as the
``fastflamingo`` provider is the claim this cell checks).

Shapes (``model``): ``cpu`` = hidden 1024, 8 q / 2 kv heads of 128, MLP 3584 (the issue's CPU cell); ``11b`` =
Llama 3.2 11B Vision (hidden 4096, 32 q / 8 kv heads, MLP 14336); 1601 tokens per tile, 4 tiles per image slot.
Images (``shots`` = image count) are evenly spaced ``<|image|>`` tokens, the first after ``first`` text tokens;
each image has ``tiles`` real tiles (the rest of its 4 is padding). CPU default: the issue's targets (T512, 2 images
of 1 tile, first image at token 0; and 64 text tokens before the first image, "hf" mode) and a decode step; CUDA
default: an 11B diagonal; ``--full``: the 11B grid (1-4 images of 1-4 tiles, prompt 512-4096, batch 1 and 8);
``--priority``: the issue's GPU targets (core at 11B shapes, decode at batch 8).
"""
from __future__ import annotations

import copy
import time
from types import SimpleNamespace
from typing import List, Optional

import torch

from fastflamingo.models.mllama import mask as mask_mod

from . import flex
from .registry import Case, Provider, Runner, register_provider

PREFILL_OP = "mllama_xattn"  # the layer and core cells: benchmarks/ops_mllama_xattn.py
DECODE_OP = "mllama_decode"  # the decode-step cells: benchmarks/ops_mllama_decode.py
TOKENS_PER_TILE, MAX_TILES = 1601, 4
MODELS = {
    "cpu": dict(hidden=1024, heads=8, kv_heads=2, intermediate=3584, tokens_per_tile=TOKENS_PER_TILE),
    "11b": dict(hidden=4096, heads=32, kv_heads=8, intermediate=14336, tokens_per_tile=TOKENS_PER_TILE),
    "tiny": dict(hidden=64, heads=4, kv_heads=2, intermediate=96, tokens_per_tile=7),
}


# ------------------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------------------


def _label(p: dict) -> str:
    first = f" first{p['first']}" if p["first"] else ""
    return f"{p['what']} {p['model']} B{p['batch']} T{p['text']} I{p['images']}x{p['tiles']}t{first}"


def _case(what, model, batch, text, images, tiles, first=0, passes=None, providers=None) -> Case:
    p = dict(what=what, model=model, batch=batch, text=text, images=images, tiles=tiles, first=first,
             **MODELS[model])
    if passes is None:
        passes = ("fwd",) if what == "decode" else ("fwd", "fwd+bwd")
    return Case(DECODE_OP if what == "decode" else PREFILL_OP, p, _label(p), images, passes=passes, providers=providers)


def prefill_cases(profile: str, shots: Optional[List[int]] = None) -> List[Case]:
    """The layer and core cells (op ``mllama_xattn``)."""
    if profile in ("cpu", "quick"):
        out = [_case("layer", "cpu", 1, 512, 2, 1), _case("layer", "cpu", 1, 512, 2, 1, first=64, passes=("fwd",)),
               _case("core", "cpu", 1, 512, 2, 1), _case("core", "cpu", 1, 512, 2, 1, first=64, passes=("fwd",))]
        if profile == "quick":
            out = [c for c in out if not c.params["first"]]
    elif profile == "diagonal":
        out = [_case(what, "11b", b, t, i, n) for what in ("layer", "core")
               for b, t, i, n in ((1, 512, 1, 1), (1, 2048, 2, 4), (8, 512, 1, 4), (1, 4096, 4, 4))]
    elif profile == "full":
        out = [_case(what, "11b", b, t, i, n) for what in ("layer", "core") for b in (1, 8) for t in (512, 4096)
               for i in (1, 2, 4) for n in (1, 4)]
        out += [_case(what, "11b", 1, 512, 2, 1, first=64, passes=("fwd",)) for what in ("layer", "core")]
    elif profile == "priority":  # the GPU target for the attention core
        rivals = ["upstream-sdpa", "flex", "fastflamingo"]
        out = [_case("core", "11b", 1, 2048, 2, 2, providers=rivals),
               _case("core", "11b", 8, 512, 1, 4, providers=rivals)]
    else:
        raise ValueError(f"unknown profile {profile}")
    return [c for c in out if not shots or c.shots in shots]


def decode_cases(profile: str, shots: Optional[List[int]] = None) -> List[Case]:
    """The decode-step cells (op ``mllama_decode``)."""
    if profile in ("cpu", "quick"):
        out = [_case("decode", "cpu", 1, 512, 2, 1)]
    elif profile == "diagonal":
        out = [_case("decode", "11b", b, 512, 1, 4) for b in (1, 8)]
    elif profile == "full":
        out = [_case("decode", "11b", b, 512, i, n) for b in (1, 8) for i in (1, 4) for n in (1, 4)]
    elif profile == "priority":  # the GPU target for a decode step
        out = [_case("decode", "11b", 8, 512, 1, 4, providers=["upstream-sdpa", "fastflamingo"])]
    else:
        raise ValueError(f"unknown profile {profile}")
    return [c for c in out if not shots or c.shots in shots]


def tiny(case: Case) -> Case:
    p = dict(case.params, **MODELS["tiny"], model=f"tiny-{case.params['model']}", batch=min(case.params["batch"], 2))
    p["text"] = min(p["text"], 24)
    p["first"] = min(p["first"], 4)
    return Case(case.op, p, _label(p), case.shots, case.passes, case.providers)


# ------------------------------------------------------------------------------------------------------------
# Inputs, reference, work
# ------------------------------------------------------------------------------------------------------------


def cross_attention_mask(p: dict) -> torch.Tensor:
    """The processor's (batch, text, images, tiles) mask: image i's token at ``first + i * span``, seen by the
    tokens up to the next image token; ``tiles`` real tiles per image."""
    batch, text, images = p["batch"], p["text"], p["images"]
    cam = torch.zeros(batch, text, images, MAX_TILES, dtype=torch.long)
    span = (text - p["first"]) // images
    for i in range(images):
        start = p["first"] + i * span
        end = text if i == images - 1 else start + span
        cam[:, start:end, i, :p["tiles"]] = 1
    return cam


def _config(p: dict, attn: str):
    from transformers import MllamaTextConfig

    config = MllamaTextConfig(hidden_size=p["hidden"], num_attention_heads=p["heads"],
                              num_key_value_heads=p["kv_heads"], intermediate_size=p["intermediate"],
                              num_hidden_layers=1, cross_attention_layers=[0], vocab_size=16)
    config._attn_implementation = attn
    return config


def make_inputs(case: Case, device: str, dtype: torch.dtype):
    from transformers.models.mllama import modeling_mllama as hf

    p = case.params
    g = torch.Generator(device="cpu").manual_seed(0)
    batch, text, tokens_per_tile = p["batch"], p["text"], p["tokens_per_tile"]
    num_keys = p["images"] * MAX_TILES * tokens_per_tile
    head_dim = p["hidden"] // p["heads"]
    cam = cross_attention_mask(p)
    mask, flag = hf._prepare_cross_attention_mask(cam, num_vision_tokens=tokens_per_tile, dtype=dtype)
    ns = SimpleNamespace(mask=mask.to(device), flag=flag.to(device), cam=cam, num_keys=num_keys,
                         rows=cam.flatten(2).any(-1).to(device))

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_()

    if p["what"] == "core":
        ns.q = rnd(batch, text, p["heads"], head_dim)
        ns.k = rnd(batch, p["kv_heads"], num_keys, head_dim)
        ns.v = rnd(batch, p["kv_heads"], num_keys, head_dim)
        ns.scale = head_dim ** -0.5
        ns.leaves = [ns.q, ns.k, ns.v]
        return ns
    torch.manual_seed(0)
    with torch.device(device):
        layer = hf.MllamaCrossAttentionDecoderLayer(_config(p, "sdpa"), layer_idx=0)
    with torch.no_grad():  # upstream initialises the gates to 0, which would hide both branches
        layer.cross_attn_attn_gate.fill_(0.5)
        layer.cross_attn_mlp_gate.fill_(0.5)
    ns.upstream = layer.to(dtype=dtype).eval()
    ns.x = rnd(batch, 1 if p["what"] == "decode" else text, p["hidden"])
    ns.states = rnd(batch, num_keys, p["hidden"], scale=0.5)  # the multi-modal projector's output
    ns.leaves = [ns.x, ns.states]
    if p["what"] == "decode":
        ns.mask, ns.flag = ns.mask[:, :, -1:], ns.flag[:, :, -1:]  # the prompt's last row, repeated per step
        ns.rows = ns.rows[:, -1:]
    return ns


def _with_attn(layer, attn: str):
    """A copy of the upstream layer whose attention uses ``attn`` (transformers reads the config at call time)."""
    new = copy.deepcopy(layer)
    new.cross_attn.config = copy.copy(layer.cross_attn.config)
    new.cross_attn.config._attn_implementation = attn
    return new


def _decode_cache(layer, x, states):
    """A DynamicCache whose layer 0 holds ``layer``'s own K/V of ``states`` (its prefill: ``cache.update``)."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        layer.cross_attn(hidden_states=x, cross_attention_states=states, cache=cache)
    return cache


def _layer_call(inputs, layer, case):
    """The timed call: prefill (``x``, vision states, mask) or a decode step (cache, a fresh mask tensor)."""
    if case.params["what"] != "decode":
        return lambda: layer(inputs.x, inputs.states, inputs.mask, None, inputs.flag)
    cache = _decode_cache(layer, inputs.x, inputs.states)
    return lambda: layer(inputs.x, None, inputs.mask.clone(), None, inputs.flag, cache=cache)


def reference(inputs, case):
    """fp32 transformers (eager attention) on the same inputs: transformers' semantics ("hf")."""
    from transformers.models.mllama import modeling_mllama as hf

    mask = inputs.mask.float().clamp(min=torch.finfo(torch.float32).min)
    with torch.no_grad():
        if case.params["what"] == "core":
            stub = SimpleNamespace(num_key_value_groups=case.params["heads"] // case.params["kv_heads"],
                                   training=False)
            out, _ = hf.eager_attention_forward(stub, inputs.q.detach().float().transpose(1, 2),
                                                inputs.k.detach().float(), inputs.v.detach().float(), mask,
                                                scaling=inputs.scale)
            return out
        layer = _with_attn(inputs.upstream, "eager").float()
        x, states = inputs.x.detach().float(), inputs.states.detach().float()
        if case.params["what"] == "decode":
            return layer(x, None, mask, None, inputs.flag.float(), cache=_decode_cache(layer, x, states))
        return layer(x, states, mask, None, inputs.flag.float())


def _visible_keys(case: Case) -> int:
    """Real keys seen by each (sample, token), summed: every key for tokens that see no image ("hf")."""
    p = case.params
    cam = cross_attention_mask(p)
    if p["what"] == "decode":
        cam = cam[:, -1:]
    tiles = cam.flatten(2).sum(-1)
    tiles = torch.where(tiles > 0, tiles, p["images"] * MAX_TILES)
    return int(tiles.sum()) * p["tokens_per_tile"]


def work(case: Case, pass_: str, dtype):
    """Useful FLOPs: attention over the keys each token sees (+ projections of the real vision rows and the MLP
    for the layer); bytes: inputs and outputs once (weights and the visible K/V for decode)."""
    p = case.params
    head_dim = p["hidden"] // p["heads"]
    es = torch.tensor([], dtype=dtype).element_size()
    core = 4 * p["heads"] * head_dim * _visible_keys(case)
    kv_rows = p["batch"] * p["images"] * p["tiles"] * p["tokens_per_tile"]
    kv_bytes = es * 2 * kv_rows * p["kv_heads"] * head_dim
    if p["what"] == "core":
        q_bytes = es * p["batch"] * p["text"] * p["hidden"]
        fwd, fwd_bytes = core, 2 * q_bytes + kv_bytes
    else:
        rows = p["batch"] * (1 if p["what"] == "decode" else p["text"])
        kv_dim = p["kv_heads"] * head_dim
        weights = 2 * p["hidden"] ** 2 + 3 * p["hidden"] * p["intermediate"]
        proj = 2 * rows * weights + (0 if p["what"] == "decode" else 2 * kv_rows * p["hidden"] * 2 * kv_dim)
        fwd = proj + core
        fwd_bytes = es * (weights + 2 * p["hidden"] * kv_dim + 2 * rows * p["hidden"]) + kv_bytes
    return {"fwd": (fwd, fwd_bytes), "fwd+bwd": (3 * fwd, 3 * fwd_bytes)}.get(pass_, (None, None))


# ------------------------------------------------------------------------------------------------------------
# Providers
# ------------------------------------------------------------------------------------------------------------


def _upstream_unavailable(device, dtype):
    try:
        import transformers.models.mllama.modeling_mllama  # noqa: F401
    except Exception as exc:
        return f"transformers mllama does not import ({type(exc).__name__}: {exc})"
    return None


def _upstream(attn: str):
    def build(inputs, case, device, dtype) -> Runner:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.models.mllama import modeling_mllama as hf

        p = case.params
        if p["what"] == "core":
            stub = SimpleNamespace(num_key_value_groups=p["heads"] // p["kv_heads"], training=False)
            attend = sdpa_attention_forward if attn == "sdpa" else hf.eager_attention_forward

            def forward():
                out, _ = attend(stub, inputs.q.transpose(1, 2), inputs.k, inputs.v, inputs.mask,
                                scaling=inputs.scale)
                return out

            return Runner(forward, note=f"transformers {attn}_attention_forward")
        layer = _with_attn(inputs.upstream, attn)
        return Runner(_layer_call(inputs, layer, case), leaves=list(inputs.leaves) + list(layer.parameters()),
                      note=f"transformers MllamaCrossAttentionDecoderLayer ({attn})")

    return build


def _closed_form_ms(inputs, case, tokens_per_tile, max_tiles, flag, empty_rows) -> Optional[float]:
    """Derive (and memoise) the closed form of the prefill mask, as the first cross layer of a forward pass does;
    its time is the provider's ``prep_ms`` (every later layer of the pass, and the timed calls, reuse it)."""
    if case.params["what"] == "decode":
        return None
    start = time.perf_counter()
    mask_mod.cached(inputs.mask, tokens_per_tile, max_tiles, flag, empty_rows)
    return (time.perf_counter() - start) * 1e3


def _build_attention_route(inputs, case, device, dtype) -> Runner:
    """transformers' own layer with ``attn_implementation="fastflamingo"`` (``fastflamingo.hf``): the attention core
    is mllama_xattn, the tile sizes inferred from the mask (``prep_ms``); projections, norms and gates stay
    transformers' (no fused gates, K/V projected for the padded tiles too)."""
    from fastflamingo.hf import register

    if case.params["what"] == "core":
        raise NotImplementedError("the attention route is a layer provider (its core is the fastflamingo provider's)")
    layer = _with_attn(inputs.upstream, register())
    prep_ms = _closed_form_ms(inputs, case, None, None, None, "hf")
    return Runner(_layer_call(inputs, layer, case), prep_ms=prep_ms,
                  leaves=list(inputs.leaves) + list(layer.parameters()),
                  note="transformers MllamaCrossAttentionDecoderLayer (attn_implementation='fastflamingo')")


def _build_loaded(inputs, case, device, dtype) -> Runner:
    """The layer transformers builds itself under the load-time drop-ins (``fastflamingo.dropins()`` and
    transformers' ``apply_patches``, what ``from_pretrained`` / ``from_config`` run), with the upstream weights."""
    from transformers.models.mllama import modeling_mllama as hf
    from transformers.monkey_patching import apply_patches

    from fastflamingo import dropins

    p = case.params
    if p["what"] == "core":
        raise NotImplementedError("the load-time drop-in is a layer provider (its core is the fastflamingo provider's)")
    with dropins(), apply_patches(), torch.device("meta"):
        layer = hf.MllamaCrossAttentionDecoderLayer(inputs.upstream.cross_attn.config, layer_idx=0)
    layer = layer.to_empty(device=device).to(dtype)
    layer.load_state_dict(inputs.upstream.state_dict())
    layer.eval()
    prep_ms = _closed_form_ms(inputs, case, layer.cross_attn.tokens_per_tile, layer.cross_attn.max_num_tiles, None,
                              "hf")
    return Runner(_layer_call(inputs, layer, case), prep_ms=prep_ms,
                  leaves=list(inputs.leaves) + list(layer.parameters()),
                  note=f"{type(layer).__module__}.{type(layer).__name__} built by transformers (load-time drop-in)")


def _fastflamingo(empty_rows: str):
    def build(inputs, case, device, dtype) -> Runner:
        from fastflamingo.models.mllama import MllamaCrossAttentionDecoderLayer, mllama_xattn

        p = case.params
        zero = empty_rows == "zero"
        if zero and bool(inputs.rows.all()):
            raise NotImplementedError("every row sees an image: the two empty-row modes are the same here")
        compare = inputs.rows if zero else None
        flag = inputs.flag if zero else None
        prep_ms = _closed_form_ms(inputs, case, p["tokens_per_tile"], MAX_TILES, flag, empty_rows)
        if p["what"] == "core":
            def forward():
                return mllama_xattn(inputs.q, inputs.k, inputs.v, inputs.mask, scale=inputs.scale,
                                    tokens_per_tile=p["tokens_per_tile"], max_tiles=MAX_TILES, row_flag=flag,
                                    empty_rows=empty_rows)

            return Runner(forward, prep_ms=prep_ms, compare_rows=compare, note=f"mllama_xattn ({empty_rows})")
        config = inputs.upstream.cross_attn.config
        with torch.device("meta"):
            layer = MllamaCrossAttentionDecoderLayer(config, 0, empty_rows=empty_rows,
                                                     tokens_per_tile=p["tokens_per_tile"], max_num_tiles=MAX_TILES)
        layer = layer.to_empty(device=device).to(dtype)
        layer.load_state_dict(inputs.upstream.state_dict())
        layer.eval()
        return Runner(_layer_call(inputs, layer, case), prep_ms=prep_ms, compare_rows=compare,
                      leaves=list(inputs.leaves) + list(layer.parameters()),
                      note=f"fastflamingo drop-in ({empty_rows})")

    return build


def _build_flex(inputs, case, device, dtype) -> Runner:
    from torch.nn.attention.flex_attention import create_block_mask

    p = case.params
    if p["what"] != "core":
        raise NotImplementedError("FlexAttention is benchmarked on the attention core only")
    start = time.perf_counter()
    closed = mask_mod.from_additive_mask(inputs.mask, p["tokens_per_tile"], MAX_TILES)
    img_start, img_end, image_keys = closed.img_start, closed.img_end, closed.image_keys
    stride = closed.image_stride

    def mask_mod_fn(b, h, q_idx, kv_idx):
        image, offset = kv_idx // stride, kv_idx % stride
        s, e = img_start[b, q_idx], img_end[b, q_idx]
        return (s == mask_mod.ALL_KEYS) | ((image >= s) & (image < e) & (offset < image_keys[b, image]))

    batch, text = img_start.shape
    block_mask = create_block_mask(mask_mod_fn, batch, None, text, inputs.num_keys, device=device)
    prep_ms = (time.perf_counter() - start) * 1e3
    q, k, v = inputs.q, inputs.k, inputs.v
    attend, note = flex.attention(device)
    if device != "cuda":  # no backward on CPU: time the forward on detached inputs
        q, k, v = q.detach(), k.detach(), v.detach()

    def forward():
        out = attend(q.transpose(1, 2), k, v, block_mask=block_mask, scale=inputs.scale, enable_gqa=True)
        return out.transpose(1, 2)

    return Runner(forward, prep_ms=prep_ms, note=note)


def register_providers(op: str) -> None:
    """Register the providers of ``op`` (``mllama_xattn`` or ``mllama_decode``); FlexAttention for the core only."""
    register_provider(op, Provider("upstream-sdpa", "upstream", _upstream("sdpa"), _upstream_unavailable,
                                   description="transformers layer / sdpa_attention_forward (4D mask, repeated K/V)"))
    register_provider(op, Provider("upstream-eager", "baseline", _upstream("eager"), _upstream_unavailable,
                                   description="transformers layer / eager_attention_forward"))
    if op == PREFILL_OP:
        register_provider(op, Provider("flex", "baseline", _build_flex, flex.unavailable,
                                       description="FlexAttention, mask_mod from the closed form, enable_gqa (core)"))
    register_provider(op, Provider("fastflamingo", "fastflamingo", _fastflamingo("hf"),
                                   description="fastflamingo drop-in / mllama_xattn, transformers' semantics"))
    register_provider(op, Provider("fastflamingo-zero", "fastflamingo", _fastflamingo("zero"),
                                   description="the same with empty_rows='zero' (Meta / vLLM), rows with an image"))
    register_provider(op, Provider("fastflamingo-attn", "fastflamingo", _build_attention_route, _upstream_unavailable,
                                   description="transformers layer, attn_implementation='fastflamingo' (layers)"))
    register_provider(op, Provider("fastflamingo-loaded", "fastflamingo", _build_loaded, _upstream_unavailable,
                                   description="the layer transformers builds under fastflamingo.dropins() (layers)"))
