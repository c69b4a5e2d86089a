"""Budgets a program can live in (issue 8, items 8, 9 and two of 10).

Each table row is one case: the environment (and program) it runs, what must
be seen, and the exit status expected. The Python programs run with this
interpreter under the shim (shimrun.run_python); they read the shim's figures
through shim-tests/py/shimstats.py.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

import shimrun

MIB = shimrun.MIB
GIB = shimrun.GIB
UNLIMITED = 2**64 - 1
# config::MIN_BUDGET_BYTES: the smallest budget (given as a size, a percentage
# or through qvshim_set_budget) and the floor of the effective budget.
MIN_BUDGET_BYTES = 16 * MIB
# config::CGROUP_HEADROOM_MIN_BYTES and the default QVSHIM_RESERVE: a cgroup
# limit of L gives a default budget of L - reserve - max(128 MiB, L / 8).
CGROUP_HEADROOM_MIN_BYTES = 128 * MIB
DEFAULT_RESERVE_BYTES = 64 * MIB

HERE = Path(__file__).resolve().parent


def mem_total_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("expected a MemTotal line in /proc/meminfo")


def lines_naming(run: shimrun.Run, word: str) -> list[str]:
    return [ln for ln in run.shim_lines() if word in ln]


# --- Item 8: values that killed the program -------------------------------

# A program that shows it started whole (site imported, so site-packages are
# on the path) and what budget it got.
STARTED_WHOLE = """
import sys, shimstats
s = shimstats.host_stats()
print("site", "site" in sys.modules, "budget", s.budget)
"""

# Waits until the monitor has lowered the effective budget for the machine
# (it samples every QVSHIM_INTERVAL=10ms), stays through many more samples,
# then builds 4 MiB of small objects.
UNDER_A_HUGE_SYSTEM_RESERVE = """
import time, shimstats
deadline = time.monotonic() + 30
while shimstats.host_stats().effective_budget == shimstats.host_stats().budget:
    assert time.monotonic() < deadline, "the monitor never lowered the effective budget"
    time.sleep(0.01)
time.sleep(0.5)
keep = [bytes(100) for _ in range(10000)]
s = shimstats.host_stats()
print("alive", len(keep), "effective", s.effective_budget)
"""

# Fills the budget with small objects under -X tracemalloc; the handler then
# allocates while everything is still held.
TRACEMALLOC_HANDLER = """
import tracemalloc
assert tracemalloc.is_tracing(), "expected python -X tracemalloc"
data = []
try:
    while True:
        data.append(bytearray(1000))
except MemoryError:
    message = "caught MemoryError after %d blocks" % len(data)
    parts = [str(i) for i in range(1000)]
    print(message, len(parts))
"""

# A runaway: after its first MemoryError it keeps asking for 1 MiB blocks.
# The reserve may serve at most one of them (the grant after a refusal).
RUNAWAY_AFTER_MEMORYERROR = """
import shimstats
held = []
try:
    while True:
        held.append(b"x" * (1 << 20))
except MemoryError:
    pass
served = 0
for _ in range(50):
    try:
        held.append(b"x" * (1 << 20))
        served += 1
    except MemoryError:
        pass
