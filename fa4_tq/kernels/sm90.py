"""FlashAttention-4's SM90 forward on TurboQuant-packed K/V.

``FlashAttentionForwardSm90TQ`` subclasses FA4's ``FlashAttentionForwardSm90`` and replaces only
the K/V load stage. The producer warpgroup (128 threads) copies packed rows into a staging ring
with cp.async and dequantises them (``load_stage.py``) into the swizzled ``sK``/``sV`` stages that
FA4's consumer warpgroups read with wgmma; each thread fences the async proxy and arrives on the
stage's mbarrier. QK^T, softmax, masks, PV, the epilogue and the tile schedulers are FA4's own
code, run unchanged. No bf16 K or V exists in global memory.

Attention runs in the rotated space. With ``fuse_rotation`` (the default) the kernel takes q and
returns o as the caller has them: the consumer warpgroups rotate their Q rows in shared memory
before the first QK^T and un-rotate the output accumulator before FA4's epilogue
(``fused_rotation.py``). Without it, the caller passes ``R_k q`` and un-rotates the output.

What FA4 lacks, and how it is bridged (each listed in docs/UPSTREAM.md):
- ``__call__`` derives shapes and smem layouts from K/V tensors of the compute dtype. We hand it
  *shape carriers*: tensors of the compute dtype over the packed buffers, used only for shapes.
- ``kernel`` has a fixed argument list, so the packed operands cannot reach ``load``. ``kernel``
  is overridden to launch a kernel with one more argument (``TQOperands``) whose body is FA4's
  own ``kernel`` body, inlined.
- ``load`` issues TMA or FA4's paged cp.async for K/V; it is overridden (Q is still loaded as FA4
  does, by TMA or PackGQA).
- The rotations need a step between "Q has landed" and the first QK^T, and one between the final
  rescale of O and its conversion: ``first_half_block_overlap`` and ``epilogue`` are wrapped
  (FA4's own code runs after / after ours), and ``mma`` only to keep a handle on ``sQ``.
- Skip-softmax (``skip_softmax=True``, ``skip_softmax.py``) needs a vote between a block's QK^T
  and its softmax: FA4's per-block step is wrapped, handing FA4's own code a voting softmax.
- Persistent (``persistent=True``, short prefill: ``scheduler.py``): ``__call__`` takes the
  scheduler by module name, rebound while tracing; FA4's ``sO`` is ``sQ``'s storage, so ``mma``
  hands FA4 a ``pipeline_q`` whose release does nothing and ``epilogue`` releases Q instead.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import types
from functools import partial
from typing import Callable, NamedTuple, Optional

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr
from cutlass import pipeline

from flash_attn.cute.block_info import BlockInfo
from flash_attn.cute.block_sparsity import BlockSparseTensors
from flash_attn.cute.flash_fwd_sm90 import FlashAttentionForwardSm90
from flash_attn.cute.named_barrier import NamedBarrierFwd
from flash_attn.cute.pack_gqa import PackGQA
from flash_attn.cute.utils import AuxData
from quack import copy_utils, layout_utils
from quack.cute_dsl_utils import ParamsBase

from .fused_rotation import rotate_q_rows, unrotate_acc
from .hadamard import scale_split
from .load_stage import copy_part_async, dequant_part
from .skip_softmax import SkipOperands, SkippingSoftmax, SkipState
from .staging import StagingPlan, choose_staging, table_floats, uses_shared_table


class TQOperands(NamedTuple):
    """The packed K/V as the kernel sees them (format v1, see docs/FORMAT.md)."""

    k_data: cute.Tensor  # uint8 (b, s, h_k, nb) | (total_k, h_k, nb) | (pages, page_size, h_k, nb)
    v_data: cute.Tensor
    k_scale: cute.Tensor  # (b, h_k, s) | (h_k, total_k) | (pages, h_k, page_size)
    v_scale: cute.Tensor
    k_table: cute.Tensor  # float32 codebook (staging.lookup_table), read for 8-bit codes
    v_table: cute.Tensor
    k_signs: cute.Tensor  # float32 (d,) sign vectors of R_k and R_v (fused rotation)
    v_signs: cute.Tensor


def inline_body(kernel_fn) -> Callable:
    """FA4's ``kernel`` body as a jit function we can call (inline) from our own kernel.

    A fresh function object over FA4's code: the decorated original is left untouched, so FA4's
    own kernels keep working in the same process."""
    raw = kernel_fn.__wrapped__
    code = getattr(raw, "_original_code", raw.__code__)
    clone = types.FunctionType(code, raw.__globals__, raw.__name__, raw.__defaults__, raw.__closure__)
    clone.__kwdefaults__ = raw.__kwdefaults__
    clone.__qualname__ = raw.__qualname__
    clone.__module__ = raw.__module__
    return cute.jit(clone)


_fa4_kernel_body = inline_body(FlashAttentionForwardSm90.kernel)


@functools.lru_cache(maxsize=None)
def _release_later_cls(base: type) -> type:
    @dataclasses.dataclass(frozen=True)
    class ReleaseLater(base):
        def consumer_release_w_index(self, index, *, loc=None, ip=None):
            pass

    return ReleaseLater


def _release_later(pipe):
    """``pipeline_q`` as FA4's ``mma`` sees it in a persistent kernel: its release of Q after the
    tile's last QK^T does nothing (``FlashAttentionForwardSm90TQ.epilogue`` releases it). The same
    frozen dataclass of another class, so the DSL carries it through FA4's tile loop as before."""
    view = copy.copy(pipe)
    object.__setattr__(view, "__class__", _release_later_cls(type(pipe)))
    return view


