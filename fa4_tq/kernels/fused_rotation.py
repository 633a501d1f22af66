"""The query rotation and the output un-rotation inside the attention kernel (CuTeDSL).

Attention runs in the rotated space: scores need ``R_k q`` and the output is ``R_v^T o``, with
``R = H diag(s) / sqrt(d)`` (``codec/rotation.py``). Done as separate GEMMs they read and write q
and o once more each, 29-44% of the attention time at seqlen 1K. Here the consumer warpgroups do
them where the data already is, as Walsh-Hadamard butterflies in float32 (d log d additions, not
a d x d product):

- ``rotate_q_rows``: each consumer warpgroup rotates its 64 rows of the Q tile in shared memory,
  after Q has landed and before its first QK^T (2-4 threads per row, a shuffle for the top
  stages), then fences the async proxy so wgmma reads the rotated rows.
- ``unrotate_acc``: the output accumulator, before FA4's epilogue converts it: the butterflies
  between columns a thread holds are register adds, the others a ``shfl.bfly`` with the lane that
  holds the partner column. Which is which is read off the MMA's thread-value layout at trace
  time (``butterfly_plan``), not assumed.

The plain PyTorch twins are ``codec.rotation.rotate`` / ``unrotate``.
"""

from __future__ import annotations

import math

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32
from quack import layout_utils

from .hadamard import butterflies


def butterfly_plan(tiled_mma: cute.TiledMma, tile_mn: tuple[int, int]):
    """(in_thread, cross_lane) for the columns of one thread's accumulator (mn view):
    ``in_thread`` lists, per column bit held inside a thread, the (lower, upper) index pairs;
    ``cross_lane`` lists (bit, lane_xor) for the bits whose partner column sits in lane
    ``lane ^ lane_xor``. Checked for every lane of a warp; raises if the layout has neither."""
    cO = cute.make_identity_tensor(tile_mn)
    coords = [layout_utils.reshape_acc_to_mn(tiled_mma.get_slice(t).partition_C(cO)) for t in range(32)]
    rows, cols = cute.size(coords[0], mode=[0]), cute.size(coords[0], mode=[1])

    def col_list(t):
        return [coords[t][0, c][1] for c in range(cols)]

    def row_list(t):
        return [coords[t][r, 0][0] for r in range(rows)]

    c0 = col_list(0)
    index = {col: c for c, col in enumerate(c0)}
    n = tile_mn[1]
    in_thread, cross_lane = [], []
    for b in range(n.bit_length() - 1):
        h = 1 << b
        if all((col ^ h) in index for col in c0):
            in_thread.append([(c, index[col | h]) for c, col in enumerate(c0) if not col & h])
            continue
        for x in range(1, 32):
            if all(col_list(t ^ x) == [col ^ h for col in col_list(t)] and row_list(t ^ x) == row_list(t)
                   for t in range(32)):
                cross_lane.append((b, x))
                break
        else:
            raise ValueError(f"column bit {b} of the accumulator is neither in a thread nor a lane xor away")
    return in_thread, cross_lane


@cute.jit
def unrotate_acc(acc: cute.Tensor, tiled_mma: cute.TiledMma, tidx: Int32, signs: cute.Tensor,
                 tile_mn: cutlass.Constexpr):
    """``acc[r, :] <- diag(s) H acc[r, :] / sqrt(d)`` for every row this thread holds (d =
    ``tile_mn[1]``, ``signs`` the float32 (d,) sign vector of R_v), in place, float32."""
    in_thread, cross_lane = butterfly_plan(tiled_mma, tile_mn)
    a = layout_utils.reshape_acc_to_mn(acc)
    mine = layout_utils.reshape_acc_to_mn(tiled_mma.get_slice(tidx).partition_C(cute.make_identity_tensor(tile_mn)))
    rows, cols = cute.size(a, mode=[0]), cute.size(a, mode=[1])
    for r in cutlass.range_constexpr(rows):
        for pairs in in_thread:
            for lo, hi in pairs:
                x, y = a[r, lo], a[r, hi]
                a[r, lo], a[r, hi] = x + y, x - y
    for b, lane_xor in cross_lane:
        # the lower column keeps mine + other, the upper other - mine (a product by -1 is exact)
        sgn = Float32(-1.0) if (mine[0, 0][1] & (1 << b)) != 0 else Float32(1.0)
        for r in cutlass.range_constexpr(rows):
            for c in cutlass.range_constexpr(cols):
                other = cute.arch.shuffle_sync_bfly(a[r, c], offset=lane_xor)
                a[r, c] = a[r, c] * sgn + other
    inv_sqrt_d = Float32(1.0 / math.sqrt(tile_mn[1]))
    for c in cutlass.range_constexpr(cols):
        scale = Float32(signs[mine[0, c][1]]) * inv_sqrt_d
        for r in cutlass.range_constexpr(rows):
            a[r, c] = a[r, c] * scale


@cute.jit
def rotate_q_rows(sQ: cute.Tensor, first_row: Int32, t: Int32, signs: cute.Tensor,
                  rows: cutlass.Constexpr[int], barrier_id: Int32):
    """``sQ[i, :] <- H diag(s) sQ[i, :] / sqrt(d)`` for the ``rows`` rows from ``first_row``, by
    the 128 threads of one warpgroup (``t`` = 0..127), rounded once to sQ's dtype; then the
    warpgroup waits for all its rows and fences the generic-proxy stores for wgmma."""
    d = cute.size(sQ, mode=[1])
    per = min(d // 2, 64)  # values per thread: a row is 2 (d <= 128) or 4 threads
    tpr = d // per
    per_pass = 128 // tpr
    inv_sqrt_d = Float32(1.0 / math.sqrt(d))
    for p in cutlass.range_constexpr(rows // per_pass):
        row = first_row + p * per_pass + t // tpr
        part = t % tpr
        src = cute.local_tile(sQ[row, None], (per,), (part,))
        x = cute.make_rmem_tensor((per,), sQ.element_type)
        cute.autovec_copy(src, x)
        f = cute.make_rmem_tensor((per,), Float32)
        for j in cutlass.range_constexpr(per):
            f[j] = Float32(x[j]) * Float32(signs[part * per + j])
        butterflies(f, per, part, tpr)  # the row's threads are adjacent lanes
        for j in cutlass.range_constexpr(per):
            x[j] = sQ.element_type(f[j] * inv_sqrt_d)
        cute.autovec_copy(x, src)
    cute.arch.fence_proxy("async.shared", space="cta")
    cute.arch.barrier(barrier_id=barrier_id, number_of_threads=128)
