"""Each allocation call is charged to its pool and refused at the budget with exactly
CUDA_ERROR_OUT_OF_MEMORY; frees give the bytes back; cuMemGetInfo and cuDeviceTotalMem report
the budget; pinned host memory lands in the host pool."""

from __future__ import annotations

import textwrap

import pytest

from fakecuda import CUDA_ERROR_OUT_OF_MEMORY, DEVICE_MEMORY, GIB, MIB, python, run

CHUNK = 256 * MIB
DEVICE_CALLS = ["alloc", "pitch", "managed", "async", "async_ptsz", "pool_async", "pool_async_ptsz",
                "create"]
HOST_CALLS = ["host_alloc", "alloc_host", "host_register"]
# A test program's own mallocs (stdio buffers and the like) in the host pool.
HOST_NOISE_BYTES = 1 * MIB


@pytest.mark.parametrize("call", DEVICE_CALLS)
def test_device_allocation_is_refused_at_the_budget_with_code_2_and_comes_back_after_free(
        fake_cuda, call):
    r = run(["cuda_client", "alloc", call, "256"], {"QVSHIM_GPU_BUDGET": "1G"})
    assert r.returncode == 0, r.describe()
    expected = {
        "granted": 4,  # 4 x 256 MiB fill the 1 GiB budget exactly
        "refused_rc": CUDA_ERROR_OUT_OF_MEMORY,
        "held_at_refusal": 1 * GIB,
        "pool_refusals": 1,
        "pool_allocs": 4,
        "pool_level": 2,  # critical: the pool is full
        "info_total": 1 * GIB,  # cuMemGetInfo: the budget, not the 8 GiB device
        "info_free": 0,
        "free_rc": 0,
        "held_after_free": 768 * MIB,
        "info_free_after_free": 256 * MIB,
        "again_rc": 0,
        "held_again": 1 * GIB,
        "held_end": 0,
    }
    got = {key: r.number(key) for key in expected}
    assert got == expected, f"{call}: expected {expected}\ngot {got}\n{r.describe()}"


@pytest.mark.parametrize("call", HOST_CALLS)
def test_pinned_host_memory_is_charged_to_the_host_pool_and_refused_at_its_budget(fake_cuda, call):
    r = run(["cuda_client", "alloc", call, "256"], {"QVSHIM_BUDGET": "1G"})
    assert r.returncode == 0, r.describe()
    assert (r.number("granted"), r.number("refused_rc")) == (3, CUDA_ERROR_OUT_OF_MEMORY), (
        f"{call}: expected 3 x 256 MiB in a 1 GiB host budget beside the program's own heap, "
        f"then code 2\n{r.describe()}")
    for key, want in [("held_at_refusal", 768 * MIB), ("held_after_free", 512 * MIB),
                      ("held_again", 768 * MIB), ("held_end", 0)]:
        assert abs(r.number(key) - want) <= HOST_NOISE_BYTES, f"{call}: {key} expected ~{want}\n{r.describe()}"
    assert r.number("pool_refusals") >= 1, r.describe()
    gpu_total = int(DEVICE_MEMORY[0] * 0.9)
    assert r.number("info_total") == gpu_total, f"pinned memory must not touch the GPU pool\n{r.describe()}"


def test_registering_malloced_memory_does_not_count_it_twice(fake_cuda):
    # The 64 MiB block is counted by malloc; pinning it (or a part of it) adds nothing, while
    # registering memory the ledger never saw (an mmap, the test above) is charged.
    r = run(["cuda_client", "register_malloc", "64"], {})
    assert r.returncode == 0, r.describe()
    block = r.number("block")
    assert block >= 64 * MIB, r.describe()
    for key in ("register_rc", "unregister_rc", "part_register_rc", "part_unregister_rc"):
        assert r.number(key) == 0, f"{key}\n{r.describe()}"
    for key in ("after_register", "after_part_register", "after_unregister"):
        assert abs(r.number(key) - block) <= HOST_NOISE_BYTES, (
            f"{key}: expected the malloc'ed block counted once (~{block}), got {r.number(key)}\n{r.describe()}")
    assert abs(r.number("after_free")) <= HOST_NOISE_BYTES, r.describe()


def test_free_of_a_pointer_the_shim_never_saw_is_the_drivers_business(fake_cuda):
    r = run(["cuda_client", "alloc", "alloc", "256", "2"], {"QVSHIM_GPU_BUDGET": "1G"})
    assert r.returncode == 0, r.describe()
    assert r.number("unknown_free_rc") == 1, f"expected the fake driver's own CUDA_ERROR_INVALID_VALUE\n{r.describe()}"
    assert r.number("held_after_unknown_free") == 0, r.describe()


def test_driver_refusal_is_passed_through_and_charges_nothing(fake_cuda):
    r = run(["cuda_client", "alloc", "alloc", "256"],
            {"QVSHIM_GPU_BUDGET": "off", "FAKE_CUDA_MEMORY_MIB": "1024"})
    assert r.returncode == 0, r.describe()
    assert (r.number("granted"), r.number("refused_rc")) == (4, CUDA_ERROR_OUT_OF_MEMORY), r.describe()
    assert r.number("pool_refusals") == 0, f"the driver refused, not the budget\n{r.describe()}"
    assert r.number("held_at_refusal") == 1 * GIB, r.describe()
    assert r.number("info_total") == 1 * GIB, f"budget off: the device's own figures\n{r.describe()}"
    assert r.number("held_end") == 0, r.describe()


