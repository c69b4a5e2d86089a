"""The diagnostic dump (text and JSON, on the dump signal, to stderr or a file), the exit line,
periodic purges, and the monitor in a fork child."""

import json
import os
import re
import signal

from monitor_run import json_dump, run_python

# Every key of the JSON dump, as documented in docs/DUMP.md. Keys are only ever added.
TOP_KEYS = {
    "dump_version", "version", "pid", "uptime_ms", "level", "config", "pools", "jemalloc",
    "process", "system", "purges", "runtime",
}
CONFIG_KEYS = {
    "budget", "reserve", "warn_percent", "critical_percent", "interval_ms", "purge_interval_ms",
    "system_reserve", "python", "signal", "dump_signal", "dump_format", "dump_file", "backtrace",
    "log_level",
}
POOL_KEYS = {
    "pool", "name", "device", "device_memory", "level", "budget", "effective_budget", "effective_reason", "live",
    "peak", "reserve", "reserve_in_use", "allocs", "frees", "refusals", "largest_refused",
    "purges", "level_changes", "notifications", "largest", "untracked_large",
}
BLOCK_KEYS = {"size", "age_ms", "call", "backtrace"}
JEMALLOC_KEYS = {"allocated", "active", "resident", "mapped", "retained"}
PROCESS_KEYS = {"rss", "rss_anon", "rss_peak"}
SYSTEM_KEYS = {
    "mem_total", "mem_available", "system_reserve", "machine_cap", "unseen_anon", "psi", "cgroup",
}
PSI_KEYS = {"some_avg10", "some_avg60", "full_avg10", "full_avg60"}
PURGE_KEYS = {"age_ms", "pool", "reason", "level", "resident_before", "resident_after"}
PYTHON_KEYS = {
    "enabled", "detected", "queued", "runs", "nudge_thread_runs", "errors", "cuda_cache_emptied", "app_callback_runs",
    "last_collected", "last_host_before", "last_host_after",
    "arenas_counted", "arenas_live", "arenas_refused", "arenas_untracked",
}

# Holds 20 blocks of 4 MiB and 80 of 1 MiB (counted by usable size: about 200 MiB), crossing warn
# under a 256 MiB budget, then asks for a dump with the dump signal.
DUMP_PROGRAM = """
import os, signal, sys, time
held = [bytearray(4 << 20) for _ in range(20)]
more = [bytearray(1 << 20) for _ in range(80)]
time.sleep(0.3)
os.kill(os.getpid(), getattr(signal, sys.argv[1] if len(sys.argv) > 1 else "SIGUSR2"))
time.sleep(0.5)
print("pid", os.getpid())
"""


def run_dump(tmp_path, fmt, sig="SIGUSR2", **variables):
    path = tmp_path / "dump-%p.out"
    r = run_python(
        DUMP_PROGRAM.replace("sys.argv[1] if len(sys.argv) > 1 else \"SIGUSR2\"", repr(sig)),
        QVSHIM_BUDGET="256M",
        QVSHIM_LOG="info",  # the "dump written to" line is INFO
        QVSHIM_DUMP_FILE=str(path),
        QVSHIM_DUMP_FORMAT=fmt,
        **variables,
    )
    assert r.returncode == 0, r.stderr
    pid = int(r.stdout.split()[1])
    written = tmp_path / f"dump-{pid}.out"
    assert written.exists(), f"no dump file for pid {pid}; stderr:\n{r.stderr}"
    assert f"dump written to {written}" in r.stderr
    return pid, written.read_text(), r


def psi_readable() -> bool:
    try:
        with open("/proc/pressure/memory") as f:
            return f.read().startswith("some ")
    except OSError:
        return False


