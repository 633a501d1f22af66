"""Shared test helpers."""

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64; NaN anywhere fails loudly."""
    a64, b64 = a.double(), b.double()
    assert torch.isfinite(a64).all(), "non-finite values in the result"
    return float((a64 - b64).norm() / b64.norm().clamp_min(1e-30))


def realistic_kv(shape, *, generator=None, outlier_channels=4, outlier_scale=20.0, bias=3.0):
    """Key-like data: Gaussian with a few channels much larger (heavy-tailed) and a channel bias."""
    x = torch.randn(*shape, generator=generator)
    d = shape[-1]
    idx = torch.randperm(d, generator=generator)[:outlier_channels]
    x[..., idx] *= outlier_scale
    x[..., idx[0]] += bias * outlier_scale
    return x


def bf16_baseline_err(q, k, v, causal, window):
    """FA4's own error as a bf16 attention: FA4 on the bf16-rounded K/V against the float64
    answer on the unrounded K/V. Ours is measured the same way (its bf16 tiles are rounded from
    the float32 decoded vectors), so the two numbers are comparable."""
    from flash_attn.cute import flash_attn_func as fa4
    from fa4_tq.reference import attention_dense_batched

    out, lse = fa4(q, k.to(q.dtype), v.to(q.dtype), causal=causal, window_size=window, return_lse=True)
    ref, ref_lse = attention_dense_batched(q, k, v, causal=causal, window_size=window)
    fin = torch.isfinite(ref_lse)
    return rel_err(out, ref), rel_err(lse[fin], ref_lse[fin])


def paged_problem(page_size, d, gen, device, *, k_bits=4, v_bits=2, h=8, hk=2):
    """Three sequences (37/200/1 queries over 300/200/513 keys) in a PagedKVCache whose pages are
    shuffled; returns ``q, k_pages, v_pages`` and the varlen arguments (causal)."""
    from fa4_tq import PagedKVCache

    lens_q, lens_k = [37, 200, 1], [300, 200, 513]
    max_pages = max(-(-n // page_size) for n in lens_k)
    num_pages, table, slots = shuffled_pages(lens_k, page_size, gen, num_pages=3 * max_pages + 5)
    cache = PagedKVCache(1, num_pages, page_size, hk, d, k_bits=k_bits, v_bits=v_bits, device=device)
    cache.write(0, realistic_kv((sum(lens_k), hk, d), generator=gen).to(device),
                torch.randn(sum(lens_k), hk, d, generator=gen).to(device), torch.tensor(slots, device=device))
    q = torch.randn(sum(lens_q), h, d, generator=gen).to(torch.bfloat16).to(device)
    args = dict(cu_seqlens_q=torch.tensor([0, 37, 237, 238], dtype=torch.int32, device=device),
                seqused_k=torch.tensor(lens_k, dtype=torch.int32, device=device),
                page_table=table.to(device), causal=True)
    kp, vp = cache.layer(0)
    return q, kp, vp, args


def ragged_paged_cache(lens, page_size, kv_heads, d, gen, *, k_bits=4, v_bits=2, k_seed=3, v_seed=4,
                       device="cpu", raw=None):
    """Sequences of ``lens`` tokens on shuffled pages of a PagedKVCache (K realistic, V Gaussian,
    or the given ``raw`` list of per-sequence ``(k, v)``). The table has two columns more than any
    sequence needs, its unused entries -1 (never read).
    Returns ``(k_pages, v_pages), page_table, seqused_k, [(k, v) of each sequence]``."""
    from fa4_tq import PagedKVCache

    num_pages, table, slots = shuffled_pages(lens, page_size, gen, spare=3, extra_cols=2, fill=-1)
    cache = PagedKVCache(1, num_pages, page_size, kv_heads, d, k_bits=k_bits, v_bits=v_bits, k_seed=k_seed,
                         v_seed=v_seed, device=device)
    if raw is None:
        raw = [(realistic_kv((n, kv_heads, d), generator=gen), torch.randn(n, kv_heads, d, generator=gen))
               for n in lens]
    k = torch.cat([r[0] for r in raw]).to(device)
    v = torch.cat([r[1] for r in raw]).to(device)
    cache.write(0, k, v, torch.tensor(slots, device=device))
    return cache.layer(0), table.to(device), torch.tensor(lens, dtype=torch.int32, device=device), raw


def shuffled_pages(lens, page_size, gen, *, spare=2, num_pages=None, extra_cols=0, fill=0, perm=True):
    """Pages for sequences of ``lens`` tokens, handed out in a random order (``perm=False``: in
    order) from a pool of ``num_pages`` (default: what they need plus ``spare``). Returns
    ``num_pages``, the page table (int32, ``extra_cols`` more columns than the longest sequence
    needs, ``fill`` past each sequence's pages) and every token's slot, sequence by sequence."""
    max_pages = max(-(-n // page_size) for n in lens)
    if num_pages is None:
        num_pages = sum(-(-n // page_size) for n in lens) + spare
    order = torch.randperm(num_pages, generator=gen) if perm else torch.arange(num_pages)
    table = torch.full((len(lens), max(max_pages + extra_cols, 1)), fill, dtype=torch.int32)
    slots, nxt = [], 0
    for b, n in enumerate(lens):
        for j in range(-(-n // page_size)):
            table[b, j] = order[nxt]
            nxt += 1
        slots += [int(table[b, t // page_size]) * page_size + t % page_size for t in range(n)]
    return num_pages, table, slots


def greedy_accept_lengths(out, proj, drafts):
    """Greedy verification: each position's next token is argmax(out . proj); a sequence keeps its
    draft tokens up to the first disagreement. Returns (argmax [batch, seqlen_q], accepted [batch])."""
    logits = out.double().flatten(2) @ proj  # [batch, seqlen_q, vocab]
    choice = logits.argmax(-1)
    agree = (choice == drafts).long()
    return choice, agree.cumprod(1).sum(1)


def mla_problem(lens_q, lens_k, heads, page_size, bits, gen, *, seed=3, device="cuda", poison_unwritten=False):
    """A shuffled-page MLACache holding ``lens_k`` tokens per sequence (latent with heavy-tailed
    channels) and queries for the last ``lens_q`` of them; returns the call's arguments.
    ``poison_unwritten``: every slot no token was written to holds NaN (bf16 latent and RoPE keys,
    packed scales) and 0xFF codes, as recycled or uninitialised pages may."""
    import mla

    num_pages, table, slots = shuffled_pages(lens_k, page_size, gen, spare=3)
    cache = mla.MLACache(1, num_pages, page_size, bits=bits, seed=seed, device=device)
    total_k = sum(lens_k)
    c_kv = realistic_kv((total_k, 512), generator=gen)
    k_pe = torch.randn(total_k, 64, generator=gen)
    cache.write(0, c_kv.to(torch.bfloat16).to(device), k_pe.to(torch.bfloat16).to(device),
                torch.tensor(slots, dtype=torch.int32, device=device))
    total_q = sum(lens_q)
    q_nope = (torch.randn(total_q, heads, 512, generator=gen) / 8).to(torch.bfloat16).to(device)
    q_pe = torch.randn(total_q, heads, 64, generator=gen).to(torch.bfloat16).to(device)
    cu = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=device)
    latent, rope = cache.layer(0)
    if poison_unwritten:
        unwritten = torch.ones(num_pages * page_size, dtype=torch.bool)
        unwritten[torch.tensor(slots, dtype=torch.long)] = False
        unwritten = unwritten.to(device)
        rope.view(-1, rope.shape[-1])[unwritten] = float("nan")
        if bits is None:
            latent.view(-1, latent.shape[-1])[unwritten] = float("nan")
        else:
            latent.data.view(-1, latent.data.shape[-1])[unwritten] = 0xFF
            latent.scales.view(-1)[unwritten] = float("nan")
    return (q_nope, q_pe, latent, rope, table.to(device), cu, torch.tensor(lens_k, dtype=torch.int32, device=device))


def mla_bf16_yardstick(args, causal, scale):
    """A plain PyTorch bf16 MLA attention on the decoded cache (the error ours is held to)."""
    from fa4_tq import PackedKV
    from mla.reference import attention_bf16

    q_nope, q_pe, latent, rope, table, cu, used = args
    lat = latent.decompress(torch.float32) if isinstance(latent, PackedKV) else latent.float()
    outs = []
    for b in range(cu.numel() - 1):
        n = int(used[b])
        pages = table[b, : -(-n // rope.shape[1])].long()
        c = lat[pages].reshape(-1, 512)[:n].to(torch.bfloat16)
        k = torch.cat([c, rope[pages].reshape(-1, 64)[:n]], -1)
        q = torch.cat([q_nope, q_pe], -1)[int(cu[b]) : int(cu[b + 1])]
        outs.append(attention_bf16(q, k, c, softmax_scale=scale, causal=causal))
    return torch.cat(outs, 0)


def check_mla_prefill(lens_q, lens_k, heads, page_size, bits, *, causal=True, tag="", poison_unwritten=False):
    """mla.flash_mla_prefill(backend="kernel") against the float64 reference: output within 2x the
    bf16 yardstick's error + 1e-3, LSE within 1e-3, rows with no key 0 / -inf."""
    import mla

    gen = torch.Generator().manual_seed(hash((tuple(lens_q), tuple(lens_k), heads, page_size, bits)) % 2**31)
    args = mla_problem(lens_q, lens_k, heads, page_size, bits, gen, poison_unwritten=poison_unwritten)
    scale = 576 ** -0.5
    out, lse = mla.flash_mla_prefill(*args, causal=causal, return_lse=True, backend="kernel")
    ref, ref_lse = mla.mla_reference(*args, causal=causal, dtype=torch.float64)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin), "rows with no key must get LSE -inf"
    assert not out[~fin.T].any(), "rows with no key must get output 0"
    err, lse_err = rel_err(out, ref), rel_err(lse[fin], ref_lse[fin])
    base = rel_err(mla_bf16_yardstick(args, causal, scale), ref)
    print(f"ERRS{tag} lens_q={lens_q[:4]} lens_k={lens_k[:4]} h{heads} page{page_size} bits={bits} causal={causal}: "
          f"out {err:.2e} (PyTorch bf16 {base:.2e}) lse {lse_err:.2e}")
    assert err <= 2 * base + 1e-3, (err, base)
    assert lse_err <= 1e-3, lse_err
