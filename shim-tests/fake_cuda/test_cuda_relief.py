"""A GPU refusal asks Python for relief: the monitor, woken by the refusal, queues a pending call
(src/runtime/python/relief.rs) that runs gc.collect(), torch.cuda.empty_cache() when torch is
imported and CUDA initialised, and the companion's _on_pressure(level, pool). Without torch: a
stand-in package (standin_torch/torch) records each call, and a stand-in companion module records
each relief, under the shim and the fake driver (1 GiB GPU budget, device 0 of 8 GiB)."""

from __future__ import annotations

import subprocess

import fakecuda
import pytest

STANDIN_DIR = fakecuda.HERE / "standin_torch"
DEADLINE_S = 20
REFUSED_MIB = 2048

# Under the shim and the fake driver. Steps (argv): "import" imports torch (the stand-in);
# "burst:K" makes K refused allocations from a second thread while the main thread is blocked
# reading a pipe with the collector off (so neither it nor the nudge thread can run a relief),
# and writes to the pipe once the monitor has seen all K and asked (its log file counts the
# looks and the refusals, the pool's notifications the asks); "ok:K" makes K allocations of 100 MiB that fit (10% each: below warn)
# and frees them; "wait:N" polls until N reliefs ran. Prints "torch_in_modules 0|1" at the end.
PROGRAM = f"""
import ctypes, gc, os, platform, re, sys, threading, time, types
LOG, SHIM_LOG = os.environ["RELIEF_LOG"], os.environ["QVSHIM_LOG_FILE"]
DEADLINE_S = {DEADLINE_S}

def note(*words):
    with open(LOG, "a") as f:
        f.write(" ".join(map(str, words)) + "\\n")

def read(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""

companion = types.ModuleType("qvshim")
companion._on_pressure = lambda level, pool: note("relief", level, pool, os.getpid())
sys.modules["qvshim"] = companion

cuda = ctypes.CDLL("libcuda.so.1")
context = ctypes.c_void_p()
assert cuda.cuInit(0) == 0
assert cuda.cuDevicePrimaryCtxRetain(ctypes.byref(context), 0) == 0 and cuda.cuCtxSetCurrent(context) == 0

def alloc(mib):
    pointer = ctypes.c_uint64(0)
    return cuda.cuMemAlloc_v2(ctypes.byref(pointer), ctypes.c_size_t(mib << 20)), pointer

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

def looks_at_refusals():
    # One line per monitor look that saw new refusals of gpu 0, with how many.
    return [int(n) for n in re.findall(r"gpu 0: refused (\\d+) allocation", read(SHIM_LOG))]

# The main thread's tid is the pid; /proc shows the system call it is blocked in.
READ_SYSCALL = {{"x86_64": 0, "aarch64": 63}}[platform.machine()]

def main_thread_blocked_reading(fd):
    fields = read(f"/proc/self/task/{{os.getpid()}}/syscall").split()
    return len(fields) > 1 and fields[0] == str(READ_SYSCALL) and int(fields[1], 16) == fd

def burst(count):
    # Done when every look that saw one of the refusals has logged them and then asked for its
    # relief (each look's ask is counted in the pool's notifications after its log line).
    before, asked_before, failed = len(looks_at_refusals()), notifications(), []
    def all_seen_and_asked():
        looks = looks_at_refusals()[before:]
        return sum(looks) >= count and notifications() - asked_before >= len(looks)
    r, w = os.pipe()
    def refuse():
        try:
            poll("the main thread to block reading the pipe", lambda: main_thread_blocked_reading(r))
            assert cuda.cuCtxSetCurrent(context) == 0
            codes = [alloc({REFUSED_MIB})[0] for _ in range(count)]
            assert codes == [{fakecuda.CUDA_ERROR_OUT_OF_MEMORY}] * count, f"expected refusals, got {{codes}}"
            poll(f"the monitor to see {{count}} refusals and ask for relief", all_seen_and_asked)
        except AssertionError as error:
            failed.append(error)
        finally:
            os.write(w, b"x")
    gc.disable()
    worker = threading.Thread(target=refuse)
    worker.start()
    os.read(r, 1)
    gc.enable()
    worker.join()
    os.close(r)
    os.close(w)
    if failed:
        raise failed[0]

for step in sys.argv[1:]:
    name, _, arg = step.partition(":")
    if name == "import":
        import torch
    elif name == "burst":
        burst(int(arg))
    elif name == "ok":
        held = [alloc(100) for _ in range(int(arg))]
        assert all(rc == 0 for rc, _ in held), f"expected {{arg}} allocations of 100 MiB to fit"
        for _, pointer in held:
            assert cuda.cuMemFree_v2(pointer) == 0
    elif name == "wait":
        poll(f"{{arg}} reliefs", lambda: read(LOG).count("relief ") >= int(arg))
print("torch_in_modules", int("torch" in sys.modules), flush=True)
"""

