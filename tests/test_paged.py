import pytest
import torch

from fa4_tq import PagedKVCache, compress, compress_into
from helpers import realistic_kv


def test_write_scatters_to_named_slots_and_skips_padding():
    gen = torch.Generator().manual_seed(0)
    cache = PagedKVCache(2, num_pages=6, page_size=8, kv_heads=2, head_dim=128, k_bits=[4, 8], v_bits=3)
    poison = 0xA5
    for layer in range(2):
        for p in cache.layer(layer):
            p.data.fill_(poison)
            p.scales.fill_(-7.0)
    k = realistic_kv((5, 2, 128), generator=gen)
    v = torch.randn(5, 2, 128, generator=gen)
    slots = torch.tensor([17, -1, 3, 40, -1])
    cache.write(1, k, v, slots)
    kp, vp = cache.layer(1)
    ref_k, ref_v = compress(k, 8, seed=0), compress(v, 3, seed=1)
    for t, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        page, off = divmod(s, 8)
        assert torch.equal(kp.data[page, off], ref_k.data[t])
        assert torch.equal(kp.scales[page, :, off], ref_k.scales[:, t])
        assert torch.equal(vp.data[page, off], ref_v.data[t])
        assert torch.equal(vp.scales[page, :, off], ref_v.scales[:, t])
    written = torch.zeros(6, 8, dtype=torch.bool)
    for s in (17, 3, 40):
        written[s // 8, s % 8] = True
    for p in (kp, vp):
        assert bool((p.data[~written] == poison).all())
        assert bool((p.scales.transpose(1, 2)[~written] == -7.0).all())
    # layer 0 untouched
    assert all(bool((p.data == poison).all()) for p in cache.layer(0))


def test_sizes_and_bytes_per_token():
    cache = PagedKVCache(3, num_pages=2, page_size=16, kv_heads=8, head_dim=128, k_bits=4, v_bits=2)
    assert cache.bytes_per_token() == 3 * 8 * ((64 + 2) + (32 + 2))
    assert cache.nbytes == 2 * 16 * cache.bytes_per_token()
    k, v = cache.layer(2)
    assert k.data.shape == (2, 16, 8, 64) and k.scales.shape == (2, 8, 16)
    assert "PagedKVCache" in repr(cache)


def test_write_rejects_bad_input():
    cache = PagedKVCache(1, num_pages=2, page_size=8, kv_heads=2, head_dim=64)
    k = torch.randn(3, 2, 64)
    with pytest.raises(ValueError, match=r"slot_mapping values must be -1 \(padding\) or in \[0, 16\)"):
        cache.write(0, k, k, torch.tensor([0, 16, 1]))
    with pytest.raises(ValueError, match=r"k must be \[num_tokens, 2, 64\]"):
        cache.write(0, torch.randn(3, 4, 64), k, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="layer must be an int in"):
        cache.write(1, k, k, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="slot_mapping must be torch.int32 or torch.int64"):
        cache.write(0, k, k, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="k has 3 tokens and v 2"):
        cache.write(0, k, k[:2], torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="page_size must be a positive multiple of 8"):
        PagedKVCache(1, 2, 12, 2, 64)
    with pytest.raises(ValueError, match="k_bits must be one int or one per layer"):
        PagedKVCache(2, 2, 16, 2, 64, k_bits=[4])


@pytest.mark.parametrize("shape", [(2, 24, 3, 64), (40, 2, 128)])
def test_compress_into_fills_existing_buffers(shape):
    """On the CPU compress_into runs the reference codec into the caller's buffers (the GPU
    kernel path is tests/test_gpu_cache_write.py)."""
    gen = torch.Generator().manual_seed(1)
    x = realistic_kv(shape, generator=gen)
    out = compress(torch.zeros(shape), 3, seed=9)
    data_ptr, scales_ptr = out.data.data_ptr(), out.scales.data_ptr()
    compress_into(x, out)
    want = compress(x, 3, seed=9)
    assert torch.equal(out.data, want.data) and torch.equal(out.scales, want.scales)
    assert (out.data.data_ptr(), out.scales.data_ptr()) == (data_ptr, scales_ptr)


def test_write_backends_are_checked():
    cache = PagedKVCache(1, num_pages=2, page_size=8, kv_heads=1, head_dim=64)
    k = torch.randn(3, 1, 64)
    with pytest.raises(ValueError, match="backend must be one of"):
        cache.write(0, k, k, torch.tensor([0, 1, 2]), backend="fast")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        cache.write(0, k, k, torch.tensor([0, 1, 2]), backend="kernel")
    with pytest.raises(ValueError, match="must match"):
        compress_into(k, compress(torch.zeros(4, 1, 64), 4))
    with pytest.raises(TypeError, match="PackedKV"):
        compress_into(k, k)
