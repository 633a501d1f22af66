"""MLA prefill on SM100 (Blackwell): FA4's 2-CTA MLA forward over a packed latent. Compile-checked only.

``FlashMLAForwardSm100`` subclasses FA4's ``FlashAttentionMLAForwardSm100`` (``flash_fwd_mla_sm100``)
on its paged cp.async path and replaces one method, ``cpasync_paged_load_KV``, for the latent's
tiles. FA4 reads the latent four times per KV block, as the B operand of ``Qv V^T`` (two halves
of 256 columns, each CTA of the pair 64 keys) and of ``P V`` (two halves, each CTA its 128
columns of every key). For each of those tiles a load thread reads its packed row part from
global memory and writes it dequantised into the stage with ``fa4_tq.kernels.load_stage.dequant_part``,
the conversion every fa4-tq kernel uses. The 64-wide RoPE keys, the schedulers, the MMA warp,
softmax, correction and epilogue are FA4's, unchanged. With ``bits=None`` (bf16 latent) nothing is
replaced: it is FA4's kernel on the cp.async path.

Why no staging ring (the SM90 kernels copy packed bytes into shared memory first with
cp.async): FA4's stages of this kernel already take nearly all of the 227 KB, so the part is read
straight into registers (16-byte loads; ``dequant_part`` accepts a global source). The load
latency is then not hidden behind the previous tile's conversion. Whether that costs on a B200 is
unmeasured: no Blackwell GPU was available to this project.

Which key row a load thread owns is FA4's choice (``PagedKVManager.load_page_table``:
``row = (t % tpr) * (128 // tpr) + t // tpr``), and so is the page the row lives on; the
non-transposed tiles hold only the CTA's 64 keys, so there two threads share a row, one per
128 columns, and take its page from the owning lane with a shuffle.
"""

from __future__ import annotations

from typing import Callable, Optional

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr

from flash_attn.cute.flash_fwd_mla_sm100 import FlashAttentionMLAForwardSm100

from fa4_tq.kernels.load_stage import dequant_part, packed_shape_carrier
from fa4_tq.kernels.sm90 import inline_body

D_LATENT = 512
D_ROPE = 64
PART_COLS = 128  # latent columns one load thread converts per tile

_fa4_kernel_body = inline_body(FlashAttentionMLAForwardSm100.kernel)


