"""Walsh-Hadamard butterflies on values held in registers (CuTeDSL), shared by the cache-write
kernel (rotating new K/V rows) and the fused query rotation.

A row of ``per * lanes`` values is split over ``lanes`` adjacent lanes, ``per`` consecutive
values each. The stages run in the order of the reference (``codec.rotation._fwht``: strides 1,
2, 4, ...), first those inside a lane, then those across lanes by ``shfl.bfly``, each one the
same float32 add or subtract: the result is bit-identical to the reference's.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr


@cute.jit
def butterflies(f: cute.Tensor, per: cutlass.Constexpr[int], lane: Int32, lanes: cutlass.Constexpr[int]):
    """``f`` (float32 rmem, ``per`` values) <- this lane's part of ``H_{per*lanes} row``, unscaled;
    ``lane`` = 0..lanes-1 within the row."""
    for s in cutlass.range_constexpr(per.bit_length() - 1):  # strides 1, 2, .. per/2 inside a lane
        h = 1 << s
        for j in cutlass.range_constexpr(per):
            if const_expr(j & h == 0):
                a, b = f[j], f[j + h]
                f[j], f[j + h] = a + b, a - b
    for s in cutlass.range_constexpr(lanes.bit_length() - 1):  # strides per, 2 per, ..: across lanes
        off = 1 << s
        # lower lane: f + other; upper lane: other - f (a product by +-1 is exact: one rounding)
        sgn = Float32(-1.0) if (lane & off) != 0 else Float32(1.0)
        for j in cutlass.range_constexpr(per):
            other = cute.arch.shuffle_sync_bfly(f[j], offset=off)
            f[j] = f[j] * sgn + other
