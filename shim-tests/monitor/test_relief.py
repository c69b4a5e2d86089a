"""The runtime is told: CPython collects, torch's cache and the companion's callbacks run at
critical, QVSHIM_SIGNAL reaches a handler and never kills a process without one."""

from monitor_run import run_program, run_python

# Garbage cycles far past the budget: 3000 cycles holding 256 KiB each (750 MiB) under 128 MiB,
# with Python's own collector off. Only a collection asked for by the shim frees them.
GARBAGE_CYCLES = """
import gc
gc.disable()

class Node:
    pass

for i in range(3000):
    a, b = Node(), Node()
    a.other, b.other = b, a
    a.payload = bytearray(256 * 1024)
print("finished", i + 1)
"""


def test_gc_disabled_garbage_cycles_finish_because_the_shim_asks_python_to_collect(lib):
    r = run_python(GARBAGE_CYCLES, QVSHIM_BUDGET="128M", QVSHIM_LOG="info")  # the relief line is INFO
    assert r.returncode == 0, f"expected the program to finish; stderr:\n{r.stderr[-3000:]}"
    assert "finished 3000" in r.stdout
    assert "gc collected" in r.stderr, "expected the shim's relief log line"
    assert "MemoryError" not in r.stderr


def test_the_same_program_without_python_relief_runs_out_of_budget(lib):
    r = run_python(GARBAGE_CYCLES, QVSHIM_BUDGET="128M", QVSHIM_PYTHON="off")
    assert r.returncode != 0, "without relief the garbage must exhaust the 128 MiB budget"
    assert "MemoryError" in r.stderr
    assert "gc collected" not in r.stderr


def test_relief_collects_the_cycles_and_its_line_says_what_came_back(lib):
    # The first cycle carries a weak reference: once the shim's relief has run, a collection
    # must really have freed it (the collector is off, so nothing else can), and the line says
    # what came back.
    code = """
import gc, time, weakref
gc.disable()

class Cycle(list):
    pass

first = None
for i in range(300):
    a = Cycle([bytearray(256 * 1024)])
    a.append(a)
    if first is None:
        first = weakref.ref(a)
del a
import ctypes, json, tempfile
def relief_runs():
    with tempfile.TemporaryFile() as f:
        assert ctypes.CDLL(None).qvshim_dump(f.fileno(), 1) == 0
        f.seek(0)
        return json.load(f)["runtime"]["python"]["runs"]
deadline = time.time() + 10
while relief_runs() == 0 and time.time() < deadline:
    time.sleep(0.05)
print("runs", relief_runs(), "first cycle freed", first() is None)
"""
    r = run_python(code, QVSHIM_BUDGET="100M", QVSHIM_LOG="info")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[1] != "0", f"expected the relief to run; stdout {r.stdout!r}\n{r.stderr}"
    assert r.stdout.strip().endswith("first cycle freed True"), (
        f"expected the relief's collection to free the garbage cycles made before it ran (gc is "
        f"off in the program), the first is still alive: {r.stdout!r}\n{r.stderr}")
    lines = [l for l in r.stderr.splitlines() if "gc collected" in l]
    assert lines, f"no relief line in:\n{r.stderr}"
    # "[qvshim] INFO gc collected N objects; host A MiB -> B MiB"
    assert " objects; host " in lines[0] and " -> " in lines[0], lines[0]


FAKE_TORCH_AND_COMPANION = """
import sys, types, time

calls = []
torch = types.ModuleType("torch")
torch.cuda = types.SimpleNamespace(
    is_initialized=lambda: True,
    empty_cache=lambda: calls.append("empty_cache"),
)
sys.modules["torch"] = torch
companion = types.ModuleType("qvshim")
companion._on_pressure = lambda level, pool: calls.append(("on_pressure", level, pool))
sys.modules["qvshim"] = companion

held = []
for i in range(88):            # 88 MiB blocks (+ the interpreter) of a 100 MiB budget: critical
    held.append(bytearray((1 << 20) - 4096))
deadline = time.time() + 10
while "empty_cache" not in calls and time.time() < deadline:
    pass                       # Python code running: pending calls get their turn
print(calls)
"""


def test_critical_empties_torch_cache_and_calls_the_companion(lib):
    r = run_python(FAKE_TORCH_AND_COMPANION, QVSHIM_BUDGET="100M", QVSHIM_LOG="info")
    assert r.returncode == 0, r.stderr
    assert "'empty_cache'" in r.stdout, f"torch.cuda.empty_cache not called: {r.stdout}"
    assert "('on_pressure', 'critical', 0)" in r.stdout or "('on_pressure', 'warn', 0)" in r.stdout
    assert "torch CUDA cache emptied" in r.stderr


def test_warn_calls_the_companion_with_level_and_pool(lib):
    code = """
import sys, types, time
got = []
companion = types.ModuleType("qvshim")
companion._on_pressure = lambda level, pool: got.append((level, pool))
sys.modules["qvshim"] = companion
held = [bytearray((1 << 20) - 4096) for _ in range(70)]   # ~75% of 100 MiB: warn
deadline = time.time() + 10
while not got and time.time() < deadline:
    pass
print(got)
"""
    r = run_python(code, QVSHIM_BUDGET="100M")
    assert r.returncode == 0, r.stderr
    assert "[('warn', 0)]" in r.stdout, r.stdout


