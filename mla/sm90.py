"""Head-dim 576/512 MLA prefill on SM90 (CuTeDSL): absorbed queries over a paged latent cache.

FA4 has no SM90 kernel for this shape (``flash_attn.cute`` b36 stops at head_dim 256 on SM90):
one warpgroup cannot hold a 64 x 512 float32 output accumulator (256 registers a thread). The
layout is FlashMLA's and FA3's "large head_dim V" one, three warpgroups per CTA:

- WG0, producer: loads the Q tile once and, per KV block, the 64 x 512 latent and the 64 x 64
  bf16 RoPE keys into a two-stage ring. A block's 64 keys are consecutive slots of one page (the
  page size is a multiple of 64), so a bf16 block is two TMA copies issued by one warp; the
  sequence's partial last block is copied by cp.async instead, the slots past its end replaced
  by its last key (they may hold NaN, and a masked P of 0 times NaN is NaN). Packed codes are
  dequantised in registers with the prefill kernel's conversion (``fa4_tq.kernels.load_stage``);
  a 2/3/4-bit block's codes are loaded into registers before the producer waits for its stage.
- WG1, scores: ``S = Q_nope C^T + Q_pe K_pe^T`` (64 x 64 over 576 dims), FA4's mask and online
  softmax, P (bf16) and the row rescale factors into shared memory, then ``O[:, :256] += P C[:, :256]``.
- WG2: ``O[:, 256:] += P C[:, 256:]`` once WG1 has published P.

8-bit latents run as pairs of CTAs (a cluster of two m-blocks): each producer converts 32 of a
block's 64 rows into its own stage and bulk-copies them (``cp.async.bulk`` shared::cluster) into
its peer's, whose full barrier counts the bytes; a stage is free when both CTAs' consumers have
released it. Both CTAs walk the union of their key ranges.

The 64 rows of a tile are (query token, head) pairs, ``row = token * heads + head`` (FA4's
PackGQA order with one KV head): every head reads the same latent, so one tile of keys serves 64
rows. Values are the latent itself: the PV operand is a transposed view of the latent stage, not
a second load. ``sQ_nope`` is reused for the output tile.

FA4 pieces used as they are: ``Softmax`` (online softmax, finalize, rescale), ``AttentionMask``
and ``BlockInfo`` (causal masking and block ranges with packed rows), ``SeqlenInfoQK``, the cp.async
pipeline, quack's wgmma helpers. What FA4 would need so this could be a subclass instead is in
docs/UPSTREAM.md.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Optional

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils_basic
from cutlass import Float32, Int32, Uint32, const_expr
from cutlass.cute.nvgpu import cpasync, warpgroup
from cutlass.pipeline import pipeline_init_arrive, pipeline_init_wait
from cutlass.utils import LayoutEnum
from cutlass import pipeline

from flash_attn.cute import copy_utils
from flash_attn.cute import pipeline as pipeline_custom
from flash_attn.cute import utils as fa_utils
from flash_attn.cute.block_info import BlockInfo
from flash_attn.cute.mask import AttentionMask
from flash_attn.cute.seqlen_info import SeqlenInfoQK
from flash_attn.cute.softmax import Softmax
from quack import layout_utils, sm90_utils

from fa4_tq.kernels.load_stage import dequant_part, dequant_words, load_words
from fa4_tq.kernels.staging import table_floats, uses_shared_table

D_LATENT = 512
D_ROPE = 64
TILE_M = 64
TILE_N = 64
# Producer threads converting one row of a packed block: two, half a row each. Four or eight (a
# quarter or an eighth of 2 or 4 rows, so a warp's code loads cover whole 128-byte lines) measured
# 0.80-0.90x and 0.52-0.54x (mla-<gpu>.md, twenty-fifth session).
ROW_THREADS = 128 // TILE_N


class _Bar:
    """Named hardware barriers (0 is __syncthreads)."""

    P_FULL = 1  # WG1 has written P and the row factors (WG1 + WG2 sync)
    P_FREE = 2  # WG2 has finished reading them (WG2 arrives, WG1 syncs)
    EPILOGUE = 3  # the output tile is in shared memory (WG1 + WG2)
    PRODUCER = 4  # the producer's 8-bit codebook is in shared memory


class FlashMLAForwardSm90:
    """One compiled variant: ``num_heads`` query heads sharing one latent, latent ``bits`` in
    {2, 3, 4, 8} (packed, format v1) or None (bf16), causal or not, LSE written or not."""

    num_stages = 2
    copy_unroll = 4  # 16-byte copies per loop trip of a bf16 tile (1, 2 and 8 measured slower)
    # Latent widths whose blocks two CTAs of a cluster load half each (mla-<gpu>.md: 1.18x at 8
    # bits, whose shared-memory codebook lookups bound the producer; 0.87-0.98x for bf16 and
    # 0.92-0.99x at 2 and 4 bits, where the pair's lockstep costs more than the halved loads save).
    pair_bits = (8,)
    dequant_unroll = 4  # iterations of 32 codes per loop trip in dequant_part
    bf16_tma = True  # whole bf16 blocks by TMA (False: every block by the producer's cp.async)
    # 2/3/4-bit codes: this thread's part of a block row (16-32 words a half) loaded into registers
    # before the stage is acquired, so their latency overlaps that wait and the RoPE copies
    # (False: ``dequant_part``'s own loads, four of 16 bytes a loop trip, two trips a block).
    # Not for the 8-bit pairs: 1.01-1.02x there, and the loads spill at 72 producer registers.
    codes_first = True

    def __init__(self, num_heads: int, bits: Optional[int], is_causal: bool, scale_dtype=Float32):
        if bits not in (None, 2, 3, 4, 8):
            raise ValueError(f"bits must be None (bf16 latent) or one of 2, 3, 4, 8, got {bits!r}")
        self.num_heads = num_heads
        self.bits = bits
        self.is_causal = is_causal
        self.dtype = cutlass.BFloat16
        # setmaxnreg moves registers inside the launch's 384 x 168 (504 per thread of each WG):
        # WG1 holds O (128), S (32) and P (16) per thread, WG2 O alone; the producer computes
        # the addresses of the bf16 tile copies or converts packed codes in registers.
        self.pair = bits in self.pair_bits
        self.codes_in_registers = bits is not None and not self.pair and self.codes_first
        # The codes loaded first take the producer from 56 to 72 (WG2's 200 still hold O;
        # 80/192 spilled, compile_check --ptxas).
        self.producer_regs, self.scores_regs, self.pv_regs = (
            (72, 232, 200) if self.codes_in_registers else (56, 232, 216))

    # ------------------------------------------------------------------ host entry
    @cute.jit
    def __call__(
        self,
        mQn: cute.Tensor,  # (total_q * heads, 512) bf16, row = token * heads + head
        mQp: cute.Tensor,  # (total_q * heads, 64) bf16
        mLat: cute.Tensor,  # bf16 (pages, page_size, 512) | uint8 (pages, page_size, 64 * bits)
        mScale: cute.Tensor,  # (pages, page_size) fp16/fp32 (read for a packed latent)
        mTable: cute.Tensor,  # float32 codebook (read for 8-bit codes)
        mRope: cute.Tensor,  # (pages, page_size, 64) bf16
        mO: cute.Tensor,  # (total_q * heads, 512) bf16
        mLSE: Optional[cute.Tensor],  # (heads, total_q) float32
        mCuSeqlensQ: cute.Tensor,  # (batch + 1,) int32
        mSeqUsedK: cute.Tensor,  # (batch,) int32
        mPageTable: cute.Tensor,  # (batch, max_pages) int32
        softmax_scale: Float32,
        max_seqlen_q: Int32,
        stream: cuda.CUstream = None,
    ):
        self.sQn_layout = sm90_utils.make_smem_layout(self.dtype, LayoutEnum.ROW_MAJOR, (TILE_M, D_LATENT))
        self.sQp_layout = sm90_utils.make_smem_layout(self.dtype, LayoutEnum.ROW_MAJOR, (TILE_M, D_ROPE))
        self.sC_layout = sm90_utils.make_smem_layout(self.dtype, LayoutEnum.ROW_MAJOR, (TILE_N, D_LATENT), self.num_stages)
        self.sR_layout = sm90_utils.make_smem_layout(self.dtype, LayoutEnum.ROW_MAJOR, (TILE_N, D_ROPE), self.num_stages)
        self.sP_layout = sm90_utils.make_smem_layout(self.dtype, LayoutEnum.ROW_MAJOR, (TILE_M, TILE_N))
        tiled_mma_qk = sm90_utils_basic.make_trivial_tiled_mma(
            self.dtype, self.dtype, warpgroup.OperandMajorMode.K, warpgroup.OperandMajorMode.K, Float32,
            atom_layout_mnk=(1, 1, 1), tiler_mn=(64, TILE_N),
        )
        # P @ C: the two consumer warpgroups side by side along the 512 value columns.
        tiled_mma_pv = sm90_utils_basic.make_trivial_tiled_mma(
            self.dtype, self.dtype, warpgroup.OperandMajorMode.K, warpgroup.OperandMajorMode.MN, Float32,
            atom_layout_mnk=(1, 2, 1), tiler_mn=(64, D_LATENT // 2),
            a_source=warpgroup.OperandSource.SMEM,
        )
        n_table = table_floats(self.bits) if self.bits is not None else 0
        # bf16 latent: whole blocks by TMA over the paged caches viewed (page_size, cols, pages)
        # (one page holds whole 64-key blocks); RoPE keys with them on the same barrier.
        tma_lat = tma_rope = (None, None)
        if const_expr(self.bits is None):
            tma_lat = self._make_tma(mLat, self.sC_layout, D_LATENT)
            tma_rope = self._make_tma(mRope, self.sR_layout, D_ROPE)

        @cute.struct
        class SharedStorage:
            mbar_q: cute.struct.MemRange[cutlass.Int64, 2]
            mbar_kv: cute.struct.MemRange[cutlass.Int64, 2 * self.num_stages]
            row_factor: cute.struct.MemRange[Float32, TILE_M]
            table: cute.struct.Align[cute.struct.MemRange[Float32, max(n_table, 4)], 16]
            sQn: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(self.sQn_layout)], 1024]
            sQp: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(self.sQp_layout)], 1024]
            sC: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(self.sC_layout)], 1024]
            sR: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(self.sR_layout)], 1024]
            sP: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(self.sP_layout)], 1024]

        softmax_scale_log2 = softmax_scale * math.log2(math.e)
        grid_m = (max_seqlen_q * self.num_heads + TILE_M - 1) // TILE_M
        if const_expr(self.pair):
            grid_m = (grid_m + 1) // 2 * 2  # whole clusters of two m-blocks
        self.kernel(
            mQn, mQp, mLat, mScale, mTable, mRope, mO, mLSE, mCuSeqlensQ, mSeqUsedK, mPageTable,
            *tma_lat, *tma_rope, softmax_scale_log2, tiled_mma_qk, tiled_mma_pv, SharedStorage,
            self.sQn_layout, self.sQp_layout, self.sC_layout, self.sR_layout, self.sP_layout,
        ).launch(
            grid=[cutlass.max(grid_m, 1), mCuSeqlensQ.shape[0] - 1, 1],
            block=[384, 1, 1],
            cluster=[2 if self.pair else 1, 1, 1],
            stream=stream,
            min_blocks_per_mp=1,
        )

    @staticmethod
    def _make_tma(mX: cute.Tensor, s_layout, cols: int):
        """(TMA atom, TMA coordinate tensor (page_size, cols, pages)) for 64-row tiles of a paged
        bf16 cache (pages, page_size, cols) into one stage of ``s_layout``."""
        paged = cute.make_tensor(mX.iterator, cute.select(mX.layout, mode=[1, 2, 0]))
        return cpasync.make_tiled_tma_atom(
            cpasync.CopyBulkTensorTileG2SOp(), paged, cute.select(s_layout, mode=[0, 1]), (TILE_N, cols), 1)

    # ------------------------------------------------------------------ kernel
    @cute.kernel
    def kernel(
        self,
        mQn: cute.Tensor,
        mQp: cute.Tensor,
        mLat: cute.Tensor,
        mScale: cute.Tensor,
        mTable: cute.Tensor,
        mRope: cute.Tensor,
        mO: cute.Tensor,
        mLSE: Optional[cute.Tensor],
        mCuSeqlensQ: cute.Tensor,
        mSeqUsedK: cute.Tensor,
        mPageTable: cute.Tensor,
        tma_atom_lat: Optional[cute.CopyAtom],
        mLatTma: Optional[cute.Tensor],
        tma_atom_rope: Optional[cute.CopyAtom],
        mRopeTma: Optional[cute.Tensor],
        softmax_scale_log2: Float32,
        tiled_mma_qk: cute.TiledMma,
        tiled_mma_pv: cute.TiledMma,
        SharedStorage: cutlass.Constexpr,
        sQn_layout: cute.ComposedLayout,
        sQp_layout: cute.ComposedLayout,
        sC_layout: cute.ComposedLayout,
        sR_layout: cute.ComposedLayout,
        sP_layout: cute.ComposedLayout,
    ):
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        tidx, _, _ = cute.arch.thread_idx()
        m_block, batch_idx, _ = cute.arch.block_idx()

        smem = cutlass.utils.SmemAllocator()
        storage = smem.allocate(SharedStorage)
        threads = partial(pipeline.CooperativeGroup, pipeline.Agent.Thread)
        pipeline_q = pipeline_custom.PipelineCpAsync.create(
            barrier_storage=storage.mbar_q.data_ptr(), num_stages=1, producer_group=threads(128),
            consumer_group=threads(8), defer_sync=True, elect_one_release=True, syncwarp_before_release=False,
        )
        # In a pair, a stage is free once both CTAs' consumer warps have released it: each CTA's
        # producer writes half of its peer's stage.
        pipeline_kv = pipeline_custom.PipelineCpAsync.create(
            barrier_storage=storage.mbar_kv.data_ptr(), num_stages=self.num_stages, producer_group=threads(128),
            consumer_group=threads(16 if self.pair else 8), defer_sync=True, elect_one_release=True,
            syncwarp_before_release=False,
        )
        cluster_mn = (2, 1) if const_expr(self.pair) else (1, 1)
        pipeline_init_arrive(cluster_shape_mn=cluster_mn, is_relaxed=True)

        sQn = storage.sQn.get_tensor(sQn_layout.outer, swizzle=sQn_layout.inner)
        sQp = storage.sQp.get_tensor(sQp_layout.outer, swizzle=sQp_layout.inner)
        sC = storage.sC.get_tensor(sC_layout.outer, swizzle=sC_layout.inner)
        sR = storage.sR.get_tensor(sR_layout.outer, swizzle=sR_layout.inner)
        sP = storage.sP.get_tensor(sP_layout.outer, swizzle=sP_layout.inner)
        sRowFactor = storage.row_factor.get_tensor(cute.make_layout((TILE_M,)))
        sTable = storage.table.get_tensor(cute.make_layout((max(table_floats(self.bits) if self.bits else 0, 4),)))

        seqlen = SeqlenInfoQK.create(
            batch_idx, Int32(0), Int32(0), mCuSeqlensQ=mCuSeqlensQ, mSeqUsedK=mSeqUsedK,
            tile_m=TILE_M, tile_n=TILE_N,
        )
        block_info = BlockInfo(TILE_M, TILE_N, self.is_causal, qhead_per_kvhead_packgqa=self.num_heads)
        n_block_min, n_block_max = block_info.get_n_block_min_max(seqlen, m_block)
        first_m_block = m_block
        if const_expr(self.pair):
            # Both CTAs of a pair walk the same blocks, the union of their ranges (the extra block
            # of the earlier m-block, if any, is masked for it). A CTA whose rows all lie past the
            # sequence still runs, on clamped rows it does not store, to fill its peer's stages.
            first_m_block = m_block // 2 * 2
            n_block_min = block_info.get_n_block_min_max(seqlen, first_m_block)[0]
            n_block_max = block_info.get_n_block_min_max(seqlen, first_m_block + 1)[1]
        n_blocks = cutlass.max(n_block_max - n_block_min, 0)
        pipeline_init_wait(cluster_shape_mn=cluster_mn)

        if first_m_block * TILE_M < seqlen.seqlen_q * self.num_heads:  # the same answer for the whole pair
            if warp_idx < 4:
                cute.arch.setmaxregister_decrease(self.producer_regs)
                tma = None
                if const_expr(self.bits is None):
                    tma = (self._tma_tiles(tma_atom_lat, mLatTma, sC, D_LATENT),
                           self._tma_tiles(tma_atom_rope, mRopeTma, sR, D_ROPE))
                self.load(mQn, mQp, mLat, mScale, mTable, mRope, mPageTable, sQn, sQp, sC, sR, sTable,
                          pipeline_q, pipeline_kv, seqlen, batch_idx, m_block, n_block_max, n_blocks, tma)
            else:
                if warp_idx < 8:
                    cute.arch.setmaxregister_increase(self.scores_regs)
                else:
                    cute.arch.setmaxregister_increase(self.pv_regs)
                self.mma(mO, mLSE, sQn, sQp, sC, sR, sP, sRowFactor, pipeline_q, pipeline_kv,
                         tiled_mma_qk, tiled_mma_pv, softmax_scale_log2, seqlen, block_info,
                         batch_idx, m_block, n_block_min, n_block_max, n_blocks)
        if const_expr(self.pair):
            # No CTA leaves while its peer may still arrive on its barriers.
            cute.arch.cluster_arrive()
            cute.arch.cluster_wait()

    # ------------------------------------------------------------------ producer
    @staticmethod
    def _tma_tiles(atom, mX_tma, sX, cols: int):
        """(atom, global tiles indexed [None, block in page, page], shared tiles [None, stage])."""
        gX = cute.local_tile(mX_tma, (TILE_N, cols), (None, 0, None))  # (64, cols, blocks/page, pages)
        tXsX, tXgX = cpasync.tma_partition(atom, 0, cute.make_layout(1), cute.group_modes(sX, 0, 2),
                                           cute.group_modes(gX, 0, 2))
        return atom, tXgX, tXsX

    @cute.jit
    def load(self, mQn, mQp, mLat, mScale, mTable, mRope, mPageTable, sQn, sQp, sC, sR, sTable,
             pipeline_q, pipeline_kv, seqlen, batch_idx, m_block, n_block_max, n_blocks, tma):
        tidx, _, _ = cute.arch.thread_idx()  # 0..127
        row, half = tidx // 2, tidx % 2  # two threads per tile row, one half of its columns each
        rank = Int32(0)
        if const_expr(self.pair):
            # Rows 32 * rank .. + 31 of each block are converted here, four threads a row.
            rank = cute.arch.make_warp_uniform(cute.arch.block_idx_in_cluster())
            kv_row, part = 32 * rank + tidx // 4, tidx % 4
        else:
            kv_row, part = tidx // ROW_THREADS, tidx % ROW_THREADS
        if const_expr(self.bits is not None and uses_shared_table(self.bits)):
            for i in cutlass.range(tidx, table_floats(self.bits), 128, unroll=1):
                sTable[i] = mTable[i]
            cute.arch.barrier(barrier_id=_Bar.PRODUCER, number_of_threads=128)

        # Q: rows m_block * 64 + row of the (token * heads + head) matrix. Rows past the end load
        # the last valid row instead (their output is never stored): every copy is a cp.async, so
        # the pipeline's cp.async-tracked arrive covers the whole tile.
        q_row = cutlass.min(m_block * TILE_M + row, seqlen.seqlen_q * self.num_heads - 1)
        g_row = seqlen.offset_q * self.num_heads + q_row
        self._copy_row_async(mQn, (g_row,), sQn[row, None], half, D_LATENT // 2)
        self._copy_row_async(mQp, (g_row,), sQp[row, None], half, D_ROPE // 2)
        pipeline_q.producer_commit_w_index(0)

        kv_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.num_stages)
        page_size = mRope.shape[1]
        codes = None  # this thread's part of a row of 2/3/4-bit codes, loaded before the stage wait
        if const_expr(self.codes_in_registers):
            codes = cute.make_rmem_tensor((D_LATENT // ROW_THREADS * self.bits // 32,), Uint32)
        # One block ahead: the next block's page-table entry and scale are read while this one
        # is converted, so no block starts with two dependent global loads.
        page, off, sigma = Int32(0), Int32(0), Float32(0.0)
        if n_blocks > 0:
            page, off, sigma = self._row_page(mPageTable, mScale, page_size, seqlen, batch_idx, n_block_max - 1, kv_row)
        for i in cutlass.range(n_blocks, unroll=1):
            n_block = n_block_max - 1 - i
            page_next, off_next, sigma_next = page, off, sigma
            if i + 1 < n_blocks:
                page_next, off_next, sigma_next = self._row_page(
                    mPageTable, mScale, page_size, seqlen, batch_idx, n_block - 1, kv_row)
            if const_expr(codes is not None):
                # In flight behind the next block's page and scale loads (issued first: 1.03x over
                # the other order) while the stage is acquired. Not a block earlier: ptxas sank
                # such loads to the end of the conversion, just before the proxy fence (a MEMBAR)
                # that precedes each arrive, where they were waited for (mla-<gpu>.md).
                load_words(self._latent_part(mLat, page, off, part, ROW_THREADS), codes, self.bits,
                           D_LATENT // ROW_THREADS)
            pipeline_kv.producer_acquire(kv_state)
            stage = kv_state.index
            # A block's 64 keys are consecutive slots of one page (page_size % 64 == 0).
            first = n_block * TILE_N % page_size
            last = first + seqlen.seqlen_k - 1 - n_block * TILE_N
            if const_expr(self.bits is None):
                if const_expr(self.bf16_tma) and last >= first + TILE_N - 1:
                    # A whole block by TMA: one thread declares its bytes, the other 127 arrive
                    # (the full barrier counts the 128 producer threads), and warp 0 issues the
                    # copies (a TMA copy elects its issuing lane: the whole warp must run it).
                    full = pipeline_kv.sync_object_full.get_barrier(stage)
                    self._arrive_expecting(full, TILE_N * (D_LATENT + D_ROPE) * 2, tidx)
                    if tidx < 32:
                        for atom, tXgX, tXsX in tma:
                            cute.copy(atom, tXgX[None, first // TILE_N, page], tXsX[None, stage], tma_bar_ptr=full)
                else:
                    # The sequence's last, partial block: slots past its end may hold anything
                    # (NaN * P = 0 is NaN), so these threads copy the last key in their place.
                    self._copy_tile_async(mRope, page, first, last, sR[None, None, stage], D_ROPE)
                    self._copy_tile_async(mLat, page, first, last, sC[None, None, stage], D_LATENT)
                    # The stage's barrier arrives when this thread's copies land.
                    pipeline_kv.producer_commit(kv_state)
            elif const_expr(self.pair):
                self._copy_tile_async(mRope, page, first, last, sR[None, None, stage], D_ROPE)
                cute.arch.cp_async_commit_group()  # the RoPE keys fly while the latent is converted
                self._dequant_row(mLat, page, off, sigma, sC[kv_row, None, stage], part, sTable, None, parts=4)
                cute.arch.cp_async_wait_group(0)
                cute.arch.fence_proxy("async.shared", space="cta")
                self._send_half_to_peer(sC, stage, rank, pipeline_kv, tidx)
            else:
                # Per-row RoPE copies here: the tile copy measured 0-6% slower beside the conversion.
                self._copy_row_async(mRope, (page, off), sR[kv_row, None, stage], part, D_ROPE // ROW_THREADS)
                cute.arch.cp_async_commit_group()  # the RoPE keys fly while the latent is converted
                self._dequant_row(mLat, page, off, sigma, sC[kv_row, None, stage], part, sTable, codes,
                                  parts=ROW_THREADS)
                cute.arch.cp_async_wait_group(0)
                cute.arch.fence_proxy("async.shared", space="cta")
                cute.arch.mbarrier_arrive(pipeline_kv.sync_object_full.get_barrier(stage))
            kv_state.advance()
            page, off, sigma = page_next, off_next, sigma_next

    @cute.jit
    def _row_page(self, mPageTable, mScale, page_size, seqlen, batch_idx, n_block, row):
        """(page, offset in the page, latent scale) of this thread's row of ``n_block``. Rows past the sequence
        read its last key (finite data: the mask zeroes their P, and 0 * finite = 0 where
        unwritten cache memory could hold NaN) and get scale 0."""
        token = n_block * TILE_N + row
        valid = token < seqlen.seqlen_k
        token = cutlass.min(token, seqlen.seqlen_k - 1)
        page = mPageTable[batch_idx, token // page_size]
        off = token % page_size
        sigma = Float32(0.0)
        if const_expr(self.bits is not None):
            if valid:
                sigma = Float32(mScale[page, off])
        return page, off, sigma

    @cute.jit
    def _copy_row_async(self, mX, row_coord, s_row, half, cols: cutlass.Constexpr[int]):
        """``cols`` bf16 of one global row (``half`` of it) into a swizzled shared row, 16 bytes
        per cp.async. ``row_coord``: ``(row,)`` of a matrix or ``(page, offset)`` of a paged cache."""
        dst = cute.zipped_divide(cute.local_tile(s_row, (cols,), (half,)), (8,))
        src_t = cute.domain_offset((*row_coord, half * cols), mX)
        ptr = cute.make_ptr(self.dtype, src_t.iterator.toint(), cute.AddressSpace.gmem, assumed_align=16)
        src = cute.zipped_divide(cute.make_tensor(ptr, cute.make_layout((cols,))), (8,))
        atom = cute.make_copy_atom(cpasync.CopyG2SOp(cache_mode=cpasync.LoadCacheMode.GLOBAL), self.dtype,
                                   num_bits_per_copy=128)
        for c in cutlass.range_constexpr(cols // 8):
            cute.copy(atom, src[None, c], dst[None, c])

    @cute.jit
    def _copy_tile_async(self, mX, page, first, last, sX, cols: cutlass.Constexpr[int]):
        """Slots ``first .. first + 63`` of ``page`` of a paged cache (slots past ``last`` read
        slot ``last``: finite data, masked) into the swizzled tile ``sX`` (64, ``cols``), 16 bytes
        per cp.async. Consecutive threads take consecutive 16-byte chunks, so a warp reads 512
        contiguous bytes (``_copy_row_async`` gives each thread its own row: half of every sector
        it fetches is another thread's)."""
        tidx = cute.arch.thread_idx()[0] % 128
        per_row = cols // 8
        chunk = tidx % per_row
        atom = cute.make_copy_atom(cpasync.CopyG2SOp(cache_mode=cpasync.LoadCacheMode.GLOBAL), self.dtype,
                                   num_bits_per_copy=128)
        for i in cutlass.range(TILE_N * per_row // 128, unroll=self.copy_unroll):
            r = (i * 128 + tidx) // per_row
            src_t = cute.domain_offset((page, cutlass.min(first + r, last), chunk * 8), mX)
            ptr = cute.make_ptr(self.dtype, src_t.iterator.toint(), cute.AddressSpace.gmem, assumed_align=16)
            cute.copy(atom, cute.make_tensor(ptr, cute.make_layout((8,))),
                      cute.zipped_divide(sX[r, None], (8,))[None, chunk])

    def _latent_part(self, mLat, page, off, part, parts: int):
        """Part ``part`` of ``parts`` of the packed latent row at (page, off): global uint8,
        16-byte aligned."""
        part_bytes = D_LATENT // parts * self.bits // 8
        src_t = cute.domain_offset((page, off, part * part_bytes), mLat)
        ptr = cute.make_ptr(cutlass.Uint8, src_t.iterator.toint(), cute.AddressSpace.gmem, assumed_align=16)
        return cute.make_tensor(ptr, cute.make_layout((part_bytes,)))

    @cute.jit
    def _dequant_row(self, mLat, page, off, sigma, s_row, part, sTable, codes, parts: cutlass.Constexpr[int] = 2):
        """Part ``part`` of ``parts`` of a packed latent row -> bf16 in the stage: from ``codes``
        (registers, loaded first) or read straight from global memory by ``dequant_part`` (no
        staging buffer either way: Q and the two latent stages fill shared memory)."""
        cols = D_LATENT // parts
        table = sTable if const_expr(uses_shared_table(self.bits)) else None
        dst = cute.local_tile(s_row, (cols,), (part,))
        if const_expr(codes is not None):
            dequant_words(codes, sigma, dst, self.bits, cols, table)
        else:
            dequant_part(self._latent_part(mLat, page, off, part, parts), sigma, dst, self.bits, cols, table,
                         unroll=min(self.dequant_unroll, cols // 32))

    @cute.jit
    def _send_half_to_peer(self, sC, stage, rank, pipeline_kv, tidx):
        """Once the 128 producer threads have written (and fenced) this CTA's 32 rows of the
        stage, one thread bulk-copies them into the same place of the peer's stage, completing
        bytes on the peer's full barrier, and declares the 32 KB the peer sends on its own; then
        every thread arrives. Rows 32 * rank .. + 31 of each 64-column swizzle atom are 4 KB
        contiguous and the swizzle does not cross them, so the bytes land where the peer's
        layout expects them."""
        cute.arch.barrier(barrier_id=_Bar.PRODUCER, number_of_threads=128)
        full = pipeline_kv.sync_object_full.get_barrier(stage)
        half_bytes = TILE_N // 2 * D_LATENT * 2
        if tidx == 0:
            base = sC[None, None, stage].iterator
            for k in cutlass.range_constexpr(D_LATENT // 64):
                src = base + (k * TILE_N * 64 + rank * (TILE_N // 2) * 64)
                copy_utils.cpasync_bulk_s2cluster(src, src, full, half_bytes // (D_LATENT // 64), 1 - rank)
        self._arrive_expecting(full, half_bytes, tidx)

    @cute.jit
    def _arrive_expecting(self, full, nbytes: cutlass.Constexpr[int], tidx):
        """The 128 producer threads' arrivals on a stage's full barrier (it counts them), thread 0's
        also declaring the ``nbytes`` that copy engines will complete on it: the phase cannot
        end before thread 0 arrives, so those bytes may land first."""
        if tidx == 0:
            cute.arch.mbarrier_arrive_and_expect_tx(full, nbytes)
        else:
            cute.arch.mbarrier_arrive(full)

    # ------------------------------------------------------------------ consumers
    @cute.jit
    def mma(self, mO, mLSE, sQn, sQp, sC, sR, sP, sRowFactor, pipeline_q, pipeline_kv, tiled_mma_qk,
            tiled_mma_pv, softmax_scale_log2, seqlen, block_info, batch_idx, m_block, n_block_min,
            n_block_max, n_blocks):
        tidx = cute.arch.thread_idx()[0] - 128  # 0..255 over the two consumer warpgroups
        wg = cute.arch.make_warp_uniform(tidx // 128)
        sCt = layout_utils.transpose_view(sC)  # (512, 64, stages): the values, N-major
        wg_mma_pv = tiled_mma_pv.get_slice(cute.make_layout(2, stride=128)(wg))
        acc_O, tOrP, tOrCt = sm90_utils.partition_fragment_ABC(wg_mma_pv, (TILE_M, D_LATENT, TILE_N), sP, sCt)
        thr_mma_pv = tiled_mma_pv.get_slice(tidx)
        acc_O.fill(0.0)
        kv_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.num_stages)
        if wg == 0:
            softmax = self.scores(sQn, sQp, sC, sR, sP, sRowFactor, pipeline_q, pipeline_kv, tiled_mma_qk,
                                  tiled_mma_pv, acc_O, tOrP, tOrCt, kv_state, softmax_scale_log2, seqlen,
                                  block_info, batch_idx, m_block, n_block_min, n_block_max)
            row_factor = softmax.finalize()
            cute.arch.barrier(barrier_id=_Bar.P_FREE, number_of_threads=256)
            self._publish_row_factor(tiled_mma_qk, tidx, row_factor, sRowFactor)
            cute.arch.barrier(barrier_id=_Bar.P_FULL, number_of_threads=256)
            softmax.rescale_O(acc_O, row_factor)
            if const_expr(mLSE is not None):
                self._store_lse(mLSE, softmax.row_sum, tiled_mma_qk, tidx, seqlen, m_block)
        else:
            cute.arch.barrier_arrive(barrier_id=_Bar.P_FREE, number_of_threads=256)
            for _ in cutlass.range(n_blocks, unroll=1):
                cute.arch.barrier(barrier_id=_Bar.P_FULL, number_of_threads=256)
                self._rescale_from_smem(acc_O, thr_mma_pv, sRowFactor)
                pipeline_kv.consumer_wait(kv_state, pipeline_kv.consumer_try_wait(kv_state))
                sm90_utils.gemm_w_idx(tiled_mma_pv, acc_O, tOrP, tOrCt, zero_init=False, B_idx=kv_state.index, wg_wait=0)
                cute.arch.barrier_arrive(barrier_id=_Bar.P_FREE, number_of_threads=256)
                self._release(pipeline_kv, kv_state)
                kv_state.advance()
            cute.arch.barrier(barrier_id=_Bar.P_FULL, number_of_threads=256)
            self._rescale_from_smem(acc_O, thr_mma_pv, sRowFactor)
        self.epilogue(acc_O, mO, sQn, tiled_mma_pv, tidx, seqlen, m_block)

    @cute.jit
    def scores(self, sQn, sQp, sC, sR, sP, sRowFactor, pipeline_q, pipeline_kv, tiled_mma_qk, tiled_mma_pv,
               acc_O, tOrP, tOrCt, kv_state, softmax_scale_log2, seqlen, block_info, batch_idx, m_block,
               n_block_min, n_block_max):
        """WG1: per block S, mask, online softmax, publish P, its half of P @ C. Returns the softmax."""
        tidx = cute.arch.thread_idx()[0] - 128  # 0..127
        thr_mma_qk = tiled_mma_qk.get_slice(tidx)
        wg_mma_qk = tiled_mma_qk.get_slice(0)
        _, tSrQn, tSrC = sm90_utils.partition_fragment_ABC(wg_mma_qk, (TILE_M, TILE_N, D_LATENT), sQn, sC)
        _, tSrQp, tSrR = sm90_utils.partition_fragment_ABC(wg_mma_qk, (TILE_M, TILE_N, D_ROPE), sQp, sR)
        smem_thr_copy_P = cute.make_tiled_copy_C(
            fa_utils.get_smem_store_atom(90, self.dtype), tiled_mma_qk).get_slice(tidx)
        tPsP = smem_thr_copy_P.partition_D(sP)
        softmax = Softmax.create(softmax_scale_log2, num_rows=acc_O.shape[0][0] * acc_O.shape[1], arch=90)
        softmax.reset()
        mask = AttentionMask(TILE_M, TILE_N, seqlen, qhead_per_kvhead_packgqa=self.num_heads)
        mask_fn = partial(mask.apply_mask, batch_idx=batch_idx, head_idx=Int32(0), m_block=m_block,
                          thr_mma=thr_mma_qk, mask_causal=self.is_causal)
        block = partial(self._score_block, tiled_mma_qk=tiled_mma_qk, tiled_mma_pv=tiled_mma_pv,
                        tSrQn=tSrQn, tSrC=tSrC, tSrQp=tSrQp, tSrR=tSrR, smem_thr_copy_P=smem_thr_copy_P,
                        tPsP=tPsP, sRowFactor=sRowFactor, softmax=softmax, pipeline_kv=pipeline_kv,
                        acc_O=acc_O, tOrP=tOrP, tOrCt=tOrCt, tidx=tidx)

        pipeline_q.consumer_wait_w_index_phase(0, Int32(0))
        if n_block_max > n_block_min:
            # The last block first, masked for the sequence end (and the diagonal when causal).
            kv_state = block(kv_state, n_block_max - 1, mask_fn=partial(mask_fn, mask_seqlen=True))
            n_block_max -= 1
            if const_expr(self.is_causal):
                n_block_causal = block_info.get_n_block_min_causal_local_mask(seqlen, m_block, n_block_min)
                for n_tile in cutlass.range(n_block_max - n_block_causal, unroll=1):
                    kv_state = block(kv_state, n_block_max - 1 - n_tile, mask_fn=partial(mask_fn, mask_seqlen=False))
                n_block_max = cutlass.min(n_block_max, n_block_causal)
            for n_tile in cutlass.range(n_block_max - n_block_min, unroll=1):
                kv_state = block(kv_state, n_block_max - 1 - n_tile, mask_fn=None)
        return softmax

    @cute.jit
    def _score_block(self, kv_state, n_block, *, mask_fn, tiled_mma_qk, tiled_mma_pv, tSrQn, tSrC, tSrQp,
                     tSrR, smem_thr_copy_P, tPsP, sRowFactor, softmax, pipeline_kv, acc_O, tOrP, tOrCt, tidx):
        pipeline_kv.consumer_wait(kv_state, pipeline_kv.consumer_try_wait(kv_state))
        acc_S = sm90_utils.gemm_zero_init(tiled_mma_qk, (TILE_M, TILE_N), tSrQn, tSrC, B_idx=kv_state.index,
                                          wg_wait=-1)
        sm90_utils.gemm_w_idx(tiled_mma_qk, acc_S, tSrQp, tSrR, zero_init=False, B_idx=kv_state.index, wg_wait=0)
        if const_expr(mask_fn is not None):
            mask_fn(acc_S, n_block=n_block)
        row_factor = softmax.online_softmax(acc_S, is_first=False, check_inf=True)
        tOrP_acc = layout_utils.reshape_acc_to_frgA(acc_S)
        rP = cute.make_rmem_tensor_like(tOrP_acc, self.dtype)
        fa_utils.cvt_f16(tOrP_acc, rP)
        # WG2 must be done with the previous P and row factors before they are overwritten.
        cute.arch.barrier(barrier_id=_Bar.P_FREE, number_of_threads=256)
        cute.copy(smem_thr_copy_P, smem_thr_copy_P.retile(rP), tPsP)
        self._publish_row_factor(tiled_mma_qk, tidx, row_factor, sRowFactor)
        cute.arch.fence_view_async_shared()
        cute.arch.barrier(barrier_id=_Bar.P_FULL, number_of_threads=256)
        softmax.rescale_O(acc_O, row_factor)
        sm90_utils.gemm_w_idx(tiled_mma_pv, acc_O, tOrP, tOrCt, zero_init=False, B_idx=kv_state.index, wg_wait=0)
        self._release(pipeline_kv, kv_state)
        kv_state.advance()
        return kv_state

    @cute.jit
    def _release(self, pipeline_kv, kv_state):
        """The stage is read: one lane per warp arrives on this CTA's empty barrier, and in a
        pair on the peer's too (its producer writes half of this CTA's stage)."""
        if const_expr(self.pair):
            if cute.arch.lane_idx() == 0:
                empty = pipeline_kv.sync_object_empty.get_barrier(kv_state.index)
                cute.arch.mbarrier_arrive(empty)
                # CTA scope, as FA4's pipelines arrive: the reads it releases are finished wgmmas.
                cute.arch.mbarrier_arrive(empty, 1 - cute.arch.block_idx_in_cluster())
        else:
            pipeline_kv.consumer_release(kv_state)

    @cute.jit
    def _publish_row_factor(self, tiled_mma_qk, tidx, row_factor, sRowFactor):
        """One thread of each row's quad writes the row's factor for WG2."""
        tScS = layout_utils.reshape_acc_to_mn(
            tiled_mma_qk.get_slice(tidx).partition_C(cute.make_identity_tensor((TILE_M, TILE_N))))
        if tScS[0, 0][1] == 0:
            for r in cutlass.range_constexpr(cute.size(row_factor)):
                sRowFactor[tScS[r, 0][0]] = row_factor[r]

    @cute.jit
    def _rescale_from_smem(self, acc_O, thr_mma_pv, sRowFactor):
        tOcO = layout_utils.reshape_acc_to_mn(thr_mma_pv.partition_C(cute.make_identity_tensor((TILE_M, D_LATENT))))
        acc_O_mn = layout_utils.reshape_acc_to_mn(acc_O)
        for r in cutlass.range_constexpr(cute.size(acc_O_mn, mode=[0])):
            f = sRowFactor[tOcO[r, 0][0]]
            acc_O_mn[r, None].store(acc_O_mn[r, None].load() * f)

    @cute.jit
    def _store_lse(self, mLSE, lse, tiled_mma_qk, tidx, seqlen, m_block):
        tScS = layout_utils.reshape_acc_to_mn(
            tiled_mma_qk.get_slice(tidx).partition_C(cute.make_identity_tensor((TILE_M, TILE_N))))
        if tScS[0, 0][1] == 0:
            for r in cutlass.range_constexpr(cute.size(lse)):
                q_row = m_block * TILE_M + tScS[r, 0][0]
                token, head = q_row // self.num_heads, q_row % self.num_heads
                if token < seqlen.seqlen_q:
                    mLSE[head, seqlen.offset_q + token] = lse[r]

    @cute.jit
    def epilogue(self, acc_O, mO, sO, tiled_mma_pv, tidx, seqlen, m_block):
        """O (bf16) -> shared memory (over Q_nope, no longer read) -> 16-byte global stores of
        the valid rows."""
        rO = cute.make_rmem_tensor_like(acc_O, self.dtype)
        fa_utils.cvt_f16(acc_O, rO)
        smem_thr_copy_O = cute.make_tiled_copy_C(fa_utils.get_smem_store_atom(90, self.dtype), tiled_mma_pv).get_slice(tidx)
        cute.copy(smem_thr_copy_O, smem_thr_copy_O.retile(rO), smem_thr_copy_O.partition_D(sO))
        cute.arch.barrier(barrier_id=_Bar.EPILOGUE, number_of_threads=256)
        chunk = tidx % (D_LATENT // 8)
        buf = cute.make_rmem_tensor((8,), self.dtype)
        for i in cutlass.range_constexpr(TILE_M * D_LATENT // 8 // 256):
            row = i * (256 // (D_LATENT // 8)) + tidx // (D_LATENT // 8)
            q_row = m_block * TILE_M + row
            if q_row < seqlen.seqlen_q * self.num_heads:
                cute.autovec_copy(cute.local_tile(sO[row, None], (8,), (chunk,)), buf)
                g = cute.domain_offset((seqlen.offset_q * self.num_heads + q_row, chunk * 8), mO)
                ptr = cute.make_ptr(self.dtype, g.iterator.toint(), cute.AddressSpace.gmem, assumed_align=16)
                cute.autovec_copy(buf, cute.make_tensor(ptr, cute.make_layout((8,))))
