"""A persistent tile scheduler for the SM90 packed-KV forward, and the switch that hands it to FA4.

FA4's SM90 forward launches one CTA per (m_block, head, batch) tile (``SingleTileScheduler``, or
``SingleTileLPTScheduler`` when causal), although its producer and consumer loops are written for
several tiles a CTA. Short tiles (seqlen_k of ~1K, 4-8 K/V blocks) then pay a CTA's start (barrier
init, codebook staging, the first Q and K loads) and end (the output un-rotation, the epilogue)
per tile with nothing beside them. Persistent, one CTA per SM walks the tiles of FA4's
``StaticPersistentTileScheduler`` (m_block fastest, then head, then batch), and the producer
dequantises the next tile's first blocks while the consumers finish the current one.

Which tiles a CTA gets is ours (``serpentine_tile``): FA4's static order gives CTA ``c`` the tiles
``c, c + grid, ...``, and when causal a tile's cost grows with its m_block, so whenever the grid
(132) is close to a multiple of the m_blocks a head has, a CTA keeps drawing the same few m_blocks:
at 1K keys, MHA (8 m_blocks) puts two tiles of 4 and 8 blocks on some CTAs and 1 and 5 on others.
Measured on the H100, that order made the persistent kernel 0.87-0.88x of one tile a CTA for MHA
and GQA 3:1 where GQA 8:1 (64 m_blocks) gained 1.10x (perf/results/prefill-*.md). Walking every
other round of ``grid`` tiles backwards pairs a CTA's short tile with a long one (a cost model of
these shapes: the busiest CTA 0.5-2.5% above the mean, against 2.5-30% in FA4's order) and keeps
a round's tiles the contiguous range FA4's order has (the same heads in L2 at a time). Measured
(H100, K4V4, 1K causal, one run): MHA 1.06x, GQA 2:1 1.09x, GQA 3:1 1.05x of one tile a CTA, GQA
8:1 1.11x as before, outputs equal bit for bit.

FA4's SM90 kernel itself cannot run persistent as it stands: its epilogue writes the output tile
into ``sO``, which is ``sQ``'s storage, while the consumers have already released ``sQ`` to the
producer (after the tile's last QK^T), so the next tile's Q lands on the output being stored.
``FlashAttentionForwardSm90TQ(persistent=True)`` releases Q after its epilogue instead.

FA4 b36 picks the scheduler class inside ``__call__`` by module-level name, with no argument for
it, so ``tile_scheduler(cls)`` rebinds those names while a kernel is traced (``cute.compile``) and
restores them after; docs/UPSTREAM.md proposes the constructor argument that would replace it.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import cutlass
import cutlass.cute as cute
import flash_attn.cute.flash_fwd_sm90 as fa4_sm90
from cutlass import Int32
from flash_attn.cute.tile_scheduler import StaticPersistentTileScheduler

_swap_lock = threading.Lock()


def serpentine_tile(t, grid, total):
    """The tile (in FA4's static order) that the ``t``-th slot of a persistent walk runs: slot ``t``
    is round ``t // grid`` and CTA ``t % grid``; odd rounds run backwards, except a last round that
    is not full (it keeps FA4's order, so that every slot below ``total`` names a tile below it).
    Plain ints or the kernel's Int32: the same arithmetic (``cutlass.min``/``max`` take both)."""
    r = t // grid
    p = t - r * grid
    backwards = (r % 2) * cutlass.min(cutlass.max(total // grid - r, 0), 1)  # odd and full: 1, else 0
    return t + backwards * (grid - 1 - 2 * p)


@functools.lru_cache(maxsize=None)  # one class per SM count, not one per compile
def persistent_scheduler(num_sms: int) -> type:
    """FA4's static persistent scheduler with a grid of ``min(num_sms, tiles)`` CTAs, walking its
    tiles in ``serpentine_tile``'s order. FA4's own asks the driver for the SM count while tracing,
    which a CPU compile (no GPU) cannot; the launcher passes the count it compiles for
    (``FLASH_ATTENTION_NUM_SMS`` or the device's). ``create`` and ``__new_from_mlir_values__`` are
    FA4's with the class they build made ours (FA4's name ``StaticPersistentTileScheduler`` there,
    so a subclass's methods are lost across the tile loop: docs/UPSTREAM.md)."""

    class PersistentTileScheduler(StaticPersistentTileScheduler):
        @staticmethod
        def get_grid_shape(params, *, loc=None, ip=None):
            return (cutlass.min(num_sms, params.total_blocks_cluster * params.cluster_shape_m), Int32(1), Int32(1))

        @staticmethod
        def create(params, ctx=None, *, loc=None, ip=None):
            assert params.cluster_shape_m == 1, "the serpentine order is written for one CTA a cluster"
            return PersistentTileScheduler(params, cute.arch.block_idx()[0], loc=loc, ip=ip)

        def get_current_work(self, *, loc=None, ip=None):
            tile = serpentine_tile(self._tile_idx, cute.arch.grid_dim()[0], self.params.total_blocks_cluster)
            return StaticPersistentTileScheduler(self.params, tile, loc=loc, ip=ip).get_current_work(loc=loc, ip=ip)

        def __new_from_mlir_values__(self, values):
            n = self._values_pos[0]
            return PersistentTileScheduler(cutlass.new_from_mlir_values(self.params, values[:n]),
                                           cutlass.new_from_mlir_values(self._tile_idx, values[n:]), loc=self._loc)

    PersistentTileScheduler.__qualname__ = f"PersistentTileScheduler[{num_sms}]"
    return PersistentTileScheduler


@contextlib.contextmanager
def tile_scheduler(cls):
    """While tracing inside it, FA4's SM90 ``__call__`` builds its grid and tile loop with ``cls``
    (None: FA4's own choice). Not re-entrant across threads: compiles under it are serialised."""
    if cls is None:
        yield
        return
    with _swap_lock:
        saved = fa4_sm90.SingleTileScheduler, fa4_sm90.SingleTileLPTScheduler
        fa4_sm90.SingleTileScheduler = fa4_sm90.SingleTileLPTScheduler = cls
        try:
            yield
        finally:
            fa4_sm90.SingleTileScheduler, fa4_sm90.SingleTileLPTScheduler = saved
