"""mla: DeepSeek-style absorbed MLA prefill on Hopper (and, compile-checked only, Blackwell) over a
compressed latent cache.

    import mla
    cache = mla.MLACache(num_layers, num_pages, page_size=64, bits=4, device="cuda")
    cache.write(layer, c_kv, k_pe, slot_mapping)            # c_kv[t, 512], k_pe[t, 64]
    latent, rope = cache.layer(layer)
    out = mla.flash_mla_prefill(q_nope, q_pe, latent, rope, page_table, cu_seqlens_q, seqused_k)

The latent is packed with fa4_tq's TurboQuant codec (bits 2/3/4/8) or kept bf16; the RoPE keys
stay bf16. On SM90 one CuTeDSL kernel (``mla/sm90.py``) reads the packed latent and dequantises
it inline; on SM100 ``mla/sm100.py`` (FA4's own MLA forward with its latent loads replaced; never
run, so only ``backend="kernel"`` picks it); elsewhere ``mla_reference`` (PyTorch, float32) runs.
"""

from .cache import D_LATENT, D_ROPE, MLACache
from .interface import BACKENDS, flash_mla_prefill, latent_rotation
from .reference import mla_reference

__all__ = ["BACKENDS", "D_LATENT", "D_ROPE", "MLACache", "flash_mla_prefill", "latent_rotation", "mla_reference"]
