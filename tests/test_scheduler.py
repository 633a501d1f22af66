"""The SM90 kernel's tile-scheduler switch (fa4_tq/kernels/scheduler.py) and the launcher's rule
for it, on the CPU. The persistent kernel itself: tests/test_compile.py (sm_90a) and
tests/test_gpu_inline.py (equal to one tile a CTA bit for bit, on the device)."""

import pytest

fa4_sm90 = pytest.importorskip("flash_attn.cute.flash_fwd_sm90")

from flash_attn.cute.tile_scheduler import StaticPersistentTileScheduler  # noqa: E402

from fa4_tq.kernels.launch import PERSISTENT_MAX_SEQLEN_K, sm90_persistent  # noqa: E402
from fa4_tq.kernels.scheduler import persistent_scheduler, tile_scheduler  # noqa: E402


def test_tile_scheduler_rebinds_fa4_names_and_restores_them():
    before = fa4_sm90.SingleTileScheduler, fa4_sm90.SingleTileLPTScheduler
    cls = persistent_scheduler(132)
    assert issubclass(cls, StaticPersistentTileScheduler) and cls is not StaticPersistentTileScheduler
    with tile_scheduler(cls):
        assert fa4_sm90.SingleTileScheduler is cls and fa4_sm90.SingleTileLPTScheduler is cls
    assert (fa4_sm90.SingleTileScheduler, fa4_sm90.SingleTileLPTScheduler) == before
    with pytest.raises(RuntimeError, match="boom"):  # a failing compile must not leave them swapped
        with tile_scheduler(cls):
            raise RuntimeError("boom")
    assert (fa4_sm90.SingleTileScheduler, fa4_sm90.SingleTileLPTScheduler) == before
    with tile_scheduler(None):
        assert (fa4_sm90.SingleTileScheduler, fa4_sm90.SingleTileLPTScheduler) == before


def test_persistent_only_for_short_prefill_tiles():
    assert sm90_persistent(1024, 128, False, 8)
    assert sm90_persistent(PERSISTENT_MAX_SEQLEN_K, 128, False, 4)
    assert not sm90_persistent(PERSISTENT_MAX_SEQLEN_K + 1, 128, False, 8)  # measured slower at 8K causal
    assert not sm90_persistent(1024, 64, False, 8)  # decode-sized tiles: not measured persistent
    assert not sm90_persistent(1024, 128, True, 8)  # skip-softmax: not measured persistent
    assert not sm90_persistent(1024, 128, False, 1)  # MHA: measured slower persistent (FA4's tile order)
    assert not sm90_persistent(1024, 128, False, 3)  # GQA 3:1: measured slower persistent
    assert not sm90_persistent(1024, 128, False, 2)  # GQA 2:1: modelled unbalanced, not measured
