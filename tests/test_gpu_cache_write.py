"""On an SM90 GPU: the cache-write kernel (rotate, quantise, pack, scatter) against the reference
codec, every bit width on K and on V, head_dim 64-512. The cache starts poisoned (0xA5 bytes,
NaN scales): slots the mapping does not name must keep the poison."""

import pytest
import torch

from fa4_tq import PagedKVCache, compress, compress_into
from fa4_tq.codec import centroids, rotate, unpack
from helpers import realistic_kv

pytestmark = pytest.mark.gpu
POISON = 0xA5


def _scales_for(x, idx, bits, seed):
    """The scale each row should carry for the codes it got: ``||R x|| / ||g[idx]||`` (float32),
    so that a row with a near-tie code is checked against its own codes, not the reference's."""
    y = rotate(x.float(), seed)
    return torch.linalg.vector_norm(y, dim=-1) / torch.linalg.vector_norm(centroids(bits, x.device)[idx.long()], dim=-1)


def _compare(packed, page, off, x, bits, seed):
    """(code mismatches, elements) of the written slots against compress(x); a mismatching code
    may only be a neighbour (a tie), and every scale must be its codes' within one fp16 rounding."""
    ref = compress(x, bits, seed=seed)
    got_idx = unpack(packed.data[page, off], bits, x.shape[-1])
    bad = got_idx != ref.indices()
    assert ((got_idx - ref.indices()).abs()[bad] == 1).all(), "a code off by more than one"
    got_s = packed.scales[page, :, off].float()  # [n, heads]
    want_s = _scales_for(x, got_idx, bits, seed)
    assert torch.isfinite(got_s).all()
    assert ((got_s - want_s).abs() <= 2.0 ** -10 * want_s.abs() + 1e-7).all()
    return int(bad.sum()), bad.numel()


@pytest.mark.parametrize("d", [64, 128, 256, 512])
@pytest.mark.parametrize("kbits,vbits", [(2, 3), (4, 8), (3, 2), (8, 4)])
def test_cache_write_kernel_is_the_codec(d, kbits, vbits):
    gen = torch.Generator().manual_seed(d + kbits * 10 + vbits)
    tokens, heads, pages, page_size = 300, 4, 12, 64
    cache = PagedKVCache(1, pages, page_size, heads, d, k_bits=kbits, v_bits=vbits, device="cuda")
    kc, vc = cache.layer(0)
    for p in (kc, vc):
        p.data.fill_(POISON)
        p.scales.fill_(float("nan"))
    k = realistic_kv((tokens, heads, d), generator=gen).bfloat16().cuda()
    v = torch.randn(tokens, heads, d, generator=gen).bfloat16().cuda()
    slots = torch.randperm(pages * page_size, generator=gen)[:tokens].to(torch.int32)
    slots[::7] = -1
    slots = slots.cuda()
    cache.write(0, k, v, slots, backend="kernel")
    torch.cuda.synchronize()
    keep = slots >= 0
    s = slots[keep].long()
    page, off = s // page_size, s % page_size
    mism = 0
    for packed, x, bits in ((kc, k, kbits), (vc, v, vbits)):
        bad, n = _compare(packed, page, off, x[keep], bits, packed.seed)
        mism += bad
        assert bad <= max(2, 1e-4 * n), (bad, n)
        untouched = torch.ones(pages * page_size, dtype=torch.bool, device="cuda")
        untouched[s] = False
        rows = packed.data.view(pages * page_size, heads, -1)[untouched]
        assert (rows == POISON).all()
        assert packed.scales.transpose(1, 2).reshape(pages * page_size, heads)[untouched].isnan().all()
    print(f"TIES d{d} k{kbits}v{vbits}: {mism} codes differ from the reference (near-ties)")


@pytest.mark.parametrize("shape", [(2, 100, 4, 128), (333, 2, 64)])
@pytest.mark.parametrize("bits", [3, 4])
def test_compress_into_is_compress(shape, bits):
    gen = torch.Generator().manual_seed(bits)
    x = realistic_kv(shape, generator=gen).to(torch.float16).cuda()
    out = compress(torch.zeros(shape, device="cuda"), bits, seed=5)
    compress_into(x, out, backend="kernel")
    ref = compress(x, bits, seed=5)
    assert (out.indices() != ref.indices()).float().mean() <= 1e-4
    want = _scales_for(x, out.indices(), bits, 5)  # [..., tokens, heads]; stored heads before tokens
    got = out.scales.float().transpose(-1, -2)
    assert ((got - want).abs() <= 2.0 ** -10 * want.abs()).all()