class FlashAttentionForwardSm90TQ(FlashAttentionForwardSm90):
    """FA4 SM90 forward whose K/V come packed (``k_bits``/``v_bits`` in {2, 3, 4, 8})."""

    # Hardware named barriers after the ones FA4 uses: the producer warpgroup's, then one per
    # consumer warpgroup (its Q rows rotated).
    _producer_barrier_id = max(int(b) for b in NamedBarrierFwd) + 1
    _rotate_q_barrier_id = _producer_barrier_id + 1
    _skip_vote_barrier_id = _rotate_q_barrier_id + 2  # one per consumer warpgroup
    _q_free_barrier_id = _skip_vote_barrier_id + 2  # the consumers, after a persistent tile's epilogue
    # Iterations of 32 codes the conversion loop unrolls (load_stage.dequant_part): 4 = a whole
    # head_dim-128 row. Measured on the H100 (hd128 s8K causal): +2-4% over 1 at K2V2/K4V4/K8V8.
    dequant_unroll = 4

    def __init__(
        self,
        dtype,
        head_dim: int,
        qhead_per_kvhead: int,
        *,
        k_bits: int,
        v_bits: int,
        is_causal: bool = False,
        is_local: bool = False,
        pack_gqa: bool = False,
        tile_m: int = 128,
        tile_n: int = 128,
        intra_wg_overlap: bool = True,
        mma_pv_is_rs: bool = True,
        producer_regs: Optional[int] = None,
        consumer_regs: Optional[int] = None,
        fuse_rotation: bool = True,
        skip_softmax: bool = False,
        persistent: bool = False,
        ablate: Optional[str] = None,
    ):
        if tile_m not in (64, 128):
            raise ValueError(f"tile_m must be 128 (two consumer warpgroups) or 64 (one, for decode), got {tile_m}")
        num_threads = 128 * (tile_m // 64 + 1)
        super().__init__(
            dtype,
            head_dim,
            head_dim,
            qhead_per_kvhead,
            is_causal=is_causal,
            is_local=is_local,
            pack_gqa=pack_gqa,
            tile_m=tile_m,
            tile_n=tile_n,
            num_stages=2,
            num_threads=num_threads,
            Q_in_regs=False,
            intra_wg_overlap=intra_wg_overlap,
            mma_pv_is_rs=mma_pv_is_rs,
            paged_kv_non_tma=True,  # FA4 then builds cp.async pipelines fed by all 128 producer threads
        )
        self.head_dim = head_dim
        self.k_bits, self.v_bits = k_bits, v_bits
        if fuse_rotation and not intra_wg_overlap:
            raise ValueError("fuse_rotation rotates Q in first_half_block_overlap: it needs intra_wg_overlap=True")
        self.fuse_rotation = fuse_rotation
        if skip_softmax and not intra_wg_overlap:
            raise ValueError("skip_softmax wraps FA4's intra-warpgroup-overlap step: it needs intra_wg_overlap=True")
        self.skip_softmax = skip_softmax
        # Several tiles a CTA (the launcher compiles it with ``scheduler.persistent_scheduler``):
        # FA4's sO is sQ's storage, so Q is released after the epilogue has stored the output,
        # not after the tile's last QK^T as FA4 releases it (scheduler.py).
        self.persistent = persistent
        self.k_plan = StagingPlan(tile_n, head_dim, k_bits)
        self.v_plan = StagingPlan(tile_n, head_dim, v_bits)
        self.staging_slots, self.staging_padded = choose_staging(tile_m, tile_n, head_dim, k_bits, v_bits)
        # setmaxnreg only moves registers inside the CTA's launch allocation: threads x the most a
        # thread gets at one CTA per SM (168 at 384 threads; 240 at 256, as ptxas sizes this
        # kernel). FA4's cp.async setting at 384 threads is 224/40; 216/72 measured 1-3% faster
        # than 224/56 here (more producer registers, no consumer spills).
        # On the 64-row tile the skip-softmax consumer takes 256: zeroing a skipped block's P
        # spilled 32 bytes at 240 in the verification variant (tests/test_compile.py fails on spills).
        launch_regs = min(240, 65536 // num_threads // 8 * 8)
        default_consumer, default_producer = (216, 72) if tile_m == 128 else (256 if skip_softmax else 240, 160)
        consumer_regs = default_consumer if consumer_regs is None else consumer_regs
        producer_regs = default_producer if producer_regs is None else producer_regs
        consumer_threads = num_threads - 128
        if (consumer_threads * consumer_regs + 128 * producer_regs > num_threads * launch_regs
                or producer_regs % 8 or consumer_regs % 8):
            raise ValueError(
                f"producer_regs={producer_regs} and consumer_regs={consumer_regs} do not fit in "
                f"{num_threads * launch_regs} registers (multiples of 8)"
            )
        self.producer_regs, self.consumer_regs = producer_regs, consumer_regs
        # Measurement only (perf/bench_prefill.py --ablate): "no_copy" skips the packed loads,
        # "no_dequant" skips the byte-to-tile conversion. The results are then wrong.
        if ablate not in (None, "no_copy", "no_dequant"):
            raise ValueError(f"ablate must be None, 'no_copy' or 'no_dequant', got {ablate!r}")
        self.ablate = ablate

    # ------------------------------------------------------------------ host entry
    @cute.jit
    def __call__(
        self,
        mQ: cute.Tensor,  # (b, s_q, h, d) or (total_q, h, d), already rotated by R_k
        mK: cute.Tensor,  # uint8 packed, see TQOperands
        mV: cute.Tensor,
        mKScale: cute.Tensor,
        mVScale: cute.Tensor,
        mKTable: cute.Tensor,
        mVTable: cute.Tensor,
        mKSigns: cute.Tensor,  # float32 (d,): R_k's and R_v's signs (read when fuse_rotation)
        mVSigns: cute.Tensor,
        mO: cute.Tensor,
        mLSE: Optional[cute.Tensor],
        softmax_scale: Float32,
        mCuSeqlensQ: Optional[cute.Tensor] = None,
        mCuSeqlensK: Optional[cute.Tensor] = None,
        mSeqUsedK: Optional[cute.Tensor] = None,
        mPageTable: Optional[cute.Tensor] = None,
        window_size_left: Int32 | int | None = None,
        window_size_right: Int32 | int | None = None,
        mSkipLog2Threshold: Optional[cute.Tensor] = None,  # float32 (b,), read when skip_softmax
        mSkipStats: Optional[cute.Tensor] = None,  # int32 (b, h_tile, 2 * m_blocks, 2), written then
        stream: cuda.CUstream = None,
    ):
        self._tq_host = TQOperands(mK, mV, mKScale, mVScale, mKTable, mVTable, mKSigns, mVSigns)
        self._skip_host = SkipOperands(mSkipLog2Threshold, mSkipStats) if const_expr(self.skip_softmax) else None
        if const_expr(self.fuse_rotation):
            # the fused rotation leaves Q scaled by 1/rest (rotate_q_rows): the scores take it back
            softmax_scale = softmax_scale * Float32(scale_split(self.head_dim)[1])
        FlashAttentionForwardSm90.__call__(
            self,
            mQ,
            self._shape_carrier(mK),
            self._shape_carrier(mV),
            mO,
            mLSE,
            softmax_scale,
            mCuSeqlensQ,
            mCuSeqlensK,
            None,  # seqused_q
            mSeqUsedK,
            mPageTable,
            window_size_left,
            window_size_right,
            None,  # learnable_sink
            None,  # block sparsity
            AuxData(),
            None,
            None,
            stream,
        )

    def _shape_carrier(self, mX: cute.Tensor) -> cute.Tensor:
        """A tensor of the compute dtype with the logical K/V shape, over the packed bytes.

        FA4's ``__call__`` reads only its shape and dtype (no TMA is built for K/V when the
        producer loads them itself); the kernel never dereferences it."""
        lead = mX.shape[:-1]
        layout = cute.make_layout((*lead, self.tile_hdim), stride=(*mX.stride[:-1], 1))
        return cute.make_tensor(cute.recast_ptr(mX.iterator, dtype=self.dtype), layout)

    # ------------------------------------------------------------------ kernel
    def kernel(self, *fa4_args):
        """FA4's ``__call__`` launches ``self.kernel(...)``: add the packed operands."""
        return self._kernel_tq(*fa4_args, self._tq_host, self._skip_host)

    @cute.kernel
    def _kernel_tq(
        self,
        mQ: cute.Tensor,
        mK: cute.Tensor,
        mV: cute.Tensor,
        mO: cute.Tensor,
        mLSE: Optional[cute.Tensor],
        mCuSeqlensQ: Optional[cute.Tensor],
        mCuSeqlensK: Optional[cute.Tensor],
        mSeqUsedQ: Optional[cute.Tensor],
        mSeqUsedK: Optional[cute.Tensor],
        mPageTable: Optional[cute.Tensor],
        tma_atom_Q: Optional[cute.CopyAtom],
        tma_atom_K: Optional[cute.CopyAtom],
        tma_atom_V: Optional[cute.CopyAtom],
        tma_atom_O: Optional[cute.CopyAtom],
        softmax_scale_log2: Float32,
        softmax_scale: Optional[Float32],
        window_size_left: Optional[Int32],
        window_size_right: Optional[Int32],
        learnable_sink: Optional[cute.Tensor],
        blocksparse_tensors: Optional[BlockSparseTensors],
        sQ_layout: cute.ComposedLayout,
        sK_layout: cute.ComposedLayout,
        sV_layout: cute.ComposedLayout,
        sO_layout: cute.ComposedLayout,
        sP_layout: cute.ComposedLayout | None,
        gmem_tiled_copy_Q: cute.TiledCopy,
        gmem_tiled_copy_K: cute.TiledCopy,
        gmem_tiled_copy_V: cute.TiledCopy,
        gmem_tiled_copy_O: cute.TiledCopy,
        tiled_mma_qk: cute.TiledMma,
        tiled_mma_pv: cute.TiledMma,
        tile_sched_params: ParamsBase,
        TileScheduler: cutlass.Constexpr[Callable],
        SharedStorage: cutlass.Constexpr[Callable],
        aux_data: AuxData,
        fastdiv_mods,
        tq: TQOperands,
        skip: Optional[SkipOperands],
    ):
        # Staging ring and codebook tables: separate shared-memory allocations beside FA4's.
        smem = cutlass.utils.SmemAllocator()
        slots = self.staging_slots
        stage_layouts = []
        for plan in (self.k_plan, self.v_plan):
            stride = plan.row_stride(self.staging_padded)
            stage_layouts.append(cute.make_layout(
                (plan.num_threads, stride, slots), stride=(stride, 1, plan.num_threads * stride)
            ))
        self._sStageK = smem.allocate_tensor(cutlass.Uint8, stage_layouts[0], byte_alignment=128)
        self._sStageV = smem.allocate_tensor(cutlass.Uint8, stage_layouts[1], byte_alignment=128)
        self._sTableK, self._sTableV = None, None
        if const_expr(uses_shared_table(self.k_bits)):
            self._sTableK = smem.allocate_tensor(Float32, cute.make_layout((table_floats(self.k_bits),)), byte_alignment=16)
        if const_expr(uses_shared_table(self.v_bits)):
            self._sTableV = smem.allocate_tensor(Float32, cute.make_layout((table_floats(self.v_bits),)), byte_alignment=16)
        self._tq, self._skip = tq, skip
        # The producer dequantises: give it registers (see __init__).
        self.num_mma_regs, self.num_producer_regs = self.consumer_regs, self.producer_regs
        _fa4_kernel_body(
            self, mQ, mK, mV, mO, mLSE, mCuSeqlensQ, mCuSeqlensK, mSeqUsedQ, mSeqUsedK, mPageTable,
            tma_atom_Q, tma_atom_K, tma_atom_V, tma_atom_O, softmax_scale_log2, softmax_scale,
            window_size_left, window_size_right, learnable_sink, blocksparse_tensors,
            sQ_layout, sK_layout, sV_layout, sO_layout, sP_layout,
            gmem_tiled_copy_Q, gmem_tiled_copy_K, gmem_tiled_copy_V, gmem_tiled_copy_O,
            tiled_mma_qk, tiled_mma_pv, tile_sched_params, TileScheduler, SharedStorage,
            aux_data, fastdiv_mods,
        )

    # ------------------------------------------------------------------ consumers: fused rotation
    def mma(self, tiled_mma_qk, tiled_mma_pv, mO, mLSE, sQ, sK, sVt, sP, sO, learnable_sink, pipeline_k,
            pipeline_v, pipeline_q, *rest):
        """FA4's ``mma``; keeps ``sQ`` for ``first_half_block_overlap`` (which FA4 does not pass it)
        and, with skip-softmax, sets up this thread's vote registers. Persistent, FA4's release of
        Q is deferred to ``epilogue``."""
        self._sQ = sQ
        if const_expr(self.persistent):
            self._pipeline_q = pipeline_q
            pipeline_q = _release_later(pipeline_q)
        if const_expr(self.skip_softmax):
            tidx = cute.arch.thread_idx()[0] - 128  # consumer threads, as FA4's mma numbers them
            cS = cute.make_identity_tensor((self.tile_m, self.tile_n))
            self._tScS_mn = layout_utils.reshape_acc_to_mn(tiled_mma_qk.get_slice(tidx).partition_C(cS))
            self._skip_state = SkipState(cute.size(self._tScS_mn, mode=[0]))
        return FlashAttentionForwardSm90.mma(self, tiled_mma_qk, tiled_mma_pv, mO, mLSE, sQ, sK, sVt, sP, sO,
                                             learnable_sink, pipeline_k, pipeline_v, pipeline_q, *rest)

    def first_half_block_overlap(self, *args, is_first_block: bool = False, **kwargs):
        """Rotate this warpgroup's Q rows (Q has landed: FA4 waited on pipeline_q before the first
        block of a tile), then FA4's first half block."""
        if const_expr(self.fuse_rotation and is_first_block):
            tidx = cute.arch.thread_idx()[0] - 128  # consumer threads, as FA4's mma numbers them
            wg = cute.arch.make_warp_uniform(tidx // 128)
            rotate_q_rows(self._sQ, wg * 64, tidx % 128, self._tq.k_signs, 64, self._rotate_q_barrier_id + wg)
        if const_expr(self.skip_softmax and is_first_block):
            # FA4 binds the tile's coordinates into the mask callable it passes (nested partials,
            # flattened by functools): the only place they reach this method.
            tile = kwargs["mask_fn"].keywords
            seqlen = kwargs["seqlen"]
            rows = seqlen.seqlen_q * (self.qhead_per_kvhead if const_expr(self.pack_gqa) else 1)
            self._skip_state.start_tile(Float32(self._skip.log2_threshold[tile["batch_idx"]]), self._tScS_mn,
                                        tile["m_block"] * self.tile_m, rows)
        return FlashAttentionForwardSm90.first_half_block_overlap(self, *args, is_first_block=is_first_block, **kwargs)

    # ------------------------------------------------------------------ consumers: skip-softmax
    def mma_one_n_block_intrawg_overlap(self, smem_pipe_read, *, softmax, **kwargs):
        """FA4's per-block step; with skip-softmax its softmax votes first and a skipped block's
        softmax is left out and its P zeroed (``skip_softmax.py``)."""
        if const_expr(self.skip_softmax):
            wg = cute.arch.make_warp_uniform(cute.arch.warp_idx() // 4 - 1)
            softmax = SkippingSoftmax(softmax, self._skip_state, self._skip_vote_barrier_id + wg)
        return FlashAttentionForwardSm90.mma_one_n_block_intrawg_overlap(self, smem_pipe_read, softmax=softmax, **kwargs)

    def epilogue(self, acc_O, lse, mO, mLSE, sO, seqlen, gmem_tiled_copy_O, tma_atom_O, tiled_mma, tidx,
                 m_block, head_idx, batch_idx):
        """Un-rotate the normalised output in registers, then FA4's epilogue; persistent, then free
        sQ (= sO) for the next tile's Q once every consumer is past the epilogue (FA4's epilogue
        waits for its TMA store to have read sO before warp 4 returns)."""
        if const_expr(self.fuse_rotation):
            unrotate_acc(acc_O, tiled_mma, self._tq.v_signs, (self.tile_m, self.tile_hdimv))
        if const_expr(self.skip_softmax):
            self._write_skip_stats(tidx, m_block, head_idx, batch_idx)
        FlashAttentionForwardSm90.epilogue(self, acc_O, lse, mO, mLSE, sO, seqlen, gmem_tiled_copy_O, tma_atom_O,
                                           tiled_mma, tidx, m_block, head_idx, batch_idx)
        if const_expr(self.persistent):
            cute.arch.barrier(barrier_id=self._q_free_barrier_id, number_of_threads=self.num_mma_threads)
            self._pipeline_q.consumer_release_w_index(0)

    @cute.jit
    def _write_skip_stats(self, tidx: Int32, m_block: Int32, head_idx: Int32, batch_idx: Int32):
        """(skipped, visited) blocks of this warpgroup's rows, by one thread of it."""
        stats, counters = self._skip.stats, self._skip_state.counters
        if tidx % 128 == 0:
            wg = tidx // 128
            stats[batch_idx, head_idx, m_block * (self.tile_m // 64) + wg, 0] = counters[1]
            stats[batch_idx, head_idx, m_block * (self.tile_m // 64) + wg, 1] = counters[2]

    # ------------------------------------------------------------------ producer
    @cute.jit
    def load(
        self,
        mQ: cute.Tensor,
        mK: cute.Tensor,
        mV: cute.Tensor,
        sQ: cute.Tensor,
        sK: cute.Tensor,
        sV: cute.Tensor,
        tma_atom_Q: Optional[cute.CopyAtom],
        tma_atom_K: Optional[cute.CopyAtom],
        tma_atom_V: Optional[cute.CopyAtom],
        pipeline_k: pipeline.PipelineAsync,
        pipeline_v: pipeline.PipelineAsync,
        pipeline_q: pipeline.PipelineAsync,
        gmem_tiled_copy_Q: cute.TiledCopy,
        mPageTable: Optional[cute.Tensor],
        blocksparse_tensors: Optional[BlockSparseTensors],
        block_info: BlockInfo,
        SeqlenInfoCls: Callable,
        TileSchedulerCls: Callable,
    ):
        tq = self._tq
        warp_idx_in_wg = cute.arch.make_warp_uniform(cute.arch.warp_idx()) % 4
        tidx, _, _ = cute.arch.thread_idx()  # 0..127: the producer warpgroup

        # 8-bit codebooks into shared memory, once per CTA (read only by this warpgroup).
        if const_expr(self._sTableK is not None or self._sTableV is not None):
            for sTable, mTable in ((self._sTableK, tq.k_table), (self._sTableV, tq.v_table)):
                if const_expr(sTable is not None):
                    for i in cutlass.range(tidx, cute.size(sTable), 128, unroll=1):
                        sTable[i] = mTable[i]
            cute.arch.barrier(barrier_id=self._producer_barrier_id, number_of_threads=128)

        row = tidx % self.tile_n
        part = tidx // self.tile_n
        q_producer_phase = Int32(1)
        kv_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.num_stages)
        tile_scheduler = TileSchedulerCls()
        work_tile = tile_scheduler.initial_work_tile_info()
        while work_tile.is_valid_tile:
            m_block, head_idx, batch_idx, _ = work_tile.tile_idx
            seqlen = SeqlenInfoCls(batch_idx)
            head_idx_kv = head_idx // self.qhead_per_kvhead if const_expr(not self.pack_gqa) else head_idx

            # --- Q, as FA4 loads it; persistent, after the tile's first K block (below): the
            # consumers free sQ only after the previous tile's epilogue, and warp 0 waiting for
            # that here would hold back the first block's dequantisation with it.
            q_phase = q_producer_phase
            q_producer_phase ^= 1
            load_q = partial(self._load_q, mQ, sQ, tma_atom_Q, pipeline_q, gmem_tiled_copy_Q, seqlen, m_block,
                             head_idx, batch_idx, warp_idx_in_wg, tidx, q_phase)
            if const_expr(not self.persistent):
                load_q()

            # --- K/V: the consumers take blocks n_block_max-1 down to n_block_min (at least one).
            # Pages are looked up one block before their bytes are issued, and the scales are
            # converted one block after they are loaded, so neither load stalls this warpgroup.
            n_block_min, n_block_max = block_info.get_n_block_min_max(seqlen, m_block)
            n_blocks = cutlass.max(n_block_max - n_block_min, 1)
            issue = partial(self._issue_block, tq, mPageTable, seqlen, batch_idx, head_idx_kv, row=row, part=part)
            page_of = partial(self._page_of, mPageTable, seqlen, batch_idx, row=row)
            page_next = page_of(n_block_max - 2)
            raw_k, raw_v = issue(n_block_max - 1, page_of(n_block_max - 1), 0)
            cute.arch.cp_async_commit_group()
            for i in cutlass.range(n_blocks, unroll=1):
                n_block = n_block_max - 1 - i
                slot = i % self.staging_slots
                raw_k_next, raw_v_next = raw_k, raw_v
                if const_expr(self.staging_slots == 2):
                    if i + 1 < n_blocks:
                        raw_k_next, raw_v_next = issue(n_block - 1, page_next, 1 - slot)
                        page_next = page_of(n_block - 2)
                    cute.arch.cp_async_commit_group()
                    cute.arch.cp_async_wait_group(1)
                else:
                    cute.arch.cp_async_wait_group(0)
                pipeline_k.producer_acquire(kv_state)
                self._dequant_block(self._sStageK, slot, self._sTableK, Float32(raw_k), sK, kv_state.index,
                                    self.k_plan, row, part)
                cute.arch.mbarrier_arrive(pipeline_k.sync_object_full.get_barrier(kv_state.index))
                if const_expr(self.persistent):
                    if i == 0:
                        load_q()
                pipeline_v.producer_acquire(kv_state)
                self._dequant_block(self._sStageV, slot, self._sTableV, Float32(raw_v), sV, kv_state.index,
                                    self.v_plan, row, part)
                cute.arch.mbarrier_arrive(pipeline_v.sync_object_full.get_barrier(kv_state.index))
                kv_state.advance()
                if const_expr(self.staging_slots == 1):
                    if i + 1 < n_blocks:
                        raw_k_next, raw_v_next = issue(n_block - 1, page_next, 0)
                        page_next = page_of(n_block - 2)
                    cute.arch.cp_async_commit_group()
                raw_k, raw_v = raw_k_next, raw_v_next

            tile_scheduler.prefetch_next_work()
            tile_scheduler.advance_to_next_work()
            work_tile = tile_scheduler.get_current_work()

    @cute.jit
    def _load_q(self, mQ, sQ, tma_atom_Q, pipeline_q, gmem_tiled_copy_Q, seqlen, m_block, head_idx, batch_idx,
                warp_idx_in_wg, tidx, phase):
        """The tile's Q into sQ, exactly as FA4's ``load`` does it (TMA by warp 0, or PackGQA's
        cp.async by the whole warpgroup)."""
        mQ_cur = seqlen.offset_batch_Q(mQ, batch_idx, dim=3)[None, None, head_idx]
        if const_expr(self.use_tma_Q):
            if warp_idx_in_wg == 0:
                gQ = cute.local_tile(mQ_cur, (self.tile_m, self.tile_hdim), (m_block, 0))
                load_Q, _, _ = copy_utils.tma_get_copy_fn(tma_atom_Q, 0, cute.make_layout(1), gQ, sQ, single_stage=True)
                pipeline_q.producer_acquire_w_index_phase(0, phase)
                load_Q(tma_bar_ptr=pipeline_q.sync_object_full.get_barrier(0))
        else:
            pack_gqa = PackGQA(self.tile_m, self.tile_hdim, self.check_hdim_oob, self.qhead_per_kvhead)
            pipeline_q.producer_acquire_w_index_phase(0, phase)
            pack_gqa.load_Q(mQ_cur, sQ, gmem_tiled_copy_Q, tidx, m_block, seqlen.seqlen_q)
            cute.arch.cp_async_commit_group()
            pipeline_q.producer_commit_w_index(0)

    @cute.jit
    def _page_of(self, mPageTable, seqlen, batch_idx, n_block, row):
        """The page that holds this thread's row of ``n_block`` (0 where there is no such row or
        no page table). Looked up a block ahead: the cp.async addresses wait on it."""
        page = Int32(0)
        if const_expr(mPageTable is not None):
            idx = n_block * self.tile_n + row
            if idx >= 0 and idx < seqlen.seqlen_k:
                page = Int32(mPageTable[batch_idx, idx // self._tq.k_data.shape[1]])
        return page

    @cute.jit
    def _issue_block(self, tq: TQOperands, mPageTable, seqlen, batch_idx, head_kv, n_block, page, slot, row, part):
        """cp.async this thread's packed K and V bytes of ``n_block`` (row ``row``, on ``page``
        when paged) into staging ``slot``; return the rows' scales as stored (0 for rows past the
        end, so their tile rows come out as zeros), for the caller to convert when it uses them."""
        idx = n_block * self.tile_n + row
        valid = idx >= 0 and idx < seqlen.seqlen_k
        raw_k, raw_v = tq.k_scale.element_type(0.0), tq.v_scale.element_type(0.0)
        if valid:
            if const_expr(mPageTable is not None):
                off = idx % tq.k_data.shape[1]
                k_row = cute.domain_offset((page, off, head_kv, part * self.k_plan.part_bytes), tq.k_data)
                v_row = cute.domain_offset((page, off, head_kv, part * self.v_plan.part_bytes), tq.v_data)
                raw_k = tq.k_scale[page, head_kv, off]
                raw_v = tq.v_scale[page, head_kv, off]
            elif const_expr(cute.rank(tq.k_data) == 3):  # varlen: (total_k, h_k, nb)
                tok = seqlen.offset_k + idx
                k_row = cute.domain_offset((tok, head_kv, part * self.k_plan.part_bytes), tq.k_data)
                v_row = cute.domain_offset((tok, head_kv, part * self.v_plan.part_bytes), tq.v_data)
                raw_k = tq.k_scale[head_kv, tok]
                raw_v = tq.v_scale[head_kv, tok]
            else:
                k_row = cute.domain_offset((batch_idx, idx, head_kv, part * self.k_plan.part_bytes), tq.k_data)
                v_row = cute.domain_offset((batch_idx, idx, head_kv, part * self.v_plan.part_bytes), tq.v_data)
                raw_k = tq.k_scale[batch_idx, head_kv, idx]
                raw_v = tq.v_scale[batch_idx, head_kv, idx]
            if const_expr(self.ablate != "no_copy"):
                for sStage, src, plan in ((self._sStageK, k_row, self.k_plan), (self._sStageV, v_row, self.v_plan)):
                    ptr = cute.make_ptr(cutlass.Uint8, src.iterator.toint(), cute.AddressSpace.gmem,
                                        assumed_align=plan.copy_bytes)
                    copy_part_async(ptr, sStage[cute.arch.thread_idx()[0], None, slot], plan.part_bytes, plan.copy_bytes)
        return raw_k, raw_v

    @cute.jit
    def _dequant_block(self, sStage, slot, sTable, sigma, sX, stage, plan: cutlass.Constexpr, row, part):
        """This thread's (row, part) of one tile: staging -> dtype, then make the generic-proxy
        stores visible to wgmma (async proxy) before the caller arrives on the stage's barrier."""
        tidx = cute.arch.thread_idx()[0]
        dst_part = cute.local_tile(sX[row, None, stage], (plan.cols,), (part,))
        if const_expr(self.ablate != "no_dequant"):
            dequant_part(sStage[tidx, None, slot], sigma, dst_part, plan.bits, plan.cols, sTable,
                         unroll=self.dequant_unroll)
        cute.arch.fence_proxy("async.shared", space="cta")