def test_json_dump_on_sigusr2_has_every_documented_key(tmp_path, lib):
    pid, text, _ = run_dump(tmp_path, "json")
    d = json_dump(text)
    assert set(d) >= TOP_KEYS, f"missing {TOP_KEYS - set(d)}"
    assert d["pid"] == pid and d["dump_version"] == 1
    assert set(d["config"]) >= CONFIG_KEYS, f"missing {CONFIG_KEYS - set(d['config'])}"
    assert d["config"]["budget"] == 256 << 20 and d["config"]["dump_format"] == "json"
    # The documented defaults of what the program did not set (docs/CONFIGURATION.md).
    assert d["config"]["system_reserve"] == 512 << 20, (
        f"expected the default QVSHIM_SYSTEM_RESERVE 512M, got {d['config']['system_reserve']}")
    host = d["pools"][0]
    assert set(host) >= POOL_KEYS, f"missing {POOL_KEYS - set(host)}"
    assert host["name"] == "host" and host["device"] == -1
    assert host["level"] in ("warn", "critical")
    assert host["live"] > 170 << 20 and host["peak"] >= host["live"]
    assert host["allocs"] > host["frees"] > 0
    assert host["level_changes"] >= 1 and host["purges"] >= 1 and host["notifications"] >= 1
    assert len(host["largest"]) == 10, "the ten largest live blocks"
    assert all(set(b) >= BLOCK_KEYS for b in host["largest"])
    assert host["largest"][0]["size"] >= 4 << 20
    assert set(d["jemalloc"]) >= JEMALLOC_KEYS and d["jemalloc"]["allocated"] > 0
    assert set(d["process"]) >= PROCESS_KEYS and d["process"]["rss"] > 0
    assert set(d["system"]) >= SYSTEM_KEYS and d["system"]["mem_total"] > 0
    # PSI where the kernel has it (a kernel booted with psi=0 keeps the file but refuses the read).
    if psi_readable():
        assert d["system"]["psi"] is not None, "the kernel has PSI, the dump does not say it"
        assert set(d["system"]["psi"]) == PSI_KEYS
    else:
        assert d["system"]["psi"] is None, d["system"]["psi"]
    assert d["purges"] and set(d["purges"][0]) >= PURGE_KEYS
    assert d["purges"][0]["reason"] == "level_rise"
    assert set(d["runtime"]["python"]) >= PYTHON_KEYS
    assert d["runtime"]["python"]["detected"] is True
    # The dump program's Python objects live in pymalloc arenas the shim counts.
    assert d["runtime"]["python"]["arenas_counted"] is True
    assert d["runtime"]["python"]["arenas_live"] >= 1
    assert set(d["runtime"]["signal"]) >= {"signal", "raised", "skipped_no_handler"}
    assert set(d["runtime"]["callbacks"]) >= {"registered", "calls"}


def test_text_dump_is_a_readable_table(tmp_path, lib):
    pid, text, _ = run_dump(tmp_path, "text")
    assert f"dump: pid {pid}" in text
    for heading in ("config: budget 256.00 MiB", "pool    level", "jemalloc: allocated",
                    "process:  rss", "system:   total", "last purges (newest first):",
                    "runtime: python on (detected)", "pymalloc arenas counted: ", "largest live allocations (host"):
        assert heading in text, f"missing {heading!r} in:\n{text}"
    assert re.search(r"^host\s+(warn|critical)\s+256\.00 MiB", text, re.M), text


def test_dump_goes_to_stderr_without_a_dump_file(lib):
    # In a Python process the dump handler arrives once the interpreter is up (CONFIGURATION.md,
    # Signals); until then SIGUSR2 keeps its default action, as without the library. The program
    # waits for the handler (SigCgt) before it signals itself.
    code = """
import os, signal, time
deadline = time.monotonic() + 10
def caught():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("SigCgt:"):
                return int(line.split()[1], 16) >> (signal.SIGUSR2 - 1) & 1
while not caught() and time.monotonic() < deadline:
    time.sleep(0.01)
os.kill(os.getpid(), signal.SIGUSR2)
time.sleep(0.5)
"""
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    assert "==== qvshim" in r.stderr and "==== end of qvshim dump ====" in r.stderr


def test_dump_signal_can_be_changed(tmp_path, lib):
    _, text, _ = run_dump(tmp_path, "json", sig="SIGUSR1", QVSHIM_DUMP_SIGNAL="USR1")
    assert json_dump(text)["config"]["dump_signal"] == signal.SIGUSR1


def test_backtraces_of_the_largest_blocks_when_asked(tmp_path, lib):
    _, text, _ = run_dump(tmp_path, "json", QVSHIM_BACKTRACE="1")
    blocks = json_dump(text)["pools"][0]["largest"]
    frames = blocks[0]["backtrace"]
    assert len(frames) >= 3, frames
    assert all(f.startswith("0x") for f in frames)
    assert any("libpython" in f or "python" in f for f in frames), frames


def test_no_backtraces_by_default(tmp_path, lib):
    _, text, _ = run_dump(tmp_path, "json")
    assert all(b["backtrace"] == [] for b in json_dump(text)["pools"][0]["largest"])


EXIT_LINE = re.compile(
    r"\[qvshim\] INFO exit pid (\d+): host peak [\d.]+ \w+ of budget 64\.00 MiB \(\d+%\); "
    r"(\d+) refusals( \(largest [\d.]+ \w+\))?, (\d+) purges, (\d+) notifications"
)


