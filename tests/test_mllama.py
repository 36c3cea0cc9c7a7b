"""fastflamingo.models.mllama drop-ins and ``fastflamingo.patch`` against the real transformers mllama classes,
built from tiny configs here (fastflamingo.testing.tiny_mllama: no hub, no downloads), with masks made by
transformers' own processor code (mllama_cases)."""
import copy
import inspect

import pytest
import torch

import fastflamingo as ff
from fastflamingo.models.mllama import MllamaCrossAttentionDecoderLayer, MllamaTextCrossAttention
from fastflamingo.models.mllama import torch_path
from fastflamingo.testing import tiny_mllama
from helpers import assert_close, assert_lowp_close
from mllama_cases import CASES, model_inputs

transformers = pytest.importorskip("transformers")
from transformers.models.mllama import modeling_mllama as hf  # noqa: E402

CROSS = ("model.language_model.layers.1", "model.language_model.layers.3")


@pytest.fixture(scope="module")
def models():
    """(upstream eager, upstream sdpa) tiny models with the same weights; tests patch deep copies."""
    return {attn: tiny_mllama(attn) for attn in ("eager", "sdpa")}


def patched(model, **options):
    model = copy.deepcopy(model)
    ff.patch(model, **options)
    return model


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


class PathSpy:
    """Counts which PyTorch-path function serves the cross-attention (closed-form runs or dense fallback)."""

    def __init__(self, monkeypatch):
        self.calls = []
        for name in ("runs", "dense"):
            original = getattr(torch_path, name)

            def spy(*args, _name=name, _original=original, **kwargs):
                self.calls.append(_name)
                return _original(*args, **kwargs)

            monkeypatch.setattr(torch_path, name, spy)


# ----------------------------------------------------------------------------------------------------------------
# Drop-in modules
# ----------------------------------------------------------------------------------------------------------------


def test_dropins_have_upstream_signatures_and_keys(models):
    config = models["eager"].config.text_config
    for ours, theirs in ((MllamaCrossAttentionDecoderLayer, hf.MllamaCrossAttentionDecoderLayer),
                         (MllamaTextCrossAttention, hf.MllamaTextCrossAttention)):
        up, new = theirs(config, layer_idx=1), ours(config, layer_idx=1)
        assert list(new.state_dict()) == list(up.state_dict())
        new.load_state_dict(up.state_dict(), strict=True)
        up.load_state_dict(new.state_dict(), strict=True)
        ours_params = list(inspect.signature(ours.forward).parameters)
        theirs_params = list(inspect.signature(theirs.forward).parameters)
        assert ours_params == theirs_params, (ours_params, theirs_params)


def test_layer_forward_and_cache_match_upstream(models):
    """The decoder layer alone, with a DynamicCache and a StaticCache: same output and same cache contents (K after
    k_norm, V, (batch, kv_heads, keys, head_dim)) when every row sees an image (nothing skipped); decode steps read
    the cache."""
    from transformers.cache_utils import Cache, DynamicCache, StaticLayer

    config = models["eager"].config.text_config
    torch.manual_seed(0)
    up = hf.MllamaCrossAttentionDecoderLayer(config, layer_idx=0)
    with torch.no_grad():
        up.cross_attn_attn_gate.fill_(0.5)
        up.cross_attn_mlp_gate.fill_(-0.3)
    new = MllamaCrossAttentionDecoderLayer(config, 0, tokens_per_tile=5, max_num_tiles=4)
    new.load_state_dict(up.state_dict())
    inputs = model_inputs(*CASES["tiles_1_to_4"])
    cam = inputs["cross_attention_mask"]
    mask, flag = hf._prepare_cross_attention_mask(cam, num_vision_tokens=5, dtype=torch.float32)
    batch, num_text = cam.shape[:2]
    x = torch.randn(batch, num_text, config.hidden_size)
    states = torch.randn(batch * cam.shape[2] * 4, 5, config.hidden_size)  # MllamaModel's layout
    for make_layer in (None, lambda: StaticLayer(max_cache_len=cam.shape[2] * 4 * 5)):
        caches = []
        for layer in (up, new):
            cache = DynamicCache() if make_layer is None else Cache(layers=[make_layer()])
            with torch.no_grad():
                out = layer(x, states, mask, None, flag, cache=cache)
                step = layer(x[:, -1:], None, mask[:, :, -1:], None, flag[:, :, -1:], cache=cache)
            caches.append((out, step, cache.layers[0].keys, cache.layers[0].values))
        for name, got, want in zip(("prefill", "decode", "keys", "values"), caches[1], caches[0]):
            assert_close(got, want, 1e-5, name)


# ----------------------------------------------------------------------------------------------------------------
# Whole models: fastflamingo.patch
# ----------------------------------------------------------------------------------------------------------------


