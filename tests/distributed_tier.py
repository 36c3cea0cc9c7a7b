"""Shared by tests/test_distributed.py and the processes it spawns: tiny models, per-rank batches and the training
loop, run the same way in one process (the oracle) and in two gloo processes under DDP or FSDP2.

Every global batch has 4 samples; rank r trains on samples 2r and 2r + 1, and rank 1's samples have no image (no
``<image>`` token / an all-zero image mask, images zero-padded), as interleaved data often has. The one-process
oracle computes the mean of the two ranks' losses, which is what DDP's gradient averaging and FSDP's
reduce-scatter compute.
"""
from __future__ import annotations

import os
import traceback
from datetime import timedelta

import torch

import fastflamingo

WORLD = 2
STEPS = 3
LR = 1e-3


# --------------------------------------------------------------------------------------------------------------
# models and data
# --------------------------------------------------------------------------------------------------------------


def _idefics_config():
    from transformers import IdeficsConfig

    config = IdeficsConfig(
        vocab_size=100, additional_vocab_size=0, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, cross_layer_interval=1, qk_layer_norms=True, alpha_type="vector",
        alpha_initializer="zeros", use_resampler=True,
        vision_config=dict(embed_dim=16, image_size=16, patch_size=8, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32),
        perceiver_config=dict(use_resampler=True, resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2,
                              resampler_head_dim=8, qk_layer_norms_perceiver=True),
    )
    config._attn_implementation = "eager"
    return config


def build(family: str, patched: bool, meta: bool = False) -> torch.nn.Module:
    """The tiny model with seed-0 weights (on the meta device when ``meta``; load :func:`reference_state` then).
    The gates / alphas are non-zero so the cross attention shows in the loss."""
    torch.manual_seed(0)
    with torch.device("meta") if meta else torch.device("cpu"):
        if family == "open_flamingo":
            from fastflamingo.testing import tiny_open_flamingo

            model, _, _ = tiny_open_flamingo(hidden_size=32, num_layers=2, num_heads=2, vis_dim=16, image_size=16,
                                             cross_attn_every_n_layers=1, vocab_size=64, gate_value=0.5)
            model.vision_encoder.requires_grad_(False)  # runs under no_grad upstream (frozen in OpenFlamingo)
        else:
            from transformers import IdeficsForVisionText2Text

            model = IdeficsForVisionText2Text(_idefics_config())
            if not meta:
                with torch.no_grad():
                    for name, p in model.named_parameters():
                        if "alpha" in name:
                            p.copy_(torch.linspace(-0.8, 0.8, p.numel()).view_as(p))
    if patched:
        fastflamingo.patch(model)
    return model.train()


def reference_state(family: str) -> dict:
    """Every tensor of the seed-0 model (persistent or not), to load into a meta-built one after ``to_empty``."""
    model = build(family, patched=False)
    state = dict(model.state_dict())
    state.update(dict(model.named_buffers()))
    return state


def batch(family: str, step: int) -> dict:
    """The global batch of ``step`` (4 samples): samples 2 and 3 (rank 1's) have no image."""
    g = torch.Generator().manual_seed(100 + step)
    num_text = 12
    if family == "open_flamingo":
        media, vocab = 63, 62  # tiny_open_flamingo(vocab_size=64): <image> = 63, <|endofchunk|> = 62
        ids = torch.randint(0, vocab, (4, num_text), generator=g)
        ids[0, [0, 6]] = media
        ids[1, [3]] = media
        vision_x = torch.randn(4, 2, 1, 3, 16, 16, generator=g)
        vision_x[1, 1] = 0
        vision_x[2:] = 0
        return dict(vision_x=vision_x, lang_x=ids, attention_mask=torch.ones_like(ids), labels=ids)
    ids = torch.randint(0, 100, (4, num_text), generator=g)
    image_mask = torch.zeros(4, num_text, 2, dtype=torch.long)
    image_mask[0, 2:7, 0] = 1
    image_mask[0, 7:, 1] = 1
    image_mask[1, 4:, 0] = 1
    pixels = torch.randn(4, 2, 3, 16, 16, generator=g)
    pixels[1, 1] = 0
    pixels[2:] = 0
    return dict(input_ids=ids, pixel_values=pixels, image_attention_mask=image_mask,
                attention_mask=torch.ones_like(ids), labels=ids)