def test_exit_line_on_normal_exit(lib):
    code = """
held = [bytearray((1 << 20) - 4096) for _ in range(50)]
try:
    bytearray(100 << 20)
except MemoryError:
    print("refused")
"""
    r = run_python(code, QVSHIM_BUDGET="64M", QVSHIM_LOG="info")  # the exit line is INFO
    assert r.returncode == 0 and "refused" in r.stdout, r.stderr
    lines = EXIT_LINE.findall(r.stderr)
    assert len(lines) == 1, f"expected exactly one exit line in:\n{r.stderr}"
    _, refusals, largest, purges, told = lines[0]
    assert int(refusals) == 1 and "100.00 MiB" in largest
    assert int(purges) >= 1 and int(told) >= 1


def test_exit_line_on_ctrl_c(lib):
    code = """
import os, signal, time
time.sleep(0.3)
os.kill(os.getpid(), signal.SIGINT)      # as Ctrl+C: KeyboardInterrupt, unhandled
time.sleep(5)
"""
    r = run_python(code, QVSHIM_BUDGET="64M", QVSHIM_LOG="info")  # the exit line is INFO
    assert r.returncode == -signal.SIGINT, r.returncode
    assert "KeyboardInterrupt" in r.stderr
    assert len(EXIT_LINE.findall(r.stderr)) == 1, r.stderr


def test_purges_repeat_every_purge_interval_while_above_normal(tmp_path, lib):
    code = """
import os, signal, time
held = [bytearray((1 << 20) - 4096) for _ in range(50)]   # ~80% of 64 MiB: warn
time.sleep(1.0)
os.kill(os.getpid(), signal.SIGUSR2)
time.sleep(0.3)
"""
    path = tmp_path / "dump.json"
    r = run_python(code, QVSHIM_BUDGET="64M", QVSHIM_PURGE_INTERVAL="200ms", QVSHIM_LOG="info",
                   QVSHIM_DUMP_FILE=str(path), QVSHIM_DUMP_FORMAT="json")
    assert r.returncode == 0, r.stderr
    purges = json_dump(path.read_text())["purges"]
    periodic = [p for p in purges if p["reason"] == "periodic"]
    assert len(periodic) >= 3, f"expected a purge every 200 ms for 1 s, got {purges}"
    assert all(p["resident_before"] > 0 for p in purges)
    assert "purged jemalloc arenas (periodic)" in r.stderr


def test_monitor_is_alive_after_fork(tmp_path, lib):
    code = """
import os, signal, sys, time
pid = os.fork()
if pid == 0:
    held = [bytearray((1 << 20) - 4096) for _ in range(50)]   # the child crosses warn
    time.sleep(0.3)
    os.kill(os.getpid(), signal.SIGUSR2)
    # os._exit skips the exit path that finishes a dump, so wait for the monitor's (the file
    # appears whole, by rename).
    deadline = time.monotonic() + 10
    while not os.path.exists(DUMP_PATTERN % os.getpid()) and time.monotonic() < deadline:
        time.sleep(0.01)
    os._exit(0)
_, status = os.waitpid(pid, 0)
time.sleep(0.3)   # time for a dump the parent must not write
print("child", pid, status, os.getpid())
"""
    code = code.replace("DUMP_PATTERN", repr(str(tmp_path / "dump-%d.json")))
    r = run_python(code, QVSHIM_BUDGET="64M", QVSHIM_DUMP_FILE=str(tmp_path / "dump-%p.json"),
                   QVSHIM_DUMP_FORMAT="json")
    assert r.returncode == 0, r.stderr
    _, child, status, parent = r.stdout.split()
    assert status == "0"
    path = tmp_path / f"dump-{child}.json"
    assert path.exists(), f"the child's monitor wrote no dump; stderr:\n{r.stderr}"
    d = json_dump(path.read_text())
    assert d["pid"] == int(child)
    host = d["pools"][0]
    assert host["level"] != "normal" and host["level_changes"] >= 1
    assert d["runtime"]["python"]["runs"] >= 1, "the child's relief ran gc"
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == [f"dump-{child}.json"], (
        f"expected only the child's dump, none by the parent (pid {parent}), found {written}")


def test_bad_monitor_variables_print_one_line_each_and_the_program_runs(lib):
    r = run_python("print('ran')", QVSHIM_DUMP_FORMAT="xml", QVSHIM_SIGNAL="KILL",
                   QVSHIM_INTERVAL="1ms", QVSHIM_LOG="off")
    assert r.returncode == 0 and r.stdout.strip() == "ran", r.stderr
    assert r.stderr.splitlines() == [
        '[qvshim] ERROR QVSHIM_INTERVAL="1ms": shorter than 10ms; using default 1s',
        '[qvshim] ERROR QVSHIM_SIGNAL="KILL": not a signal meant for users (USR1, USR2, RTMIN+n, RTMAX-n or their numbers, or off); using default off',
        '[qvshim] ERROR QVSHIM_DUMP_FORMAT="xml": not text or json; using default text',
    ], r.stderr
