"""The effective budget follows the machine: it shrinks while another process holds memory, and
while the process holds anonymous memory the ledger cannot see."""

import json
import subprocess
import time

from monitor_run import PYTHON, read_meminfo, run_python, shim_env

GIB = 1 << 30
MIB = 1 << 20

# Under the shim: answers each line on stdin with the host pool's figures from the JSON dump
# (written by the C API's qvshim_dump), "mmap N" maps and touches N MiB of anonymous memory
# outside malloc, "quit" ends.
WATCHED = r"""
import ctypes, json, mmap, os, sys, tempfile
lib = ctypes.CDLL(None)
maps = []
for line in sys.stdin:
    word = line.split()
    if word[0] == "quit":
        break
    if word[0] == "mmap":
        m = mmap.mmap(-1, int(word[1]) << 20, flags=mmap.MAP_PRIVATE)  # RssAnon, not shmem
        for i in range(0, len(m), 4096):
            m[i] = 1
        maps.append(m)
    with tempfile.TemporaryFile() as f:
        assert lib.qvshim_dump(f.fileno(), 1) == 0
        f.seek(0)
        d = json.load(f)
    host = d["pools"][0]
    print(json.dumps({"effective": host["effective_budget"], "reason": host["effective_reason"],
                      "machine_cap": d["system"]["machine_cap"],
                      "unseen": d["system"]["unseen_anon"]}), flush=True)
"""

# Not under the shim: holds N MiB, touched, until stdin closes.
HOG = r"""
import sys
held = b"\x01" * (int(sys.argv[1]) << 20)
print("holding", flush=True)
sys.stdin.read()
"""


