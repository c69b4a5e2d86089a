"""Where the shim's relief runs the app's finalizers, and how often it collects.

Run under the shim by test_relief_guest.py, one case per run:

  relief_guest_program.py where GC MAIN PAYLOAD LEVEL
      GC      "on" or "off" (the app called gc.disable())
      MAIN    "busy" (the main thread runs Python code) or "blocked" (it waits in C with the
              GIL released, in os.read() of a pipe; the worker allocates only once
              /proc/self/task/<main>/syscall shows it there)
      PAYLOAD "plain" (a reference cycle whose __del__ records its thread) or "tcl" (the cycle
              also holds a Tcl interpreter, which aborts the process when it is deleted by
              another thread than the one that created it)
      LEVEL   "warn" or "critical": how far a worker thread allocates while the main thread
              busies itself or waits
    Prints one JSON line: the main thread's id, the threads (id, name) __del__ ran on, the
    relief runs seen while the main thread was still waiting, and the dump's python figures.

  relief_guest_program.py backoff ITERATIONS
      Holds the host pool at warn and runs a fixed loop of ITERATIONS steps of pure Python
      work (with a heap of many small containers, so that each collection costs something and
      frees nothing). Prints one JSON line: the relief runs the shim made during the loop and
      the periodic reliefs it skipped (python.backed_off).
"""

import ctypes
import gc
import json
import os
import sys
import tempfile
import threading
import time

from shimstats import MIB

LEVEL_WARN = 1
LEVEL_CRITICAL = 2
# How long the worker watches for a relief run while the main thread waits: a relief the shim
# runs on its own thread does so within tens of milliseconds of being queued.
WATCH_WHILE_MAIN_WAITS_S = 2.0
DEADLINE_S = 20.0
STEP_BYTES = 256 * 1024
PAST_WARN_BYTES = 8 * MIB

_process = ctypes.CDLL(None)
_process.qvshim_level.argtypes = [ctypes.c_int]
_process.qvshim_level.restype = ctypes.c_int


def python_figures():
    """runtime.python of the shim's JSON dump."""
    with tempfile.TemporaryFile() as f:
        assert _process.qvshim_dump(f.fileno(), 1) == 0, "expected qvshim_dump to succeed"
        f.seek(0)
        return json.load(f)["runtime"]["python"]


def thread_name():
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm") as comm:
            return comm.read().strip()
    except OSError:
        return "?"


def blocked_in_read(native_id, fd):
    """The thread is inside read(fd, ...): /proc's syscall file names the call's arguments."""
    try:
        with open(f"/proc/self/task/{native_id}/syscall") as f:
            fields = f.read().split()
    except OSError:
        return False
    return len(fields) > 1 and fields[1].startswith("0x") and int(fields[1], 16) == fd


def rise_to(level, held):
    """Allocates in small steps until the host pool is at `level`, never past it."""
    while _process.qvshim_level(0) < level:
        held.append(bytearray(STEP_BYTES))


def where(gc_state, main_mode, payload, level_name):
    if gc_state == "off":
        gc.disable()
    ran = []

    class Cycle:
        def __del__(self):
            ran.append((threading.get_ident(), thread_name()))

    cycle = Cycle()
    cycle.me = cycle
    if payload == "tcl":
        import tkinter
        cycle.tcl = tkinter.Tcl()
    del cycle

    held = []
    main_may_go = threading.Event()
    wake_read, wake_write = os.pipe()
    main_native_id = threading.get_native_id()
    seen = {}

    def worker():
        try:
            if main_mode == "blocked":
                # Only a main thread already inside its blocking call is outside Python code; one
                # still on its way there would run the relief at its next bytecode.
                deadline = time.monotonic() + DEADLINE_S
                while not blocked_in_read(main_native_id, wake_read):
                    assert time.monotonic() < deadline, "the main thread never blocked in read()"
                    time.sleep(0.001)
            rise_to(LEVEL_CRITICAL if level_name == "critical" else LEVEL_WARN, held)
            deadline = time.monotonic() + DEADLINE_S
            while python_figures()["queued"] < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            seen["queued"] = python_figures()["queued"]
            deadline = time.monotonic() + WATCH_WHILE_MAIN_WAITS_S
            while not ran and python_figures()["runs"] == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            seen["ran_while_main_waited"] = list(ran)
            seen["runs_while_main_waited"] = python_figures()["runs"]
        finally:
            main_may_go.set()
            os.write(wake_write, b"x")

    threading.Thread(target=worker, name="app-worker").start()
    if main_mode == "blocked":
        os.read(wake_read, 1)
    else:
        while not main_may_go.is_set():
            pass
    # The main thread runs Python code again: a relief left to it runs here.
    deadline = time.monotonic() + DEADLINE_S
    while not ran and time.monotonic() < deadline:
        pass
    print(json.dumps({
        "main": [threading.get_ident(), thread_name()],
        "ran": ran,
        **seen,
        "python": python_figures(),
    }))


def backoff(iterations):
    # Many small containers: a collection has work to do and finds nothing to free.
    containers = [[i] for i in range(200_000)]
    held = []
    rise_to(LEVEL_WARN, held)
    # A little past the threshold, so that what a collection frees (CPython's free lists) does
    # not take the pool back below warn's hysteresis.
    held.append(bytearray(PAST_WARN_BYTES))
    before = python_figures()["runs"]
    total = 0
    for i in range(iterations):
        total += i % 7
    after = python_figures()
    print(json.dumps({
        "runs_during_loop": after["runs"] - before,
        "backed_off": after.get("backed_off", 0),
        "level_after": _process.qvshim_level(0),
        "containers": len(containers),
        "total": total,
    }))


if __name__ == "__main__":
    if sys.argv[1] == "where":
        where(*sys.argv[2:6])
    elif sys.argv[1] == "backoff":
        backoff(int(sys.argv[2]))
    else:
        sys.exit(f"unknown case {sys.argv[1]!r}")
