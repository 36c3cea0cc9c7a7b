"""Evolla drop-ins and patching against the real transformers implementation (models/evolla): the compressor, the
protein encoder's per-sequence cache, the aligner (three sources, their padding masks, upstream's uniform rows), the
whole model's logits, gradients and greedy generation."""
import copy
import warnings

import pytest
import torch

import fastflamingo
from fastflamingo.models import evolla as ff
from fastflamingo.models.evolla.decoding import KvCachedGenerate
from fastflamingo.models.evolla.protein_cache import CachedProteinEncoding
from fastflamingo.testing import evolla_config, tiny_evolla
from helpers import assert_close, assert_lowp_close, grads_match

transformers = pytest.importorskip("transformers")
from transformers import EvollaForProteinText2Text, EvollaModel  # noqa: E402
from transformers.models.evolla import modeling_evolla as hf  # noqa: E402

B, P, T = 4, 12, 7  # batch, protein tokens, text tokens


@pytest.fixture(scope="module")
def config():
    return evolla_config()


@pytest.fixture(scope="module")
def models():
    upstream = tiny_evolla()
    patched = copy.deepcopy(upstream)
    fastflamingo.patch(patched)
    return upstream, patched


def inputs(seed=0, batch=B, protein=P, text=T, padded_protein=True):
    """Protein ids with padding (sample 1: right-padded; with ``padded_protein`` sample 3 is fully padded, which
    upstream's SaProt turns into NaN) and text ids with left padding (sample 2)."""
    g = torch.Generator().manual_seed(seed)
    pmask = torch.ones(batch, protein, dtype=torch.long)
    pmask[1, protein * 2 // 3:] = 0
    if padded_protein:
        pmask[batch - 1] = 0
    am = torch.ones(batch, text, dtype=torch.long)
    am[2, :3] = 0
    return dict(input_ids=torch.randint(3, 100, (batch, text), generator=g), attention_mask=am,
                protein_input_ids=torch.randint(4, 446, (batch, protein), generator=g), protein_attention_mask=pmask)


# --------------------------------------------------------------------------------------------------------------
# the compressor
# --------------------------------------------------------------------------------------------------------------


def _upstream_and_dropin(upstream_cls, dropin_cls, *args, seed=0, **kwargs):
    torch.manual_seed(seed)
    up = upstream_cls(*args, **kwargs)
    with torch.no_grad():
        for p in up.parameters():  # LayerNorms and gates away from their 1 / 0 initialisation
            p.add_(0.1 * torch.randn_like(p))
    new = dropin_cls(*args, **kwargs)
    new.load_state_dict(up.state_dict(), strict=True)
    up.load_state_dict(new.state_dict(), strict=True)
    return up, new


def test_compressor_attention_matches_upstream_with_padded_proteins():
    up, new = _upstream_and_dropin(hf.EvollaSequenceCompressorAttention, ff.EvollaSequenceCompressorAttention,
                                   dim=24, dim_head=6, heads=3)
    x, latents = torch.randn(3, 11, 24), torch.randn(3, 5, 24)
    mask = torch.ones(3, 16)
    mask[0, 7:11] = 0
    mask[2, :11] = 0  # a fully padded protein: only the latents are visible
    assert_close(new(x, latents, mask), up(x, latents, mask), 1e-5)
    with pytest.raises(ValueError, match="latents must stay visible"):
        new(x, latents, torch.zeros(3, 16))
    with pytest.raises(ValueError, match=r"mask must have shape \(3, 16\)"):
        new(x, latents, mask[:, :11])


def test_resampler_matches_upstream_with_gradients(config):
    up, new = _upstream_and_dropin(hf.EvollaSequenceCompressorResampler, ff.EvollaSequenceCompressorResampler,
                                   config)
    embeds = torch.randn(3, 10, config.protein_encoder_config.hidden_size)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2] = 0
    outs = []
    for module in (up, new):
        e = embeds.clone().requires_grad_()
        out = module(e, mask)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        outs.append((out, {"embeds": e.grad, **{n: p.grad for n, p in module.named_parameters()}}))
    assert_close(outs[1][0], outs[0][0], 1e-5)
    grads_match(outs[1][1], outs[0][1])


# --------------------------------------------------------------------------------------------------------------
# the aligner
# --------------------------------------------------------------------------------------------------------------


