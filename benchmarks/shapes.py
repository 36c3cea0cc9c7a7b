"""Model shapes and the shot/text axes of docs/performance.md, "Benchmark matrix", shared by the op modules.

Presets (heads x head_dim of the cross-attention, latents per image, LM width, vision width):

- ``cpu``: the issue-2 CPU cells: 8 x 64, dim 1024, visual dim 1024 (OpenFlamingo cross-attention at a CPU size);
- ``of``: OpenFlamingo-9B (MPT-7B + ViT-L/14): 8 x 64, dim 4096, visual 1024, 256 patches per image;
- ``idefics``: IDEFICS-80B (LLaMA-65B + ViT-H/14): 64 x 128, dim 8192, visual 1280, 257 patches per image;
- ``tiny``: toy sizes for ``--dry-run`` (same code paths, seconds on a laptop CPU).

The Perceiver resamplers (``PERCEIVERS``), the gated layers of the decode op (``DECODE_LAYERS``) and the axes of each
follow below.
"""
from __future__ import annotations

import torch

MODELS = {
    "cpu": dict(heads=8, head_dim=64, latents=64, dim=1024, dim_visual=1024, patches=256),
    "of": dict(heads=8, head_dim=64, latents=64, dim=4096, dim_visual=1024, patches=256),
    "idefics": dict(heads=64, head_dim=128, latents=64, dim=8192, dim_visual=1280, patches=257),
    "tiny": dict(heads=2, head_dim=16, latents=8, dim=64, dim_visual=48, patches=12),
}

SHOTS = (0, 4, 8, 16, 32)
CPU_TEXT = 2048
DIAGONAL = ((0, 512), (4, 512), (8, 1024), (16, 2048), (32, 4096))  # (shots, text tokens)
TEXTS = (512, 1024, 2048, 4096)
BATCHES = (1, 4, 16)
MODES = ("immediate", "all_previous")
MODE_SHORT = {"immediate": "imm", "all_previous": "prev"}

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def media_locations(batch: int, text: int, num_media: int, first_frac: float, device) -> torch.Tensor:
    """Evenly spaced ``<image>`` tokens (fastflamingo.testing), the first one after ``first_frac`` of the text
    (0 = the prompt starts with an image; > 0 leaves text that sees no media, which exercises the zero rows)."""
    from fastflamingo.testing import evenly_spaced_media_locations

    return evenly_spaced_media_locations(batch, text, num_media, first=int(first_frac * text), device=device)


def tiny_params(params: dict) -> dict:
    """Shrink a case to dry-run size, keeping shots, mode and the model-independent structure."""
    out = dict(params)
    out.update(**MODELS["tiny"])
    out["model"] = f"tiny-{params.get('model', '')}"  # keeps the cells of different models apart
    out["batch"] = min(params.get("batch", 1), 2)
    if "text" in params:
        out["text"] = min(params["text"], 16 * (params.get("shots", 0) + 1) + 8)
    out.setdefault("first_frac", 0.1)
    out["first_frac"] = 0.1  # exercise the rows that see no media
    return out


# The Perceiver resamplers (docs/performance.md, matrix row B) of the perceiver_attn, resampler and idefics_block
# ops: heads x head_dim of its attention, media tokens per image, latents, vision width, layers; ``tiny``: --dry-run.
PERCEIVERS = {
    "of": dict(heads=8, head_dim=64, tokens=256, latents=64, width=1024, depth=6),
    "idefics": dict(heads=16, head_dim=96, tokens=257, latents=64, width=1280, depth=6),
    "tiny": dict(heads=2, head_dim=16, tokens=9, latents=5, width=32, depth=2),
}


def perceiver_params(model: str, batch: int, shots: int, **extra) -> dict:
    """A case's params: ``model``'s resampler (``PERCEIVERS``), ``batch`` samples of ``shots + 1`` images each."""
    return dict(model=model, batch=batch, shots=shots, **PERCEIVERS[model], **extra)


def tiny_perceiver_params(params: dict) -> dict:
    """The same case with the ``tiny`` resampler and one sample, named ``tiny-<model>``."""
    return dict(params, model="tiny-" + params["model"].replace("tiny-", ""), batch=1, **PERCEIVERS["tiny"])


# One gated cross-attention layer for the decode op (issue 6): the layer's own sizes beside the attention shape.
#
# - ``of3b``: OpenFlamingo-3B's ``GatedCrossAttentionBlock`` (MPT-1B width 2048, ViT-L/14 1024, 8 x 64, ff_mult 4);
# - ``of9b``: OpenFlamingo-9B's (MPT-7B width 4096);
# - ``idefics9b``: IDEFICS-9B's ``IdeficsGatedCrossAttentionLayer`` (LLaMA-7B: 4096 = 32 x 128, MLP 11008; ViT-H/14
#   1280), the real layer size (transformers' ``IdeficsConfig`` defaults, no qk norms);
# - ``idefics80b``: IDEFICS-80B's (LLaMA-65B: 8192 = 64 x 128, MLP 22016, qk norms);
# - ``tiny-of`` / ``tiny-idefics``: ``--dry-run`` sizes.
DECODE_LAYERS = {
    "of3b": dict(family="of", heads=8, head_dim=64, latents=64, dim=2048, dim_visual=1024, ff_mult=4),
    "of9b": dict(family="of", heads=8, head_dim=64, latents=64, dim=4096, dim_visual=1024, ff_mult=4),
    "idefics9b": dict(family="idefics", heads=32, head_dim=128, latents=64, dim=4096, dim_visual=1280,
                      intermediate=11008, qk_norms=False),
    "idefics80b": dict(family="idefics", heads=64, head_dim=128, latents=64, dim=8192, dim_visual=1280,
                       intermediate=22016, qk_norms=True),
    "tiny-of": dict(family="of", heads=2, head_dim=16, latents=8, dim=64, dim_visual=48, ff_mult=2),
    "tiny-idefics": dict(family="idefics", heads=2, head_dim=16, latents=8, dim=32, dim_visual=48, intermediate=64,
                         qk_norms=True),
}
DECODE_SHOTS = (0, 4, 32)
DECODE_BATCHES = (1, 16)