def test_program_linked_against_libcuda_is_counted_through_the_exports(fake_cuda):
    r = run(["cuda_client_direct", "alloc", "alloc", "256"], {"QVSHIM_GPU_BUDGET": "512M"})
    assert r.returncode == 0, r.describe()
    got = (r.number("granted"), r.number("refused_rc"), r.number("held_at_refusal"), r.number("held_end"))
    assert got == (2, CUDA_ERROR_OUT_OF_MEMORY, 512 * MIB, 0), r.describe()


# QVSHIM_GPU_BUDGET -> each device's reported size (the fake has 8 GiB and 4 GiB devices).
BUDGET_CASES = [
    (None, [int(m * 0.9) for m in DEVICE_MEMORY]),
    ("50%", [m // 2 for m in DEVICE_MEMORY]),
    ("6G", [6 * GIB, 4 * GIB]),  # never more than the device has
    ("off", list(DEVICE_MEMORY)),
    ("lots", [int(m * 0.9) for m in DEVICE_MEMORY]),  # bad value: one line, the default
    # A share of each device, for several processes on one GPU.
    ("45%", [int(m * 45.0 / 100.0) for m in DEVICE_MEMORY]),
    ("150%", [int(m * 0.9) for m in DEVICE_MEMORY]),
    ("0%", [int(m * 0.9) for m in DEVICE_MEMORY]),
    ("-45%", [int(m * 0.9) for m in DEVICE_MEMORY]),
    ("45%%", [int(m * 0.9) for m in DEVICE_MEMORY]),
]
BAD_BUDGETS = {"lots", "150%", "0%", "-45%", "45%%"}


@pytest.mark.parametrize("budget,totals", BUDGET_CASES)
def test_gpu_budget_is_resolved_per_device_and_reported_as_its_size(fake_cuda, budget, totals):
    env = {} if budget is None else {"QVSHIM_GPU_BUDGET": budget}
    r = run(["cuda_client", "devices"], env)
    assert r.returncode == 0, r.describe()
    for device, total in enumerate(totals):
        for key in (f"device{device}_total_mem", f"device{device}_info_total", f"device{device}_info_free"):
            assert r.number(key) == total, f"QVSHIM_GPU_BUDGET={budget}: {key} expected {total}\n{r.describe()}"
    bad_lines = [l for l in r.stderr.splitlines() if "QVSHIM_GPU_BUDGET" in l]
    assert len(bad_lines) == (1 if budget in BAD_BUDGETS else 0), r.describe()
    if budget in BAD_BUDGETS:
        assert "using default 90%" in bad_lines[0], f"expected the default named\n{r.describe()}"


def test_allocations_are_charged_to_the_device_they_are_on(fake_cuda):
    r = run(["cuda_client", "devices"])
    assert r.returncode == 0, r.describe()
    assert (r.number("alloc_on_1_rc"), r.number("create_on_1_rc")) == (0, 0), r.describe()
    assert (r.number("pool1_live"), r.number("pool2_live")) == (0, 1536 * MIB), (
        f"1 GiB cuMemAlloc on device 1 and a 512 MiB cuMemCreate located on device 1\n{r.describe()}")
    assert (r.number("pool1_live_end"), r.number("pool2_live_end")) == (0, 0), r.describe()


def test_many_threads_allocating_and_freeing_leave_the_pool_balanced(fake_cuda):
    threads, rounds = 8, 3000
    r = run(["cuda_client", "threads", str(threads), str(rounds)])
    assert r.returncode == 0, r.describe()
    assert r.number("pool_live") == 0, r.describe()
    assert r.number("pool_allocs") == r.number("pool_frees") == threads * rounds, r.describe()


def test_python_ctypes_reaches_the_wrapper_and_sees_code_2(fake_cuda):
    code = textwrap.dedent("""
        import ctypes
        cuda = ctypes.CDLL("libcuda.so.1")
        assert cuda.cuInit(0) == 0
        ctx = ctypes.c_void_p()
        assert cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0) == 0
        assert cuda.cuCtxSetCurrent(ctx) == 0
        ptr = ctypes.c_uint64()
        print("small", cuda.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(128 << 20)))
        print("large", cuda.cuMemAlloc_v2(ctypes.byref(ctypes.c_uint64()), ctypes.c_size_t(512 << 20)))
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        cuda.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total))
        print("free", free.value)
        print("total", total.value)
        print("freed", cuda.cuMemFree_v2(ptr))
    """)
    r = run([python(), "-c", code], {"QVSHIM_GPU_BUDGET": "256M"})
    assert r.returncode == 0, r.describe()
    got = {k: r.number(k) for k in ("small", "large", "free", "total", "freed")}
    assert got == {"small": 0, "large": CUDA_ERROR_OUT_OF_MEMORY, "free": 128 * MIB, "total": 256 * MIB,
                   "freed": 0}, r.describe()
