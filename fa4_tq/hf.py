"""A Hugging Face ``transformers`` cache that keeps K/V packed and attends through fa4_tq.

    import fa4_tq.hf
    fa4_tq.hf.enable(model)                        # route the model's attention through fa4_tq
    cache = fa4_tq.hf.TQCache(model.config, k_bits=4, v_bits=4)
    model.generate(ids, past_key_values=cache, max_new_tokens=32)

Each layer's keys and values are compressed with the codec as they arrive (prefill and each
decode step) and stored packed, ``[batch, tokens, kv_heads, d·bits/8]`` plus one scale per
vector; attention runs ``fa4_tq.flash_attn_func`` on them (the reference path on the CPU, the
inline kernel on Hopper). Nothing but the packed bytes is kept.

Needs ``transformers`` >= 5 (the ``hf`` extra). Batches must be unpadded (the packed path has no
padding mask); decoder-only models with full attention only. A float32 model's queries are
rounded to bf16 for attention (fa4_tq's kernels take bf16/fp16 queries); the output is cast back.
"""

from __future__ import annotations

from typing import Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .codec import SCALE_DTYPES, PackedKV, compress, row_bytes
from .interface import flash_attn_func
from .paged import BitsArg, _per_layer

__all__ = ["ATTENTION", "TQCache", "enable"]

ATTENTION = "fa4_tq"  # the name under which enable() registers the attention function