def _aligner(config, seed=0, **dims):
    return _upstream_and_dropin(hf.EvollaSequenceAlignerCrossAttention, ff.EvollaSequenceAlignerCrossAttention,
                                config, seed=seed, **dims)


def _aligner_args(config, seed=0, sources=("protein", "structure", "msa"), dims=None):
    g = torch.Generator().manual_seed(seed)
    dims = dims or {"protein": config.hidden_size, "structure": 20, "msa": 12}
    lengths = {"protein": 8, "structure": 6, "msa": 5}
    args = dict(query_states=torch.randn(B, T, config.hidden_size, generator=g),
                query_attn_mask=torch.ones(B, T, dtype=torch.long))
    args["query_attn_mask"][2, :3] = 0  # left-padded text: upstream averages every key uniformly there
    for name in ("protein", "structure", "msa"):
        states = torch.randn(B, lengths[name], dims[name], generator=g) if name in sources else None
        args[f"{name}_kv_states"] = states
    return args


def _run_aligner(module, args, grad=False):
    args = {k: (v.clone().requires_grad_() if grad and v is not None and v.is_floating_point() else v)
            for k, v in args.items()}
    out = module(**args)
    if not grad:
        return out, None
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = {k: v.grad for k, v in args.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    grads.update({n: p.grad for n, p in module.named_parameters()})
    return out, grads


def test_aligner_three_sources_with_batch_masks_and_uniform_rows(config):
    """Structure and MSA sources with batch masks that drop samples (sample 3 has no visible key at all: every
    one of its rows is upstream's uniform average, as are the masked text rows of sample 2)."""
    up, new = _aligner(config, protein_encoder_dim=config.hidden_size, structure_encoder_dim=20, msa_encoder_dim=12)
    args = _aligner_args(config)
    args.update(protein_batch_mask=torch.tensor([True, True, False, False]),
                structure_batch_mask=torch.tensor([True, False, True, False]),
                msa_batch_mask=torch.tensor([False, True, True, False]))
    out_up, grads_up = _run_aligner(up, args, grad=True)
    out_new, grads_new = _run_aligner(new, args, grad=True)
    assert_close(out_new, out_up, 1e-5)
    grads_match(grads_new, grads_up)


def test_aligner_per_key_masks_and_a_single_source(config):
    up, new = _aligner(config, protein_encoder_dim=config.hidden_size, structure_encoder_dim=20)
    args = _aligner_args(config, sources=("protein", "structure"))
    pm = torch.ones(B, 8)
    pm[0, 5:] = 0
    pm[3] = 0
    sm = torch.ones(B, 6, dtype=torch.bool)
    sm[1, :4] = False
    sm[3] = False  # sample 3 sees nothing
    args.update(protein_kv_attn_mask=pm, structure_kv_attn_mask=sm)
    assert_close(_run_aligner(new, args)[0], _run_aligner(up, args)[0], 1e-5)
    up1, new1 = _aligner(config, seed=1, protein_encoder_dim=config.hidden_size)
    args = _aligner_args(config, seed=1, sources=("protein",))
    args["protein_batch_mask"] = torch.tensor([True, True, True, False])
    out_up, grads_up = _run_aligner(up1, args, grad=True)
    out_new, grads_new = _run_aligner(new1, args, grad=True)
    assert_close(out_new, out_up, 1e-5)
    grads_match(grads_new, grads_up)


def test_aligner_skips_when_no_key_is_visible_and_accepts_the_deprecated_cache_name(config):
    _, new = _aligner(config, protein_encoder_dim=config.hidden_size)
    args = _aligner_args(config, sources=("protein",))
    args["protein_batch_mask"] = torch.zeros(B, dtype=torch.bool)
    assert new(**args) is args["query_states"]  # upstream returns its input untouched
    args["protein_batch_mask"] = torch.ones(B, dtype=torch.bool)
    with pytest.warns(FutureWarning, match="past_key_values"):
        with_old = new(**args, past_key_values=None)
    assert torch.equal(with_old, new(**args))
    with pytest.raises(ValueError, match="protein_kv_attn_mask or protein_batch_mask"):
        new(**{**args, "protein_batch_mask": None})


def test_aligner_bf16_within_twice_upstreams_error(config):
    up, new = _aligner(config, protein_encoder_dim=config.hidden_size, structure_encoder_dim=20)
    args = _aligner_args(config, sources=("protein", "structure"))
    args.update(protein_batch_mask=torch.ones(B, dtype=torch.bool),
                structure_batch_mask=torch.tensor([True, False, True, True]))
    ref = _run_aligner(copy.deepcopy(up).double(), {k: v.double() if v is not None and v.is_floating_point() else v
                                                   for k, v in args.items()})[0]
    low = {k: v.bfloat16() if v is not None and v.is_floating_point() else v for k, v in args.items()}
    assert_lowp_close(_run_aligner(new.bfloat16(), low)[0], ref, _run_aligner(up.bfloat16(), low)[0], "aligner")


def test_compressor_bf16_within_twice_upstreams_error(config):
    up, new = _upstream_and_dropin(hf.EvollaSequenceCompressorResampler, ff.EvollaSequenceCompressorResampler,
                                   config)
    embeds = torch.randn(3, 10, config.protein_encoder_config.hidden_size)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 4:] = 0
    ref = copy.deepcopy(up).double()(embeds.double(), mask)
    assert_lowp_close(new.bfloat16()(embeds.bfloat16(), mask), ref, up.bfloat16()(embeds.bfloat16(), mask),
                      "resampler")