def test_patch_report_parameters_and_unpatch(models):
    model = copy.deepcopy(models["sdpa"])
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    originals = [model.get_submodule(p) for p in CROSS]
    report = ff.patch(model)
    assert report.counts() == {"MllamaCrossAttentionDecoderLayer": 2}
    assert all(isinstance(model.get_submodule(p), MllamaCrossAttentionDecoderLayer) for p in CROSS)
    assert model.get_submodule(CROSS[0]).cross_attn.tokens_per_tile == 5  # from the vision encoder
    assert list(model.state_dict()) == keys
    for name, p in model.named_parameters():
        assert p is params[name], f"{name} is a new Parameter object"
    assert ff.unpatch(model) == 2
    assert [model.get_submodule(p) for p in CROSS] == originals
    with pytest.raises(ValueError, match="empty_rows"):
        ff.patch(model, empty_rows="meta")


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_logits_match_upstream_fp32(models, monkeypatch, case, attn):
    """Whole-model logits within 1e-5 of transformers (its eager and SDPA attention), through the closed form."""
    inputs = model_inputs(*CASES[case])
    model = patched(models[attn])
    spy = PathSpy(monkeypatch)
    assert_close(logits(model, inputs), logits(models[attn], inputs), 1e-5, f"{case} {attn}")
    assert spy.calls and set(spy.calls) == {"runs"}, spy.calls  # the closed form, never the dense fallback


def _zero_mode_reference(model, inputs):
    """transformers with Meta's semantics: the attention output of rows that see no image is dropped (a forward
    hook on each MllamaTextCrossAttention multiplies it by the row flag)."""
    flag = inputs["cross_attention_mask"].flatten(2).any(-1).float()[..., None]  # (B, S, 1)
    handles = [m.register_forward_hook(lambda mod, args, out: (out[0] * flag, out[1]))
               for m in model.modules() if isinstance(m, hf.MllamaTextCrossAttention)]
    try:
        return logits(model, inputs)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("case", ["interleaved", "text_only", "left_padding"])
def test_empty_rows_zero_mode(models, case):
    inputs = model_inputs(*CASES[case])
    hf_logits = logits(models["eager"], inputs)
    zero_logits = logits(patched(models["eager"], empty_rows="zero"), inputs)
    assert_close(zero_logits, _zero_mode_reference(models["eager"], inputs), 1e-5, case)
    assert (zero_logits - hf_logits).abs().max() > 1e-4  # the two semantics do differ on these prompts


def test_mask_none_attends_to_every_key(models):
    """Without a cross-attention mask every token sees every vision key: upstream's eager attention (its SDPA path
    would be causal, transformers #48172)."""
    inputs = model_inputs(*CASES["interleaved"], mask=False)
    for attn in ("eager", "sdpa"):
        assert_close(logits(patched(models[attn]), inputs), logits(models["eager"], inputs), 1e-5, attn)


def test_bf16_within_twice_upstream_error(models):
    inputs = model_inputs(*CASES["interleaved"])
    ref32 = logits(models["sdpa"], inputs)
    upstream = copy.deepcopy(models["sdpa"]).to(torch.bfloat16)
    ours = patched(upstream)
    lowp = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in inputs.items()}
    assert_lowp_close(logits(ours, lowp).float(), ref32, logits(upstream, lowp).float(), "bf16 logits", atol=2e-3)


def test_other_masks_fall_back_to_dense(models, monkeypatch):
    """A mask that is not a run of images with tile prefixes (a hand-made collator mask) runs densely: same
    logits as upstream."""
    inputs = model_inputs(*CASES["interleaved"])
    cam = inputs["cross_attention_mask"].clone()
    cam[0, 6, 0, :3] = 1  # token 6 of sample 0 also sees 3 tiles of image 0, which every other row sees 2 of
    inputs["cross_attention_mask"] = cam
    spy = PathSpy(monkeypatch)
    assert_close(logits(patched(models["eager"]), inputs), logits(models["eager"], inputs), 1e-5, "dense")
    assert "dense" in spy.calls


def test_gradients_of_cross_layers_match(models):
    inputs = model_inputs(*CASES["left_padding"])
    labels = inputs["input_ids"].clone()
    results = []
    for model in (copy.deepcopy(models["eager"]), patched(models["eager"])):
        model.train()
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if n.startswith(CROSS) and p.grad is not None}
        results.append((loss.detach(), grads))
    (loss_up, grads_up), (loss_ff, grads_ff) = results
    assert_close(loss_ff, loss_up, 1e-5, "loss")
    assert len(grads_ff) == len(grads_up) == 2 * 13  # every parameter of both cross layers
    for name, grad in grads_up.items():
        assert_close(grads_ff[name], grad, 1e-4, name)


def test_output_hidden_states_and_gradient_checkpointing(models):
    inputs = model_inputs(*CASES["consecutive"])
    model = copy.deepcopy(models["eager"])
    with torch.no_grad():
        want = model(**inputs, output_hidden_states=True).hidden_states
    ff.patch(model)
    with torch.no_grad():
        got = model(**inputs, output_hidden_states=True).hidden_states
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, 1e-5, f"hidden state {i}")
    model.train()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith(CROSS))


