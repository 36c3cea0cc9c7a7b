"""Comparison helpers shared by the tests (the one ``assert_close``; oracles live in ``fastflamingo.reference``)."""
import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| relative to max |expected| (absolute when the reference is all zeros)."""
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    diff = (actual - expected).abs().max().item() if expected.numel() else 0.0
    return diff / scale if scale > 0 else diff


def assert_close(actual, expected, rtol, name=""):
    """max |actual - expected| <= rtol * max |expected|, compared in float64 on the CPU. Shapes must match; a NaN
    anywhere (an element a kernel never wrote into a NaN-filled buffer) or an inf where the reference is finite
    fails; an all-zero reference (tokens that see nothing) demands exact zeros."""
    actual = actual.detach().to("cpu", torch.float64)
    expected = expected.detach().to("cpu", torch.float64)
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(actual).any(), f"{name}: {int(torch.isnan(actual).sum())} NaN elements (unwritten?)"
    bad = ~torch.isfinite(actual) & torch.isfinite(expected)
    assert not bad.any(), f"{name}: {int(bad.sum())} non-finite elements where the reference is finite"
    if expected.numel() == 0:
        return
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    if scale == 0.0:
        assert err == 0.0, f"{name}: reference is all zeros but max |actual| = {err}"
    else:
        assert err <= rtol * scale, f"{name}: max error {err:.3e} > {rtol:.1e} * max |ref| {scale:.3e}"


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


def grads_match(got: dict, want: dict, tol=1e-5):
    """Every parameter's gradient within ``tol`` of its largest entry; gradients below 1e-3 of the largest one
    (e.g. vision gates at 5e-7, sums that cancel) are held to ``tol`` of that floor instead of their own noise."""
    assert got.keys() == want.keys()
    floor = 1e-3 * max(g.abs().max().item() for g in want.values())
    for name, g in want.items():
        scale = max(g.abs().max().item(), floor)
        err = (got[name].double() - g.double()).abs().max().item()
        assert err <= tol * scale, f"{name}: {err:.3e} > {tol} * {scale:.3e}"
