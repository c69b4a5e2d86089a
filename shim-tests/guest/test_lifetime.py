"""The shim never keeps a process alive and never takes a signal that is not its own.

Threads (shim-tests/guest/c/lifetime_threads.c): when the program's last thread ends, the process
ends as glibc would end it without the library (exit(0): atexit handlers run, status 0), also in
a fork child; SIGTERM, SIGINT, SIGHUP and SIGQUIT end it exactly as without the library whatever
state its threads are in. Every case runs twice, with and without the library, and the two runs
must agree with each other and with the row.

Signals (shim-tests/guest/c/lifetime_signals.c): QVSHIM_DUMP_SIGNAL and QVSHIM_SIGNAL take only
signals meant for users (USR1, USR2, RTMIN..RTMAX); a refused value prints one line naming the
variable, the value and the default even with QVSHIM_LOG=off; the dump signal is never taken
from a program that ignores or handles it.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import shimrun

GUEST_C = Path(__file__).resolve().parent / "c"

# A process that should end does so within this (a deadline, not a timing assertion: a hung
# process is what the rows are about).
END_DEADLINE_SECONDS = 30
# How long the test waits for a line the program or the shim prints.
SEEN_DEADLINE_SECONDS = 30
POLL_SECONDS = 0.01

THE_FOUR = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


def _build(name: str) -> Path:
    return shimrun.build(GUEST_C / f"{name}.c")


def _build_preload(name: str) -> Path:
    """shim-tests/guest/c/<name>.c as a shared object for LD_PRELOAD."""
    source = GUEST_C / f"{name}.c"
    shimrun.BUILD_DIR.mkdir(parents=True, exist_ok=True)
    built = shimrun.BUILD_DIR / f"{name}.so"
    if not built.exists() or built.stat().st_mtime < source.stat().st_mtime:
        cmd = ["gcc", "-shared", "-fPIC", "-O0", "-Wall", "-o", str(built), str(source), "-ldl"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, f"expected {source.name} to compile:\n{done.stderr}"
    return built


def _child_setup(ignore: tuple[int, ...] = ()):
    """The child starts with the four signals at their default action and unblocked (a test
    runner started in the background inherits SIGINT/SIGQUIT ignored), no core files, and
    `ignore` set to SIG_IGN."""
    def setup():
        for sig in THE_FOUR:
            signal.signal(sig, signal.SIG_DFL)
        for sig in ignore:
            signal.signal(sig, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return setup


def _wait_for(what: str, path: Path, proc: subprocess.Popen) -> bool:
    """Polls `path` until it holds `what`, the process ends, or the deadline passes."""
    def holds() -> bool:
        try:
            return what in path.read_text(errors="replace")
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + SEEN_DEADLINE_SECONDS
    while time.monotonic() < deadline:
        if holds():
            return True
        if proc.poll() is not None:
            return holds()
        time.sleep(POLL_SECONDS)
    return False


def _app_threads(pid: int) -> int | None:
    """Threads of `pid` that belong to the program: neither a zombie (a main thread that
    called pthread_exit) nor one of the shim's (named qvshim-*). None once the process is
    gone."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    count = 0
    for tid in tasks:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        state = stat[stat.rindex(")") + 2:][:1]
        if state not in ("Z", "X") and not comm.startswith("qvshim"):
            count += 1
    return count