def test_a_fall_in_level_asks_for_no_relief(lib):
    # Up to critical, then down to warn: the fall is logged, and the companion hears nothing more
    # (a fall counted as a rise would ask for relief at warn). Periodic relief is kept out of it.
    code = """
import ctypes, sys, types, time
got = []
companion = types.ModuleType("qvshim")
companion._on_pressure = lambda level, pool: got.append(level)
sys.modules["qvshim"] = companion
level = ctypes.CDLL(None).qvshim_level
held = []
while level(0) < 2:            # allocate up to critical, and no further
    held.append(bytearray((1 << 20) - 4096))
deadline = time.time() + 20
while "critical" not in got and time.time() < deadline:
    time.sleep(0.01)
at_critical = list(got)
del held[-15:]                 # from just over 90% of the budget to about 76%: warn
time.sleep(2)
print("at critical", at_critical)
print("after the fall", got[len(at_critical):])
"""
    r = run_python(code, QVSHIM_BUDGET="100M", QVSHIM_LOG="info", QVSHIM_PURGE_INTERVAL="60s")
    assert r.returncode == 0, r.stderr
    assert "at critical" in r.stdout and "'critical']" in r.stdout, r.stdout + r.stderr
    assert "critical -> warn" in r.stderr, "the fall was not seen: " + r.stderr
    assert "after the fall []" in r.stdout, r.stdout + r.stderr


def test_exception_in_relief_is_logged_and_cleared_never_raised_into_the_app(lib):
    code = """
import sys, types, time
companion = types.ModuleType("qvshim")
def boom(level, pool):
    raise RuntimeError("callback failed on purpose")
companion._on_pressure = boom
sys.modules["qvshim"] = companion
held = [bytearray((1 << 20) - 4096) for _ in range(70)]
t = time.time()
n = 0
while time.time() - t < 1.0:
    n += 1                     # any exception raised into the app would end this loop
print("app went on", n > 0)
"""
    r = run_python(code, QVSHIM_BUDGET="100M")
    assert r.returncode == 0, r.stderr
    assert "app went on True" in r.stdout
    assert "callback failed on purpose" in r.stderr, "the exception is printed (unraisable hook)"
    assert "raised an exception (cleared, not raised into the app)" in r.stderr


def test_usr1_handler_receives_the_signal_on_a_level_rise(c_programs):
    r = run_program(c_programs["level_signal"], "handler", QVSHIM_BUDGET="64M", QVSHIM_SIGNAL="USR1",
                    QVSHIM_LOG="info")
    assert r.returncode == 0, f"stdout {r.stdout!r} stderr {r.stderr}"
    assert "received SIGUSR1" in r.stdout
    assert "raised signal 10 (USR1) to the process" in r.stderr


def test_usr1_without_a_handler_is_not_raised_and_does_not_kill(c_programs):
    r = run_program(c_programs["level_signal"], "none", QVSHIM_BUDGET="64M", QVSHIM_SIGNAL="USR1",
                    QVSHIM_LOG="info")
    assert r.returncode == 0, f"killed or failed: rc {r.returncode}, stderr {r.stderr}"
    assert "survived" in r.stdout
    assert "not raised: the process has no handler for it" in r.stderr


def test_python_signal_handler_receives_qvshim_signal(lib):
    code = """
import signal, time
got = []
signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
held = [bytearray((1 << 20) - 4096) for _ in range(70)]
deadline = time.time() + 10
while not got and time.time() < deadline:
    time.sleep(0.01)
print("got", len(got))
"""
    r = run_python(code, QVSHIM_BUDGET="100M", QVSHIM_SIGNAL="SIGUSR1")
    assert r.returncode == 0, r.stderr
    assert "got 1" in r.stdout


JOIN_PROGRAM = """
import ctypes, gc, json, os, sys, tempfile, threading
gc.disable()
errors = []

def work():
    try:
        for i in range(1500):  # 375 MiB of garbage in all, three times the budget
            a = [bytearray(256 * 1024)]
            a.append(a)        # a garbage cycle of 256 KiB
            sum(range(50000))  # and some work with it (about 0.5 ms here), as a real worker does
    except MemoryError:
        errors.append("MemoryError")

t = threading.Thread(target=work)
t.start()
t.join()                       # the main thread waits in C with the GIL released
with tempfile.TemporaryFile() as f:
    ctypes.CDLL(None).qvshim_dump(f.fileno(), 1)
    f.seek(0)
    python = json.load(f)["runtime"]["python"]
print(errors or "finished", python["nudge_thread_runs"])
"""


def test_relief_runs_while_the_main_thread_is_blocked_in_join(lib):
    r = run_python(JOIN_PROGRAM, QVSHIM_BUDGET="128M", QVSHIM_LOG="info")
    assert r.returncode == 0, r.stderr
    result, nudge_thread_runs = r.stdout.rsplit(None, 1)
    assert result == "finished", f"the worker ran out of budget: {r.stdout}\n{r.stderr[-2000:]}"
    assert int(nudge_thread_runs) >= 1, "the nudge thread ran the relief for the blocked main thread"
    assert "gc collected" in r.stderr


def test_blocked_main_thread_without_relief_runs_out(lib):
    r = run_python(JOIN_PROGRAM, QVSHIM_BUDGET="128M", QVSHIM_PYTHON="off")
    assert r.returncode == 0, r.stderr
    assert "MemoryError" in r.stdout
