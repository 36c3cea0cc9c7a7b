"""Upstream loaders and tiny random-weight models shared by the tests and the benchmarks.

Nothing here is imported by ``import fastflamingo``; each helper imports what it needs when called.
:func:`tiny_model` builds a tiny upstream model of every family of the registry (``fastflamingo.models.FAMILIES``);
tests/test_registry.py fails when a registered family has none here.

OpenFlamingo: ``open_flamingo/__init__`` imports its factory, which imports open_clip, which needs a torchvision
that does not exist beside the CPU torch wheel. :func:`load_open_flamingo` loads the real ``open_flamingo.src``
modules (``flamingo``, ``flamingo_lm``, ``helpers``, ``utils``) without running the package ``__init__`` files, and
:func:`tiny_open_flamingo` builds the real ``Flamingo`` class with a small patch-embedding vision encoder in place
of the open_clip ViT (the encoder runs under ``no_grad`` upstream and is not what fastflamingo replaces).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import Optional

import torch
from torch import nn


def _find_package(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"{name} is not installed: pip install --no-deps open-flamingo==2.0.1 einops-exts (see README)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def load_open_flamingo() -> types.SimpleNamespace:
    """The real open-flamingo 2.0.1 modules, without importing open_clip. Returns a namespace with ``Flamingo``,
    ``FlamingoLMMixin``, ``extend_instance``, ``helpers`` (MaskedCrossAttention, GatedCrossAttentionBlock, ...)."""
    if "open_flamingo.src.flamingo" not in sys.modules:
        root = _find_package("open_flamingo")
        for name, path in (("open_flamingo", root), ("open_flamingo.src", root / "src")):
            if name not in sys.modules:
                package = types.ModuleType(name)
                package.__path__ = [str(path)]  # a package whose __init__ is never run
                sys.modules[name] = package
    flamingo = importlib.import_module("open_flamingo.src.flamingo")
    flamingo_lm = importlib.import_module("open_flamingo.src.flamingo_lm")
    helpers = importlib.import_module("open_flamingo.src.helpers")
    utils = importlib.import_module("open_flamingo.src.utils")
    _fix_generate_for_transformers5(flamingo_lm.FlamingoLMMixin)
    return types.SimpleNamespace(
        Flamingo=flamingo.Flamingo,
        FlamingoLMMixin=flamingo_lm.FlamingoLMMixin,
        extend_instance=utils.extend_instance,
        helpers=helpers,
    )


def _fix_generate_for_transformers5(mixin) -> None:
    """transformers 5 drops an all-ones ``attention_mask`` in generate, and OpenFlamingo's ``FlamingoLMMixin.forward``
    requires it positionally (docs/testing.md, "Upstream packages"): give it a default of None."""
    if getattr(mixin.forward, "_fastflamingo_default_mask", False):
        return
    original = mixin.forward

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        return original(self, input_ids, attention_mask, **kwargs)

    forward._fastflamingo_default_mask = True
    mixin.forward = forward


class TinyVisionEncoder(nn.Module):
    """Stands in for open_clip's ``VisionTransformer(output_tokens=True)``: returns ``(pooled, tokens)`` with
    tokens of shape (images, patches, width)."""

    def __init__(self, width: int, image_size: int = 32, patch_size: int = 8):
        super().__init__()
        self.patchify = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
        self.ln = nn.LayerNorm(width)
        self.num_tokens = (image_size // patch_size) ** 2

    def forward(self, images):
        tokens = self.ln(self.patchify(images).flatten(2).transpose(1, 2))
        return tokens.mean(1), tokens


class _VisualWrapper(nn.Module):
    def __init__(self, visual):
        super().__init__()
        self.visual = visual


def tiny_open_flamingo(
    *,
    lm: str = "llama",
    hidden_size: int = 48,
    num_layers: int = 4,
    num_heads: int = 4,
    vis_dim: int = 32,
    cross_attn_every_n_layers: int = 2,
    vocab_size: int = 100,
    image_size: int = 32,
    patch_size: int = 8,
    gate_value: Optional[float] = 0.5,
    seed: int = 0,
    intermediate_size: Optional[int] = None,
    lm_config: Optional[dict] = None,
):
    """A random-weight OpenFlamingo ``Flamingo`` (real class) on a small Hugging Face LM built from a config.

    Token ids: ``vocab_size - 1`` is ``<image>``, ``vocab_size - 2`` is ``<|endofchunk|>``. ``gate_value`` sets the
    tanh gates (upstream initialises them to 0, which would make cross-attention invisible in the logits).
    ``intermediate_size`` is the LM's MLP width (default ``2 * hidden_size``); ``lm_config`` holds further
    config fields of the LM (e.g. ``tie_word_embeddings``). The LM's decoder layers must sit at ``model.layers``
    (``llama``, ``phi``, ``mistral``, ...).
    Returns ``(model, media_token_id, eoc_token_id)``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    of = load_open_flamingo()
    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        lm,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2 if intermediate_size is None else intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=4096,
        **(lm_config or {}),
    )
    lang = AutoModelForCausalLM.from_config(config)
    of.extend_instance(lang, of.FlamingoLMMixin)
    lang.set_decoder_layers_attr_name("model.layers")
    media_token_id, eoc_token_id = vocab_size - 1, vocab_size - 2
    model = of.Flamingo(
        _VisualWrapper(TinyVisionEncoder(vis_dim, image_size, patch_size)),
        lang,
        eoc_token_id=eoc_token_id,
        media_token_id=media_token_id,
        vis_dim=vis_dim,
        cross_attn_every_n_layers=cross_attn_every_n_layers,
    )
    if gate_value is not None:
        with torch.no_grad():
            for block in model.lang_encoder.gated_cross_attn_layers:
                if block is not None:
                    block.attn_gate.fill_(gate_value)
                    block.ff_gate.fill_(gate_value)
    model.eval()
    return model, media_token_id, eoc_token_id


