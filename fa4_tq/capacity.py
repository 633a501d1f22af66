"""KV-cache capacity arithmetic: how many tokens (and sessions) fit beside the weights."""

from __future__ import annotations

import dataclasses

import torch

from .codec import row_bytes


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    params: float  # parameters
    layers: int
    kv_heads: int
    head_dim: int


LLAMA_31_70B = ModelSpec("Llama-3.1-70B", params=70.55e9, layers=80, kv_heads=8, head_dim=128)
H100_80GB_BYTES = 81559 * 2**20  # what nvidia-smi reports for an H100 80GB HBM3


def kv_bytes_per_token(spec: ModelSpec, k_bits, v_bits, scale_dtype=torch.float16) -> int:
    """K+V bytes per token over all layers; ``None`` bits means bf16 (2 bytes per element)."""
    es = torch.empty((), dtype=scale_dtype).element_size()

    def one(bits):
        return 2 * spec.head_dim if bits is None else row_bytes(spec.head_dim, bits) + es

    return spec.layers * spec.kv_heads * (one(k_bits) + one(v_bits))


def capacity_rows(spec: ModelSpec, kv_budget_bytes: float, context: int, configs):
    """Rows of (label, bytes/token, ratio vs bf16, tokens, sessions at ``context``)."""
    bf16 = kv_bytes_per_token(spec, None, None)
    rows = []
    for label, kb, vb in configs:
        per_tok = kv_bytes_per_token(spec, kb, vb)
        tokens = int(kv_budget_bytes // per_tok)
        rows.append((label, per_tok, bf16 / per_tok, tokens, tokens / context))
    return rows
