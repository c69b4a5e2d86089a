"""Relief where the app would have run it (issue 8, item 6).

The shim's relief (gc.collect(), torch's cache, the app's callbacks) runs in the main thread
through CPython's pending call. A thread of the shim's own runs it only while the app's collector
is on, or when the next step is a refusal (docs/MONITOR.md): never while the app called
gc.disable() and the pool is short of that step, since finalizers would run on a thread the app
never expected (a Tcl interpreter aborts the process). A collection that frees nothing backs off.

Each row runs shim-tests/guest/relief_guest_program.py under the shim.
"""

import json
from pathlib import Path

import pytest

PROGRAM = Path(__file__).resolve().parent / "relief_guest_program.py"

SHIM_THREAD = "qvshim-nudge"


def tcl_available():
    try:
        import tkinter
        tkinter.Tcl()
    except Exception as e:  # no tkinter, no libtcl, or no Tcl init script
        return f"tkinter.Tcl() fails here: {e!r}"
    return None


TCL_SKIP = tcl_available()
needs_tcl = pytest.mark.skipif(TCL_SKIP is not None, reason=TCL_SKIP or "")


def last_json(run):
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert lines, f"expected the program's JSON line{run.describe()}"
    return json.loads(lines[-1])


# Where the finalizer of a garbage cycle runs. Columns: gc (the app's collector on/off), main
# (the main thread busy in Python code or blocked in C), payload (plain, or the cycle holds a
# Tcl interpreter), level (how far a worker thread allocates), extra environment, and what must
# be seen:
#   "main":       the finalizer ran, only on the main thread, never on a shim thread
#   "shim_allowed": the relief ran while the main thread was still blocked (on the shim's thread)
WHERE_ROWS = [
    pytest.param("off", "busy", "plain", "warn", {}, "main",
                 id="gc_disabled_main_busy_warn_collects_on_the_main_thread"),
    pytest.param("off", "blocked", "plain", "warn", {}, "main",
                 id="gc_disabled_main_blocked_warn_waits_for_the_main_thread"),
    pytest.param("off", "blocked", "plain", "critical", {"QVSHIM_RESERVE": "4M"}, "main",
                 id="gc_disabled_main_blocked_critical_short_of_the_reserve_waits_for_the_main_thread"),
    pytest.param("off", "blocked", "plain", "critical", {}, "shim_allowed",
                 id="gc_disabled_main_blocked_critical_within_the_reserve_is_collected_by_the_shim"),
    pytest.param("on", "blocked", "plain", "warn", {}, "shim_allowed",
                 id="gc_enabled_main_blocked_warn_is_collected_by_the_shim"),
    pytest.param("off", "busy", "tcl", "warn", {}, "main",
                 id="tcl_interpreter_gc_disabled_main_busy_finalized_on_the_main_thread",
                 marks=needs_tcl),
    pytest.param("off", "blocked", "tcl", "warn", {}, "main",
                 id="tcl_interpreter_gc_disabled_main_blocked_finalized_on_the_main_thread",
                 marks=needs_tcl),
]


@pytest.mark.parametrize("gc_state, main, payload, level, extra, expected", WHERE_ROWS)
def test_relief_runs_where_the_app_would_have(python_under_shim, gc_state, main, payload, level,
                                              extra, expected):
    env = {"QVSHIM_BUDGET": "100M", **extra}
    run = python_under_shim([str(PROGRAM), "where", gc_state, main, payload, level], env)
    assert run.returncode == 0, (
        f"expected the program to end normally (a Tcl interpreter deleted by another thread "
        f"aborts it){run.describe()}")
    seen = last_json(run)
    assert seen["queued"] >= 1, f"expected the shim to queue a relief at {level}{run.describe()}"
    main_thread = seen["main"][0]
    if expected == "main":
        on_shim = [t for t in seen["ran"] if t[0] != main_thread]
        assert not on_shim, (
            f"expected the finalizer never to run on a thread other than the main thread "
            f"(gc {gc_state}, main {main}, {level}); it ran on {on_shim}{run.describe()}")
        assert seen["ran"], (
            f"expected the relief to run the finalizer on the main thread once it ran Python "
            f"code{run.describe()}")
        assert seen["python"]["nudge_thread_runs"] == 0, (
            f"expected no relief run by {SHIM_THREAD}{run.describe()}")
    else:
        assert seen["runs_while_main_waited"] >= 1, (
            f"expected the relief to run while the main thread was blocked (gc {gc_state}, "
            f"{level}: the shim's thread may run it){run.describe()}")
        assert seen["python"]["nudge_thread_runs"] >= 1, (
            f"expected {SHIM_THREAD} to have run it{run.describe()}")


# The shim's own collections over a fixed loop of pure Python work, the host pool at warn, with a
# heap of 200000 small containers (each collection costs something and frees nothing).
# Columns: environment, at most this many collections during the loop, whether periodic reliefs
# must have been skipped (python.backed_off in the dump).
LOOP_ITERATIONS = 10_000_000
BACKOFF_ROWS = [
    # Without backoff this was one collection every 10 ms for as long as the loop ran (981 in a
    # loop of 0.5 s alone, which took 18 s); waits doubling up to 30 s give about a dozen at
    # most, whatever the machine's speed.
    pytest.param({"QVSHIM_PURGE_INTERVAL": "10ms"}, 20, True,
                 id="fruitless_collections_back_off_at_a_10ms_purge_interval"),
    pytest.param({}, 3, False, id="default_purge_interval_collects_about_once"),
]


@pytest.mark.parametrize("extra, most, backed_off", BACKOFF_ROWS)
def test_collections_that_free_nothing_back_off(python_under_shim, extra, most, backed_off):
    env = {"QVSHIM_BUDGET": "100M", **extra}
    run = python_under_shim([str(PROGRAM), "backoff", str(LOOP_ITERATIONS)], env)
    assert run.returncode == 0, f"expected the loop to finish{run.describe()}"
    seen = last_json(run)
    assert seen["level_after"] == 1, f"expected the loop to run at warn{run.describe()}"
    assert seen["runs_during_loop"] <= most, (
        f"expected at most {most} collections by the shim during {LOOP_ITERATIONS} iterations "
        f"at warn ({extra or 'defaults'}), got {seen['runs_during_loop']}")
    if backed_off:
        assert seen["backed_off"] >= 1, (
            f"expected the dump to count periodic reliefs skipped while backing off{run.describe()}")


# Collections that free memory are not backed off: gc disabled, 750 MiB of garbage cycles
# through a 128 MiB budget, a 10 ms purge interval. Only the shim's collections free them. Each
# cycle comes with a little work (about 0.2 ms here), as a real program's would: at full speed
# the last 39 MiB before the budget take a few milliseconds, and on a loaded machine the monitor
# was once not scheduled within them (a MemoryError that says nothing about backing off).
GARBAGE_CYCLES = """
import gc
gc.disable()

class Node:
    pass

for i in range(3000):
    a, b = Node(), Node()
    a.other, b.other = b, a
    a.payload = bytearray(256 * 1024)
    sum(range(20000))
print("finished", i + 1)
"""


def test_collections_that_free_memory_keep_coming_at_a_short_interval(python_under_shim):
    run = python_under_shim(["-c", GARBAGE_CYCLES],
                            {"QVSHIM_BUDGET": "128M", "QVSHIM_PURGE_INTERVAL": "10ms"})
    assert run.returncode == 0 and "finished 3000" in run.stdout, (
        f"expected the shim's collections to keep the garbage under the budget{run.describe()}")
