"""Quiet by default, and a log that cannot be turned against the host (issue 8, items 1, 4, 10).

At the defaults a program under the shim prints exactly what it prints without it; the start and
exit lines are asked for (QVSHIM_LOG=info, or a log file). QVSHIM_LOG_FILE is opened without
following a symlink, without blocking on a FIFO, mode 0600, and its descriptor is checked before
each write so that a program that closed it and opened its own file never receives the shim's
lines. The exit line reaches the original stderr after the program closed fd 2. A bad value's
line names the default however long the value is. Level lines never say "normal -> normal".

Each table row is one case: the environment or the files it plants, what must be seen, and the
status the program must end with.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

import shimrun

GUEST_DIR = Path(__file__).resolve().parent
# A FIFO with no reader once hung the program before main: this is the deadline for any run.
RUN_DEADLINE_SECONDS = 60
# The umask the runs get, so that "created mode 0600" is not an accident of the caller's umask.
TEST_UMASK = 0o022

START_LINE = re.compile(r"^\[qvshim\] INFO qvshim \S+ pid \d+: host budget ", re.M)
EXIT_LINE = re.compile(r"^\[qvshim\] INFO exit pid \d+: host peak ", re.M)


@dataclass
class Ran:
    argv: list[str]
    env_set: dict[str, str]
    returncode: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False

    def describe(self) -> str:
        env = " ".join(f"{k}={v[:80]!r}" for k, v in self.env_set.items())
        status = f"timed out after {RUN_DEADLINE_SECONDS} s" if self.timed_out else f"status {self.returncode}"
        return (f"\n  command: {env} {' '.join(self.argv)}\n  result: {status}"
                f"\n  stdout: {self.stdout[-3000:]!r}\n  stderr: {self.stderr[-3000:]!r}")


def run(argv: list[str], env_set: dict[str, str] | None = None, preload: bool = True) -> Ran:
    """argv in a clean environment (no QVSHIM_*), with the shim preloaded unless told not to."""
    env_set = dict(env_set or {})
    argv = [str(a) for a in argv]
    try:
        done = subprocess.run(argv, env=shimrun.shim_env(env_set, preload=preload), capture_output=True,
                              stdin=subprocess.DEVNULL, timeout=RUN_DEADLINE_SECONDS,
                              preexec_fn=lambda: os.umask(TEST_UMASK))
    except subprocess.TimeoutExpired as e:
        return Ran(argv, env_set, -1, e.stdout or b"", e.stderr or b"", timed_out=True)
    return Ran(argv, env_set, done.returncode, done.stdout, done.stderr)


@pytest.fixture(scope="module")
def quiet_prog(shim_library) -> Path:
    return shimrun.build(GUEST_DIR / "c" / "quiet_prog.c")


# ---------------------------------------------------------------------------------------------
# Silent by default: byte for byte what the program prints without the shim.

CHILDREN = """
import subprocess, sys
subprocess.run([sys.executable, "-c", "print('python child'); import sys; print('err', file=sys.stderr)"])
subprocess.run(["sh", "-c", "echo shell child; echo shell child err >&2; ls / > /dev/null"])
print("parent done")
"""

def launched(prog: Path) -> list:
    """`python -m qvshim run` of a script that starts children: the launcher preloads the shim."""
    script = prog.parent / "quiet_children.py"
    script.write_text(CHILDREN)
    return [sys.executable, "-m", "qvshim", "run", script]


def launched_without(prog: Path) -> list:
    launched(prog)
    return [sys.executable, prog.parent / "quiet_children.py"]


PYTHON_PACKAGE = {"PYTHONPATH": str(shimrun.REPO / "python")}

QUIET_ROWS = [
    # (id, argv under the shim given the C program, the same without it (None: the same argv),
    #  environment, whether the test preloads the shim itself)
    ("c-program", lambda prog: [prog, "plain"], None, {}, True),
    ("python-c", lambda prog: [sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr)"],
     None, {}, True),
    ("python-children", lambda prog: [sys.executable, "-c", CHILDREN], None, {}, True),
    ("c-program-warn", lambda prog: [prog, "plain"], None, {"QVSHIM_LOG": "warn"}, True),
    ("qvshim-run-with-children", launched, launched_without, PYTHON_PACKAGE, False),
]


@pytest.mark.parametrize("name,argv,argv_without,env,preload", QUIET_ROWS, ids=[r[0] for r in QUIET_ROWS])
def test_default_run_prints_exactly_what_the_program_prints_without_the_shim(name, argv, argv_without, env,
                                                                            preload, quiet_prog):
    without = run((argv_without or argv)(quiet_prog), env, preload=False)
    under = run(argv(quiet_prog), env, preload=preload)
    assert under.returncode == without.returncode == 0, (
        f"expected status 0 with and without the shim{without.describe()}{under.describe()}")
    assert (under.stdout, under.stderr) == (without.stdout, without.stderr), (
        "expected the same stdout and stderr, byte for byte, as without LD_PRELOAD (nothing from the "
        f"shim or its children at the defaults){under.describe()}\n  without the shim:{without.describe()}")


def test_info_level_shows_the_start_and_exit_lines(quiet_prog):
    result = run([quiet_prog, "plain"], {"QVSHIM_LOG": "info"})
    err = result.stderr.decode(errors="replace")
    assert result.returncode == 0 and len(START_LINE.findall(err)) == 1 and len(EXIT_LINE.findall(err)) == 1, (
        f"expected one start line and one exit line on stderr with QVSHIM_LOG=info{result.describe()}")


# ---------------------------------------------------------------------------------------------
# The log file: what is planted at the path, and what must (not) happen.

@dataclass
class LogCase:
    name: str
    # Plants whatever the case needs under tmp; returns the QVSHIM_LOG_FILE value.
    plant: Callable[[Path], str]
    # The program, given the C program and tmp.
    argv: Callable[[Path, Path], list]
    # What is wrong after the run, given the run and tmp (an empty list: nothing).
    check: Callable[[Ran, Path], list[str]]
    env: dict[str, str] = field(default_factory=dict)
    status: int = 0


def error_lines(result: Ran) -> list[str]:
    return [ln for ln in result.stderr.decode(errors="replace").splitlines() if ln.startswith("[qvshim] ERROR")]


def plant_symlink(tmp: Path) -> str:
    target = tmp / "precious.txt"
    target.write_text("precious\n")
    link = tmp / "qvshim.log"
    link.symlink_to(target)
    return str(link)


def check_symlink_refused(result: Ran, tmp: Path) -> list[str]:
    problems = []
    if (tmp / "precious.txt").read_text() != "precious\n":
        problems.append(f"expected the symlink's target untouched, it holds {(tmp / 'precious.txt').read_text()!r}")
    lines = error_lines(result)
    if len(lines) != 1 or "QVSHIM_LOG_FILE=" not in lines[0] or "symbolic link" not in lines[0]:
        problems.append(f"expected one ERROR line naming QVSHIM_LOG_FILE and saying it is a symbolic link, got {lines}")
    return problems


def plant_fifo(tmp: Path) -> str:
    path = tmp / "qvshim.fifo"
    os.mkfifo(path)
    return str(path)


def check_fifo_without_reader(result: Ran, tmp: Path) -> list[str]:
    problems = []
    if b"quiet program on stdout" not in result.stdout:
        problems.append("expected the program to start and run")
    lines = error_lines(result)
    if len(lines) != 1 or "QVSHIM_LOG_FILE=" not in lines[0]:
        problems.append(f"expected one ERROR line naming QVSHIM_LOG_FILE (a FIFO nobody reads), got {lines}")
    return problems


# A FIFO that already has a reader: the shim writes into it, without blocking.
FIFO_READERS: dict[str, int] = {}


def plant_fifo_with_reader(tmp: Path) -> str:
    path = plant_fifo(tmp)
    FIFO_READERS[path] = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    return path


def check_fifo_with_reader(result: Ran, tmp: Path) -> list[str]:
    path = str(tmp / "qvshim.fifo")
    reader = FIFO_READERS.pop(path)
    try:
        got = os.read(reader, 65536).decode(errors="replace")
    except BlockingIOError:
        got = ""
    finally:
        os.close(reader)
    problems = []
    if not (START_LINE.search(got) and EXIT_LINE.search(got)):
        problems.append(f"expected the start and exit lines in the FIFO (a log file gets info), got {got!r}")
    if error_lines(result) or result.stderr != b"quiet program on stderr\n":
        problems.append("expected only the program's own line on stderr")
    return problems


def check_data_untouched(result: Ran, tmp: Path) -> list[str]:
    data = (tmp / "data.txt").read_text()
    problems = []
    if data != "the program's own data\n":
        problems.append(f"expected the program's data file to hold only its own line, it holds {data!r}")
    if b"[qvshim]" in result.stderr:
        problems.append("expected no shim line on stderr with a log file")
    return problems


def check_mode_0600(result: Ran, tmp: Path) -> list[str]:
    path = tmp / "new.log"
    if not path.exists():
        return ["expected the log file to be created"]
    mode = stat.S_IMODE(path.stat().st_mode)
    problems = [] if mode == 0o600 else [f"expected the new log file created mode 0600, got {oct(mode)}"]
    if not START_LINE.search(path.read_text()):
        problems.append(f"expected the start line in the log file (info by default there), got {path.read_text()!r}")
    return problems


CLOSERANGE_PY = """
import os, sys
os.closerange(3, 65536)
# A raw descriptor: finalization does not close it, so it is still open when the exit line comes.
data = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
os.write(data, b"the program's own data\\n")
print("data file is fd", data)
"""

LOG_CASES = [
    LogCase("symlink-at-the-log-path", plant_symlink, lambda prog, tmp: [prog, "plain"], check_symlink_refused),
    LogCase("fifo-with-no-reader", plant_fifo, lambda prog, tmp: [prog, "plain"], check_fifo_without_reader),
    LogCase("fifo-with-a-reader", plant_fifo_with_reader, lambda prog, tmp: [prog, "plain"],
            check_fifo_with_reader),
    LogCase("c-closerange-then-data-file", lambda tmp: str(tmp / "shim.log"),
            lambda prog, tmp: [prog, "closerange", tmp / "data.txt"], check_data_untouched),
    LogCase("python-closerange-then-data-file", lambda tmp: str(tmp / "shim.log"),
            lambda prog, tmp: [sys.executable, "-c", CLOSERANGE_PY, tmp / "data.txt"], check_data_untouched),
    LogCase("created-mode-0600", lambda tmp: str(tmp / "new.log"), lambda prog, tmp: [prog, "plain"],
            check_mode_0600),
]


@pytest.mark.parametrize("case", LOG_CASES, ids=[c.name for c in LOG_CASES])
def test_log_file_cannot_be_turned_against_the_program(case, tmp_path, quiet_prog):
    log_path = case.plant(tmp_path)
    result = run(case.argv(quiet_prog, tmp_path), {"QVSHIM_LOG_FILE": log_path, **case.env})
    problems = []
    if result.timed_out or result.returncode != case.status:
        problems.append(f"expected status {case.status} within {RUN_DEADLINE_SECONDS} s")
    problems += case.check(result, tmp_path)
    assert not problems, "\n".join(problems) + result.describe()


# ---------------------------------------------------------------------------------------------
# Where lines go when the program closes or redirects its stderr (QVSHIM_LOG=info asks for the
# exit line).

def test_exit_line_reaches_the_original_stderr_after_the_program_closed_fd_2(quiet_prog):
    result = run([quiet_prog, "close-stderr"], {"QVSHIM_LOG": "info"})
    err = result.stderr.decode(errors="replace")
    assert result.returncode == 0 and len(EXIT_LINE.findall(err)) == 1, (
        f"expected the exit line on the original stderr although the program closed fd 2{result.describe()}")


def test_a_read_only_file_at_number_2_is_not_taken_for_a_redirected_stderr(quiet_prog):
    # After the program closes fd 2, the lowest free number goes to the next open: the shim's own
    # reads of /proc and the cgroup files on the monitor thread, or, as here, the program's. A
    # read-only file there is nobody's stderr: the exit line still goes to the original one.
    result = run([quiet_prog, "close-stderr-read", "/proc/self/stat"], {"QVSHIM_LOG": "info"})
    err = result.stderr.decode(errors="replace")
    assert result.returncode == 0 and len(EXIT_LINE.findall(err)) == 1, (
        f"expected the exit line on the original stderr although a read-only file holds number 2"
        f"{result.describe()}")


def test_exit_line_follows_stderr_the_program_redirected_on_purpose(quiet_prog, tmp_path):
    target = tmp_path / "stderr.txt"
    result = run([quiet_prog, "redirect-stderr", target], {"QVSHIM_LOG": "info"})
    redirected = target.read_text()
    err = result.stderr.decode(errors="replace")
    assert result.returncode == 0 and len(EXIT_LINE.findall(redirected)) == 1 and not EXIT_LINE.search(err), (
        f"expected the exit line where the program sent its stderr (dup2 onto fd 2), not on the old stderr;"
        f" the file holds {redirected!r}{result.describe()}")


def test_a_reader_that_went_away_never_kills_the_program_with_sigpipe(shim_library):
    # `true` writes nothing itself; the shim's start and exit lines meet a pipe nobody reads.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(["true"], env=shimrun.shim_env({"QVSHIM_LOG": "info"}), stderr=write_end,
                              stdin=subprocess.DEVNULL, timeout=RUN_DEADLINE_SECONDS)
    finally:
        os.close(write_end)
    assert done.returncode == 0, (
        f"expected `true` to end with status 0 although its stderr pipe has no reader (the shim's lines are "
        f"lost, never a SIGPIPE), got status {done.returncode}")


# ---------------------------------------------------------------------------------------------
# A bad value's line names the variable, (the start of) the value and the default, whatever the
# value's length.

LONG_VALUE_BYTES = 5000
LONG_VALUES = [
    # (variable, value, the default the line must name)
    ("QVSHIM_BUDGET", "9" * LONG_VALUE_BYTES, "6G"),
    ("QVSHIM_RESERVE", "x" * LONG_VALUE_BYTES, "64M"),
    ("QVSHIM_LOG", "loud" * (LONG_VALUE_BYTES // 4), "warn"),
    ("QVSHIM_DUMP_SIGNAL", "U" * LONG_VALUE_BYTES, "USR2"),
    ("QVSHIM_LOG_FILE", "/nonexistent-qvshim-dir/" + "d" * LONG_VALUE_BYTES, "stderr"),
]


@pytest.mark.parametrize("variable,value,default", LONG_VALUES, ids=[r[0] for r in LONG_VALUES])
def test_bad_long_value_line_names_variable_value_and_default(variable, value, default, quiet_prog):
    result = run([quiet_prog, "plain"], {variable: value})
    lines = error_lines(result)
    ok = (len(lines) == 1 and lines[0].startswith(f'[qvshim] ERROR {variable}="{value[:40]}')
          and f"using default {default}" in lines[0] and f"{len(value)} bytes" in lines[0])
    assert result.returncode == 0 and ok, (
        f"expected one ERROR line naming {variable}, the start of its {len(value)}-byte value, its length and "
        f"'using default {default}', got {lines}{result.describe()}")


# ---------------------------------------------------------------------------------------------
# Level lines: a pool that rose and fell back between two looks is not "normal -> normal".

def test_level_lines_never_name_the_same_level_twice(quiet_prog):
    result = run([quiet_prog, "level-flap"], {"QVSHIM_BUDGET": "64M", "QVSHIM_LOG": "info"})
    err = result.stderr.decode(errors="replace")
    same = re.findall(r"^\[qvshim\] \w+ .*level (\w+) -> \1\b.*$", err, re.M)
    warn_falls = re.findall(r"^\[qvshim\] WARN .*(-> normal|fell back).*$", err, re.M)
    assert result.returncode == 0 and not same and not warn_falls, (
        f"expected no 'X -> X' level line and no fall to normal at WARN, got {same} {warn_falls}{result.describe()}")
