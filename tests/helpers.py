"""Comparison helpers shared by the tests."""
import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| relative to max |expected| (absolute when the reference is all zeros)."""
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    diff = (actual - expected).abs().max().item() if expected.numel() else 0.0
    return diff / scale if scale > 0 else diff


def assert_close(actual, expected, rtol, name=""):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(actual).any(), f"{name}: NaN in result"
    err = rel_err(actual, expected)
    assert err <= rtol, f"{name}: relative error {err:.3g} > {rtol:.3g}"


def assert_lowp_close(lowp, ref32, upstream_lowp, name="", atol=1e-3):
    """FlashAttention's criterion: our low-precision error against the fp32 reference is at most twice the
    upstream implementation's own low-precision error, plus a small absolute tolerance."""
    assert not torch.isnan(lowp).any(), f"{name}: NaN in result"
    ours = (lowp.double() - ref32.double()).abs().max().item()
    theirs = (upstream_lowp.double() - ref32.double()).abs().max().item()
    # plus a few units in the last place of the largest value: a reduction to one element (a gate's gradient) is
    # a single rounded number, where "twice upstream's error" can be twice one lucky rounding
    ulps = 4 * torch.finfo(lowp.dtype).eps * ref32.abs().max().item()
    bound = 2 * theirs + atol + ulps
    assert ours <= bound, f"{name}: error {ours:.3g} > 2 x upstream's {theirs:.3g} + {atol} + 4 ulp ({ulps:.3g})"


def grads_of(module, *inputs):
    """Gradients of every input that requires grad, then of every parameter, by name."""
    out = {f"input{i}": t.grad for i, t in enumerate(inputs) if isinstance(t, torch.Tensor) and t.requires_grad}
    out.update({name: p.grad for name, p in module.named_parameters()})
    return out
