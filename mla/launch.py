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
    if arch // 10 not in (9, 10):
        raise NotImplementedError(
            f"the MLA kernel is built for SM90 (Hopper) and SM100 (Blackwell); this device is SM{arch}: "
            "use backend='reference'"
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
    if arch // 10 == 10:
        return _launch_sm100(key, q_nope, q_pe, latent.data if packed else latent, scales, table, rope, out, lse,
                             cu_seqlens_q, seqused_k, page_table, softmax_scale)
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


def _launch_sm100(key, q_nope, q_pe, latent, scales, table, rope, out, lse, cu_seqlens_q, seqused_k, page_table,
                  softmax_scale):
    """FA4's 2-CTA MLA forward with the packed-latent load stage (``mla/sm100.py``); never run:
    no Blackwell GPU was available to this project."""
    import cutlass.cute as cute
    from flash_attn.cute.cute_dsl_utils import to_cute_tensor
    from flash_attn.cute.interface import _compile_options
    from flash_attn.cute.testing import is_fake_mode

    from .sm100 import FlashMLAForwardSm100

    lse_t = lse.t() if lse is not None else None  # FA4 writes (total_q, heads); ours is (heads, total_q)
    if key not in _compile_cache:
        small = dict(assumed_align=4, leading_dim=0)
        args = [
            to_cute_tensor(q_nope), to_cute_tensor(q_pe),
            to_cute_tensor(latent, assumed_align=16), to_cute_tensor(scales, assumed_align=2),
            to_cute_tensor(table, assumed_align=16, leading_dim=0), to_cute_tensor(rope),
            to_cute_tensor(out, assumed_align=32),
            to_cute_tensor(lse_t, assumed_align=4, leading_dim=0) if lse_t is not None else None,
            to_cute_tensor(cu_seqlens_q, **small), to_cute_tensor(seqused_k, **small),
            to_cute_tensor(page_table, assumed_align=4, leading_dim=1),
            softmax_scale,
            cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True),
        ]
        kernel = FlashMLAForwardSm100(q_nope.shape[1], key[3], key[5])
        _compile_cache[key] = cute.compile(kernel, *args, options=_compile_options(kernel.ptxas_options))
    if not is_fake_mode() and q_nope.shape[0]:
        _compile_cache[key](q_nope, q_pe, latent, scales, table, rope, out, lse_t, cu_seqlens_q, seqused_k,
                            page_table, softmax_scale)
    return out, lse
