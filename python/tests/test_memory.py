"""The pool numbers and names of qvshim.memory, as include/qvshim.h numbers the pools."""

import sys
import types

import pytest

import qvshim
from qvshim import memory

POOL_ROWS = [
    # (CUDA device, its pool: QVSHIM_POOL_GPU(device) = 1 + device, the name in log lines)
    (0, 1, "gpu0"),
    (1, 2, "gpu1"),
    (15, 16, "gpu15"),  # the last of QVSHIM_MAX_POOLS (17: host + 16 GPUs)
]


@pytest.mark.parametrize("device,pool,name", POOL_ROWS, ids=[r[2] for r in POOL_ROWS])
def test_gpu_pool_numbers_and_names_follow_the_c_header(device, pool, name):
    assert qvshim.gpu_pool(device) == pool, f"expected gpu_pool({device}) == {pool}, got {qvshim.gpu_pool(device)}"
    assert memory.pool_name(pool) == name, f"expected pool_name({pool}) == {name!r}, got {memory.pool_name(pool)!r}"


def test_host_pool_is_zero_and_named_host():
    assert qvshim.POOL_HOST == 0
    assert memory.pool_name(qvshim.POOL_HOST) == "host", f"got {memory.pool_name(qvshim.POOL_HOST)!r}"


def test_release_memory_with_a_torch_that_has_no_cuda(monkeypatch):
    # A CPU-only or stub torch module (no torch.cuda attribute) must not make the release fail.
    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))
    memory.release_memory()


def test_rss_bytes_is_the_resident_size_and_grows_with_written_memory():
    before = memory.rss_bytes()
    written = b"\x01" * (64 << 20)
    grown = memory.rss_bytes() - before
    assert written[-1] == 1
    assert grown >= 48 << 20, f"expected rss_bytes to grow by about 64 MiB with 64 MiB written, grew {grown}"


def test_stats_skips_a_pool_that_is_not_there_and_goes_on(monkeypatch):
    # A GPU pool between two others may have no statistics (its device not in use): the pools
    # after it are still listed.
    entries = {0: {"level": 0}, 1: None, 2: {"level": 1}}
    monkeypatch.setattr(memory._capi, "pool_count", lambda: 3)
    monkeypatch.setattr(memory._capi, "pool_stats", lambda pool: None if entries[pool] is None else dict(entries[pool]))
    names = [(entry["name"], entry["level_name"]) for entry in memory.stats()]
    assert names == [("host", "normal"), ("gpu1", "warn")], f"expected host and gpu1, got {names}"


@pytest.mark.parametrize("initialized,emptied", [(True, 1), (False, 0)])
def test_release_memory_empties_torchs_cuda_cache_only_when_cuda_is_in_use(monkeypatch, initialized, emptied):
    calls = []
    torch = types.ModuleType("torch")
    torch.cuda = types.SimpleNamespace(is_initialized=lambda: initialized, empty_cache=lambda: calls.append(1))
    monkeypatch.setitem(sys.modules, "torch", torch)
    memory.release_memory()
    assert len(calls) == emptied, f"expected empty_cache called {emptied} time(s) with CUDA initialized={initialized}"
