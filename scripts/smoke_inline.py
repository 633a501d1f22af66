"""Quick device smoke test of the inline kernel: one case per bit width, errors vs reference."""
import sys, time, torch
sys.path.insert(0, "tests")
from fa4_tq import compress, flash_attn_func, attention_reference
from helpers import rel_err, realistic_kv

gen = torch.Generator().manual_seed(0)
for kb, vb, d, causal in [(4, 4, 128, True), (2, 3, 128, False), (8, 8, 64, True), (4, 4, 256, True)]:
    q = torch.randn(2, 300, 8, d, generator=gen).bfloat16().cuda()
    k = compress(realistic_kv((2, 300, 2, d), generator=gen).cuda(), kb, seed=1)
    v = compress(torch.randn(2, 300, 2, d, generator=gen).cuda(), vb, seed=2)
    print(f"running k{kb}v{vb} d{d}", flush=True)
    t = time.time()
    out, lse = flash_attn_func(q, k, v, causal=causal, return_lse=True, backend="inline")
    torch.cuda.synchronize()
    t = time.time() - t
    ref, ref_lse = attention_reference(q, k, v, causal=causal, dtype=torch.float64)
    dec, _ = flash_attn_func(q, k, v, causal=causal, backend="decompress")
    print(f"k{kb}v{vb} d{d} causal={causal}: inline {rel_err(out, ref):.3e} decompress {rel_err(dec, ref):.3e} "
          f"lse {rel_err(lse, ref_lse):.3e} first call {t:.1f}s", flush=True)
