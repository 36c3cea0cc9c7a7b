"""Distributed training tier: 2 CPU processes on localhost (gloo), bounded in time.

A tiny patched OpenFlamingo and IDEFICS train 3 AdamW steps under DDP, under FSDP2 (``fully_shard``) and under
FSDP2 with the model built on the meta device (``to_empty`` + load). Rank 1's batch has no image. Every run must
give the losses and gradients of one process training on both ranks' batches, patched and unpatched (see
distributed_tier.py). Before drop-ins gave every parameter upstream touches a gradient, the imageless rank left
``to_q`` without one and DDP raised "Expected to have finished reduction" (or hung).
"""
import os
import time

import pytest
import torch
import torch.multiprocessing as mp

import distributed_tier as tier

pytest.importorskip("transformers")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

DEADLINE_S = 240  # spawn + import + 3 scenarios x 3 steps take ~20 s; a hang must not stall the suite


def _spawn(family: str, tmp_path) -> dict:
    store = str(tmp_path / "store")
    context = mp.start_processes(tier.worker, args=(family, store, str(tmp_path)), nprocs=tier.WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the {tier.WORLD} processes did not finish within {DEADLINE_S} s (a collective hung)")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
    errors = []
    for rank in range(tier.WORLD):
        path = tmp_path / f"rank{rank}.pt"
        if os.path.exists(path):
            result = torch.load(path, weights_only=False)
            if "error" in result:
                errors.append(f"rank {rank} raised:\n{result['error']}")
    if errors:
        pytest.fail("\n".join(errors))
    return torch.load(tmp_path / "rank0.pt", weights_only=False)


def _assert_same_training(got: dict, expected: dict, what: str) -> None:
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(expected["losses"]), rtol=1e-5, atol=0,
                               msg=lambda m: f"{what}: losses differ\n{m}")
    for step, (grads, ref) in enumerate(zip(got["grads"], expected["grads"])):
        assert grads.keys() == ref.keys(), what
        missing = sorted(n for n, g in grads.items() if g is None)
        assert missing == sorted(n for n, g in ref.items() if g is None), f"{what}: no gradient for {missing}"
        # gradients that are rounding noise around an analytically zero value (Adam then amplifies the noise into
        # weight differences of size lr) are compared against the step's largest gradient
        largest = max(g.abs().max().item() for g in ref.values() if g is not None)
        for name, g in ref.items():
            if g is not None:
                torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5 * largest,
                                           msg=lambda m: f"{what}: step {step} gradient of {name}\n{m}")


@pytest.mark.parametrize("family", ["open_flamingo", "idefics"])
def test_ddp_and_fsdp2_match_one_process_with_an_imageless_rank(family, tmp_path):
    if family == "open_flamingo":
        pytest.importorskip("einops_exts")
    torch.set_num_threads(1)
    results = _spawn(family, tmp_path)
    upstream = tier.one_process(family, patched=False)
    patched = tier.one_process(family, patched=True)
    _assert_same_training(patched, upstream, "one process, patched vs unpatched")
    assert all(g is not None for g in upstream["grads"][0].values())  # upstream gives every parameter a gradient
    for scenario in ("ddp", "fsdp2", "fsdp2-meta"):
        _assert_same_training(results[scenario], upstream, f"{scenario} (2 processes) vs one unpatched process")
