"""Every route by which a program reaches the CUDA driver hands out the shim's wrappers, for
exactly the forms the shim wraps; every other lookup answers as if the shim were not there."""

from __future__ import annotations

import pytest

from fakecuda import python, run

PER_THREAD = 2

# dlsym(driver handle, name) -> where the pointer lies ("shim:<export>" or "driver").
DLSYM_CASES = [
    ("cuGetProcAddress", "shim:cuGetProcAddress"),
    ("cuGetProcAddress_v2", "shim:cuGetProcAddress_v2"),
    ("cuMemAlloc_v2", "shim:cuMemAlloc_v2"),
    ("cuMemAllocAsync_ptsz", "shim:cuMemAllocAsync_ptsz"),
    ("cuMemFree_v2", "shim:cuMemFree_v2"),
    ("cuMemCreate", "shim:cuMemCreate"),
    ("cuMemGetInfo_v2", "shim:cuMemGetInfo_v2"),
    ("cuMemHostAlloc", "shim:cuMemHostAlloc"),
    # The legacy 32-bit form and functions the shim does not wrap stay the driver's own.
    ("cuMemAlloc", "driver:-"),
    ("cuInit", "driver:-"),
]

# cuGetProcAddress_v2(name, version, flags) -> (result, symbolStatus, where).
PROC_CASES = [
    ("cuGetProcAddress", 13000, 0, "0", "0", "shim:cuGetProcAddress_v2"),
    ("cuGetProcAddress", 11030, 0, "0", "0", "shim:cuGetProcAddress"),
    ("cuMemAlloc", 13000, 0, "0", "0", "shim:cuMemAlloc_v2"),
    ("cuMemAlloc", 12000, PER_THREAD, "0", "0", "shim:cuMemAlloc_v2"),
    ("cuMemAlloc", 3000, 0, "0", "0", "driver:-"),  # before CUDA 3.2: the 32-bit form
    ("cuMemAllocAsync", 12080, 0, "0", "0", "shim:cuMemAllocAsync"),
    ("cuMemAllocAsync", 12080, PER_THREAD, "0", "0", "shim:cuMemAllocAsync_ptsz"),
    ("cuMemAllocAsync", 11000, 0, "500", "2", "null:-"),  # CUDA_ERROR_NOT_FOUND, version too low
    ("cuMemAllocFromPoolAsync", 12000, PER_THREAD, "0", "0", "shim:cuMemAllocFromPoolAsync_ptsz"),
    ("cuMemFreeAsync", 13000, PER_THREAD, "0", "0", "shim:cuMemFreeAsync_ptsz"),
    ("cuMemGetInfo", 13000, 0, "0", "0", "shim:cuMemGetInfo_v2"),
    ("cuMemGetInfo", 14000, 0, "0", "0", "driver:-"),  # a form newer than the shim knows
    ("cuMemHostRegister", 13000, 0, "0", "0", "shim:cuMemHostRegister_v2"),
    ("cuInit", 13000, 0, "0", "0", "driver:-"),
    ("cuNoSuchThing", 13000, 0, "500", "1", "null:-"),  # symbol not found
]


@pytest.fixture(scope="module")
def lookups(fake_cuda):
    result = run(["cuda_client", "lookup"])
    assert result.returncode == 0, result.describe()
    return result


@pytest.mark.parametrize("name,where", DLSYM_CASES)
def test_dlsym_on_the_driver_handle_hands_out_the_wrapper_for_wrapped_names(lookups, name, where):
    got = lookups.lookups.get(("dlsym", name, 0, 0))
    assert got is not None, f"expected a lookup line for {name}\n{lookups.describe()}"
    assert got["at"] == where, f"dlsym(driver, {name!r}) expected at {where}, got {got}"


