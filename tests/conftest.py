import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
        return
    if torch.cuda.get_device_capability()[0] != 9:  # SM90 kernel tests on a Blackwell, say
        skip = pytest.mark.skip(reason="tests the SM90 kernels: needs a Hopper (SM 9.x) GPU")
        for item in items:
            if "sm90" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def poisoned(monkeypatch):
    """Every floating torch.empty (FA4's outputs, our scratch) starts as NaN, not stale memory:
    an element the kernel fails to write cannot pass the checks."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", nan_empty)