@pytest.mark.parametrize("per_lane,ctas_per_sm", [(32, 2), (64, 4), (64, 8)])
def test_cache_write_knobs_do_not_change_the_bytes(per_lane, ctas_per_sm):
    """The tuning knobs (values per thread: 4 or 2 lanes per row; the grid) change who
    computes what, and the order of the norm's sum when a row spans lanes: the same codes as the
    default launch but for near-ties; scales within one fp16 rounding where the codes agree."""
    from fa4_tq.kernels.launch import write_packed

    gen = torch.Generator().manual_seed(per_lane)
    tokens, heads, d = 3000, 8, 128
    caches = [PagedKVCache(1, 50, 64, heads, d, k_bits=4, v_bits=8, device="cuda") for _ in range(2)]
    k = realistic_kv((tokens, heads, d), generator=gen).bfloat16().cuda()
    v = torch.randn(tokens, heads, d, generator=gen).bfloat16().cuda()
    slots = torch.randperm(50 * 64, generator=gen)[:tokens].to(torch.int32).cuda()
    caches[0].write(0, k, v, slots, backend="kernel")
    write_packed(k, v, slots, *caches[1].layer(0), per_lane=per_lane, ctas_per_sm=ctas_per_sm)
    for a, b in zip(caches[0].layer(0), caches[1].layer(0)):
        differ = unpack(a.data, a.bits, d) != unpack(b.data, b.bits, d)  # [P, S, H, d]
        assert differ.sum() <= 1e-5 * differ.numel(), int(differ.sum())
        # a tie moves its row's scale with it (the norm of other centroids): compare the others
        same_codes = ~differ.any(-1).transpose(1, 2)  # [P, H, S] like the scales
        sa, sb = a.scales.float(), b.scales.float()
        assert ((sa - sb).abs() <= 2.0 ** -10 * sa.abs())[same_codes].all()
        assert ((sa - sb).abs() <= 0.01 * sa.abs()).all()


def test_cache_write_as_a_dependent_launch_in_a_cuda_graph():
    """The write is a programmatic dependent launch (PDL): its CTAs may start while the kernel
    before it finishes and wait for it before reading k, v and the slots. Captured in a CUDA
    graph right behind the kernels that produce k and v, and replayed on new inputs (the same
    slots, so each replay overwrites the last), it must give the bytes of a plain launch."""
    from fa4_tq.kernels.launch import write_packed

    gen = torch.Generator().manual_seed(11)
    tokens, heads, d, pages = 2000, 8, 128, 40
    slots = torch.randperm(pages * 64, generator=gen)[:tokens].to(torch.int32)
    slots[::5] = -1
    slots = slots.cuda()
    src = torch.randn(2, tokens, heads, d, generator=gen).cuda()
    graphed, plain = (PagedKVCache(1, pages, 64, heads, d, k_bits=4, v_bits=2, device="cuda") for _ in range(2))
    for cache in (graphed, plain):
        for p in cache.layer(0):
            p.data.fill_(POISON)
            p.scales.fill_(float("nan"))
    k_buf = torch.empty(tokens, heads, d, dtype=torch.bfloat16, device="cuda")
    v_buf = torch.empty_like(k_buf)

    def step():
        torch.mul(src[0], 3.0, out=k_buf)  # the producers: kernels right before the write
        torch.add(src[1], 1.0, out=v_buf)
        graphed.write(0, k_buf, v_buf, slots, check_indices=False, backend="kernel")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compiles and warms up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for replay in range(3):
        src.copy_(torch.randn(2, tokens, heads, d, generator=gen))
        graph.replay()
        k, v = (src[0] * 3.0).bfloat16(), (src[1] + 1.0).bfloat16()
        write_packed(k, v, slots, *plain.layer(0), pdl=False)
        torch.cuda.synchronize()
        for a, b in zip(graphed.layer(0), plain.layer(0)):
            assert torch.equal(a.data, b.data), f"replay {replay}: bytes differ from a plain launch"
            assert torch.equal(a.scales.view(torch.int16), b.scales.view(torch.int16)), f"replay {replay}: scales"
