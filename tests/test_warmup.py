"""``fastflamingo.warmup``: finds what a model will launch and runs it ahead of time, without touching the model.

Under the Triton interpreter the kernels run on CPU tensors, so the discovery, the calls and the autotune keys they
settle are checked on any machine; compile counts only mean something on a GPU (where the same test runs natively).
"""
import pytest
import torch

import fastflamingo
from fastflamingo import modules

pytestmark = pytest.mark.triton


def test_warmup_settles_every_bucket_and_leaves_the_model_alone(device):
    from fastflamingo.kernels import gated_linear, media_xattn

    torch.manual_seed(0)
    block = modules.GatedCrossAttentionBlock(dim=32, dim_visual=24, dim_head=16, heads=2).to(device)
    state = {k: v.clone() for k, v in block.state_dict().items()}
    before_xattn = set(media_xattn.FWD_CHOOSER.cache)
    before_gate = set(gated_linear.FWD_CHOOSER.cache)
    report = fastflamingo.warmup(block, max_text=32, max_media=2, latents=8, backward=False)
    assert report.calls > 0 and not report.skipped, report
    new = set(media_xattn.FWD_CHOOSER.cache) - before_xattn
    # (head_dim, latents, immediate, dtype, text bucket, media bucket): every text x media bucket up to the limits
    assert {(k[4], k[5]) for k in new if k[:4] == (16, 8, True, torch.float32)} >= {(16, 1), (32, 1), (16, 2), (32, 2)}
    rows = {k[0] for k in set(gated_linear.FWD_CHOOSER.cache) - before_gate}
    assert {16, 32} <= rows  # rows buckets of both gated projections (decode's single row too, bucket 1)
    assert all(torch.equal(v, state[k]) for k, v in block.state_dict().items())
    assert all(p.grad is None for p in block.parameters())
    assert "op calls" in str(report)


def test_warmup_on_cpu_without_the_interpreter_does_nothing(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    report = fastflamingo.warmup(modules.MaskedCrossAttention(dim=16, dim_visual=16, dim_head=8, heads=2))
    assert report.skipped and "cpu" in report.skipped and report.calls == 0