class _PackedBuffer:
    """One layer's K or V: packed rows and scales in buffers that grow by doubling. The token
    capacity stays a multiple of 8, so the head-major scales keep 16-byte aligned strides."""

    def __init__(self, bits: int, seed: int, scale_dtype: torch.dtype):
        self.bits, self.seed, self.scale_dtype = bits, seed, scale_dtype
        self.data: Optional[torch.Tensor] = None  # [batch, capacity, kv_heads, row_bytes]
        self.scales: Optional[torch.Tensor] = None  # [batch, kv_heads, capacity]
        self.length = 0

    def append(self, x: torch.Tensor) -> PackedKV:
        """Compress ``x[batch, tokens, kv_heads, d]`` after the stored tokens; return all of them."""
        b, n, h, d = x.shape
        p = compress(x, self.bits, seed=self.seed, scale_dtype=self.scale_dtype)
        need = self.length + n
        if self.data is None or need > self.data.shape[1]:
            cap = max(64, -(-2 * need // 8) * 8)
            data = torch.zeros(b, cap, h, row_bytes(d, self.bits), dtype=torch.uint8, device=x.device)
            scales = torch.zeros(b, h, cap, dtype=self.scale_dtype, device=x.device)
            if self.length:
                data[:, : self.length] = self.data[:, : self.length]
                scales[:, :, : self.length] = self.scales[:, :, : self.length]
            self.data, self.scales = data, scales
        self.data[:, self.length : need] = p.data
        self.scales[:, :, self.length : need] = p.scales
        self.length = need
        return self.view(d)

    def view(self, head_dim: int) -> PackedKV:
        return PackedKV(self.data[:, : self.length], self.scales[:, :, : self.length], self.bits,
                        head_dim, self.seed)

    @property
    def nbytes(self) -> int:
        if self.data is None:
            return 0
        b, _, h, nb = self.data.shape
        return self.length * b * h * (nb + self.scales.element_size())


class TQLayer(CacheLayerMixin):
    """One decoder layer's packed K/V. ``update`` returns ``PackedKV`` views, which only the
    attention function that ``enable`` registers can read."""

    is_sliding = False

    def __init__(self, k_bits: int, v_bits: int, k_seed: int, v_seed: int, scale_dtype: torch.dtype,
                 subtract_k_mean: bool):
        super().__init__()
        self.k_bits, self.v_bits = k_bits, v_bits
        self._seeds, self._scale_dtype = (k_seed, v_seed), scale_dtype
        self.subtract_k_mean = subtract_k_mean
        self.reset()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """``key_states``/``value_states`` ``[batch, kv_heads, new_tokens, d]`` (the model's layout)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.subtract_k_mean:
            # Softmax is shift-invariant per query: removing one vector from every key of a head
            # changes no output, and takes the channel bias out of what gets quantised.
            if self.k_mean is None:
                self.k_mean = key_states.float().mean(dim=2, keepdim=True)
            key_states = key_states.float() - self.k_mean
        k = self._k.append(key_states.transpose(1, 2))
        v = self._v.append(value_states.transpose(1, 2))
        return k, v

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self._k.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._k = _PackedBuffer(self.k_bits, self._seeds[0], self._scale_dtype)
        self._v = _PackedBuffer(self.v_bits, self._seeds[1], self._scale_dtype)
        self.k_mean: Optional[torch.Tensor] = None  # [batch, kv_heads, 1, d], from the first write

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("TQCache does not support beam search yet")

    @property
    def nbytes(self) -> int:
        return self._k.nbytes + self._v.nbytes


class TQCache(Cache):
    """A ``transformers`` cache storing every layer's K/V packed with the TurboQuant codec.

    Args:
        config: the model's config (its number of layers).
        k_bits, v_bits: bits per K/V coordinate, 2/3/4/8: one int, or one per layer (e.g.
            8-bit first and last layers: ``[8] + [4] * 28 + [8]``).
        subtract_k_mean: subtract each head's mean key (taken over the first tokens written,
            i.e. the prompt) before compressing; exact for attention, often more accurate.
        k_seed, v_seed: rotation seeds. scale_dtype: float16 (default) or float32.

    The model must run its attention through fa4_tq: call ``fa4_tq.hf.enable(model)`` first.
    """

    def __init__(
        self,
        config,
        *,
        k_bits: BitsArg = 4,
        v_bits: BitsArg = 4,
        subtract_k_mean: bool = False,
        k_seed: int = 0,
        v_seed: int = 1,
        scale_dtype: torch.dtype = torch.float16,
    ):
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        n = int(text.num_hidden_layers)
        if scale_dtype not in SCALE_DTYPES:
            raise TypeError(f"scale_dtype must be torch.float16 or torch.float32, got {scale_dtype}")
        kb, vb = _per_layer("k_bits", k_bits, n), _per_layer("v_bits", v_bits, n)
        layers = [TQLayer(kb[i], vb[i], k_seed, v_seed, scale_dtype, bool(subtract_k_mean)) for i in range(n)]
        super().__init__(layers=layers)

    @property
    def nbytes(self) -> int:
        """Bytes of packed K/V held (rows plus scales, buffer slack excluded)."""
        return sum(layer.nbytes for layer in self.layers)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention function ``enable`` registers: ``query[b, heads, sq, d]`` (the model's
    layout) over the packed K/V that ``TQCache`` returned; causal, aligned to the last key."""
    if not isinstance(key, PackedKV) or not isinstance(value, PackedKV):
        raise TypeError(
            "fa4_tq attention reads packed K/V: pass past_key_values=fa4_tq.hf.TQCache(model.config, ...) "
            f"(got {type(key).__name__} keys)"
        )
    if attention_mask is not None:
        raise ValueError(
            "fa4_tq attention supports unpadded batches only (the attention mask marks padding): "
            "run one sequence per batch row without padding"
        )
    if dropout:
        raise ValueError("fa4_tq attention has no dropout: call model.eval()")
    q = query.transpose(1, 2)
    if q.dtype not in (torch.bfloat16, torch.float16):  # a float32 model (CPU): queries as bf16
        q = q.to(torch.bfloat16)
    out, _ = flash_attn_func(q, key, value, softmax_scale=scaling, causal=True)
    return out.to(query.dtype), None


def enable(model) -> None:
    """Register fa4_tq's attention with ``transformers`` and switch ``model`` to it."""
    ALL_ATTENTION_FUNCTIONS.register(ATTENTION, _attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, flash_attention_mask)
    model.set_attn_implementation(ATTENTION)