# --------------------------------------------------------------------------------------------------------------
# the whole model
# --------------------------------------------------------------------------------------------------------------


def test_patch_replaces_the_evolla_modules_and_unpatch_restores_them():
    for cls in (EvollaForProteinText2Text, EvollaModel):
        model = tiny_evolla(cls)
        before = {path: type(m) for path, m in model.named_modules()}
        state = model.state_dict()
        report = fastflamingo.patch(model)
        assert report.counts() == {"EvollaSequenceCompressorResampler": 1,
                                   "EvollaSequenceAlignerCrossAttention": 2}, report
        encoder = model.get_submodule("model.protein_encoder" if cls is EvollaForProteinText2Text
                                      else "protein_encoder")
        assert type(encoder) is hf.EvollaProteinEncoder  # upstream's, with the caching forward of patch()
        assert isinstance(encoder.__dict__["forward"], CachedProteinEncoding)
        assert type(encoder.sequence_compressor_resampler.layers[0][0]) is ff.EvollaSequenceCompressorAttention
        new_state = model.state_dict()
        assert list(new_state) == list(state) and all(new_state[k] is state[k] or torch.equal(new_state[k], state[k])
                                                      for k in state)
        model.load_state_dict(state, strict=True)
        assert fastflamingo.unpatch(model) == 3
        assert {path: type(m) for path, m in model.named_modules()} == before
        assert "forward" not in encoder.__dict__ and "media_cache" not in encoder.__dict__


def test_the_encoder_hook_keeps_an_earlier_instance_forward_and_follows_deepcopy():
    model = tiny_evolla()
    encoder = model.model.protein_encoder
    calls = []

    def earlier(*args, **kwargs):  # e.g. accelerate's device hook
        calls.append(1)
        return type(encoder).forward(encoder, *args, **kwargs)

    encoder.forward = earlier
    fastflamingo.patch(model)
    batch = inputs(seed=7, padded_protein=False)
    with torch.no_grad():
        model(**batch)
        model(**batch)
    assert calls == [1]  # through the earlier forward, once: the second call reused the encoding
    copied = copy.deepcopy(model)
    hook = copied.model.protein_encoder.__dict__["forward"]
    assert hook.encoder is copied.model.protein_encoder and hook.encoder.media_cache.value is None
    fastflamingo.unpatch(model)
    assert encoder.__dict__["forward"] is earlier


def test_logits_match_upstream_with_protein_and_text_padding(models):
    upstream, patched = models
    batch = inputs()
    with torch.no_grad():
        want = upstream(**batch).logits
        got = patched(**batch).logits
    nan = torch.isnan(want)
    assert nan[B - 1].all() and not nan[: B - 1].any()  # upstream's SaProt gives NaN for a fully padded protein
    assert torch.equal(torch.isnan(got), nan)
    assert_close(got[: B - 1], want[: B - 1], 1e-5)


def test_gradients_of_every_parameter_match_upstream(models):
    upstream, patched = models
    batch = inputs(seed=1, padded_protein=False)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    grads = []
    for model in (upstream, patched):
        model.train()
        model.zero_grad()
        try:
            model(**batch).loss.backward()
        finally:
            model.eval()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert len(grads[0]) == len([p for p in upstream.parameters() if p.requires_grad])
    grads_match(grads[1], grads[0])
    upstream.zero_grad(set_to_none=True)
    patched.zero_grad(set_to_none=True)


