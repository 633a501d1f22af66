"""FlashAttention-4's SM100 (Blackwell) forward on TurboQuant-packed K/V. Compile-checked only.

``FlashAttentionForwardSm100TQ`` subclasses FA4's ``FlashAttentionForwardSm100`` and replaces only
``load_KV``, the per-block K/V load of FA4's paged cp.async path (``paged_kv_non_tma``): each of
the 128 load threads copies its packed row into a staging slot and dequantises it into the
K/V stage the tcgen05 MMA reads, with the same ``load_stage.py`` code as the SM90 kernel (one
place for the byte-to-bf16 conversion). FA4's MMA warp, softmax, correction, epilogue and
schedulers run unchanged.

No Blackwell GPU was available to this project: this kernel is compiled for ``sm_100a`` in CI
and has never run. ``scripts/bench_b200.sh`` runs its tests and benchmarks where one is.

Differences from the SM90 subclass, each a consequence of FA4's SM100 structure:
- ``q_stage=1``: FA4 then gives the K/V load to four warps (128 threads), the SM90 producer's
  thread count, so a thread owns one 128-key tile row. Which row is FA4's choice
  (``PagedKVManager.load_page_table``, which also looks up the row's page); we follow it.
- No staging ring prefetch: a block's packed bytes are copied and dequantised in one step.
- No fused rotation: the caller rotates q and un-rotates the output (``rotation="gemm"``).
- Paged K/V only (``launch.py`` presents a contiguous cache as one page per sequence); the
  carriers' strides are the packed byte strides in dtype units (``load_stage.packed_shape_carrier``), so FA4's
  per-row pointers are the packed rows' addresses.
"""

from __future__ import annotations

from typing import Optional

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr

from flash_attn.cute.flash_fwd_sm100 import FlashAttentionForwardSm100
from flash_attn.cute.utils import AuxData

from .load_stage import copy_part_async, dequant_part, packed_shape_carrier
from .sm90 import TQOperands, inline_body
from .staging import SMEM_CAPACITY, StagingPlan, table_floats, uses_shared_table

LOAD_THREADS = 128  # four load warps with q_stage=1 (FA4: softmax1_warp_ids take the load)

_fa4_kernel_body = inline_body(FlashAttentionForwardSm100.kernel)


