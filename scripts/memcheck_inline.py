"""One small inline-kernel call per bit width (plus one paged), for compute-sanitizer:

    compute-sanitizer --tool memcheck --report-api-errors no python scripts/memcheck_inline.py

(``--report-api-errors no``: the CUDA runtime probes driver entry points it may not find, and
memcheck counts each ``cuGetProcAddress`` miss as an error; device-side errors are still reported.)
"""
import torch

from fa4_tq import PagedKVCache, compress, flash_attn_func, flash_attn_varlen_func

gen = torch.Generator().manual_seed(0)
for bits in (2, 3, 4, 8):
    q = torch.randn(1, 130, 4, 128, generator=gen).bfloat16().cuda()
    k = compress(torch.randn(1, 200, 2, 128, generator=gen).cuda(), bits, seed=1)
    v = compress(torch.randn(1, 200, 2, 128, generator=gen).cuda(), bits, seed=2)
    out, _ = flash_attn_func(q, k, v, causal=True, backend="inline")
    torch.cuda.synchronize()
    print(f"bits {bits}: ok, finite={bool(out.isfinite().all())}", flush=True)
cache = PagedKVCache(1, 8, 64, 2, 128, k_bits=4, v_bits=3, device="cuda")
cache.write(0, torch.randn(150, 2, 128).cuda(), torch.randn(150, 2, 128).cuda(), torch.arange(150, device="cuda") + 64)
q = torch.randn(150, 4, 128, generator=gen).bfloat16().cuda()
kp, vp = cache.layer(0)
out, _ = flash_attn_varlen_func(
    q, kp, vp, cu_seqlens_q=torch.tensor([0, 150], dtype=torch.int32, device="cuda"),
    seqused_k=torch.tensor([150], dtype=torch.int32, device="cuda"),
    page_table=torch.tensor([[1, 2, 3, 0]], dtype=torch.int32, device="cuda"), causal=True, backend="inline")
torch.cuda.synchronize()
print(f"paged: ok, finite={bool(out.isfinite().all())}")