def _counting(model):
    """Counters of SaProt forwards and of protein K/V projections (every aligner's ``key_protein``)."""
    calls = {"saprot": 0, "kv": 0}
    hooks = [model.model.protein_encoder.model.register_forward_hook(
        lambda *a: calls.__setitem__("saprot", calls["saprot"] + 1))]
    for layer in model.model.layers:
        if hasattr(layer, "adapter"):
            hooks.append(layer.adapter.key_protein.register_forward_hook(
                lambda *a: calls.__setitem__("kv", calls["kv"] + 1)))
    return calls, hooks


def test_generate_encodes_the_protein_once_and_gives_upstreams_tokens(models, monkeypatch):
    upstream, patched = models
    batch = inputs(seed=2, padded_protein=False)
    new_tokens = 4
    counts = {}
    for name, model in (("upstream", upstream), ("patched", patched)):
        calls, hooks = _counting(model)
        fastflamingo.clear_media_cache(model)
        out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False)
        for hook in hooks:
            hook.remove()
        counts[name] = (out, dict(calls))
    assert torch.equal(counts["patched"][0], counts["upstream"][0])
    steps = new_tokens  # the prompt's forward and one per generated token but the last
    # upstream re-encodes the protein and re-projects every aligner's K/V at every step
    assert counts["upstream"][1] == {"saprot": steps, "kv": 2 * steps}
    assert counts["patched"][1] == {"saprot": 1, "kv": 2}
    # FASTFLAMINGO_MEDIA_CACHE=0: every step afresh, same tokens
    monkeypatch.setenv("FASTFLAMINGO_MEDIA_CACHE", "0")
    calls, hooks = _counting(patched)
    out = patched.generate(**batch, max_new_tokens=new_tokens, do_sample=False)
    for hook in hooks:
        hook.remove()
    assert calls == {"saprot": steps, "kv": 2 * steps} and torch.equal(out, counts["upstream"][0])


def test_beam_search_gives_upstreams_tokens_with_one_encoding(models):
    upstream, patched = models
    batch = inputs(seed=6, padded_protein=False)
    fastflamingo.clear_media_cache(patched)
    calls, hooks = _counting(patched)
    got = patched.generate(**batch, max_new_tokens=3, do_sample=False, num_beams=2)
    for hook in hooks:
        hook.remove()
    assert calls == {"saprot": 1, "kv": 2}
    assert torch.equal(got, upstream.generate(**batch, max_new_tokens=3, do_sample=False, num_beams=2))


def test_the_cache_follows_new_proteins_and_weight_updates(models):
    _, patched = models
    encoder = patched.model.protein_encoder
    batch = inputs(seed=3, padded_protein=False)
    with torch.no_grad():
        first = patched(**batch).logits
        misses = encoder.media_cache.misses
        again = patched(**batch).logits
        assert encoder.media_cache.misses == misses and torch.equal(first, again)
        batch["protein_input_ids"][0, 0] += 1  # in place: the version counter moves
        changed = patched(**batch).logits
        assert encoder.media_cache.misses == misses + 1 and not torch.equal(changed[0], first[0])
        adapter = patched.model.layers[1].adapter
        misses = adapter.media_cache.misses
        adapter.key_protein.bias.add_(0.5)
        try:
            patched(**batch)
            assert adapter.media_cache.misses == misses + 1
        finally:
            adapter.key_protein.bias.sub_(0.5)


def test_kv_cached_decoding_works_patched_where_upstream_fails(models):
    """``generate(use_cache=True)``: upstream broadcasts the whole text mask against the one-token query of a decode
    step (the aligner returns one row per position) and the next decoder layer fails; the drop-in uses the mask of
    the step's tokens and gives the tokens of upstream's default (use_cache=False) generation."""
    upstream, patched = models
    batch = inputs(seed=4, padded_protein=False)
    options = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True)
    want = upstream.generate(**batch, **options)
    with pytest.raises(RuntimeError, match="size of tensor"):
        upstream.generate(**batch, max_new_tokens=4, do_sample=False, use_cache=True)
    got = patched.generate(**batch, use_cache=True, **options)
    assert torch.equal(got.sequences, want.sequences)
    for step, (ours, theirs) in enumerate(zip(got.logits, want.logits)):
        assert_close(ours, theirs, 1e-5, f"step {step}")