s = shimstats.host_stats()
print("served", served, "live_past_budget", s.live - s.effective_budget)
"""

# (id, python arguments, environment, stdout pattern, shim-line pattern that
#  must appear exactly once (or None for no line naming that variable), the
#  variable the line names, expected exit status)
PYTHON_ROWS = [
    ("percent_budget_below_the_minimum_uses_the_minimum",
     ["-c", STARTED_WHOLE], {"QVSHIM_BUDGET": "0.0001%"},
     rf"site True budget {MIN_BUDGET_BYTES}\b",
     r'QVSHIM_BUDGET="0\.0001%": .*below the 16\.00 MiB minimum; using 16\.00 MiB',
     "QVSHIM_BUDGET", 0),
    ("percent_budget_above_the_minimum_is_taken_silently",
     ["-c", STARTED_WHOLE], {"QVSHIM_BUDGET": "50%"},
     r"site True budget [1-9]\d{7,}\b", None, "QVSHIM_BUDGET", 0),
    ("size_budget_below_the_minimum_is_refused_for_the_default",
     ["-c", STARTED_WHOLE], {"QVSHIM_BUDGET": "8M"},
     r"site True budget \d+\b",
     r'QVSHIM_BUDGET="8M": below the 16 MiB minimum; using default 6G',
     "QVSHIM_BUDGET", 0),
    ("system_reserve_larger_than_the_machine_is_refused_for_the_default",
     ["-c", STARTED_WHOLE], {"QVSHIM_SYSTEM_RESERVE": f"{4 * mem_total_bytes() // GIB + 4}G"},
     r"site True budget \d+\b",
     r'QVSHIM_SYSTEM_RESERVE="\d+G": not below this machine\'s memory \(.*\); using default 512M',
     "QVSHIM_SYSTEM_RESERVE", 0),
    ("system_reserve_past_the_available_memory_holds_the_effective_budget_at_its_floor",
     ["-c", UNDER_A_HUGE_SYSTEM_RESERVE],
     {"QVSHIM_SYSTEM_RESERVE": str(mem_total_bytes() - MIB), "QVSHIM_INTERVAL": "10ms"},
     rf"alive 10000 effective {MIN_BUDGET_BYTES}\b",
     r"QVSHIM_SYSTEM_RESERVE .* leaves no room .*effective budget held at its floor of 16\.00 MiB",
     "QVSHIM_SYSTEM_RESERVE", 0),
    ("memoryerror_handler_runs_under_tracemalloc",
     ["-X", "tracemalloc", "-c", TRACEMALLOC_HANDLER], {"QVSHIM_BUDGET": "64M"},
     r"caught MemoryError after \d+ blocks 1000", None, "QVSHIM_RESERVE", 0),
    ("runaway_after_memoryerror_gets_at_most_one_large_block_from_the_reserve",
     ["-c", RUNAWAY_AFTER_MEMORYERROR], {"QVSHIM_BUDGET": "64M"},
     r"served [01] live_past_budget", None, "QVSHIM_RESERVE", 0),
]


@pytest.mark.parametrize("case", PYTHON_ROWS, ids=[r[0] for r in PYTHON_ROWS])
def test_budget_values_leave_python_alive(case):
    name, args, env, stdout_pattern, line_pattern, variable, status = case
    run = shimrun.run_python(args, env)
    assert run.returncode == status, (
        f"{name}: expected exit {status}, got {run.exit_text()}:{run.describe()}")
    assert re.search(stdout_pattern, run.stdout), (
        f"{name}: expected stdout to match {stdout_pattern!r}:{run.describe()}")
    named = lines_naming(run, variable)
    if line_pattern is None:
        assert named == [], f"{name}: expected no line naming {variable}, got {named}:{run.describe()}"
    else:
        assert len(named) == 1 and re.search(line_pattern, named[0]), (
            f"{name}: expected exactly one line naming {variable} matching {line_pattern!r}, "
            f"got {named}:{run.describe()}")


# --- Item 10: the documented interval range, and qvshim_set_budget ------------

# (QVSHIM_INTERVAL, the error reason expected, or None when it is taken)
INTERVAL_ROWS = [
    ("1h", None),
    ("60m", None),
    ("3600s", None),
    ("3600000ms", None),
    ("10ms", None),
    ("0.01", None),
    ("9ms", "shorter than 10ms"),
    ("3600001ms", "longer than 1 hour"),
    ("1.01h", "longer than 1 hour"),
    ("2h", "longer than 1 hour"),
]


@pytest.mark.parametrize("value,reason", INTERVAL_ROWS, ids=[r[0] for r in INTERVAL_ROWS])
def test_interval_range_is_the_documented_10ms_to_1h(value, reason, c_program):
    run = shimrun.run([c_program("hello")], {"QVSHIM_INTERVAL": value})
    assert run.returncode == 0, f"expected hello to exit 0, got {run.exit_text()}:{run.describe()}"
    named = lines_naming(run, "QVSHIM_INTERVAL")
    if reason is None:
        assert named == [], f"expected QVSHIM_INTERVAL={value} to be taken silently, got {named}"
    else:
        want = f'QVSHIM_INTERVAL="{value}": {reason}; using default 1s'
        assert len(named) == 1 and named[0].endswith(want), (
            f"expected one line ending {want!r}, got {named}:{run.describe()}")


SET_BUDGET = """
import ctypes, sys
import shimstats
f = ctypes.CDLL(None).qvshim_set_budget
f.argtypes = [ctypes.c_int, ctypes.c_uint64]
f.restype = ctypes.c_int
before = shimstats.host_stats().budget
rc = f(int(sys.argv[1]), int(sys.argv[2]))
after = shimstats.host_stats().budget
print("rc", rc, "host budget", "kept" if after == before else after)
"""

# (pool, bytes, return code, what the host budget must read after)
SET_BUDGET_ROWS = [
    (0, 0, -1, "kept"),
    (0, 1, -1, "kept"),
    (0, MIN_BUDGET_BYTES - 1, -1, "kept"),
    (0, MIN_BUDGET_BYTES, 0, str(MIN_BUDGET_BYTES)),
    (0, GIB, 0, str(GIB)),
    (0, UNLIMITED, 0, str(UNLIMITED)),
    (1, GIB, -1, "kept"),  # GPU 0: no CUDA in this process, so no such pool
    (5, GIB, -1, "kept"),
    (16, GIB, -1, "kept"),
    (17, GIB, -1, "kept"),
    (-1, GIB, -1, "kept"),
]


@pytest.mark.parametrize("pool,nbytes,rc,after", SET_BUDGET_ROWS,
                         ids=[f"pool{r[0]}_{r[1]}" for r in SET_BUDGET_ROWS])
def test_set_budget_refuses_too_small_budgets_and_absent_pools(pool, nbytes, rc, after):
    run = shimrun.run_python(["-c", SET_BUDGET, str(pool), str(nbytes)], {"QVSHIM_BUDGET": "512M"})
    want = f"rc {rc} host budget {after}"
    assert run.returncode == 0 and want in run.stdout, (
        f"expected qvshim_set_budget({pool}, {nbytes}) to print {want!r}:{run.describe()}")


# --- Item 9: a real cgroup v1 memory controller -------------------------------

CGROUP_LIMIT_BYTES = 600 * MIB


def v1_memory_dir() -> Path | None:
    """This process's own cgroup v1 memory directory, when there is one we may
    make a child in (root, a v1 memory hierarchy mounted)."""
    if os.geteuid() != 0:
        return None
    mount = None
    try:
        with open("/proc/self/mountinfo") as mountinfo:
            for line in mountinfo:
                left, _, right = line.partition(" - ")
                fields, super_fields = left.split(), right.split()
                if (len(super_fields) >= 3 and super_fields[0] == "cgroup"
                        and "memory" in super_fields[2].split(",")):
                    mount = (fields[3], fields[4])
        if mount is None:
            return None
        with open("/proc/self/cgroup") as cgroup:
            for line in cgroup:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if "memory" in controllers.split(","):
                    root, point = mount
                    rel = path[len(root):] if root != "/" and path.startswith(root) else path
                    d = Path(point + rel.rstrip("/")) if rel != "/" else Path(point)
                    return d if (d / "memory.limit_in_bytes").exists() else None
    except OSError:
        return None
    return None


@pytest.fixture
def v1_cgroup():
    """A child memory cgroup (v1) limited to 600 MiB, removed afterwards."""
    parent = v1_memory_dir()
    if parent is None:
        pytest.skip("no writable cgroup v1 memory hierarchy here (needs root and a v1 mount)")
    child = parent / f"qvshim-budgets-{os.getpid()}"
    try:
        child.mkdir()
        (child / "memory.limit_in_bytes").write_text(str(CGROUP_LIMIT_BYTES))
    except OSError as e:
        if child.exists():
            child.rmdir()
        pytest.skip(f"cannot make a v1 memory cgroup under {parent}: {e}")
    yield child
    child.rmdir()


FILL_UNTIL_MEMORYERROR = """
import shimstats
s = shimstats.host_stats()
print("budget", s.budget, flush=True)
if s.budget > 1 << 40:
    raise SystemExit(0)