# (steps, STANDIN_CUDA_INITIALIZED, torch.cuda.empty_cache calls expected, reliefs expected,
#  imports of torch expected)
RELIEF_CASES = [
    # One call per burst of refusals, none for the allocations that fit in between.
    (["import", "burst:3", "wait:1", "ok:4", "burst:3", "wait:2"], "1", 2, 2, 1),
    (["import", "burst:1", "wait:1"], "1", 1, 1, 1),
    # CUDA not initialised: the cache is not emptied (torch would initialise CUDA to do it).
    (["import", "burst:3", "wait:1"], "0", 0, 1, 1),
    # torch not imported: the relief runs and never imports it on the app's behalf.
    (["burst:3", "wait:1", "burst:1", "wait:2"], "1", 0, 2, 0),
]


@pytest.mark.parametrize("steps,initialized,emptied,reliefs,imports", RELIEF_CASES)
def test_a_gpu_refusal_empties_torchs_cuda_cache_once_per_burst(fake_cuda, tmp_path, steps, initialized,
                                                                emptied, reliefs, imports):
    log, shim_log = tmp_path / "relief.log", tmp_path / "qvshim.log"
    env = fakecuda.environment({
        "QVSHIM_GPU_BUDGET": "1G", "QVSHIM_INTERVAL": "20ms", "QVSHIM_LOG_FILE": str(shim_log),
        "PYTHONPATH": str(STANDIN_DIR), "RELIEF_LOG": str(log), "STANDIN_TORCH_LOG": str(log),
        "STANDIN_CUDA_INITIALIZED": initialized, "PYTHONDONTWRITEBYTECODE": "1"})
    done = subprocess.run([fakecuda.python(), "-c", PROGRAM, *steps], env=env, capture_output=True, text=True,
                          timeout=fakecuda.RUN_TIMEOUT_SECONDS)
    lines = log.read_text().splitlines() if log.exists() else []
    shown = (f"steps {steps}, CUDA initialised {initialized}: exit {done.returncode}\nrecorded:\n"
             + "\n".join(lines) + f"\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}\nqvshim log:\n"
             + (shim_log.read_text() if shim_log.exists() else ""))
    assert done.returncode == 0, shown
    got = (sum(line.startswith("empty_cache ") for line in lines),
           sum(line.startswith("relief ") for line in lines),
           sum(line.startswith("import ") for line in lines))
    assert got == (emptied, reliefs, imports), (
        f"expected (empty_cache calls, reliefs, torch imports) {(emptied, reliefs, imports)}, got {got}\n{shown}")
    assert all(line.split()[1:3] == ["critical", "1"] for line in lines if line.startswith("relief ")), (
        f"expected every relief asked for at critical for pool 1 (gpu 0)\n{shown}")
    assert f"torch_in_modules {min(imports, 1)}" in done.stdout, (
        f"expected torch in sys.modules only when the program imported it\n{shown}")