def rank_batch(full: dict, rank: int) -> dict:
    return {k: v[2 * rank:2 * rank + 2] for k, v in full.items()}


def loss_of(model, inputs: dict) -> torch.Tensor:
    if "vision_x" in inputs:
        return model(inputs["vision_x"], inputs["lang_x"], attention_mask=inputs["attention_mask"],
                     labels=inputs["labels"]).loss
    return model(**inputs).loss


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def train(model, family: str, loss_fn) -> dict:
    """3 AdamW steps; ``loss_fn(model, global batch)`` returns the loss to backpropagate and the loss to report.
    Returns the losses and, per step, every gradient by name (None where a parameter got none)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    losses, grads = [], []
    for step in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        loss, reported = loss_fn(model, batch(family, step))
        loss.backward()
        losses.append(float(reported))
        grads.append({n: None if p.grad is None else _full(p.grad).detach().clone()
                      for n, p in model.named_parameters() if p.requires_grad})
        optimizer.step()
    return dict(losses=losses, grads=grads)


def one_process(family: str, patched: bool) -> dict:
    """The oracle: the mean of the two ranks' losses, in one process."""

    def loss_fn(model, full):
        loss = sum(loss_of(model, rank_batch(full, r)) for r in range(WORLD)) / WORLD
        return loss, loss.detach()

    return train(build(family, patched), family, loss_fn)


# --------------------------------------------------------------------------------------------------------------
# the spawned processes
# --------------------------------------------------------------------------------------------------------------


def _wrap(model, family: str, wrapper: str):
    if wrapper == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    if family == "open_flamingo":
        blocks = [model.perceiver] + [m for m in model.lang_encoder.gated_cross_attn_layers if m is not None] + list(
            model.lang_encoder.old_decoder_blocks)
    else:
        blocks = [model.model.perceiver_resampler, *model.model.gated_cross_attn_layers, *model.model.layers]
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def distributed(rank: int, family: str, wrapper: str, meta: bool) -> dict:
    """One rank's run under DDP or FSDP2; with ``meta`` the patched model is built on the meta device, sharded,
    then materialised with ``to_empty`` and loaded."""
    import torch.distributed as dist

    model = build(family, patched=True, meta=meta)
    model = _wrap(model, family, wrapper)
    if meta:
        from torch.distributed.tensor import DTensor, distribute_tensor

        model.to_empty(device="cpu")
        state = reference_state(family)
        # FSDP2's loading recipe: shard each full tensor as the parameter it goes into is sharded
        model.load_state_dict({
            name: distribute_tensor(state[name], t.device_mesh, t.placements) if isinstance(t, DTensor) else state[name]
            for name, t in model.state_dict().items()
        })
        with torch.no_grad():
            for name, buf in model.named_buffers():  # non-persistent buffers (rotary frequencies, position ids)
                buf.copy_(state[name])

    def loss_fn(model, full):
        loss = loss_of(model, rank_batch(full, rank))
        reported = loss.detach().clone()
        dist.all_reduce(reported)
        return loss, reported / WORLD

    result = train(model, family, loss_fn)
    # DDP's parameter names carry a "module." prefix
    result["grads"] = [{n.removeprefix("module."): g for n, g in step.items()} for step in result["grads"]]
    return result


def worker(rank: int, family: str, store: str, out_dir: str) -> None:
    """Entry point of each spawned process: every scenario of ``family``; rank 0 saves the results."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # localhost only
    results = {}
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                                timeout=timedelta(seconds=60))
        for name, wrapper, meta in (("ddp", "ddp", False), ("fsdp2", "fsdp2", False), ("fsdp2-meta", "fsdp2", True)):
            results[name] = distributed(rank, family, wrapper, meta)
            dist.barrier()
        dist.destroy_process_group()
    except Exception:
        results["error"] = traceback.format_exc()
    if rank == 0 or "error" in results:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