def _text_lengths(model):
    """The text length of every decoder forward (a hook on the token embedding): the whole text again at each step
    without the KV cache, one new token per step with it."""
    lengths = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, args, out: lengths.append(args[0].shape[1]))
    return lengths, hook


def test_patched_generate_uses_the_kv_cache_unless_the_call_decides(models):
    """A patched model's ``generate`` passes ``use_cache=True`` (upstream's config says False); an explicit
    ``use_cache`` or ``generation_config`` is the caller's; the configs ``save_pretrained`` writes are untouched;
    ``unpatch`` removes the hook."""
    upstream, patched = models
    batch = inputs(seed=8, padded_protein=False)
    want = upstream.generate(**batch, max_new_tokens=4, do_sample=False)
    runs = {}
    for name, kwargs in (("default", {}), ("use_cache=False", {"use_cache": False}),
                         ("generation_config", {"generation_config": copy.deepcopy(patched.generation_config)})):
        lengths, hook = _text_lengths(patched)
        try:
            got = patched.generate(**batch, max_new_tokens=4, do_sample=False, **kwargs)
        finally:
            hook.remove()
        assert torch.equal(got, want), name
        runs[name] = lengths
    assert runs["default"] == [T, 1, 1, 1]
    assert runs["use_cache=False"] == runs["generation_config"] == [T, T + 1, T + 2, T + 3]
    assert patched.config.use_cache is False and patched.generation_config.use_cache is False
    model = tiny_evolla()
    fastflamingo.patch(model)
    assert isinstance(model.__dict__["generate"], KvCachedGenerate)
    copied = copy.deepcopy(model)
    assert copied.__dict__["generate"].model is copied
    fastflamingo.unpatch(model)
    assert "generate" not in model.__dict__


def test_patched_model_bf16_logits_within_twice_upstreams_error(models):
    upstream, _ = models
    batch = inputs(seed=5, padded_protein=False)
    with torch.no_grad():
        ref = copy.deepcopy(upstream).double()(**batch).logits
        up16 = copy.deepcopy(upstream).bfloat16()
        want = up16(**batch).logits
        fastflamingo.patch(up16)
        got = up16(**batch).logits
    assert_lowp_close(got, ref, want, "logits")


@pytest.mark.triton
@pytest.mark.parametrize("text", [pytest.param(3, id="decode-length"), pytest.param(T, id="prefill-length")])
def test_aligner_on_the_triton_kernels_matches_the_torch_path(text):
    """backend("triton") (interpreted on CPU): the aligner's attention runs media_xattn's kernels with the sources'
    padding as the key mask (a fully padded sample, a partly padded source, left-padded text rows averaged as
    upstream does) and its output, in fp32 and fp16, equals the PyTorch path's; in fp32 the gradients of the inputs
    and of every parameter too. head_dim 16: the kernels' smallest."""
    pytest.importorskip("triton")
    config = evolla_config(hidden_size=64)
    _, module = _aligner(config, protein_encoder_dim=config.hidden_size, structure_encoder_dim=20)
    args = _aligner_args(config, sources=("protein", "structure"))
    args["query_states"], args["query_attn_mask"] = args["query_states"][:, :text], args["query_attn_mask"][:, :text]
    pm = torch.ones(B, 8)
    pm[0, 5:] = 0
    pm[3] = 0
    sm = torch.ones(B, 6, dtype=torch.bool)
    sm[1, :4] = False
    sm[3] = False  # sample 3 sees no key at all
    args.update(protein_kv_attn_mask=pm, structure_kv_attn_mask=sm)
    results = {}
    for name in ("triton", "torch"):
        with fastflamingo.backend(name):
            results[name] = _run_aligner(module, args, grad=True)
            module.zero_grad(set_to_none=True)
    (out, grads), (want, want_grads) = results["triton"], results["torch"]
    assert_close(out, want, 1e-5)
    unused = {name for name, g in want_grads.items() if g is None}  # the float protein mask: an input, no graph
    assert unused == {name for name, g in grads.items() if g is None}
    grads_match({n: g for n, g in grads.items() if n not in unused},
                {n: g for n, g in want_grads.items() if n not in unused})
    half = copy.deepcopy(module).half()
    args16 = {k: (v.half() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in args.items()}
    with torch.no_grad():
        outs = {}
        for name in ("triton", "torch"):
            with fastflamingo.backend(name):
                outs[name] = half(**args16)
    assert_close(outs["triton"], outs["torch"].float(), 5e-3)
