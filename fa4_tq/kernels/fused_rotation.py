"""The query rotation and the output un-rotation inside the attention kernel (CuTeDSL).

Attention runs in the rotated space: scores need ``R_k q`` and the output is ``R_v^T o``, with
``R = H diag(s) / sqrt(d)`` (``codec/rotation.py``). Done as separate GEMMs they read and write q
and o once more each, 29-44% of the attention time at seqlen 1K. Here the consumer warpgroups do
them where the data already is, the Walsh-Hadamard transform split (it is a Kronecker product
over the index bits) between the tensor cores and float32 adds in the thread
(``hadamard.py``):

- ``rotate_q_rows``: each consumer warpgroup rotates its 64 rows of the Q tile in shared memory,
  after Q has landed and before its first QK^T: four lanes a row, the 16x16 factor by
  ``mma.sync`` (``hadamard.rotate_mma``) and the rest in the lane, rounded once to Q's dtype;
  then it fences the async proxy so wgmma reads the rotated rows. The ``1/sqrt(2)`` of
  ``1/sqrt(128)`` is left to the softmax scale (``FlashAttentionForwardSm90TQ.__call__``).
- ``unrotate_acc``: the output accumulator, before FA4's epilogue converts it: the factor over
  the column bits a thread holds by adds, the factor over the bits that span a quad of lanes by
  one tf32 ``mma.sync`` per 8 columns (``hadamard.mma_tf32_split``; by shuffles at head_dim 256,
  where the MMA version spilled).

The plain PyTorch twins are ``codec.rotation.rotate`` / ``unrotate``.
"""

from __future__ import annotations

import math

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Uint32, const_expr
from quack import layout_utils

from .hadamard import h8_sign_bit, h16_fragments, mma_tf32_split, rotate_mma, scale_split, tf32_a_values


