"""Split-KV combine for decode (CuTeDSL), and its plain PyTorch twin ``combine_reference``.

Per split ``j`` of the keys, a normalised output row ``o_j`` and its log-sum-exp ``lse_j``: float32
from the decode kernel (``kernels/decode.py``), q's dtype from the packed-KV kernel's split
launches (``fa4_tq.decode._run_split``), read as they are. Per (batch, query, head) row this
kernel computes ``lse = log sum_j exp(lse_j)`` and ``o = sum_j exp(lse_j - lse) o_j`` in the output
dtype; one split is the cast. A row whose every split is empty (``lse_j = -inf``) gets ``o = 0``
and ``lse = -inf``, as FA4's combine gives; a split of weight 0 is not read (its partial may
hold anything).

Why not FA4's combine (``flash_attn.cute.flash_fwd_combine``): b36 merges bf16/fp16 partials
wrongly, so it needed a float32 copy of them, and it is launched plainly (no ``use_pdl`` switch;
both in ``docs/UPSTREAM.md``), so after the decode kernel it starts only once that kernel has
completed; this one is a programmatic dependent launch (its CTAs start as the decode kernel's
exit and wait on ``griddepcontrol.wait``), and the same launch does the unsplit path's cast, which
was a PyTorch kernel of its own.

One warp a row, ``d / 32`` values a lane: the row's split count is small (at most
``decode.MAX_SPLITS``), so each lane first reads every 32nd ``lse_j`` for the max and the sum,
then all lanes walk the splits, the weight of each from a broadcast load of its ``lse_j``.
"""

from __future__ import annotations

import math

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import torch
from cutlass import Float32, const_expr

WARPS = 4  # rows a CTA


def combine_reference(out_part: torch.Tensor, lse_part: torch.Tensor):
    """``(out [B, Q, H, D], lse [B, H, Q])`` in float64 from ``out_part [S, B, Q, H, D]`` and
    ``lse_part [S, B, H, Q]``; splits of ``lse_j = -inf`` are not read."""
    lse64 = lse_part.double()
    lse = torch.logsumexp(lse64, dim=0)  # [B, H, Q]; -inf where every split is
    w = torch.exp(lse64 - torch.where(torch.isinf(lse), 0.0, lse))  # [S, B, H, Q]; 0 for empty splits
    w = w.permute(0, 1, 3, 2).unsqueeze(-1)  # [S, B, Q, H, 1]
    parts = torch.where(w > 0, out_part.double(), 0.0)
    return (w * parts).sum(0), lse


