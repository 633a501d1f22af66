"""Skip-softmax in the SM90 consumer loop (DESIGN section 2; semantics: ``fa4_tq/skip_softmax.py``).

After a block's S = Q K^T and its mask, every row of a consumer warpgroup (64 query rows) checks
``exp(block_max - running_max) < lambda``; if all rows agree, the warpgroup skips the block's
exp, row sum and O rescale, and the running max stays; its P is zero, so the P.V product that
still runs adds nothing. The first block of a tile is never skipped. Rows past the query tile's
end (pack-GQA padding) vote "skip": they are not part of the result, so a warpgroup whose rows
are all padding (q_len x GQA <= 64) skips every block after its first.

The vote is per warpgroup, as its wgmmas are: one ``bar.red.and.pred`` over its 128 threads per
block. The P.V wgmma is not left out: a wgmma inside a run-time branch makes ptxas serialise
every wgmma of the kernel (its note C7520, "program dependence on compiler-inserted WG.AR in
divergent path"; C7519 when the predicate comes from the warp index): each wgmma then waits for
the one before. The P.V of a skipped block costs tensor-core time only. The V tile is still
loaded and dequantised (the producer runs ahead of the vote), so the saving is consumer work only.

Decode without skipping once used the same vote on the 128-row tile to idle a second consumer
warpgroup whose rows were all padding. With the P.V of such a warpgroup no longer left out, the
vote cost more than the softmax it saved (scripts/profile_decode.py: 767 against 684 us at K4V4,
batch 32, 16K), so it was removed; such calls take a 64-row tile with one consumer warpgroup
(``launch.sm90_config``).

FA4's per-block step (``mma_one_n_block_intrawg_overlap``) is reused unchanged: it is handed a
softmax that votes first (``SkippingSoftmax``). With intra-warpgroup overlap the O rescale of
block j runs in the step of block j - 1 (the next one visited), so the vote is carried in a
register between steps.
"""

from __future__ import annotations

from typing import NamedTuple

import cutlass
import cutlass.cute as cute
from cutlass import Boolean, Float32, Int32
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import T, dsl_user_op

import flash_attn.cute.utils as fa4_utils
from quack import layout_utils

WARPGROUP_THREADS = 128
ROWS_PER_VOTE = 64  # one consumer warpgroup's rows of the 128-row tile


class SkipOperands(NamedTuple):
    """What the kernel reads and writes for skip-softmax."""

    log2_threshold: cute.Tensor  # float32 (batch,): log2(lambda) of each batch entry (-inf: no skip)
    stats: cute.Tensor  # int32 (batch, heads, 2 * m_blocks, 2): (skipped, visited) blocks per warpgroup


@dsl_user_op
def warpgroup_all(pred: Boolean, barrier_id: Int32, *, loc=None, ip=None) -> Boolean:
    """AND of ``pred`` over the 128 threads of this warpgroup: one named barrier with a reduction
    (``bar.red.and.pred``), which CuTeDSL's ``barrier`` does not expose."""
    res = llvm.inline_asm(
        T.i32(),
        [Int32(pred).ir_value(loc=loc, ip=ip), Int32(barrier_id).ir_value(loc=loc, ip=ip)],
        "{\n.reg .pred p, q;\nsetp.ne.u32 p, $1, 0;\n"
        f"bar.red.and.pred q, $2, {WARPGROUP_THREADS}, p;\nselp.u32 $0, 1, 0, q;\n}}",
        "=r,r,r",
        has_side_effects=True,
        is_align_stack=False,
        asm_dialect=llvm.AsmDialect.AD_ATT,
    )
    return Int32(res) != Int32(0)


class SkipState:
    """One consumer thread's skip-softmax registers for the tile it works on."""

    def __init__(self, num_rows: int):
        self.counters = cute.make_rmem_tensor((3,), Int32)  # [last block skipped, skipped, visited]
        self.log2_threshold = cute.make_rmem_tensor((1,), Float32)
        self.row_valid = cute.make_rmem_tensor((num_rows,), Int32)

    @cute.jit
    def start_tile(self, log2_threshold: Float32, tScS_mn: cute.Tensor, first_row: Int32, num_rows_valid: Int32):
        """Before the first block of a tile: its threshold, which of this thread's rows exist, and
        the first block counted as visited and kept."""
        self.counters[0] = Int32(0)
        self.counters[1] = Int32(0)
        self.counters[2] = Int32(1)
        self.log2_threshold[0] = log2_threshold
        for r in cutlass.range_constexpr(cute.size(self.row_valid)):
            self.row_valid[r] = Int32(first_row + tScS_mn[r, 0][0] < num_rows_valid)

    def last_skipped(self) -> Boolean:
        return self.counters[0] != Int32(0)


class SkippingSoftmax:
    """FA4's ``Softmax`` with the vote in front: what FA4's per-block step gets as ``softmax``."""

    def __init__(self, softmax, state: SkipState, barrier_id: Int32):
        self.softmax, self.state, self.barrier_id = softmax, state, barrier_id

    @cute.jit
    def online_softmax(self, acc_S: cute.Tensor, is_first: cutlass.Constexpr[bool] = False,
                       check_inf: cutlass.Constexpr[bool] = True) -> cute.Tensor:
        softmax, st = self.softmax, self.state
        acc_S_mn = layout_utils.reshape_acc_to_mn(acc_S)
        agree = Boolean(True)
        for r in cutlass.range_constexpr(cute.size(softmax.row_max)):
            block_max = fa4_utils.fmax_reduce(acc_S_mn[r, None].load(), init_val=None, arch=softmax.arch)
            block_max = cute.arch.warp_reduction_max(block_max, threads_in_group=4)
            # exp(block_max - running_max) < lambda, in FA4's units (unscaled scores, base 2).
            # A row that has seen no key yet (running max -inf) never agrees: the gap is +inf or NaN.
            gap = (block_max - softmax.row_max[r]) * softmax.scale_log2
            agree = agree & ((gap < st.log2_threshold[0]) | (st.row_valid[r] == Int32(0)))
        skip = warpgroup_all(agree, self.barrier_id)
        row_scale = cute.make_fragment_like(softmax.row_max, Float32)
        counters = st.counters  # (tensors, not the state object, may be written inside a run-time if)
        counters[2] += Int32(1)
        counters[0] = Int32(skip)
        counters[1] += Int32(skip)
        if skip:
            row_scale.fill(1.0)
            acc_S.fill(0.0)  # P = 0: the P.V that FA4 issues for this block adds nothing
        else:
            row_scale.store(softmax.online_softmax(acc_S, is_first=is_first, check_inf=check_inf).load())
        return row_scale

    @cute.jit
    def rescale_O(self, acc_O: cute.Tensor, row_scale: cute.Tensor) -> None:
        # Called for the block just voted on (or, with rescale_O_before_gemm, for the one before
        # the current step): its row_scale is 1 when skipped.
        if not self.state.last_skipped():
            self.softmax.rescale_O(acc_O, row_scale)
