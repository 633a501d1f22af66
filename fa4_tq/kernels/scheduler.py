"""A persistent tile scheduler for the SM90 packed-KV forward, and the switch that hands it to FA4.

FA4's SM90 forward launches one CTA per (m_block, head, batch) tile (``SingleTileScheduler``, or
``SingleTileLPTScheduler`` when causal), although its producer and consumer loops are written for
several tiles a CTA. Short tiles (seqlen_k of ~1K, 4-8 K/V blocks) then pay a CTA's start (barrier
init, codebook staging, the first Q and K loads) and end (the output un-rotation, the epilogue)
per tile with nothing beside them. Persistent, one CTA per SM walks tiles ``i, i + grid, ...``
(FA4's ``StaticPersistentTileScheduler``) and the producer dequantises the next tile's first
blocks while the consumers finish the current one.

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

import flash_attn.cute.flash_fwd_sm90 as fa4_sm90
import cutlass
from cutlass import Int32
from flash_attn.cute.tile_scheduler import StaticPersistentTileScheduler

_swap_lock = threading.Lock()


@functools.lru_cache(maxsize=None)  # one class per SM count, not one per compile
def persistent_scheduler(num_sms: int) -> type:
    """FA4's static persistent scheduler with a grid of ``min(num_sms, tiles)`` CTAs. FA4's own asks
    the driver for the SM count while tracing, which a CPU compile (no GPU) cannot; the launcher
    passes the count it compiles for (``FLASH_ATTENTION_NUM_SMS`` or the device's)."""

    class PersistentTileScheduler(StaticPersistentTileScheduler):
        @staticmethod
        def get_grid_shape(params, *, loc=None, ip=None):
            return (cutlass.min(num_sms, params.total_blocks_cluster * params.cluster_shape_m), Int32(1), Int32(1))

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