class Watched:
    def __init__(self, **variables):
        self.p = subprocess.Popen([PYTHON, "-c", WATCHED], env=shim_env(**variables),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)

    def ask(self, command="look"):
        self.p.stdin.write(command + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        assert line, f"the watched process ended: {self.p.stderr.read()}"
        return json.loads(line)

    def close(self):
        self.p.stdin.write("quit\n")
        self.p.stdin.close()
        self.p.wait(timeout=30)
        return self.p.stderr.read()


SETTLE_S = 0.6  # six monitor intervals of 100 ms
SETTLE_DEADLINE_S = 10.0


def settle(look, condition):
    """Waits six monitor intervals, then looks until `condition` holds of what the monitor
    reports (a busy machine can delay its readings) or the deadline passes; returns the last
    look, which the test's assertions then judge."""
    time.sleep(SETTLE_S)
    deadline = time.monotonic() + SETTLE_DEADLINE_S
    seen = look()
    while not condition(seen) and time.monotonic() < deadline:
        time.sleep(0.1)
        seen = look()
    return seen


def test_effective_budget_shrinks_while_another_process_holds_memory(lib):
    hog_mib = 1024
    # A system reserve that leaves 2.5 GiB of the machine's MemAvailable to the process, so a
    # 1 GiB neighbour makes the machine, not the 6 GiB budget, the limit.
    reserve = read_meminfo("MemAvailable") - int(2.5 * GIB)
    w = Watched(QVSHIM_SYSTEM_RESERVE=reserve, QVSHIM_INTERVAL="100ms", QVSHIM_LOG="info")
    hog = None

    def look():
        return w.ask(), read_meminfo("MemAvailable")

    try:
        before, avail_before = settle(look, lambda seen: seen[0]["reason"] == "machine")
        assert before["reason"] == "machine", before
        hog = subprocess.Popen([PYTHON, "-c", HOG, str(hog_mib)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
        assert hog.stdout.readline().startswith("holding")
        during, avail_during = settle(
            look, lambda seen: before["effective"] - seen[0]["effective"] > 256 * MIB)
        hog.stdin.close()
        hog.wait(timeout=30)
        hog = None
        after, avail_after = settle(look, lambda seen: seen[0]["effective"] > during["effective"])
    finally:
        if hog is not None:
            hog.kill()
        stderr = w.close()
    shrink = before["effective"] - during["effective"]
    regain = after["effective"] - during["effective"]
    print(f"effective budget: before {before['effective'] / MIB:.0f} MiB, with a {hog_mib} MiB "
          f"neighbour {during['effective'] / MIB:.0f} MiB, after {after['effective'] / MIB:.0f} MiB; "
          f"MemAvailable moved by {(avail_during - avail_before) / MIB:.0f} and "
          f"{(avail_after - avail_during) / MIB:.0f} MiB")
    assert during["reason"] == "machine"
    # The machine must show the neighbour for the test to mean anything (on the development VM
    # MemAvailable moves by 400 MiB to 1 GiB for a 1 GiB neighbour, and does not always come
    # back in full when it exits).
    assert avail_before - avail_during > 256 * MIB, "MemAvailable did not show the neighbour"
    assert shrink > 256 * MIB, f"the effective budget shrank by only {shrink / MIB:.0f} MiB"
    # The effective budget follows the machine's MemAvailable, within what other processes
    # move it by in the 100 ms between the monitor's reading and the question.
    tolerance = 256 * MIB
    assert abs(shrink - (avail_before - avail_during)) < tolerance, (shrink, avail_before - avail_during)
    assert abs(regain - (avail_after - avail_during)) < tolerance, (regain, avail_after - avail_during)
    assert regain > 0, "the budget grows again when the neighbour is gone"
    assert "host effective budget" in stderr and "(machine;" in stderr


def test_effective_budget_shrinks_for_anonymous_memory_the_ledger_cannot_see(lib):
    w = Watched(QVSHIM_BUDGET="1G", QVSHIM_INTERVAL="100ms", QVSHIM_LOG="info")
    try:
        before = settle(w.ask, lambda seen: seen["reason"] == "budget")
        assert before["reason"] == "budget" and before["effective"] == GIB, before
        w.ask("mmap 300")
        during = settle(w.ask, lambda seen: seen["reason"] == "unseen_anon")
    finally:
        stderr = w.close()
    assert during["reason"] == "unseen_anon", during
    assert during["unseen"] > 200 * MIB
    assert during["effective"] == GIB - during["unseen"]
    assert GIB - during["effective"] > 200 * MIB, during
    assert "(unseen_anon;" in stderr


def test_freed_memory_jemalloc_keeps_is_purged_not_held_against_the_budget(lib, tmp_path):
    code = """
import os, signal, time
blocks = [b"\\x01" * (1 << 20) for _ in range(200)]   # 200 MiB touched, in blocks jemalloc keeps
del blocks                                            # freed: dirty pages, resident, unseen
time.sleep(1.0)
os.kill(os.getpid(), signal.SIGUSR2)
time.sleep(0.3)
"""
    path = tmp_path / "dump.json"
    r = run_python(code, QVSHIM_BUDGET="1G", QVSHIM_INTERVAL="100ms", QVSHIM_LOG="info",
                   QVSHIM_DUMP_FILE=str(path), QVSHIM_DUMP_FORMAT="json")
    assert r.returncode == 0, r.stderr
    d = json.loads(path.read_text())
    dirty = [p for p in d["purges"] if p["reason"] == "dirty_pages"]
    assert dirty, f"expected a purge of jemalloc's dirty pages: {d['purges']}\n{r.stderr}"
    returned = sum(p["resident_before"] - p["resident_after"] for p in dirty)
    assert returned > 50 * MIB, f"the purges gave back only {returned / MIB:.0f} MiB: {dirty}"
    host = d["pools"][0]
    assert host["effective_reason"] == "budget" and host["effective_budget"] == GIB
    assert "purged jemalloc arenas (dirty_pages)" in r.stderr


def dump_after_holding_unseen_memory(tmp_path, then: str) -> dict:
    """Runs a program that maps and touches 300 MiB outside malloc (unseen by the ledger), runs
    `then` (Python, at the top level), and asks for a JSON dump; returns the dump."""
    code = f"""
import mmap, os, signal, time
m = mmap.mmap(-1, 300 << 20, flags=mmap.MAP_PRIVATE)
for i in range(0, len(m), 4096):
    m[i] = 1
{then}
os.kill(os.getpid(), signal.SIGUSR2)
time.sleep(0.3)
"""
    path = tmp_path / "dump.json"
    r = run_python(code, QVSHIM_BUDGET="1G", QVSHIM_INTERVAL="100ms", QVSHIM_DUMP_FILE=str(path),
                   QVSHIM_DUMP_FORMAT="json")
    assert r.returncode == 0, r.stderr
    return json.loads(path.read_text())


def test_memory_outside_the_ledger_with_few_dirty_pages_purges_nothing(lib, tmp_path):
    # jemalloc holds only a few MiB of dirty pages (under DIRTY_PURGE_MIN_BYTES, 16 MiB):
    # purging them would give back nothing worth a purge, so 20 looks of the monitor purge
    # nothing.
    d = dump_after_holding_unseen_memory(tmp_path, "time.sleep(2.0)")
    assert d["system"]["unseen_anon"] > 200 * MIB, d["system"]
    dirty_bytes = d["jemalloc"]["resident"] - d["jemalloc"]["active"]
    assert dirty_bytes < 16 * MIB, f"the premise: few dirty pages, but jemalloc holds {dirty_bytes}"
    dirty = [p for p in d["purges"] if p["reason"] == "dirty_pages"]
    assert not dirty, f"purged {len(dirty)} times for {dirty_bytes} bytes of dirty pages: {dirty}"


def test_dirty_pages_are_purged_at_most_once_a_second(lib, tmp_path):
    # The program keeps leaving 25 MiB of freed blocks dirty in jemalloc: each look at 100 ms
    # finds enough to purge, but the purge of dirty pages comes at most once a second
    # (DIRTY_PURGE_EVERY_MS, on the same clock as the purges' ages in the dump).
    churn = """
end = time.monotonic() + 2.5
while time.monotonic() < end:
    blocks = [bytearray(64 << 10) for _ in range(400)]
    del blocks
    time.sleep(0.01)
"""
    d = dump_after_holding_unseen_memory(tmp_path, churn)
    dirty = [p for p in d["purges"] if p["reason"] == "dirty_pages"]
    assert len(dirty) >= 2, f"the premise: dirty pages worth purging again, but: {d['purges']}"
    ages = sorted(p["age_ms"] for p in dirty)
    gaps = [later - earlier for earlier, later in zip(ages, ages[1:])]
    # A purge records its time a moment after the look that decided it: a few ms of slack.
    assert min(gaps) >= 950, f"purges of dirty pages {gaps} ms apart: {dirty}"