def _wait_no_app_threads(proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + SEEN_DEADLINE_SECONDS
    while time.monotonic() < deadline and proc.poll() is None:
        if not _app_threads(proc.pid):
            return
        time.sleep(POLL_SECONDS)


def _status_text(status: int | None) -> str:
    if status is None:
        return f"still running after {END_DEADLINE_SECONDS} s (killed by the test)"
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit {status}"


# ---------------------------------------------------------------------------------------------
# Threads and the process's end.

@dataclass(frozen=True)
class EndRow:
    """One case of lifetime_threads.c: the signal sent (None: none), when (after the program
    printed "ready", or once no thread of the program is left after it printed "leaving"),
    the status both runs must end with, and how many "atexit ran" lines they print."""

    case: str
    sig: int | None
    status: int
    atexit_lines: int
    send_when: str = "ready"


END_ROWS = [
    EndRow("main_exits_worker_allocates", None, 0, 1),
    EndRow("main_exits_worker_quiet", None, 0, 1),
    EndRow("fork_child_thread_returns", None, 0, 2),
    EndRow("fork_child_main_exits", None, 0, 2),
    *[EndRow("signal_main_blocked", s, -s, 0) for s in THE_FOUR],
    *[EndRow("signal_main_gone", s, -s, 0) for s in THE_FOUR],
    *[EndRow("signal_all_gone", s, 0, 1, send_when="no_app_thread") for s in THE_FOUR],
    *[EndRow("signal_pending_at_last_exit", s, 0, 1) for s in THE_FOUR],
]


@dataclass
class Ended:
    status: int | None
    stdout: str
    stderr: str

    def describe(self, preload: bool) -> str:
        return (f"\n  {'with' if preload else 'without'} the library: {_status_text(self.status)}"
                f"\n  stdout: {self.stdout!r}\n  stderr: {self.stderr!r}")


def _run_end_row(binary: Path, row: EndRow, preload: bool, tmp_path: Path) -> Ended:
    tag = f"{row.case}-{row.sig}-{'shim' if preload else 'plain'}"
    out, err = tmp_path / f"{tag}.out", tmp_path / f"{tag}.err"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen([str(binary), row.case], env=shimrun.shim_env({}, preload=preload),
                                stdin=subprocess.DEVNULL, stdout=o, stderr=e,
                                preexec_fn=_child_setup())
    status = None
    try:
        if row.sig is not None:
            if row.send_when == "no_app_thread":
                _wait_for("leaving", out, proc)
                _wait_no_app_threads(proc)
            else:
                _wait_for("ready", out, proc)
            try:
                os.kill(proc.pid, row.sig)
            except ProcessLookupError:
                pass
        status = proc.wait(timeout=END_DEADLINE_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return Ended(status, out.read_text(errors="replace"), err.read_text(errors="replace"))


@pytest.mark.parametrize("row", END_ROWS, ids=lambda r: f"{r.case}-{r.sig or 'nosignal'}")
def test_the_process_ends_as_without_the_library(row, shim_library, tmp_path):
    binary = _build("lifetime_threads")
    plain = _run_end_row(binary, row, False, tmp_path)
    shim = _run_end_row(binary, row, True, tmp_path)
    both = plain.describe(False) + shim.describe(True)
    assert plain.status == row.status, (
        f"the row expects {_status_text(row.status)} without the library (check the row):{both}")
    assert shim.status == plain.status, (
        f"expected {row.case} to end with {_status_text(plain.status)} under the library, as "
        f"without it:{both}")
    assert shim.stdout.count("atexit ran") == plain.stdout.count("atexit ran") == row.atexit_lines, (
        f"expected {row.atexit_lines} 'atexit ran' line(s), with and without the library:{both}")
    child_lines = [ln for ln in plain.stdout.splitlines() if ln.startswith("child ")]
    assert [ln for ln in shim.stdout.splitlines() if ln.startswith("child ")] == child_lines, (
        f"expected the fork child to end as without the library ({child_lines}):{both}")


# ---------------------------------------------------------------------------------------------
# The dump signal and QVSHIM_SIGNAL.

@dataclass(frozen=True)
class SignalRow:
    """One run of lifetime_signals.c under the library: its environment, the program's mode
    (plain: takes nothing; handle: installs its own handler for `app_signal` after load),
    signals it starts with ignored, the signal the test sends (None: none), whether a dump must
    be written, the status, and text each line of which must be on stderr exactly once.
    `preload_first`/`preload_after`: a library of guest/c preloaded before/after the shim;
    `stdout`: text the program's stdout must hold."""

    env: dict = field(default_factory=dict)
    mode: str = "plain"
    app_signal: int = signal.SIGUSR2
    ignored: tuple = ()
    send: int | None = None
    dump: bool = False
    status: int = 0
    lines: tuple = ()
    wait_stderr: str | None = None
    preload_first: str | None = None
    preload_after: str | None = None
    stdout: str | None = None


RTMIN = signal.SIGRTMIN
RTMAX = signal.SIGRTMAX
REFUSED = "not a signal meant for users"


def refused(variable: str, value: str, default: str) -> tuple[str, ...]:
    return (f'{variable}="{value}": {REFUSED}', f"; using default {default}")


SIGNAL_ROWS = {
    # Signals not meant for users are refused, with one line even when logging is off, and act
    # exactly as without the library.
    "dump_segv_refused": SignalRow({"QVSHIM_DUMP_SIGNAL": "SEGV", "QVSHIM_LOG": "off"},
                                   send=signal.SIGSEGV, status=-signal.SIGSEGV,
                                   lines=refused("QVSHIM_DUMP_SIGNAL", "SEGV", "USR2")),
    "dump_sigint_refused": SignalRow({"QVSHIM_DUMP_SIGNAL": "SIGINT", "QVSHIM_LOG": "off"},
                                     send=signal.SIGINT, status=-signal.SIGINT,
                                     lines=refused("QVSHIM_DUMP_SIGNAL", "SIGINT", "USR2")),
    "dump_term_refused": SignalRow({"QVSHIM_DUMP_SIGNAL": "TERM"}, send=signal.SIGTERM,
                                   status=-signal.SIGTERM,
                                   lines=refused("QVSHIM_DUMP_SIGNAL", "TERM", "USR2")),
    "dump_hup_number_refused": SignalRow({"QVSHIM_DUMP_SIGNAL": "1"}, send=signal.SIGHUP,
                                         status=-signal.SIGHUP,
                                         lines=refused("QVSHIM_DUMP_SIGNAL", "1", "USR2")),
    "dump_quit_refused": SignalRow({"QVSHIM_DUMP_SIGNAL": "QUIT"}, send=signal.SIGQUIT,
                                   status=-signal.SIGQUIT,
                                   lines=refused("QVSHIM_DUMP_SIGNAL", "QUIT", "USR2")),
    "dump_segv_number_refused": SignalRow({"QVSHIM_DUMP_SIGNAL": "11"},
                                          lines=refused("QVSHIM_DUMP_SIGNAL", "11", "USR2")),
    "dump_glibc_internal_refused": SignalRow({"QVSHIM_DUMP_SIGNAL": "32"},
                                             lines=refused("QVSHIM_DUMP_SIGNAL", "32", "USR2")),
    # Signals meant for users are taken, by name or number.
    "dump_usr1": SignalRow({"QVSHIM_DUMP_SIGNAL": "USR1"}, send=signal.SIGUSR1, dump=True),
    "dump_rtmin_plus_2": SignalRow({"QVSHIM_DUMP_SIGNAL": "SIGRTMIN+2"}, send=RTMIN + 2,
                                   dump=True),
    "dump_rtmax_minus_1": SignalRow({"QVSHIM_DUMP_SIGNAL": "rtmax-1"}, send=RTMAX - 1,
                                    dump=True),
    "dump_rt_number": SignalRow({"QVSHIM_DUMP_SIGNAL": str(RTMIN + 6)}, send=RTMIN + 6,
                                dump=True),
    # QVSHIM_SIGNAL obeys the same rule and never equals the dump signal.
    "notify_term_refused": SignalRow({"QVSHIM_SIGNAL": "TERM", "QVSHIM_LOG": "off"},
                                     lines=refused("QVSHIM_SIGNAL", "TERM", "off")),
    "notify_equal_to_dump_refused": SignalRow(
        {"QVSHIM_SIGNAL": "USR2", "QVSHIM_LOG": "off"},
        lines=('QVSHIM_SIGNAL="USR2": the same signal as QVSHIM_DUMP_SIGNAL',
               "; using default off")),
    # The dump signal is never taken from the program.
    "inherited_ignore_stays": SignalRow({"QVSHIM_DUMP_SIGNAL": "USR2"},
                                        ignored=(signal.SIGUSR2,), send=signal.SIGUSR2,
                                        lines=("QVSHIM_DUMP_SIGNAL: signal 12 (USR2) is ignored",
                                               "dumps by signal are off"),
                                        wait_stderr="dumps by signal are off"),
    "app_handler_later_is_noticed": SignalRow({"QVSHIM_DUMP_SIGNAL": "USR1",
                                               "QVSHIM_INTERVAL": "50ms"},
                                              mode="handle", app_signal=signal.SIGUSR1,
                                              send=signal.SIGUSR1,
                                              lines=("QVSHIM_DUMP_SIGNAL: the program installed",
                                                     "dumps by signal are off"),
                                              wait_stderr="dumps by signal are off"),
    "handler_not_installed_is_named_with_logging_off": SignalRow(
        {"QVSHIM_LOG": "off"}, preload_first="lifetime_sigaction_fails",
        lines=("ERROR QVSHIM_DUMP_SIGNAL: the handler for signal 12 (USR2) could not be "
               "installed", "dumps by signal are off")),
    "handler_at_load_is_kept": SignalRow(
        {"QVSHIM_DUMP_SIGNAL": "USR2"}, preload_after="lifetime_handles_usr2_at_load",
        send=signal.SIGUSR2, stdout="early handler ran",
        lines=("QVSHIM_DUMP_SIGNAL: the program handles signal 12 (USR2) itself and keeps it",
               "dumps by signal are off")),
}


@pytest.mark.parametrize("name", sorted(SIGNAL_ROWS))
def test_signals_are_the_programs_own(name, shim_library, tmp_path):
    row = SIGNAL_ROWS[name]
    binary = _build("lifetime_signals")
    dump = tmp_path / "dump.txt"
    out, err = tmp_path / "out", tmp_path / "err"
    env = shimrun.shim_env({"QVSHIM_DUMP_FILE": str(dump), **row.env})
    if row.preload_first:
        env["LD_PRELOAD"] = f"{_build_preload(row.preload_first)} {env['LD_PRELOAD']}"
    if row.preload_after:
        env["LD_PRELOAD"] = f"{env['LD_PRELOAD']} {_build_preload(row.preload_after)}"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen([str(binary), row.mode, str(int(row.app_signal))], env=env,
                                stdin=subprocess.PIPE, stdout=o, stderr=e,
                                preexec_fn=_child_setup(row.ignored))
    status = None
    try:
        _wait_for("ready", out, proc)
        if row.wait_stderr:
            _wait_for(row.wait_stderr, err, proc)
        if row.send is not None:
            os.kill(proc.pid, row.send)
        if row.dump:
            _wait_for("end of qvshim dump", dump, proc)
        if row.mode == "handle":
            _wait_for("app handler ran", out, proc)
        if row.stdout:
            _wait_for(row.stdout, out, proc)
        try:
            proc.stdin.close()
        except BrokenPipeError:
            pass
        status = proc.wait(timeout=END_DEADLINE_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    stdout, stderr = out.read_text(errors="replace"), err.read_text(errors="replace")
    seen = (f"\n  env: {row.env}\n  result: {_status_text(status)}\n  stdout: {stdout!r}"
            f"\n  stderr: {stderr!r}")
    assert status == row.status, f"expected {_status_text(row.status)}:{seen}"
    for text in row.lines:
        hits = [ln for ln in stderr.splitlines() if text in ln]
        assert len(hits) == 1, f"expected one stderr line with {text!r}:{seen}"
    assert dump.exists() == row.dump, (
        f"expected {'a' if row.dump else 'no'} dump at {dump}:{seen}")
    if row.ignored:
        assert f"signal {row.ignored[0]} ignored" in stdout, (
            f"expected the program to see its inherited SIG_IGN kept:{seen}")
    if row.mode == "handle":
        assert "app handler ran" in stdout, f"expected the program's own handler to run:{seen}"
    if row.stdout:
        assert row.stdout in stdout, f"expected {row.stdout!r} on stdout:{seen}"