class FlashMLAForwardSm100(FlashAttentionMLAForwardSm100):
    """One compiled variant: ``num_heads`` query heads sharing one latent, latent ``bits`` in
    {2, 3, 4, 8} (packed, format v1) or None (bf16), causal or not."""

    dequant_unroll = 4  # iterations of 32 codes per loop trip in dequant_part (one 128-column part)

    def __init__(self, num_heads: int, bits: Optional[int], is_causal: bool):
        if bits not in (None, 2, 3, 4, 8):
            raise ValueError(f"bits must be None (bf16 latent) or one of 2, 3, 4, 8, got {bits!r}")
        if not (128 % num_heads == 0 or num_heads % 128 == 0):
            raise ValueError(f"FA4's SM100 MLA kernel packs heads into 128-row tiles: num_heads must divide "
                             f"128 or be a multiple of it, got {num_heads}")
        super().__init__(
            is_causal=is_causal, use_cpasync_load_KV=True, is_topk_gather=False, pack_gqa=True,
            qhead_per_kvhead=num_heads, nheads_kv=1, hdim=D_ROPE, hdimv=D_LATENT, has_cu_seqlens_q=True,
        )
        self.bits = bits

    # ------------------------------------------------------------------ host entry
    @cute.jit
    def __call__(
        self,
        mQn: cute.Tensor,  # (total_q, heads, 512) bf16, rotated by the latent's R when packed
        mQp: cute.Tensor,  # (total_q, heads, 64) bf16
        mLat: cute.Tensor,  # bf16 (pages, page_size, 1, 512) | uint8 (pages, page_size, 1, 64 * bits)
        mScale: cute.Tensor,  # (pages, page_size) fp16/fp32 (read for a packed latent)
        mTable: cute.Tensor,  # float32 codebook (read for 8-bit codes)
        mRope: cute.Tensor,  # (pages, page_size, 1, 64) bf16
        mO: cute.Tensor,  # (total_q, heads, 512) bf16
        mLSE: Optional[cute.Tensor],  # (total_q, heads) float32 (a transposed (heads, total_q) view)
        mCuSeqlensQ: cute.Tensor,  # (batch + 1,) int32
        mSeqUsedK: cute.Tensor,  # (batch,) int32
        mPageTable: cute.Tensor,  # (batch, max_pages) int32
        softmax_scale: Float32,
        stream: cuda.CUstream = None,
    ):
        mV = mLat
        if const_expr(self.bits is not None):
            mV = packed_shape_carrier(mLat, cutlass.BFloat16, D_LATENT)
        self._tq_host = (mLat, mScale, mTable)
        FlashAttentionMLAForwardSm100.__call__(
            self, mQp, mQn, mRope, mV, mO, mLSE, softmax_scale,
            mCuSeqlensQ=mCuSeqlensQ, mSeqUsedK=mSeqUsedK, mPageTable=mPageTable, stream=stream,
        )

    # ------------------------------------------------------------------ kernel
    def kernel(self, *fa4_args):
        """FA4's ``__call__`` launches ``self.kernel(...)``: add the packed operands."""
        return self._kernel_tq(*fa4_args, *self._tq_host)

    @cute.kernel
    def _kernel_tq(self, mQ, mQv, mK, mV, mVt, mO, mOlo, mP, mLSE, mRowMax, mCuSeqlensQ, mCuSeqlensK,
                   mSeqUsedQ, mSeqUsedK, mIndexTopk, mPageTable, learnable_sink, tma_atom_Q, tma_atom_Qv,
                   tma_atom_K, tma_atom_V, tma_atom_Vt, tma_atom_O, tma_atom_P, tiled_copy_O_r2g: cute.TiledCopy,
                   sQ_layout_staged: cute.ComposedLayout, sK_layout_staged: cute.ComposedLayout,
                   sQv_layout_staged: cute.ComposedLayout, sV_layout_staged: cute.ComposedLayout,
                   sVt_layout_staged: cute.ComposedLayout, sP_layout_staged: cute.ComposedLayout,
                   sStats_layout: cute.Layout, sScale_layout: cute.Layout, sBitmask_layout: cute.Layout,
                   sO_layout: cute.ComposedLayout, sP_layout_out: cute.ComposedLayout,
                   tiled_mma_QK: cute.TiledMma, tiled_mma_QvV: cute.TiledMma, tiled_mma_PVt: cute.TiledMma,
                   softmax_scale: Float32, softmax_scale_log2: Float32, topk_length_dynamic: Optional[Int32],
                   tile_sched_params, SharedStorage: cutlass.Constexpr[Callable],
                   mLatPacked: cute.Tensor, mScale: cute.Tensor, mTable: cute.Tensor):
        self._latent = (mLatPacked, mScale, mTable)
        _fa4_kernel_body(
            self, mQ, mQv, mK, mV, mVt, mO, mOlo, mP, mLSE, mRowMax, mCuSeqlensQ, mCuSeqlensK, mSeqUsedQ,
            mSeqUsedK, mIndexTopk, mPageTable, learnable_sink, tma_atom_Q, tma_atom_Qv, tma_atom_K, tma_atom_V,
            tma_atom_Vt, tma_atom_O, tma_atom_P, tiled_copy_O_r2g, sQ_layout_staged, sK_layout_staged,
            sQv_layout_staged, sV_layout_staged, sVt_layout_staged, sP_layout_staged, sStats_layout,
            sScale_layout, sBitmask_layout, sO_layout, sP_layout_out, tiled_mma_QK, tiled_mma_QvV,
            tiled_mma_PVt, softmax_scale, softmax_scale_log2, topk_length_dynamic, tile_sched_params,
            SharedStorage,
        )

    # ------------------------------------------------------------------ the load stage
    def cpasync_paged_load_KV(self, paged_kv_manager, pipeline_mma, pipeline_cpasync, sX, transpose, K_or_V,
                              cta_rank_in_cluster, n_block, producer_state, d_offset=0):
        """One tile of the RoPE keys (FA4's copy) or of the latent (packed row part -> dtype tile).
        Plain Python: it picks, while tracing, which of the two jit functions the tile gets."""
        is_rope = not transpose and paged_kv_manager.head_dim_padded == self.hdim
        load = (FlashAttentionMLAForwardSm100.cpasync_paged_load_KV if self.bits is None or is_rope
                else FlashMLAForwardSm100._load_latent_part)
        return load(self, paged_kv_manager, pipeline_mma, pipeline_cpasync, sX, transpose, K_or_V,
                    cta_rank_in_cluster, n_block, producer_state, d_offset)

    @cute.jit
    def _load_latent_part(self, mgr, pipeline_mma, pipeline_cpasync, sX: cute.Tensor,
                          transpose: cutlass.Constexpr[bool], K_or_V: cutlass.Constexpr[str],
                          cta_rank_in_cluster: Int32, n_block: Int32, producer_state,
                          d_offset: cutlass.Constexpr[int] = 0):
        """This thread's 128 columns of one key row of the tile: packed bytes -> dtype."""
        mLat, mScale, mTable = self._latent
        bits = self.bits
        tidx = cute.arch.thread_idx()[0] % self.num_cpasync_load_threads
        tpr = mgr.gmem_threads_per_row
        rows_per_lane = self.num_cpasync_load_threads // tpr
        # Tile coordinates of this thread's part: key row, first column in the tile, first latent
        # column; and the lane that holds the row's page (FA4's load_page_table layout).
        if const_expr(transpose):
            # P V operand: all 128 keys, this CTA's 128 columns of the 256-column half
            # (FA4's CTA-split Vt view: half d_offset // 128, CTA rank within it).
            half_cols = self.hdimv // self.num_hdimv_splits
            cta_cols = half_cols // self.cta_group_size
            tile_rows = self.tile_n
            owner = tidx
            row = (tidx % tpr) * rows_per_lane + tidx // tpr
            key = n_block * self.tile_n + row
            col0 = Int32(0)
            lat_col0 = (d_offset // cta_cols) * half_cols + cta_rank_in_cluster * cta_cols
        else:
            # Qv V^T operand: this CTA's 64 keys, 256 columns from d_offset, two threads a row.
            half = tpr // 2
            tile_rows = self.tile_n // self.cta_group_size
            owner = (tidx // tpr) * tpr + (tidx % tpr) % half + cta_rank_in_cluster * half
            key_in_block = (owner % tpr) * rows_per_lane + owner // tpr
            row = key_in_block - cta_rank_in_cluster * tile_rows
            key = n_block * self.tile_n + key_in_block
            col0 = ((tidx % tpr) // half) * PART_COLS
            lat_col0 = d_offset + col0
        page = cute.arch.shuffle_sync(mgr.tPrPage[0], owner % 32)
        off = cute.arch.shuffle_sync(mgr.tPrPageOffset[0], owner % 32)
        sigma = Float32(mScale[page, off])
        if n_block < 0 or key >= mgr.seqlen_k:
            sigma = Float32(0.0)  # past the keys: this row (page 0, in bounds) converts to zeros
        src = cute.domain_offset((page, off, 0, lat_col0 * bits // 8), mLat)
        src = cute.make_tensor(
            cute.make_ptr(cutlass.Uint8, src.iterator.toint(), cute.AddressSpace.gmem, assumed_align=16),
            cute.make_layout((PART_COLS * bits // 8,)))

        head_dim = mgr.head_dim_v_padded if const_expr(K_or_V == "V") else mgr.head_dim_padded
        order = (1, 0) if const_expr(transpose) else (0, 1)
        pipeline_mma.producer_acquire(producer_state)
        sX_nd = cute.composition(sX[None, None, None, producer_state.index],
                                 cute.make_ordered_layout((tile_rows, head_dim), order=order))
        dst = cute.local_tile(sX_nd[row, None], (PART_COLS,), (col0 // PART_COLS,))
        dequant_part(src, sigma, dst, bits, PART_COLS, mTable if const_expr(bits == 8) else None,
                     unroll=self.dequant_unroll)
        # generic-proxy stores, read by tcgen05.mma (async proxy) once the relay warp commits
        cute.arch.fence_proxy("async.shared", space="cta")
        cute.arch.mbarrier_arrive(pipeline_cpasync.sync_object_full.get_barrier(producer_state.index))
        producer_state.advance()
        return producer_state
