"""Torch side of the SM90 MLA kernel: compile once per variant, launch (as fa4_tq.kernels.launch
does for the attention kernel; under torch's FakeTensorMode it compiles and does not launch)."""

from __future__ import annotations

from typing import Optional, Union

import torch

from fa4_tq.codec import PackedKV

_compile_cache: dict = {}


def mla_attention(
    q_nope: torch.Tensor,  # [total_q, heads, 512] bf16 (rotated by the latent's R when packed)
    q_pe: torch.Tensor,  # [total_q, heads, 64] bf16
    latent: Union[torch.Tensor, PackedKV],  # [pages, page_size, 1, 512]
    rope: torch.Tensor,  # [pages, page_size, 1, 64] bf16
    page_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seqused_k: torch.Tensor,
    max_seqlen_q: int,
    *,
    softmax_scale: float,
    causal: bool,
    return_lse: bool,
    out: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The kernel on checked inputs; the output stays in the latent's rotated space. ``out`` /
    ``lse`` may be given (contiguous, of the output's shapes): the kernel writes into them."""
    import cutlass.cute as cute
    from flash_attn.cute.cute_dsl_utils import to_cute_tensor
    from flash_attn.cute.testing import is_fake_mode

    from fa4_tq.kernels.launch import device_arch
    from fa4_tq.kernels.staging import lookup_table

    from .sm90 import FlashMLAForwardSm90

    arch = device_arch()
    if arch // 10 != 9:
        raise NotImplementedError(
            f"the MLA kernel is built for SM90 (Hopper); this device is SM{arch}: use backend='reference'"
        )
    total_q, heads, _ = q_nope.shape
    q_nope = q_nope.contiguous()
    q_pe = q_pe.contiguous()
    qn, qp = q_nope.view(total_q * heads, -1), q_pe.view(total_q * heads, -1)
    if out is None:
        out = torch.empty_like(q_nope)
    if lse is None and return_lse:
        lse = torch.empty(heads, total_q, dtype=torch.float32, device=q_nope.device)
    if out.shape != q_nope.shape or out.dtype != q_nope.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {q_nope.dtype} tensor of shape {tuple(q_nope.shape)}")
    if lse is not None and (lse.shape != (heads, total_q) or lse.dtype != torch.float32 or not lse.is_contiguous()):
        raise ValueError(f"lse must be a contiguous float32 tensor of shape {(heads, total_q)}")
    rope3 = rope.squeeze(2)
    packed = isinstance(latent, PackedKV)
    if packed:
        lat3, scales = latent.data.squeeze(2), latent.scales.squeeze(1)
        bits = latent.bits
        table = (torch.empty(1 << bits, dtype=torch.float32, device=q_nope.device) if is_fake_mode()
                 else lookup_table(bits, q_nope.device))
    else:
        lat3, bits = latent.squeeze(2), None
        scales = torch.empty(1, 1, dtype=torch.float32, device=q_nope.device)  # not read
        table = torch.empty(4, dtype=torch.float32, device=q_nope.device)  # not read
    key = ("mla", arch, heads, bits, scales.dtype, causal, lse is not None)
    if key not in _compile_cache:
        small = dict(assumed_align=4, leading_dim=0)
        args = [
            to_cute_tensor(qn), to_cute_tensor(qp),
            to_cute_tensor(lat3, assumed_align=16), to_cute_tensor(scales, assumed_align=2),
            to_cute_tensor(table, assumed_align=16, leading_dim=0), to_cute_tensor(rope3),
            to_cute_tensor(out.view(total_q * heads, -1)),
            to_cute_tensor(lse, assumed_align=4) if lse is not None else None,
            to_cute_tensor(cu_seqlens_q, **small), to_cute_tensor(seqused_k, **small),
            to_cute_tensor(page_table, assumed_align=4, leading_dim=1),
            softmax_scale, max_seqlen_q,
            cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True),
        ]
        kernel = FlashMLAForwardSm90(heads, bits, causal)
        _compile_cache[key] = cute.compile(kernel, *args, options="--enable-tvm-ffi")
    if not is_fake_mode() and total_q:
        _compile_cache[key](qn, qp, lat3, scales, table, rope3, out.view(total_q * heads, -1), lse,
                            cu_seqlens_q, seqused_k, page_table, softmax_scale, max_seqlen_q)
    return out, lse