GENERATE = {
    "greedy": {},
    "greedy-static": dict(cache_implementation="static"),
    "beam": dict(num_beams=2),
    "beam-static": dict(cache_implementation="static", num_beams=2),
}


@pytest.mark.parametrize("empty_rows", ["hf", "zero"])
def test_generate_dynamic_and_static_cache(models, empty_rows):
    """Greedy and beam generate with dynamic and static caches: identical tokens to transformers ("hf"), and to
    transformers with Meta's empty-row semantics ("zero")."""
    inputs = model_inputs(*CASES["left_padding"])
    upstream = models["sdpa"]
    ours = patched(upstream, empty_rows=empty_rows)
    for name, options in GENERATE.items():
        kwargs = dict(inputs, max_new_tokens=5, do_sample=False, **options)
        with torch.no_grad():
            got = ours.generate(**kwargs)
            if empty_rows == "hf":
                want = upstream.generate(**kwargs)
            else:
                flag_hooks = []
                try:
                    for m in upstream.modules():
                        if isinstance(m, hf.MllamaTextCrossAttention):
                            flag_hooks.append(m.register_forward_hook(_zero_output_hook, with_kwargs=True))
                    want = upstream.generate(**kwargs)
                finally:
                    for h in flag_hooks:
                        h.remove()
        assert torch.equal(got, want), f"{name}: {got[:, -5:].tolist()} != {want[:, -5:].tolist()}"


def _zero_output_hook(module, args, kwargs, out):
    """Meta's semantics on upstream: drop the attention output of rows whose (already multiplied) mask row is all
    zeros, i.e. rows that see no image."""
    mask = kwargs.get("attention_mask")
    if mask is None:
        return out
    sees = (mask[:, 0] != 0).any(-1)[..., None].to(out[0].dtype)  # a row that sees an image has blocked keys
    return out[0] * sees, out[1]


def test_generate_static_cache_compiled(models):
    """generate with the static cache compiled by torch.compile (aot_eager, on CPU) gives upstream's tokens."""
    from transformers import CompileConfig

    config = CompileConfig(backend="aot_eager", mode=None, fullgraph=False)
    config._compile_all_devices = True
    inputs = model_inputs(*CASES["interleaved"])
    kwargs = dict(inputs, max_new_tokens=4, do_sample=False, cache_implementation="static", compile_config=config)
    with torch.no_grad():
        want = models["sdpa"].generate(**kwargs)
        got = patched(models["sdpa"]).generate(**kwargs)
    assert torch.equal(got, want)


@pytest.mark.triton
def test_model_through_the_kernels(models, device):
    """The patched model with backend("triton"): the prefill kernels, the decode kernel and the gated projection
    kernels serve every cross-attention layer (interpreted on CPU); logits and greedy tokens match upstream."""
    if device == "cpu":
        pytest.importorskip("triton")
    upstream = tiny_mllama("sdpa", num_heads=4)  # head_dim 16: the kernels' smallest
    inputs = model_inputs(*CASES["interleaved"])
    model = patched(upstream)
    with ff.backend("triton"):
        assert_close(logits(model, inputs), logits(upstream, inputs), 1e-5, "logits")
        with torch.no_grad():
            got = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        want = upstream.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(got, want)


def test_causal_lm_cross_layers(models, monkeypatch):
    """MllamaForCausalLM (text model only): the caller passes the vision states and the 4D mask. Without a vision
    encoder the patch assumes Llama 3.2's 1601-token tiles: at another tile size the dense path serves (exact), at
    1601 the closed form."""
    text_config = copy.deepcopy(models["eager"].config.text_config)
    text_config._attn_implementation = "eager"
    torch.manual_seed(0)
    upstream = hf.MllamaForCausalLM(text_config).eval()
    with torch.no_grad():
        for name, p in upstream.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                p.fill_(0.6)
    inputs = model_inputs(*CASES["interleaved"])
    cam = inputs["cross_attention_mask"]
    model = patched(upstream)
    for tokens_per_tile, path in ((5, "dense"), (1601, "runs")):
        mask, flag = hf._prepare_cross_attention_mask(cam, num_vision_tokens=tokens_per_tile, dtype=torch.float32)
        states = torch.randn(cam.shape[0], mask.shape[-1], text_config.hidden_size)
        kwargs = dict(input_ids=inputs["input_ids"], cross_attention_states=states, cross_attention_mask=mask,
                      full_text_row_masked_out_mask=flag)
        spy = PathSpy(monkeypatch)
        assert_close(logits(model, kwargs), logits(upstream, kwargs), 1e-5, f"P={tokens_per_tile}")
        assert set(spy.calls) == {path}
