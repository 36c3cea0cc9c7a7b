"""fastflamingo.vllm.paged against a dense reference, on caches written by vLLM's own CPU attention backend (no
engine needed): the layout probe, the block reads and the decode attention over key ranges."""
import types

import pytest
import torch

from fastflamingo.vllm.paged import DecodeRows, cache_layout, decode_attention


def _backend(heads, kv_heads, dim, block_size, dtype):
    from vllm.v1.attention.backend import AttentionType
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl, _get_attn_isa

    # the backend's impl without its constructor (which wants a whole engine config): its cache update reads
    # these two attributes and calls the backend's own cache-write kernel
    impl = CPUAttentionBackendImpl.__new__(CPUAttentionBackendImpl)
    impl.attn_type, impl.kv_cache_dtype = AttentionType.ENCODER_DECODER, "auto"
    layer = types.SimpleNamespace(impl=impl, isa=_get_attn_isa(dtype, block_size, dim), _k_scale_float=1.0,
                                  _v_scale_float=1.0)
    return impl, layer


def _filled_cache(impl, layer, lengths, kv_heads, dim, block_size, dtype, gen):
    """A cache of shuffled blocks holding ``lengths[i]`` random K/V rows for request i, written with the backend's
    cache update; returns the cache, each request's block table and its K/V."""
    tables, total = [], 0
    for n in lengths:
        tables.append(-(-n // block_size))
        total += tables[-1]
    order = torch.randperm(total + 3, generator=gen)  # spare blocks, never read
    cache = torch.full((total + 3, kv_heads, block_size, 2 * dim), float("nan"), dtype=dtype)
    out, start = [], 0
    for n, nb in zip(lengths, tables):
        blocks = order[start:start + nb]
        start += nb
        k = torch.randn(n, kv_heads, dim, generator=gen).to(dtype)
        v = torch.randn(n, kv_heads, dim, generator=gen).to(dtype)
        slots = blocks.repeat_interleave(block_size) * block_size + torch.arange(block_size).repeat(nb)
        impl.do_kv_cache_update(layer, k, v, cache, slots[:n].contiguous())
        out.append((blocks, k, v))
    return cache, out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layout_reads_back_what_the_backend_wrote(dtype):
    kv_heads, dim, block_size = 2, 64, 32
    impl, layer = _backend(4, kv_heads, dim, block_size, dtype)
    gen = torch.Generator().manual_seed(0)
    cache, written = _filled_cache(impl, layer, [70, 32, 5], kv_heads, dim, block_size, dtype, gen)
    layout = cache_layout(layer, cache, kv_heads, dim)
    assert layout.key.strides is not None and layout.value.strides is not None  # the CPU layouts are views
    for blocks, k, v in written:
        keys = layout.key.read(cache, blocks).reshape(-1, kv_heads, dim)[:k.shape[0]]
        values = layout.value.read(cache, blocks).reshape(-1, kv_heads, dim)[:v.shape[0]]
        assert torch.equal(keys, k) and torch.equal(values, v)


def _reference(q, k, v, lo, hi, scale):
    heads, kv_heads = q.shape[0], k.shape[1]
    k = k[lo:hi].double().repeat_interleave(heads // kv_heads, dim=1)  # (keys, heads, dim)
    v = v[lo:hi].double().repeat_interleave(heads // kv_heads, dim=1)
    weights = torch.softmax(torch.einsum("hd,khd->hk", q.double(), k) * scale, dim=-1)
    return torch.einsum("hk,khd->hd", weights, v)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_decode_attention_on_key_ranges(dtype, tol):
    heads, kv_heads, dim, block_size = 8, 2, 64, 32
    impl, layer = _backend(heads, kv_heads, dim, block_size, dtype)
    gen = torch.Generator().manual_seed(1)
    lengths = [100, 33, 64, 7, 300]
    cache, written = _filled_cache(impl, layer, lengths, kv_heads, dim, block_size, dtype, gen)
    layout = cache_layout(layer, cache, kv_heads, dim)
    # per row: its request and key range, ranges starting and ending inside blocks, on block edges, one key, all keys
    rows = [(0, 0, 100), (0, 31, 65), (1, 32, 33), (2, 0, 64), (3, 6, 7), (4, 40, 290), (4, 0, 300), (1, 0, 1)]
    q = torch.randn(len(rows), heads, dim, generator=gen).to(dtype)
    decode = DecodeRows.build(list(range(len(rows))), [written[r][0] for r, _, _ in rows],
                              [(lo, hi) for _, lo, hi in rows], [lengths[r] for r, _, _ in rows], block_size, "cpu")
    got = decode_attention(q, cache, layout, decode, dim ** -0.5)
    assert got.dtype == dtype and got.shape == q.shape
    for i, (r, lo, hi) in enumerate(rows):
        _, k, v = written[r]
        want = _reference(q[i], k, v, lo, hi, dim ** -0.5)
        assert torch.allclose(got[i].double(), want, atol=tol, rtol=tol), (i, (got[i].double() - want).abs().max())


def test_unsupported_caches_are_refused():
    impl, layer = _backend(8, 2, 64, 32, torch.float32)
    with pytest.raises(NotImplementedError, match="CPU backend only"):
        cache_layout(layer, torch.zeros(2, 4, 32, 2, 64), 2, 64)  # a GPU-style (2, blocks, ...) cache
    impl.kv_cache_dtype = "fp8"
    with pytest.raises(NotImplementedError, match="unquantised"):
        cache_layout(layer, torch.zeros(4, 2, 32, 128), 2, 64)