class TinyImageEncoder(nn.Module):
    """Stands in for flamingo-pytorch's image encoder: (images, 3, H, W) -> (images, patches, dim)."""

    def __init__(self, dim: int, patch_size: int = 8):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, patch_size)

    def forward(self, images):
        return self.proj(images).flatten(2).transpose(1, 2)


def tiny_flamingo_palm(*, immediate: bool = True, gate_values=(0.6, -0.4), seed: int = 0):
    """A random-weight flamingo-pytorch 0.1.2 ``FlamingoPaLM`` (real class) at toy sizes: width 32, 4 layers with a
    gated cross-attention block every 2, 16 x 16 images of 4 patches, 6 latents, up to 3 video frames. Token 3 is
    the media token. ``gate_values``: the (attention, feed-forward) tanh gates (upstream initialises them to 0)."""
    from flamingo_pytorch import FlamingoPaLM

    torch.manual_seed(seed)
    model = FlamingoPaLM(
        dim=32, num_tokens=50, depth=4, dim_head=8, heads=4, cross_attn_every=2, media_token_id=3,
        img_encoder=TinyImageEncoder(32), perceiver_num_latents=6, perceiver_depth=2, max_video_frames=3,
        only_attend_immediate_media=immediate,
    )
    with torch.no_grad():
        for _, block in model.layers:
            if block is not None:
                block.attn_gate.fill_(gate_values[0])
                block.ff_gate.fill_(gate_values[1])
    return model.eval()


def idefics_config(hidden=64, heads=4, vision=32, alpha_type="vector", qk=True, qk_perceiver=True, attn="eager",
                   **kw):
    """A transformers ``IdeficsConfig`` at toy sizes: 4 layers with a gated cross-attention layer every 2, 32 x 32
    images of 16 patches, a resampler of 8 latents; further ``IdeficsConfig`` fields through ``kw``."""
    from transformers import IdeficsConfig

    kw.setdefault("alpha_initializer", "normal" if alpha_type == "vector" else "ones")
    cfg = IdeficsConfig(
        vocab_size=100,
        additional_vocab_size=2,
        hidden_size=hidden,
        intermediate_size=kw.pop("intermediate_size", 96),
        num_hidden_layers=kw.pop("num_hidden_layers", 4),
        num_attention_heads=heads,
        cross_layer_interval=2,
        qk_layer_norms=qk,
        alpha_type=alpha_type,
        alphas_initializer_range=1.0,
        use_resampler=kw.pop("use_resampler", True),
        vision_config=dict(embed_dim=vision, image_size=32, patch_size=8, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64),
        perceiver_config=dict(use_resampler=True, resampler_n_latents=8, resampler_depth=2, resampler_n_heads=2,
                              resampler_head_dim=16, qk_layer_norms_perceiver=qk_perceiver),
        **kw,
    )
    cfg._attn_implementation = attn
    return cfg