def acc_columns(tiled_mma: cute.TiledMma, tile_mn: tuple[int, int]) -> dict:
    """``{(j, e): c}``: which column ``c`` of a thread's accumulator (mn view) holds column
    ``8j + 2t + e`` of its rows, checked at trace time for every lane ``(g, t)`` of a warp (rows
    ``g``, ``g + 8`` of its 16): the layout ``unrotate_acc`` assumes. Raises otherwise."""
    cO = cute.make_identity_tensor(tile_mn)
    coords = [layout_utils.reshape_acc_to_mn(tiled_mma.get_slice(t).partition_C(cO)) for t in range(32)]
    rows, cols = cute.size(coords[0], mode=[0]), cute.size(coords[0], mode=[1])
    index = {}
    for c in range(cols):
        col = coords[0][0, c][1]
        index[(col // 8, col % 2)] = c
        for t in range(32):
            got = [coords[t][r, c] for r in range(rows)]
            want = [(coords[0][r, 0][0] + t // 4, col + 2 * (t % 4)) for r in range(rows)]
            if rows != 2 or coords[0][1, 0][0] != coords[0][0, 0][0] + 8 or col % 8 >= 2 or got != want:
                raise ValueError("the accumulator is not in the m64nNk16 layout unrotate_acc assumes")
    if sorted(index) != [(j, e) for j in range(tile_mn[1] // 8) for e in range(2)]:
        raise ValueError("the accumulator's columns are not 8j + 2t + e")
    return index


@cute.jit
def unrotate_acc(acc: cute.Tensor, tiled_mma: cute.TiledMma, signs: cute.Tensor, tile_mn: cutlass.Constexpr):
    """``acc[r, :] <- diag(s) H acc[r, :] / sqrt(d)`` (``d`` = ``tile_mn[1]``, ``s`` the float32
    sign vector of R_v) for the rows this thread holds, in place, float32: the factor over the
    column bits of ``j`` by adds in the thread, then one ``mma_tf32_split`` per 8-column group
    ``j`` over the bits of ``t`` and ``e``, whose A fragment is the lane's own accumulators and
    whose output lands where they were. At ``d`` > 128 the bits of ``t`` go by shuffles instead:
    with 128 accumulators a thread, the MMA version spilled (248 bytes at head_dim 256). All 32
    lanes of each warp must call it."""
    index = acc_columns(tiled_mma, tile_mn)
    a = layout_utils.reshape_acc_to_mn(acc)
    d = tile_mn[1]
    groups = d // 8
    # 1. the factor over the bits of j (and at d > 128 of e), in the lane
    pairs = [[(index[(j, e)], index[(j + h, e)]) for j in range(groups) if not j & h for e in range(2)]
             for h in (1 << b for b in range(groups.bit_length() - 1))]
    if const_expr(d > 128):
        pairs.insert(0, [(index[(j, 0)], index[(j, 1)]) for j in range(groups)])
    for stage in pairs:
        for lo, hi in stage:
            for r in cutlass.range_constexpr(2):
                x, y = a[r, lo], a[r, hi]
                a[r, lo], a[r, hi] = x + y, x - y
    lane = cute.arch.lane_idx()
    g, t = lane // 4, lane % 4
    if const_expr(d > 128):
        # 2. the bits of t by shuffles (the lower column keeps mine + other, the upper other -
        # mine), then the signs and 1/sqrt(d) (exact: d is an even power of two here)
        for x in (1, 2):
            sgn = Float32(-1.0) if (t & x) != 0 else Float32(1.0)
            for c in cutlass.range_constexpr(2 * groups):
                for r in cutlass.range_constexpr(2):
                    a[r, c] = a[r, c] * sgn + cute.arch.shuffle_sync_bfly(a[r, c], offset=x)
        for (j, e), c in index.items():
            sc = Float32(signs[8 * j + 2 * t + e]) * Float32(1.0 / math.sqrt(d))
            for r in cutlass.range_constexpr(2):
                a[r, c] = a[r, c] * sc
    else:
        # 2. the factor over t and e, the signs and the power of two in 1/sqrt(d) (B stays exact
        # in tf32) on the tensor cores: lane (g, t)'s B fragment is H_8 at (column 2t (b0) /
        # 2t + 1 (b1), column g) times s[8j + g]
        exp2, rest = scale_split(d)
        one, minus = Float32(2.0 ** -exp2), Float32(-(2.0 ** -exp2))
        h0 = minus if h8_sign_bit(2 * t, g) != 0 else one
        h1 = minus if h8_sign_bit(2 * t + 1, g) != 0 else one
        for j in cutlass.range_constexpr(groups):
            sg = Float32(signs[8 * j + g])
            vals = tuple(a[r, index[(j, e)]] for r, e in tf32_a_values())
            dv = mma_tf32_split(vals, (h0 * sg, h1 * sg))
            if const_expr(rest != 1.0):
                dv = tuple(x * Float32(rest) for x in dv)
            # D: d0 (row g, col 2t), d1 (row g, col 2t+1), d2 (row g+8, col 2t), d3 (row g+8, col 2t+1)
            a[0, index[(j, 0)]], a[0, index[(j, 1)]] = dv[0], dv[1]
            a[1, index[(j, 0)]], a[1, index[(j, 1)]] = dv[2], dv[3]


@cute.jit
def rotate_q_rows(sQ: cute.Tensor, first_row: Int32, t: Int32, signs: cute.Tensor,
                  rows: cutlass.Constexpr[int], barrier_id: Int32):
    """``sQ[i, :] <- H diag(s) sQ[i, :] / sqrt(d) / rest`` (``rest`` of ``scale_split(d)``, 1 or
    1/sqrt(2): the caller multiplies the softmax scale by it, so that the scale here is a power
    of two in the MMA's +-1 matrix) for the ``rows`` rows from ``first_row``, by the 128 threads
    of one warpgroup (``t`` = 0..127), rounded once to sQ's dtype; then the warpgroup waits for
    all its rows and fences the generic-proxy stores for wgmma. Lane ``(g, q)`` of warp ``w``
    takes values ``per*q ..`` (``per`` = d / 4) of row ``8w + g`` of each 32 rows."""
    d = cute.size(sQ, mode=[1])
    per = d // 4
    bf16 = const_expr(sQ.element_type == cutlass.BFloat16)
    lane, warp = t % 32, t // 32
    g, q = lane // 4, lane % 4
    # the signs as the sign bits of the lane's bf16/fp16 pairs: s * x is one xor
    sv = cute.make_rmem_tensor((per,), Float32)
    cute.autovec_copy(cute.local_tile(signs, (per,), (q,)), sv)
    sb = cute.recast_tensor(sv, Uint32)
    masks = cute.make_rmem_tensor((per // 2,), Uint32)
    for w in cutlass.range_constexpr(per // 2):
        masks[w] = ((sb[2 * w] >> 16) & Uint32(0x8000)) | (sb[2 * w + 1] & Uint32(0x80000000))
    hb = h16_fragments(g, q, bf16, -scale_split(d)[0])
    for p in cutlass.range_constexpr(rows // 32):
        src = cute.local_tile(sQ[first_row + 32 * p + 8 * warp + g, None], (per,), (q,))
        x = cute.make_rmem_tensor((per,), sQ.element_type)
        cute.autovec_copy(src, x)
        xw = cute.recast_tensor(x, Uint32)
        for w in cutlass.range_constexpr(per // 2):
            xw[w] = xw[w] ^ masks[w]
        f = cute.make_rmem_tensor((per,), Float32)
        rotate_mma(xw, f, hb, bf16)
        for j in cutlass.range_constexpr(per):
            x[j] = sQ.element_type(f[j])
        cute.autovec_copy(x, src)
    cute.arch.fence_proxy("async.shared", space="cta")
    cute.arch.barrier(barrier_id=barrier_id, number_of_threads=128)