class FlashAttentionForwardSm100TQ(FlashAttentionForwardSm100):
    """FA4 SM100 forward whose K/V come packed (``k_bits``/``v_bits`` in {2, 3, 4, 8}), paged."""

    dequant_unroll = 4  # as on SM90 (sm90.py says what it measured there)

    def __init__(self, dtype, head_dim: int, qhead_per_kvhead: int, *, k_bits: int, v_bits: int,
                 is_causal: bool = False, is_local: bool = False, pack_gqa: bool = False, is_varlen_q: bool = False):
        if head_dim not in (64, 128):
            raise ValueError(f"the SM100 packed-KV kernel supports head_dim 64 and 128, got {head_dim}")
        super().__init__(
            head_dim, head_dim, qhead_per_kvhead, is_causal=is_causal, is_local=is_local, pack_gqa=pack_gqa,
            m_block_size=128, n_block_size=128, q_stage=1, is_static_persistent=False, paged_kv_non_tma=True,
            is_varlen_q=is_varlen_q,
        )
        self.dtype, self.head_dim, self.k_bits, self.v_bits = dtype, head_dim, k_bits, v_bits
        self.k_plan = StagingPlan(128, head_dim, k_bits, LOAD_THREADS)
        self.v_plan = StagingPlan(128, head_dim, v_bits, LOAD_THREADS)

    def _staging_bytes(self) -> int:
        return sum(p.bytes(padded=True) for p in (self.k_plan, self.v_plan)) + 4 * (
            table_floats(self.k_bits) + table_floats(self.v_bits)) + 256

    def _setup_attributes(self):
        """FA4's stage counts, then as many K/V stages fewer as the staging slots need."""
        super()._setup_attributes()
        per_stage = 128 * self.head_dim * 2
        q_o = 2 * 128 * self.head_dim * 2
        fit = (SMEM_CAPACITY - 8 * 1024 - q_o - self._staging_bytes()) // per_stage
        if fit < 2:
            raise ValueError(f"no two K/V stages fit beside the staging slots at head_dim {self.head_dim}")
        self.kv_stage = min(self.kv_stage, fit)

    # ------------------------------------------------------------------ host entry
    @cute.jit
    def __call__(
        self,
        mQ: cute.Tensor,  # (b, s_q, h, d) or (total_q, h, d), already rotated by R_k
        mK: cute.Tensor,  # uint8 packed pages (num_pages, page_size, h_k, nb)
        mV: cute.Tensor,
        mKScale: cute.Tensor,  # (num_pages, h_k, page_size)
        mVScale: cute.Tensor,
        mKTable: cute.Tensor,
        mVTable: cute.Tensor,
        mO: cute.Tensor,
        mLSE: Optional[cute.Tensor],
        softmax_scale: Float32,
        mCuSeqlensQ: Optional[cute.Tensor] = None,
        mSeqUsedK: Optional[cute.Tensor] = None,
        mPageTable: Optional[cute.Tensor] = None,
        window_size_left: Int32 | int | None = None,
        window_size_right: Int32 | int | None = None,
        stream: cuda.CUstream = None,
    ):
        # (no sign vectors: the caller rotates; the tables stand in for the unused fields)
        self._tq_host = TQOperands(mK, mV, mKScale, mVScale, mKTable, mVTable, mKTable, mVTable)
        FlashAttentionForwardSm100.__call__(
            self, mQ, packed_shape_carrier(mK, self.dtype, self.head_dim),
            packed_shape_carrier(mV, self.dtype, self.head_dim), mO, mLSE, softmax_scale,
            mCuSeqlensQ, None, None, mSeqUsedK, mPageTable, window_size_left, window_size_right,
            None, None, None, AuxData(), stream=stream,
        )

    # ------------------------------------------------------------------ kernel
    def kernel(self, *fa4_args, **fa4_kwargs):
        """FA4's ``__call__`` launches ``self.kernel(...)``: add the packed operands."""
        return self._kernel_tq(*fa4_args, self._tq_host, **fa4_kwargs)

    @cute.kernel
    def _kernel_tq(self, mQ, mK, mV, mO, mLSE, mCuSeqlensQ, mCuSeqlensK, mSeqUsedQ, mSeqUsedK, mPageTable,
                   tma_atom_Q, tma_atom_K, tma_atom_V, tma_atom_O, softmax_scale_log2, softmax_scale,
                   window_size_left, window_size_right, learnable_sink, descale_tensors, blocksparse_tensors,
                   sQ_layout: cute.ComposedLayout, sK_layout: cute.ComposedLayout, tP_layout: cute.ComposedLayout,
                   sV_layout: cute.ComposedLayout, sO_layout: cute.ComposedLayout,
                   gmem_tiled_copy_Q, gmem_tiled_copy_O, tiled_mma_qk: cute.TiledMma, tiled_mma_pv: cute.TiledMma,
                   tile_sched_params, num_splits, num_splits_dynamic_ptr, tile_count_semaphore,
                   virtual_batch_idx_ptr, num_nheads_in_l2_ptr, aux_data, fastdiv_mods, head_divmod,
                   tq: TQOperands):
        smem = cutlass.utils.SmemAllocator()
        stages = []
        for plan in (self.k_plan, self.v_plan):
            stride = plan.row_stride(True)
            stages.append(smem.allocate_tensor(cutlass.Uint8, cute.make_layout((LOAD_THREADS, stride), stride=(stride, 1)),
                                               byte_alignment=128))
        self._sStageK, self._sStageV = stages
        self._sTableK, self._sTableV = None, None
        if const_expr(uses_shared_table(self.k_bits)):
            self._sTableK = smem.allocate_tensor(Float32, cute.make_layout((table_floats(self.k_bits),)), byte_alignment=16)
        if const_expr(uses_shared_table(self.v_bits)):
            self._sTableV = smem.allocate_tensor(Float32, cute.make_layout((table_floats(self.v_bits),)), byte_alignment=16)
        self._tq = tq
        # 8-bit codebooks into shared memory, by the whole CTA before FA4's code starts
        if const_expr(self._sTableK is not None or self._sTableV is not None):
            tidx = cute.arch.thread_idx()[0]
            for sTable, mTable in ((self._sTableK, tq.k_table), (self._sTableV, tq.v_table)):
                if const_expr(sTable is not None):
                    for i in cutlass.range(tidx, cute.size(sTable), self.threads_per_cta, unroll=1):
                        sTable[i] = mTable[i]
            cute.arch.barrier()
        _fa4_kernel_body(
            self, mQ, mK, mV, mO, mLSE, mCuSeqlensQ, mCuSeqlensK, mSeqUsedQ, mSeqUsedK, mPageTable,
            tma_atom_Q, tma_atom_K, tma_atom_V, tma_atom_O, softmax_scale_log2, softmax_scale,
            window_size_left, window_size_right, learnable_sink, descale_tensors, blocksparse_tensors,
            sQ_layout, sK_layout, tP_layout, sV_layout, sO_layout, gmem_tiled_copy_Q, gmem_tiled_copy_O,
            tiled_mma_qk, tiled_mma_pv, tile_sched_params, num_splits, num_splits_dynamic_ptr,
            tile_count_semaphore, virtual_batch_idx_ptr, num_nheads_in_l2_ptr, aux_data, fastdiv_mods,
            head_divmod,
        )

    # ------------------------------------------------------------------ the load stage
    @cute.jit
    def load_KV(self, tma_atom, tXgX, tXsX, paged_kv_manager, sX: cute.Tensor, block: Int32, pipeline_kv,
                producer_state, K_or_V: cutlass.Constexpr[str], page_idx: Optional[Int32] = None,
                extra_tx_count: Optional[Int32] = None):
        """One K or V block: this thread's packed row -> staging -> dtype row of the stage."""
        tq, mgr = self._tq, paged_kv_manager
        is_k = const_expr(K_or_V == "K")
        plan = self.k_plan if is_k else self.v_plan
        sStage = self._sStageK if is_k else self._sStageV
        sTable = self._sTableK if is_k else self._sTableV
        data, scale = (tq.k_data, tq.k_scale) if is_k else (tq.v_data, tq.v_scale)
        tidx = cute.arch.thread_idx()[0] % LOAD_THREADS
        # The row FA4's load_page_table gave this thread, and its page (PagedKVManager's layout).
        tpr = mgr.gmem_threads_per_row
        row = (tidx % tpr) * (LOAD_THREADS // tpr) + tidx // tpr
        page, off = mgr.tPrPage[0], mgr.tPrPageOffset[0]
        valid = block * 128 + row < mgr.seqlen_k
        # Which KV head: the carrier FA4 sliced by head addresses packed bytes (packed_shape_carrier).
        head = Int32((mgr.mK_paged.iterator.toint() - tq.k_data.iterator.toint()) // tq.k_data.stride[2])
        sigma = Float32(0.0)
        if valid:
            sigma = Float32(scale[page, head, off])
            src = cute.domain_offset((page, off, head, 0), data)
            ptr = cute.make_ptr(cutlass.Uint8, src.iterator.toint(), cute.AddressSpace.gmem, assumed_align=plan.copy_bytes)
            copy_part_async(ptr, sStage[tidx, None], plan.part_bytes, plan.copy_bytes)
        cute.arch.cp_async_commit_group()
        pipeline_kv.producer_acquire(producer_state)
        cute.arch.cp_async_wait_group(0)  # a thread reads only the staging bytes it copied
        tile = mgr._flatten_smem_sm100(sX[None, None, None, producer_state.index], K_or_V)  # (128, d)
        dequant_part(sStage[tidx, None], sigma, tile[row, None], plan.bits, plan.cols, sTable,
                     unroll=self.dequant_unroll)
        cute.arch.fence_proxy("async.shared", space="cta")
        cute.arch.mbarrier_arrive(pipeline_kv.sync_object_full.get_barrier(producer_state.index))