def tiny_idefics(cls=None, *, seed: int = 0, **config):
    """A random-weight transformers IDEFICS model (``cls``: ``IdeficsForVisionText2Text``, the default, or
    ``IdeficsModel``) of :func:`idefics_config` (SDPA attention unless ``attn`` says otherwise), in eval mode."""
    if cls is None:
        from transformers import IdeficsForVisionText2Text as cls

    config.setdefault("attn", "sdpa")
    torch.manual_seed(seed)
    return cls(idefics_config(**config)).eval()


def idefics2_config(hidden=64, heads=4, kv_heads=2, head_dim=16, latents=8, depth=2, attn="sdpa", **kw):
    """A transformers ``Idefics2Config`` at toy sizes: a 2-layer vision tower on 32 x 32 images of 8 x 8 patches
    (16 patches), a perceiver of ``depth`` layers with ``latents`` latents and GQA ``heads`` / ``kv_heads``, a
    2-layer Mistral; token ids: 0 pad, 1 bos, 2 eos, 98 the image token; further fields through ``kw``."""
    from transformers import Idefics2Config

    text = dict(vocab_size=100, hidden_size=hidden, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                max_position_embeddings=256)
    text.update(kw.pop("text_config", {}))
    cfg = Idefics2Config(
        image_token_id=98,
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        perceiver_config=dict(hidden_size=hidden, rms_norm_eps=1e-5, resampler_n_latents=latents,
                              resampler_depth=depth, resampler_n_heads=heads, resampler_head_dim=head_dim,
                              num_key_value_heads=kv_heads),
        text_config=dict(model_type="mistral", **text),
        **kw,
    )
    cfg._attn_implementation = attn
    for sub in (cfg.vision_config, cfg.perceiver_config, cfg.text_config):
        sub._attn_implementation = attn
    return cfg


def tiny_idefics2(cls=None, *, seed: int = 0, **config):
    """A random-weight transformers Idefics2 model (``cls``: ``Idefics2ForConditionalGeneration``, the default,
    ``Idefics2Model``) of :func:`idefics2_config`, in eval mode; the perceiver latents are drawn at random
    (upstream initialises them to ones, which makes every latent the same)."""
    if cls is None:
        from transformers import Idefics2ForConditionalGeneration as cls

    torch.manual_seed(seed)
    model = cls(idefics2_config(**config)).eval()
    for module in model.modules():
        if type(module).__name__ == "Idefics2PerceiverResampler":
            with torch.no_grad():
                module.latents.normal_()
    return model


def evenly_spaced_media_locations(batch: int, num_text: int, num_media: int, first: int = 0, device="cpu"):
    """Boolean (batch, text) with ``num_media`` ``<image>`` positions spread evenly from ``first``."""
    locations = torch.zeros(batch, num_text, dtype=torch.bool, device=device)
    if num_media:
        positions = torch.linspace(first, num_text - 1, num_media + 1)[:-1].long()
        locations[:, positions] = True
    return locations


def random_media_locations(batch: int, num_text: int, num_media: int, generator=None, device="cpu"):
    """Boolean (batch, text) with up to ``num_media`` ``<image>`` positions per sample at random places (a sample
    may get fewer: padded images)."""
    locations = torch.zeros(batch, num_text, dtype=torch.bool)
    for b in range(batch):
        count = int(torch.randint(0, num_media + 1, (1,), generator=generator))
        if count and num_text:
            positions = torch.randperm(num_text, generator=generator)[: min(count, num_text)]
            locations[b, positions] = True
    return locations.to(device)


