"""``fastflamingo.warmup``: finds what a model will launch and runs it ahead of time, without touching the model.

Under the Triton interpreter the kernels run on CPU tensors, so the discovery, the calls and the autotune keys they
settle are checked on any machine; compile counts only mean something on a GPU (where the same test runs natively).
"""
import pytest
import torch

import fastflamingo
from fastflamingo.models.openflamingo import modules

pytestmark = pytest.mark.triton


def test_warmup_settles_every_bucket_and_leaves_the_model_alone(device, monkeypatch):
    from fastflamingo.kernels import gated_linear, media_xattn

    torch.manual_seed(0)
    block = modules.GatedCrossAttentionBlock(dim=32, dim_visual=24, dim_head=16, heads=2).to(device)
    state = {k: v.clone() for k, v in block.state_dict().items()}
    # empty choosers (other tests of this process settle keys too): every key below is one warmup settled
    for chooser in (media_xattn.FWD_CHOOSER, gated_linear.FWD_CHOOSER):
        monkeypatch.setattr(chooser, "cache", {})
        monkeypatch.setattr(chooser, "sources", {})
    report = fastflamingo.warmup(block, max_text=32, max_media=2, latents=8, backward=False)
    assert report.calls > 0 and not report.skipped, report
    new = set(media_xattn.FWD_CHOOSER.cache)
    # (head_dim, latents, immediate, dtype, text class, media class): every text x media class up to the limits
    # (text 1..32: the class of 64; media 1 and 2: the classes of 1 and 8)
    assert {(k[4], k[5]) for k in new if k[:4] == (16, 8, True, torch.float32)} >= {(64, 1), (64, 8)}
    rows = {k[0] for k in gated_linear.FWD_CHOOSER.cache}
    # the fused GEMM's row class 17..128 (up to 16 rows the gated projection takes its cuBLAS or split-K form,
    # which have fixed configs: nothing to settle)
    assert 128 in rows
    assert all(torch.equal(v, state[k]) for k, v in block.state_dict().items())
    assert all(p.grad is None for p in block.parameters())
    assert "op calls" in str(report)


def test_class_sizes_reach_every_class_once():
    from fastflamingo.models._warm import class_sizes
    from fastflamingo.kernels._utils import size_class

    bounds = (16, 128, 1024)
    for limit in (1, 15, 16, 17, 128, 500, 1024, 5000):
        for per in (1, 3):
            sizes = class_sizes(limit, bounds, per)
            classes = [size_class(s * per, bounds) for s in sizes]
            reached = {size_class(n * per, bounds) for n in range(1, limit + 1)}
            assert sorted(classes) == sorted(reached) and max(sizes) == limit, (limit, per, sizes)


def test_warmup_on_cpu_without_the_interpreter_does_nothing(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    report = fastflamingo.warmup(modules.MaskedCrossAttention(dim=16, dim_visual=16, dim_head=8, heads=2))
    assert report.skipped and "cpu" in report.skipped and report.calls == 0
