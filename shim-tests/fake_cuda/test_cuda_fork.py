"""In a fork child the shim leaves the driver's memory pools and NVML alone (CUDA cannot be used
after fork; docs/GPU.md): no cuMemPoolTrimTo before a refusal, no pool reading and no NVML
reading by the child's monitor, while the parent does all three as before. The fake driver
(FAKE_CUDA_LOG) and the fake NVML (FAKE_NVML_LOG) write "name pid" for each call."""

from __future__ import annotations

import subprocess

import fakecuda
import pytest

DEADLINE_S = 20
REFUSED_MIB = 2048

# Under the shim, the fake driver and the fake NVML: takes 256 MiB on device 0, has one
# allocation refused (the pools are trimmed first), waits until its monitor read NVML, then
# forks. The child allocates 128 MiB (that reaches the driver: its calls are logged) and has two
# allocations refused, each time waiting until its monitor saw the refusal and asked for relief
# (the pool's notifications), so the child's monitor has sampled the GPU at least once.
# Prints "parent PID" and "child PID"; the child exits 0 when it got that far.
PROGRAM = f"""
import ctypes, os, sys, time
NVML_LOG = os.environ["FAKE_NVML_LOG"]
DEADLINE_S = {DEADLINE_S}

def read(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""

def poll(what, done):
    deadline = time.monotonic() + DEADLINE_S
    while not done():
        assert time.monotonic() < deadline, f"expected {{what}} within {{DEADLINE_S}} s"
        time.sleep(0.01)

# struct qvshim_pool_stats from its one Python definition (python/qvshim/_capi.py, via shimstats).
sys.path.insert(0, {str(fakecuda.REPO / "shim-tests" / "py")!r})
import shimstats

def notifications():
    return shimstats.pool_stats(1).notifications

cuda = ctypes.CDLL("libcuda.so.1")
context = ctypes.c_void_p()
assert cuda.cuInit(0) == 0
assert cuda.cuDevicePrimaryCtxRetain(ctypes.byref(context), 0) == 0 and cuda.cuCtxSetCurrent(context) == 0

def alloc(mib):
    pointer = ctypes.c_uint64(0)
    return cuda.cuMemAlloc_v2(ctypes.byref(pointer), ctypes.c_size_t(mib << 20))

def refused_and_seen():
    asked = notifications()
    assert alloc({REFUSED_MIB}) == {fakecuda.CUDA_ERROR_OUT_OF_MEMORY}, "expected a refusal"
    poll("the monitor to see the refusal", lambda: notifications() > asked)

assert alloc(256) == 0
refused_and_seen()
poll("the parent's monitor to read NVML",
     lambda: f"nvmlDeviceGetComputeRunningProcesses_v3 {{os.getpid()}}" in read(NVML_LOG))
print("parent", os.getpid(), flush=True)
child = os.fork()
if child == 0:
    code = 1
    try:
        assert alloc(128) == 0
        refused_and_seen()
        refused_and_seen()
        code = 0
    finally:
        os._exit(code)
print("child", child, flush=True)
_, status = os.waitpid(child, 0)
assert os.waitstatus_to_exitcode(status) == 0, f"expected the child to exit 0, got status {{status}}"
"""

# (log, call, whether the parent made it, whether the child made it)
FORK_CASES = [
    # The control: the child's own allocation reaches the driver, and is logged with its pid.
    ("cuda", "cuMemAlloc_v2", True, True),
    ("cuda", "cuMemPoolTrimTo", True, False),
    ("cuda", "cuDeviceGetDefaultMemPool", True, False),
    ("cuda", "cuMemPoolGetAttribute", True, False),
    ("nvml", "nvmlDeviceGetComputeRunningProcesses_v3", True, False),
    ("nvml", "nvml*", True, False),
]


@pytest.fixture(scope="module")
def fork_run(fake_cuda, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fork")
    logs = {"cuda": tmp / "cuda.log", "nvml": tmp / "nvml.log"}
    env = fakecuda.environment({
        "QVSHIM_GPU_BUDGET": "1G", "QVSHIM_INTERVAL": "20ms", "FAKE_CUDA_POOL_KEEPS": "1",
        "LD_LIBRARY_PATH": fakecuda.nvml_library_path("v3"),
        "FAKE_CUDA_LOG": str(logs["cuda"]), "FAKE_NVML_LOG": str(logs["nvml"])})
    done = subprocess.run([fakecuda.python(), "-c", PROGRAM], env=env, capture_output=True, text=True,
                          timeout=fakecuda.RUN_TIMEOUT_SECONDS)
    shown = f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.returncode == 0, shown
    pids = dict(line.split() for line in done.stdout.splitlines())
    calls = {name: [line.split() for line in path.read_text().splitlines()] if path.exists() else []
             for name, path in logs.items()}
    return pids, calls, shown


@pytest.mark.parametrize("log,call,by_parent,by_child", FORK_CASES)
def test_a_fork_child_leaves_the_pools_and_nvml_alone(fork_run, log, call, by_parent, by_child):
    pids, calls, shown = fork_run
    callers = {pid for name, pid in calls[log]
               if name == call or (call.endswith("*") and name.startswith(call[:-1]))}
    got = (pids["parent"] in callers, pids["child"] in callers)
    assert got == (by_parent, by_child), (
        f"expected {call} (in the fake {log} log) called by the parent: {by_parent}, by the fork child: "
        f"{by_child}; got {got}\ncallers {sorted(callers)}, parent {pids['parent']}, child {pids['child']}\n{shown}")
