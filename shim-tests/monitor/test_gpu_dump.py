"""GPU pools in the dump and the exit line, with the fake CUDA driver of shim-tests/fake_cuda
(no GPU needed): each active pool is listed with its driver allocations, and a GPU pool's level
rise tells the runtime and purges like the host's."""

import subprocess
import sys
from pathlib import Path

import pytest

from monitor_run import PYTHON, json_dump, shim_env

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fake_cuda"))
import fakecuda  # noqa: E402

MIB = 1 << 20

# Through the fake driver: device memory of 64 + 256 + 128 MiB (448 MiB of a 512 MiB GPU
# budget: warn) and 32 MiB of pinned host memory, then the dump through the C API.
PROGRAM = r"""
import ctypes, json, sys, time
cuda = ctypes.CDLL("libcuda.so.1")
MIB = 1 << 20
assert cuda.cuInit(0) == 0
dev = ctypes.c_int()
assert cuda.cuDeviceGet(ctypes.byref(dev), 0) == 0
ctx = ctypes.c_void_p()
assert cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) == 0
assert cuda.cuCtxSetCurrent(ctx) == 0
held = []
allocated_at = time.monotonic()
for mib in (64, 256, 128):
    p = ctypes.c_uint64()
    assert cuda.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(mib * MIB)) == 0
    held.append(p)
pinned = ctypes.c_void_p()
assert cuda.cuMemHostAlloc(ctypes.byref(pinned), ctypes.c_size_t(32 * MIB), 0) == 0
time.sleep(0.3)                # the allocations' age in the dump is at least this
# The monitor sees the GPU pool's rise: purges and tells Python (a busy machine may take a while).
deadline = time.monotonic() + 10
while True:
    with open(sys.argv[1], "w") as f:
        assert ctypes.CDLL(None).qvshim_dump(f.fileno(), 1) == 0
    with open(sys.argv[1]) as f:
        gpu = json.load(f)["pools"][1]
    if (gpu["purges"] >= 1 and gpu["notifications"] >= 1) or time.monotonic() > deadline:
        break
    time.sleep(0.05)
print("age bound ms", int((time.monotonic() - allocated_at) * 1000) + 1)
"""


@pytest.fixture(scope="module")
def fake_driver(lib):
    try:
        return fakecuda.build_all()
    except RuntimeError as error:
        pytest.fail(str(error))


def test_dump_lists_every_active_pool_with_its_driver_allocations(fake_driver, tmp_path):
    out = tmp_path / "dump.json"
    env = shim_env(QVSHIM_GPU_BUDGET="512M", QVSHIM_LOG="info")  # the exit line is INFO
    env["LD_LIBRARY_PATH"] = str(fake_driver)
    r = subprocess.run([PYTHON, "-c", PROGRAM, str(out)], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    d = json_dump(out.read_text())
    names = [p["name"] for p in d["pools"]]
    assert names == ["host", "gpu 0"], names
    host, gpu = d["pools"]
    assert gpu["device"] == 0 and gpu["pool"] == 1
    assert gpu["device_memory"] == fakecuda.DEVICE_MEMORY[0]
    assert host["device_memory"] is None
    assert gpu["budget"] == 512 * MIB and gpu["live"] == 448 * MIB
    assert gpu["level"] == "warn" and gpu["level_changes"] == 1
    assert gpu["purges"] >= 1 and gpu["notifications"] >= 1, "the GPU rise purged and told Python"
    assert [(b["size"] // MIB, b["call"]) for b in gpu["largest"]] == [
        (256, "cuMemAlloc"), (128, "cuMemAlloc"), (64, "cuMemAlloc")]
    # Ages on the coarse monotonic clock (a tick of a few ms): from the sleep to the last dump.
    bound = int(r.stdout.split("age bound ms")[1])
    ages = [b["age_ms"] for b in gpu["largest"]]
    assert all(290 <= age <= bound + 20 for age in ages), (ages, bound)
    assert (32 * MIB, "cuMemHostAlloc") in [(b["size"], b["call"]) for b in host["largest"]]
    assert "gpu 0 level normal -> warn" in r.stderr
    assert "gpu 0 peak 448.00 MiB of budget 512.00 MiB (87%)" in r.stderr, "the exit line"
