"""`qvshim status` shows a process's GPU pools, and `qvshim doctor` the CUDA driver, through the fake
driver (shim-tests/fake_cuda: two devices of 8 and 4 GiB)."""

from __future__ import annotations

import json
import os
import subprocess
import time

import fakecuda
import pytest

PYTHON_DIR = fakecuda.REPO / "python"
DEADLINE_S = 20
HELD_MIB = 256

# Under the shim and the fake driver: takes HELD_MIB on device 0, says "ready", waits for stdin.
GPU_HOLDER = f"""
import ctypes, sys
cuda = ctypes.CDLL("libcuda.so.1")
context, pointer = ctypes.c_void_p(), ctypes.c_uint64(0)
assert cuda.cuInit(0) == 0
assert cuda.cuDevicePrimaryCtxRetain(ctypes.byref(context), 0) == 0 and cuda.cuCtxSetCurrent(context) == 0
assert cuda.cuMemAlloc_v2(ctypes.byref(pointer), ctypes.c_size_t({HELD_MIB} << 20)) == 0
print("ready", flush=True)
sys.stdin.read()
"""


def qvshim(*args: str, extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = fakecuda.environment({"PYTHONPATH": str(PYTHON_DIR), **(extra or {})}, preload=None)
    done = subprocess.run([fakecuda.python(), "-m", "qvshim", *args], env=env, capture_output=True, text=True,
                          timeout=120)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def test_status_shows_each_gpu_pool_in_use(fake_cuda):
    env = fakecuda.environment()
    holder = subprocess.Popen([fakecuda.python(), "-c", GPU_HOLDER], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        directory = os.environ.get("XDG_RUNTIME_DIR")
        candidates = [f"/dev/shm/qvshim-{os.geteuid()}/{holder.pid}.json"]
        if directory:
            candidates.insert(0, os.path.join(directory, "qvshim", f"{holder.pid}.json"))
        deadline = time.monotonic() + DEADLINE_S
        record = None
        while record is None and time.monotonic() < deadline:
            for path in candidates:
                try:
                    with open(path) as f:
                        record = json.load(f)
                    break
                except (OSError, ValueError):
                    pass
            time.sleep(0.05)
        assert record is not None, f"expected a counters file at one of {candidates}"
        gpu = [p for p in record["pools"] if p["pool"] == "gpu 0"]
        assert gpu and gpu[0]["live"] == HELD_MIB << 20 and gpu[0]["device"] == 0, \
            f"expected gpu 0 holding {HELD_MIB} MiB: {record['pools']}"
        done = qvshim("status", str(holder.pid))
        assert done.returncode == 0, done.stderr
        row = [line for line in done.stdout.splitlines() if line.lstrip().startswith("gpu 0")]
        assert row and "256.0 MiB" in row[0] and "7.2 GiB" in row[0], f"expected a gpu 0 row:\n{done.stdout}"
    finally:
        holder.stdin.close()
        holder.wait(timeout=DEADLINE_S)


# (fake NVML form or None for no NVML, MiB NVML shows past the count, what the status line must say)
UNSEEN_CASES = [
    ("v3", 100, "counted 256.0 MiB, unseen 100.0 MiB, NVML 356.0 MiB"),
    (None, 0, "counted 256.0 MiB, unseen 0 B, NVML n/a"),
]


@pytest.mark.parametrize("form,extra_mib,want", UNSEEN_CASES)
def test_status_shows_counted_unseen_and_the_nvml_figure(fake_cuda, form, extra_mib, want):
    env = fakecuda.environment({"QVSHIM_INTERVAL": "20ms", "FAKE_NVML_EXTRA_MIB": str(extra_mib),
                                "LD_LIBRARY_PATH": fakecuda.nvml_library_path(form)})
    holder = subprocess.Popen([fakecuda.python(), "-c", GPU_HOLDER], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + DEADLINE_S
        line = ""
        while time.monotonic() < deadline:
            done = qvshim("status", str(holder.pid))
            lines = [x for x in done.stdout.splitlines() if x.startswith(f"{holder.pid} gpu 0:")]
            line = lines[0] if lines else ""
            if want in line:
                break
            time.sleep(0.1)
        assert want in line, f"NVML {form} with {extra_mib} MiB past the count: expected {want!r}, got:\n{done.stdout}"
    finally:
        holder.stdin.close()
        holder.wait(timeout=DEADLINE_S)


# (QVSHIM_GPU_BUDGET, what the gpu 0 line says)
DOCTOR_CASES = [
    (None, "8.0 GiB; GPU budget 7.2 GiB"),
    ("50%", "8.0 GiB; GPU budget 4.0 GiB"),
    ("off", "8.0 GiB; GPU budget off (unlimited)"),
]


def test_doctor_reports_the_driver_and_each_devices_gpu_budget(fake_cuda):
    for budget, want in DOCTOR_CASES:
        done = qvshim("doctor", extra={"QVSHIM_GPU_BUDGET": budget} if budget else None)
        assert done.returncode == 0, f"QVSHIM_GPU_BUDGET={budget}: exit {done.returncode}\n{done.stdout}"
        assert "ok    CUDA driver      libcuda.so.1 CUDA 13.0, 2 device(s)" in done.stdout, done.stdout
        gpu0 = [line for line in done.stdout.splitlines() if line.startswith("info  gpu 0")]
        assert gpu0 and want in gpu0[0], f"QVSHIM_GPU_BUDGET={budget}: expected {want!r}:\n{done.stdout}"


def test_doctor_says_when_a_devices_memory_is_unknown_and_does_not_fail(fake_cuda):
    done = qvshim("doctor", extra={"FAKE_CUDA_FAIL": "totalmem"})
    assert done.returncode == 0, done.stdout
    gpus = [line for line in done.stdout.splitlines() if line.startswith("info  gpu ")]
    assert gpus == ["info  gpu 0            memory unknown", "info  gpu 1            memory unknown"], done.stdout


def test_doctor_without_a_driver_says_so_and_does_not_fail(fake_cuda):
    # Without the fake on the path: "no CUDA driver" here, the real one on a machine that has it.
    installed = "libcuda.so.1" in subprocess.run(["/sbin/ldconfig", "-p"], capture_output=True, text=True).stdout
    done = qvshim("doctor", extra={"LD_LIBRARY_PATH": "/nonexistent"})
    assert done.returncode == 0, done.stdout
    want = "ok    CUDA driver      libcuda.so.1 CUDA" if installed else "info  CUDA driver      no CUDA driver"
    assert want in done.stdout, done.stdout