def test_dlsym_of_other_names_returns_the_drivers_own_address(lookups):
    assert lookups.facts.get("own") is not None, lookups.describe()
    lines = [line for line in lookups.stdout.splitlines() if line.startswith("own ")]
    assert lines == ["own cuInit 1", "own cuMemAlloc 1"], (
        f"expected dlsym to return the driver's own cuInit and cuMemAlloc\n{lookups.describe()}")


def test_dlsym_of_a_missing_name_fails_with_dlerror(lookups):
    got = lookups.lookups[("dlsym", "cuNoSuchFunction", 0, 0)]
    assert got["at"] == "null:-" and got["status"] == "1", f"expected NULL and a dlerror, got {got}"


def test_dlsym_default_lookup_of_libc_names_is_untouched(lookups):
    got = lookups.lookups[("dlsym_default", "printf", 0, 0)]
    assert got["at"] == "libc:-", f"expected printf from libc, got {got}"


@pytest.mark.parametrize("name,version,flags,rc,status,where", PROC_CASES)
def test_get_proc_address_wraps_exactly_the_form_the_driver_picked(lookups, name, version, flags, rc,
                                                                    status, where):
    got = lookups.lookups.get(("proc_v2", name, version, flags))
    assert got is not None, f"expected a lookup line for {name} {version} {flags}\n{lookups.describe()}"
    assert (got["rc"], got["status"], got["at"]) == (rc, status, where), (
        f"cuGetProcAddress_v2({name!r}, {version}, flags={flags}): expected rc={rc} "
        f"status={status} at={where}, got {got}")


def test_get_proc_address_v1_hands_out_wrappers_too(lookups):
    got = lookups.lookups[("proc_v1", "cuMemFree", 12000, 0)]
    assert (got["rc"], got["at"]) == ("0", "shim:cuMemFree_v2"), f"got {got}"


def test_per_thread_wrapper_calls_the_drivers_per_thread_entry_and_counts(lookups):
    line = next(l for l in lookups.stdout.splitlines() if l.startswith("call cuMemAllocAsync_ptsz"))
    assert line == "call cuMemAllocAsync_ptsz rc=0 driver_ptsz=1 driver_default=0 live=1048576", (
        f"expected the _ptsz entry reached once and 1 MiB counted, got: {line}")


def test_newer_form_than_the_shim_knows_is_handed_out_unwrapped_and_works(lookups):
    line = next(l for l in lookups.stdout.splitlines() if l.startswith("call cuMemGetInfo_v3"))
    assert line == f"call cuMemGetInfo_v3 rc=0 driver_v3=1 total={8 << 30}", (
        f"expected the driver's own 14.0 form with the physical size, got: {line}")


def test_without_the_shim_every_route_lands_in_the_driver(fake_cuda):
    result = run(["cuda_client", "lookup"], preload=None)
    assert result.returncode == 0, result.describe()
    for key, got in result.lookups.items():
        assert not got["at"].startswith("shim"), f"{key}: {got}\n{result.describe()}"
    # The control shows the table above can fail: these would all be "driver" without the shim.
    assert result.lookups[("proc_v2", "cuMemAlloc", 13000, 0)]["at"] == "driver:-"


def test_the_driver_is_loaded_only_when_a_wrapper_is_first_called(fake_cuda):
    maps = "int('libcuda' in open('/proc/self/maps').read())"
    code = ("import ctypes\n"
            "shim = ctypes.CDLL(None)\n"
            f"print('loaded_at_start', {maps})\n"
            "free, total = ctypes.c_size_t(), ctypes.c_size_t()\n"
            "print('info_rc', shim.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)))\n"
            f"print('loaded_after_call', {maps})\n")
    result = run([python(), "-c", code])
    assert result.returncode == 0, result.describe()
    assert result.number("loaded_at_start") == 0, f"expected no libcuda mapped at start\n{result.describe()}"
    # The shim's export, called with no driver initialised: the driver's own answer.
    assert result.number("info_rc") == 3, f"expected CUDA_ERROR_NOT_INITIALIZED\n{result.describe()}"
    assert result.number("loaded_after_call") == 1, result.describe()