held = []
try:
    while True:
        held.append(b"x" * (8 << 20))
except MemoryError:
    print("MemoryError after", len(held) * 8, "MiB", flush=True)
"""


def v1_default_budget(limit: int) -> int:
    return min(6 * GIB, limit - DEFAULT_RESERVE_BYTES - max(CGROUP_HEADROOM_MIN_BYTES, limit // 8))


# (id, environment, budget expected, whether the program meets MemoryError)
CGROUP_V1_ROWS = [
    ("default_budget_fits_the_cgroup_and_refuses_before_the_oom_killer", {},
     v1_default_budget(CGROUP_LIMIT_BYTES), True),
    ("percent_budget_is_of_the_cgroup_limit", {"QVSHIM_BUDGET": "50%"},
     CGROUP_LIMIT_BYTES // 2, True),
    ("explicit_size_budget_is_kept", {"QVSHIM_BUDGET": "2G"}, 2 * GIB, False),
]


# Writes the library's JSON dump of itself to stdout.
DUMP_ITSELF = """
import ctypes, sys
sys.stdout.flush()
ctypes.CDLL(None).qvshim_dump(1, 1)
"""


def test_dump_reports_the_cgroup_v1_limit(v1_cgroup):
    argv = ["/bin/sh", "-c", f'echo $$ > {v1_cgroup}/cgroup.procs && exec "$0" "$@"',
            sys.executable, "-c", DUMP_ITSELF]
    run = shimrun.run(argv)
    assert run.returncode == 0, run.describe()
    cgroup = json.loads(run.stdout)["system"]["cgroup"]
    assert cgroup["memory_max"] == CGROUP_LIMIT_BYTES and 0 < cgroup["memory_current"] < CGROUP_LIMIT_BYTES, (
        f"expected the dump to show the {CGROUP_LIMIT_BYTES // MIB} MiB limit and a use below it, got {cgroup}")


@pytest.mark.parametrize("case", CGROUP_V1_ROWS, ids=[r[0] for r in CGROUP_V1_ROWS])
def test_cgroup_v1_limit_sets_the_budget(case, v1_cgroup):
    name, env, budget, fills = case
    code = FILL_UNTIL_MEMORYERROR if fills else FILL_UNTIL_MEMORYERROR.replace(
        "if s.budget > 1 << 40", "if True")
    # The child shell moves itself into the cgroup, then becomes the interpreter.
    argv = ["/bin/sh", "-c", f'echo $$ > {v1_cgroup}/cgroup.procs && exec "$0" "$@"',
            sys.executable, "-c", code]
    env = {**env, "PYTHONPATH": str(shimrun.PY_PROGRAMS_DIR)}
    run = shimrun.run(argv, env)
    assert run.returncode == 0, (
        f"{name}: expected exit 0 in a {CGROUP_LIMIT_BYTES // MIB} MiB v1 cgroup, got "
        f"{run.exit_text()} (killed by SIGKILL means the OOM killer):{run.describe()}")
    assert f"budget {budget}\n" in run.stdout, (
        f"{name}: expected a budget of {budget} bytes:{run.describe()}")
    if fills:
        met = re.search(r"MemoryError after (\d+) MiB", run.stdout)
        assert met, f"{name}: expected the program to meet MemoryError:{run.describe()}"
        # The cgroup's room feeds the effective budget less the pool's reserve, not the
        # machine's 512 MiB system reserve (which left under 100 MiB of a 600 MiB cgroup).
        held = int(met.group(1)) * MIB
        # (Measured: 320 of 408 MiB and 232 of 300 MiB in 8 MiB blocks, besides the
        # interpreter's own; 80 and 64 MiB before the cgroup kept only the pool's reserve.)
        assert held >= budget // 2, (
            f"{name}: expected to hold at least half the {budget // MIB} MiB budget before "
            f"MemoryError, held {held // MIB} MiB:{run.describe()}")
