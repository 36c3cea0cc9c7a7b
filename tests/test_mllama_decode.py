"""mllama decode steps: the unit list of the tiles a step can see (fastflamingo.models.mllama.mask.decode_units) and the
decode kernel (kernels/mllama_decode.py through fastflamingo/ops/mllama_decode.py; interpreted on CPU, native on
CUDA), which reads the additive mask and the cache layout in place. Compared with transformers' attention in
float64 (softmax(scale q k^T + mask) v); outputs launched into NaN-filled buffers."""
import pytest
import torch

import fastflamingo
from fastflamingo.models.mllama import mask as M
from fastflamingo.models.mllama import mllama_xattn
from mllama_cases import P, TOLERANCE, T, additive_reference, assert_close, make_qkv, mixed_layout, nan_like, prepare


def test_decode_units_skip_padded_tiles():
    cam = mixed_layout()[:, -1:]  # the last row: what every decode step repeats
    additive, flag = prepare(cam, P, torch.float32)
    units, count, unit_len = M.decode_units(additive, 2 * T * P, P, 2, "cpu")
    assert unit_len == P and count.tolist() == [3, 5]  # sample 0: image 1 (3 tiles); sample 1: images 0 and 1
    assert units[0, :3].tolist() == [3, 4, 5] and units[1, :5].tolist() == [0, 1, 3, 4, 5]
    # hf: a row that sees no image sees every tile; zero mode: it is ignored
    empty = torch.zeros(1, 1, 1, 2 * T * P)
    assert M.decode_units(empty, 2 * T * P, P, 1, "cpu")[1].tolist() == [2 * T]
    assert M.decode_units(empty, 2 * T * P, P, 1, "cpu", torch.zeros(1, 1, 1, 1))[1].tolist() == [0]
    # a key count that is not a multiple of the tile: one unit of every key
    assert M.decode_units(None, 20, P, 1, "cpu")[1:] == (torch.tensor([1], dtype=torch.int32), 20)


# ----------------------------------------------------------------------------------------------------------------
# Decode kernel
# ----------------------------------------------------------------------------------------------------------------


DECODE_CASES = [(torch.float32, 4, 1, 1), (torch.float32, 1, 3, 3), (torch.bfloat16, 4, 1, 2),
                (torch.float16, 2, 2, 5)]


@pytest.mark.triton
@pytest.mark.parametrize("dtype,group,tokens,splits", DECODE_CASES,
                         ids=[f"{str(d)[6:]}-g{g}-t{t}-s{s}" for d, g, t, s in DECODE_CASES])
def test_decode_kernel_matches_fp64(device, dtype, group, tokens, splits):
    """Reads the cache layout in place with the additive mask: hf rows that see no image (all keys), partial tiles,
    an all-blocked row (upstream: uniform average), a soft bias, a batch-1 (stride-0) mask; split counts 1..5."""
    pytest.importorskip("triton")
    from fastflamingo.ops import mllama_decode

    cam = mixed_layout()[:, -tokens:].clone()
    cam[0, 0] = 0  # sample 0's first decode token sees no image
    additive, _ = prepare(cam, P, dtype)
    additive = additive.to(device)
    if tokens > 1:
        additive[1, 0, 1] = torch.finfo(dtype).min  # a row that sees nothing at all
        additive[0, 0, -1, :5] = -1.5  # a soft bias
    batch, heads, head_dim = 2, 2 * group, 32
    q, k, v = make_qkv(device, dtype, batch, tokens, heads, 2, head_dim, 2 * T * P, seed=2)
    units, count, unit_len = M.decode_units(additive, 2 * T * P, P, batch, device)
    scale = head_dim ** -0.5
    out = nan_like(q.shape, dtype, device)
    mllama_decode.launch(q, k, v, additive[:, 0], units, count, unit_len, scale, {"BLOCK_N": 16},
                                    num_splits=splits, out=out)
    assert_close("o", out, additive_reference(q, k, v, additive, scale), TOLERANCE[dtype][0])
    # one mask row shared by the batch (stride 0), and no mask at all
    shared = additive[:1].expand(batch, -1, -1, -1)
    units, count, unit_len = M.decode_units(shared, 2 * T * P, P, batch, device)
    got = mllama_decode.launch(q, k, v, shared[:, 0], units, count, unit_len, scale, num_splits=splits)
    assert_close("o shared mask", got, additive_reference(q, k, v, shared, scale), TOLERANCE[dtype][0])
    units, count, unit_len = M.decode_units(None, 2 * T * P, P, batch, device)
    got = mllama_decode.launch(q, k, v, None, units, count, unit_len, scale, num_splits=splits)
    assert_close("o no mask", got, additive_reference(q, k, v, None, scale), TOLERANCE[dtype][0])


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_torch_compile_decode_step(device, backend):
    """A decode step through ``mllama_xattn`` compiles with fullgraph=True (no host synchronisation, no graph
    break): the decode op on Triton, the dense path on PyTorch."""
    if backend == "triton" and device == "cpu":
        pytest.importorskip("triton")
    cam = mixed_layout()[:, -1:]
    additive = prepare(cam, P, torch.float32)[0].to(device)
    q, k, v = make_qkv(device, torch.float32, 2, 1, 4, 2, 16, 2 * T * P)

    def step(q, k, v, mask):
        return torch.tanh(mllama_xattn(q, k, v, mask, tokens_per_tile=P, max_tiles=T)) + q

    with torch.no_grad(), fastflamingo.backend(backend):
        got = torch.compile(step, backend="aot_eager", fullgraph=True)(q, k, v, additive)
        want = step(q, k, v, additive)
    torch.testing.assert_close(got, want)


@pytest.mark.triton
def test_opcheck(device):
    pytest.importorskip("triton")
    from fastflamingo.ops import mllama_decode

    additive = prepare(mixed_layout()[:, -1:], P, torch.float32)[0].to(device)
    q, k, v = make_qkv(device, torch.float32, 2, 1, 4, 2, 16, 2 * T * P)
    units, count, unit_len = M.decode_units(additive, 2 * T * P, P, 2, device)
    torch.library.opcheck(mllama_decode.decode_op, (q.contiguous(), k, v, additive[:, 0], units, count, unit_len,
                                                   0.25), test_utils=("test_schema", "test_faketensor"))