class SplitCombine:
    """Compile-time configuration: the head dim (64 or 128) and whether the launch is a
    programmatic dependent one."""

    # splits whose loads are in flight together: 8 measured 1.01-1.04x faster than 4 and level with
    # or faster than 16 at 8-16 splits (batch 1), level at 2 (H100, perf/results/decode-*.md)
    unroll = 8

    def __init__(self, head_dim: int, pdl: bool = True):
        if head_dim % 64:
            raise ValueError(f"SplitCombine runs head_dim 64 and 128, got {head_dim}")
        self.d = head_dim
        self.per_lane = head_dim // 32
        self.pdl = pdl

    @cute.jit
    def __call__(
        self,
        mOPart: cute.Tensor,  # (splits, batch, seqlen_q, heads, d) float32/bf16/fp16, rows 16-byte aligned
        mLSEPart: cute.Tensor,  # (splits, batch, heads, seqlen_q) float32
        mO: cute.Tensor,  # (batch, seqlen_q, heads, d) bf16/fp16, contiguous
        mLSE: cute.Tensor,  # (batch, heads, seqlen_q) float32
        stream: cuda.CUstream = None,
    ):
        rows = mO.shape[0] * mO.shape[1] * mO.shape[2]
        self.kernel(mOPart, mLSEPart, mO, mLSE).launch(
            grid=[(rows + WARPS - 1) // WARPS, 1, 1], block=[32 * WARPS, 1, 1], stream=stream, use_pdl=self.pdl)

    @cute.kernel
    def kernel(self, mOPart, mLSEPart, mO, mLSE):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        lane = tidx % 32
        row = bidx * WARPS + tidx // 32
        batch, seqlen_q, heads = mO.shape[0], mO.shape[1], mO.shape[2]
        if const_expr(self.pdl):  # the partials are the previous kernel's output
            cute.arch.griddepcontrol_wait()
        if row < batch * seqlen_q * heads:
            h = row % heads
            q = row // heads % seqlen_q
            b = row // (heads * seqlen_q)
            merge_row(mOPart, mLSEPart, mO, mLSE, b, q, h, lane, self.per_lane, self.unroll)


@cute.jit
def merge_row(mOPart: cute.Tensor, mLSEPart: cute.Tensor, mO: cute.Tensor, mLSE: cute.Tensor, b, q, h, lane,
              E: cutlass.Constexpr[int], unroll: cutlass.Constexpr[int]):
    """Row ``(b, q, h)`` of ``mO`` and ``mLSE`` from every split's partials, by one warp (``lane``),
    ``E = d / 32`` values a lane: the combine's work per row, which the decode kernel's last CTA
    of a row group also does (``PackedDecode``), so both give the same bits."""
    splits = mOPart.shape[0]
    log2e = Float32(math.log2(math.e))
    m = -Float32.inf
    for j in cutlass.range(lane, splits, 32, unroll=1):
        m = cute.arch.fmax(m, mLSEPart[j, b, h, q])
    m = cute.arch.warp_reduction(m, cute.arch.fmax)
    m_off = Float32(0.0) if m == -Float32.inf else m  # every split empty: all weights 0
    total = Float32(0.0)
    for j in cutlass.range(lane, splits, 32, unroll=1):
        total += cute.math.exp2((mLSEPart[j, b, h, q] - m_off) * log2e, fastmath=True)
    total = cute.arch.warp_reduction(total, lambda x, y: x + y)
    inv = Float32(0.0) if total == Float32(0.0) else Float32(1.0) / total
    acc = cute.make_rmem_tensor((E,), Float32)
    acc.fill(0.0)
    part = cute.make_rmem_tensor((E,), mOPart.element_type)
    part_f32 = cute.make_rmem_tensor((E,), Float32)
    # Every split's loads are issued whatever its weight (none depends on another
    # iteration, so the unrolled loop keeps several in flight: a branch around them
    # serialised the loads, 1.5-2.9 us slower at 16 splits); the product is then selected
    # away where the weight is 0, NaN partials included.
    for j in cutlass.range(splits, unroll=unroll):
        src = cute.domain_offset((j, b, q, h, lane * E), mOPart).iterator.toint()
        src = cute.make_ptr(mOPart.element_type, src, cute.AddressSpace.gmem,
                            assumed_align=mOPart.element_type.width // 8 * E)
        cute.autovec_copy(cute.make_tensor(src, cute.make_layout((E,))), part)
        part_f32.store(part.load().to(Float32))
        w = cute.math.exp2((mLSEPart[j, b, h, q] - m_off) * log2e, fastmath=True) * inv
        for i in cutlass.range_constexpr(E):
            acc[i] += w * part_f32[i] if w > Float32(0.0) else Float32(0.0)
    res = cute.make_rmem_tensor((E,), mO.element_type)
    res.store(acc.load().to(mO.element_type))
    dst = cute.domain_offset((b, q, h, lane * E), mO).iterator.toint()
    dst = cute.make_ptr(mO.element_type, dst, cute.AddressSpace.gmem, assumed_align=2 * E)
    cute.autovec_copy(res, cute.make_tensor(dst, cute.make_layout((E,))))
    if lane == 0:
        mLSE[b, h, q] = cute.math.log(total, fastmath=True) + m_off if total > Float32(0.0) else -Float32.inf