def tiny_mllama(attn_implementation: str = "eager", *, image_size: int = 28, patch_size: int = 14,
                max_num_tiles: int = 4, hidden_size: int = 64, num_heads: int = 8, num_kv_heads: int = 2,
                intermediate_size: int = 96, cross_attention_layers=(1, 3), num_layers: int = 4, vocab_size: int = 100,
                gate: Optional[float] = 0.6, seed: int = 0):
    """A random-weight transformers ``MllamaForConditionalGeneration`` (Llama 3.2 Vision) at toy sizes, in eval
    mode: (560 / 14)^2 + 1 = 1601 vision tokens per tile become ``(image_size / patch_size)^2 + 1`` (5 by default),
    aspect ratios 1 x n (``aspect_ratio_id`` n for n tiles). ``gate``: value of every cross-attention tanh gate (upstream initialises them to
    0, which would hide the cross-attention layers); None keeps the initialisation. Token ids: 0 pad, 1 bos, 2 eos,
    ``vocab_size - 1`` the image token."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    aspect_ratios = [[1, t] for t in range(1, max_num_tiles + 1)]  # n tiles: aspect_ratio_id n
    config = MllamaConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                           intermediate_size=64, image_size=image_size, patch_size=patch_size,
                           max_num_tiles=max_num_tiles, intermediate_layers_indices=[0, 1], vision_output_dim=96,
                           supported_aspect_ratios=aspect_ratios),
        text_config=dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                         intermediate_size=intermediate_size, cross_attention_layers=list(cross_attention_layers),
                         bos_token_id=1, eos_token_id=2, pad_token_id=0),
        image_token_index=vocab_size - 1,
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(config).eval()
    if gate is not None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                    param.fill_(gate)
    return model


def evolla_config(hidden_size: int = 32, num_layers: int = 4, aligner_every: int = 2, protein_hidden: int = 32,
                  **kw):
    """A transformers ``EvollaConfig`` at toy sizes: a 2-layer SaProt encoder of width ``protein_hidden``, a 2-layer
    compressor of 8 latents, a Llama decoder of ``num_layers`` layers with an aligner after every ``aligner_every``
    (GQA 4 / 2 heads). Token ids: 0 pad, 1 bos, 2 eos. Further ``EvollaConfig`` fields through ``kw``."""
    from transformers import EvollaConfig

    protein = dict(vocab_size=446, hidden_size=protein_hidden, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=2 * protein_hidden, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    protein.update(kw.pop("protein_encoder_config", {}))
    fields = dict(vocab_size=100, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                  aligner_num_add_layers=num_layers // aligner_every, resampler_depth=2, resampler_dim_head=8,
                  resampler_heads=4, resampler_num_latents=8, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    fields.update(kw)
    return EvollaConfig(protein_encoder_config=protein, **fields)


def tiny_evolla(cls=None, *, gate: Optional[float] = 0.6, seed: int = 0, **config):
    """A random-weight transformers ``EvollaForProteinText2Text`` (or ``cls``, e.g. ``EvollaModel``) of
    :func:`evolla_config`, in eval mode. ``gate``: value of every aligner tanh gate (upstream initialises them to 0,
    which would hide the aligners); None keeps the initialisation."""
    if cls is None:
        from transformers import EvollaForProteinText2Text as cls

    torch.manual_seed(seed)
    model = cls(evolla_config(**config)).eval()
    if gate is not None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(("gate_attention", "gate_ffw")):
                    param.fill_(gate)
    return model


# one builder per registered family (fastflamingo.models.FAMILIES): each returns a tiny upstream model in eval mode
TINY_MODELS = {
    "openflamingo": lambda: tiny_open_flamingo()[0],
    "flamingo_pytorch": tiny_flamingo_palm,
    "idefics": tiny_idefics,
    "mllama": tiny_mllama,
    "idefics2": tiny_idefics2,
    "evolla": tiny_evolla,
}


def tiny_model(family: str) -> nn.Module:
    """A tiny random-weight upstream model of the registered family ``family`` (``fastflamingo.models.names()``),
    in eval mode: what ``fastflamingo.patch`` and ``fastflamingo.warmup`` are tried on for every family."""
    from .models import names

    if family not in names():
        raise ValueError(f"family={family!r}; expected one of {names()}")
    if family not in TINY_MODELS:
        raise NotImplementedError(f"fastflamingo.testing has no tiny model of the family {family!r} (TINY_MODELS)")
    return TINY_MODELS[family]()
