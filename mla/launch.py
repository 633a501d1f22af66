"""Torch side of the MLA kernels: compile once per variant, launch (as fa4_tq.kernels.launch does
for the attention kernel; under torch's FakeTensorMode it compiles and does not launch).

SM 9.x runs ``mla/sm90.py`` (our kernel), SM 10.x ``mla/sm100.py`` (FA4's 2-CTA MLA forward with
the packed-latent load stage; compile-checked only, never run)."""

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
    from flash_attn.cute.interface import _compile_options
    from flash_attn.cute.testing import is_fake_mode

    from fa4_tq.kernels.launch import device_arch, zero_strides
    from fa4_tq.kernels.staging import lookup_table

    arch = device_arch()
    if arch // 10 not in (9, 10):
        raise NotImplementedError(
            f"the MLA kernel is built for SM90 (Hopper) and SM100 (Blackwell); this device is SM{arch}: "
            "use backend='reference'"
        )
    total_q, heads, _ = q_nope.shape
    q_nope = q_nope.contiguous()
    q_pe = q_pe.contiguous()
    if out is None:
        out = torch.empty_like(q_nope)
    if lse is None and return_lse:
        lse = torch.empty(heads, total_q, dtype=torch.float32, device=q_nope.device)
    if out.shape != q_nope.shape or out.dtype != q_nope.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {q_nope.dtype} tensor of shape {tuple(q_nope.shape)}")
    if lse is not None and (lse.shape != (heads, total_q) or lse.dtype != torch.float32 or not lse.is_contiguous()):
        raise ValueError(f"lse must be a contiguous float32 tensor of shape {(heads, total_q)}")
    packed = isinstance(latent, PackedKV)
    if packed:
        lat, scales, bits = latent.data, latent.scales.squeeze(1), latent.bits
        table = (torch.empty(1 << bits, dtype=torch.float32, device=q_nope.device) if is_fake_mode()
                 else lookup_table(bits, q_nope.device))
    else:
        lat, bits = latent, None
        scales = torch.empty(1, 1, dtype=torch.float32, device=q_nope.device)  # not read
        table = torch.empty(4, dtype=torch.float32, device=q_nope.device)  # not read
    idx = (cu_seqlens_q, seqused_k, page_table)
    if arch // 10 == 9:
        from .sm90 import FlashMLAForwardSm90 as Kernel

        # rows = (token, head) pairs; the latent and RoPE caches without their head axis
        tensors = (q_nope.view(total_q * heads, -1), q_pe.view(total_q * heads, -1), lat.squeeze(2), scales,
                   table, rope.squeeze(2), out.view(total_q * heads, -1), lse, *idx)
        scalars = (softmax_scale, max_seqlen_q)
        out_align = 16
    else:
        from .sm100 import FlashMLAForwardSm100 as Kernel

        # FA4's MLA shapes; its LSE is (total_q, heads), ours the transposed (heads, total_q)
        tensors = (q_nope, q_pe, lat, scales, table, rope, out, lse.t() if lse is not None else None, *idx)
        scalars = (softmax_scale,)
        out_align = 32  # as FA4's interface assumes for head_dim_v 512
    # bytes each pointer may be assumed aligned to (scales and index tensors: their element)
    aligns = (16, 16, 16, 2, 16, 16, out_align, 4, 4, 4, 4)
    # the class too: a subclass with other switches (compile_check, tests, scripts/ab_mla.py) is another kernel
    key = ("mla", Kernel, arch, heads, bits, scales.dtype, causal, lse is not None, zero_strides(q_nope, q_pe))
    if key not in _compile_cache:
        kernel = Kernel(heads, bits, causal)
        args = [None if t is None else to_cute_tensor(t, assumed_align=a, leading_dim=_unit_stride_dim(t))
                for t, a in zip(tensors, aligns)]
        _compile_cache[key] = cute.compile(
            kernel, *args, *scalars, cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True),
            options=_compile_options(getattr(kernel, "ptxas_options", "")),
        )
    if not is_fake_mode() and total_q:
        _compile_cache[key](*tensors, *scalars)
    return out, lse


def _unit_stride_dim(t: torch.Tensor) -> int:
    """The dimension CuTeDSL is told is contiguous (the transposed LSE view's is the first)."""
    return t.dim() - 1 if t.stride(-1) == 1 else list(t.stride()).index(1)
