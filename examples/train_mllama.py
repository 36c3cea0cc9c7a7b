"""Fine-tune Llama 3.2 Vision (transformers' mllama) with transformers' ``Trainer`` and fastflamingo patched in.

The recipe (docs/training.md explains each step):

1. load the model: here a tiny random ``MllamaForConditionalGeneration``, saved to OUT/base and loaded back with
   ``from_pretrained`` (no Hub);
2. ``fastflamingo.patch(model)``, before anything else wraps or rebinds the model (the Trainer, peft, Liger);
3. activation checkpointing: ``model.activation_checkpointing_enable()`` (transformers 5.25 deprecates the old name
   ``gradient_checkpointing_enable()``, which older releases have instead);
4. LoRA with peft (when installed) on the language model's attention and MLP projections, cross layers included;
5. ``Trainer`` for a few steps (fp32, fixed seed, no dropout); with ``--liger`` the Trainer applies Liger-Kernel
   (``use_liger_kernel``) when training starts, which is after the patch;
6. ``merge_and_unload()`` and ``save_pretrained``: the checkpoint has upstream's keys and loads into an unpatched
   model; the LoRA adapter alone is saved too (OUT/adapter).

    python examples/train_mllama.py OUT [--steps 6] [--no-patch] [--no-lora] [--liger] [--seed 0]

prints one line per step (``step N loss X``) and writes OUT/losses.json. ``--no-patch`` runs the same recipe on the
unpatched model: the losses agree within 1e-5 (tests/test_trainer_recipe.py).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

import fastflamingo

# The language model's projections LoRA adapts (peft matches the whole module name against this pattern): the
# self-attention and cross-attention projections and the SwiGLU MLP of every text layer; not the vision tower.
LORA_TARGETS = r".*language_model\.layers\.\d+\.(self_attn|cross_attn|mlp)\.(q|k|v|o|gate|up|down)_proj"
# Liger-Kernel 0.8.5's default fused linear cross-entropy binds a MllamaForCausalLM forward to a
# MllamaForConditionalGeneration, which then fails on every call (tests/test_liger.py): keep it off
LIGER_CONFIG = {"fused_linear_cross_entropy": False}
IMAGE_SIZE, MAX_TILES = 28, 2


@dataclass
class Result:
    losses: List[float]                  # training loss of every step
    model: torch.nn.Module               # the trained model (LoRA merged in), in eval mode
    lora_modules: List[str] = field(default_factory=list)       # modules peft wrapped with LoRA
    lora_weights: Dict[str, torch.Tensor] = field(default_factory=dict)  # trained LoRA A/B, before the merge
    patch_report: Optional[fastflamingo.PatchReport] = None


def build_base(path: Path, seed: int) -> Path:
    """A tiny random Llama 3.2 Vision checkpoint at ``path`` (made once): cross-attention layers 1 and 3 of 4, their
    tanh gates at 0.6 (upstream initialises them to 0, which would hide the cross layers), 2 tiles per image."""
    if not (path / "config.json").is_file():
        from fastflamingo.testing import tiny_mllama

        tiny_mllama("sdpa", num_heads=4, max_num_tiles=MAX_TILES, seed=seed).save_pretrained(path)
    return path


def make_samples(config, num_samples: int, seed: int) -> List[Dict[str, torch.Tensor]]:
    """Training samples built as ``MllamaProcessor`` builds them, minus the tokenizer (random token ids): pixels,
    aspect ratios and tiles from ``MllamaImageProcessorPil``, the cross-attention mask from the processor's own
    functions. Every other sample has text before its image (rows that see no image); pads and the image token are
    not predicted (label -100)."""
    from transformers import MllamaImageProcessorPil
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    rng = np.random.default_rng(seed)
    image_token, pad, length = config.image_token_index, config.text_config.pad_token_id, 12
    processor = MllamaImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, max_image_tiles=MAX_TILES)
    samples = []
    for i in range(num_samples):
        text = rng.integers(3, image_token, size=length - 1 - i % 3).tolist()
        before = 0 if i % 2 == 0 else 3
        ids = text[:before] + [image_token] + text[before:]
        ids += [pad] * (length - len(ids))
        # wide images are cut into 2 tiles (aspect ratio 1 x 2), square ones into 1
        width = IMAGE_SIZE * (2 if i % 2 == 0 else 1)
        image = rng.integers(0, 256, size=(IMAGE_SIZE, width, 3), dtype=np.uint8)
        pixels = processor([[image]], return_tensors="pt")
        mask = convert_sparse_cross_attention_mask_to_dense(
            [get_cross_attention_token_mask(ids, image_token)], pixels["num_tiles"], MAX_TILES, length)
        input_ids = torch.tensor(ids)
        samples.append(dict(
            input_ids=input_ids,
            attention_mask=(input_ids != pad).long(),
            pixel_values=pixels["pixel_values"][0],
            aspect_ratio_ids=pixels["aspect_ratio_ids"][0],
            aspect_ratio_mask=pixels["aspect_ratio_mask"][0],
            cross_attention_mask=torch.from_numpy(mask[0]),
            labels=input_ids.masked_fill((input_ids == pad) | (input_ids == image_token), -100),
        ))
    return samples


def _peft_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("peft") is not None


def _enable_activation_checkpointing(model) -> None:
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def train(out: Path, *, steps: int = 6, patch: bool = True, lora: Optional[bool] = None, liger: bool = False,
          seed: int = 0, learning_rate: float = 2e-3, num_samples: int = 2, base: Optional[Path] = None,
          before_training: Optional[Callable[[torch.nn.Module], None]] = None) -> Result:
    """The recipe, writing to ``out``. ``lora=None``: LoRA when peft is installed, full fine-tuning otherwise.
    ``base``: the checkpoint to start from (default: a tiny random one made in OUT/base). ``before_training`` is
    called with the model the Trainer gets (hooks, checks). Two samples and a batch of two: every step sees the same
    batch, so the loss falls step by step."""
    from transformers import MllamaForConditionalGeneration, Trainer, TrainingArguments, default_data_collator
    from transformers import set_seed

    if lora is None:
        lora = _peft_available()
    if lora and not _peft_available():
        raise RuntimeError("lora=True needs peft: pip install peft")
    if liger and not torch.cuda.is_available():
        raise RuntimeError("liger=True needs a CUDA device: Liger-Kernel's kernels are Triton kernels "
                           "(tests/test_liger.py runs them under the Triton interpreter on CPU)")
    out = Path(out)
    base = build_base(Path(base) if base is not None else out / "base", seed)
    model = MllamaForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    report = fastflamingo.patch(model) if patch else None
    _enable_activation_checkpointing(model)
    lora_modules: List[str] = []
    if lora:
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora import LoraLayer

        set_seed(seed)  # LoRA's A matrices are drawn here: the same draw with and without the patch
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS))
        base_model = model.get_base_model()
        lora_modules = sorted(n for n, m in base_model.named_modules() if isinstance(m, LoraLayer))
    args = TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=steps, per_device_train_batch_size=2, learning_rate=learning_rate,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, seed=seed, data_seed=seed, dataloader_num_workers=0,
        remove_unused_columns=False,  # pixel_values & co. are not in PeftModel.forward's signature
        dataloader_pin_memory=torch.cuda.is_available(),
        use_liger_kernel=liger, liger_kernel_config=LIGER_CONFIG if liger else None,
    )
    if before_training is not None:
        before_training(model)
    trainer = Trainer(model=model, args=args, train_dataset=make_samples(model.config, num_samples, seed),
                      data_collator=default_data_collator)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    lora_weights = {}
    if lora:
        lora_weights = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        model.save_pretrained(out / "adapter")
        model = model.merge_and_unload()
    model.eval()
    model.save_pretrained(out / "merged")
    (out / "losses.json").write_text(json.dumps({"patch": patch, "lora": lora, "liger": liger, "losses": losses}))
    return Result(losses, model, lora_modules, lora_weights, report)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for the base checkpoint, the adapter and the merged model")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-patch", action="store_true", help="the same recipe on the unpatched model")
    parser.add_argument("--no-lora", action="store_true", help="full fine-tuning even when peft is installed")
    parser.add_argument("--liger", action="store_true", help="Liger-Kernel through the Trainer (CUDA only)")
    args = parser.parse_args(argv)
    result = train(args.out, steps=args.steps, patch=not args.no_patch, lora=False if args.no_lora else None,
                   liger=args.liger, seed=args.seed)
    if result.patch_report is not None:
        print(result.patch_report)
    for step, loss in enumerate(result.losses, 1):
        print(f"step {step} loss {loss:.6f}")
    print(f"merged model saved to {args.out / 'merged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
