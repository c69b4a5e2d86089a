"""Build the test programs and run them under libqvshim.so.

Everything the test files share lives here: where the library is, how a C or
C++ program is compiled, the environment a program under the shim gets, and
how a finished run is described in a failure message.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
SHIM = REPO / "target" / "release" / "libqvshim.so"
INCLUDE_DIR = REPO / "include"
BUILD_DIR = TESTS_DIR / "build"
PY_PROGRAMS_DIR = TESTS_DIR / "py"

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

# A program that hangs (a deadlock after fork, say) is stopped after this.
RUN_TIMEOUT_SECONDS = 120

C_FLAGS = ["-std=gnu11", "-O0", "-g", "-fno-builtin", "-Wall", "-Wextra",
           "-Wno-use-after-free"]
CXX_FLAGS = ["-std=gnu++17", "-O0", "-g", "-fno-builtin", "-Wall", "-Wextra"]
LINK_FLAGS = ["-pthread", "-ldl"]

# Variables that would change what the shim does; a test sets them itself.
_SHIM_VARIABLE = re.compile(r"^(QVSHIM_|LD_PRELOAD$|PYTHONMALLOC$)")


def _newest_mtime(paths):
    return max(p.stat().st_mtime for p in paths)


def build(source: Path) -> Path:
    """Compile one C (.c) or C++ (.cpp) program into BUILD_DIR; returns the binary.

    Rebuilt only when the source, the shared harness or qvshim.h is newer.
    """
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    is_cpp = source.suffix == ".cpp"
    binary = BUILD_DIR / source.stem
    inputs = [source, TESTS_DIR / "c" / "shimcheck.h", INCLUDE_DIR / "qvshim.h"]
    if binary.exists() and binary.stat().st_mtime >= _newest_mtime(inputs):
        return binary
    compiler = ["g++", *CXX_FLAGS] if is_cpp else ["gcc", *C_FLAGS]
    cmd = [*compiler, f"-I{INCLUDE_DIR}", "-o", str(binary), str(source), *LINK_FLAGS]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"expected {source.name} to compile, the compiler said:\n{' '.join(cmd)}\n"
            f"{done.stdout}{done.stderr}")
    return binary


def shim_env(extra: dict[str, str] | None = None, preload: bool = True) -> dict[str, str]:
    """The caller's environment without any QVSHIM_*, LD_PRELOAD or PYTHONMALLOC,
    then LD_PRELOAD=<the shim> and the test's own variables."""
    env = {k: v for k, v in os.environ.items() if not _SHIM_VARIABLE.match(k)}
    if preload:
        env["LD_PRELOAD"] = str(SHIM)
    env.update(extra or {})
    return env


@dataclass
class Run:
    """A finished program: what was run and everything it said."""

    argv: list[str]
    env_set: dict[str, str]
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False

    def exit_text(self) -> str:
        if self.timed_out:
            return f"timed out after {RUN_TIMEOUT_SECONDS} s"
        if self.returncode < 0:
            sig = -self.returncode
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = f"signal {sig}"
            return f"killed by {name}"
        return f"exit {self.returncode}"

    def describe(self) -> str:
        env = " ".join(f"{k}={v!r}" for k, v in self.env_set.items())
        return (f"\n  command: {env} {' '.join(self.argv)}\n  result:  {self.exit_text()}"
                f"\n  stdout:\n{_indent(self.stdout)}\n  stderr:\n{_indent(self.stderr)}")

    def shim_lines(self) -> list[str]:
        """Lines the shim wrote to stderr."""
        return [ln for ln in self.stderr.splitlines() if ln.startswith("[qvshim]")]


def _indent(text: str) -> str:
    if not text:
        return "    (empty)"
    return "\n".join("    " + ln for ln in text.rstrip("\n").splitlines())


def _close_stdin() -> None:
    os.close(0)


def run(argv: list[str], env_set: dict[str, str] | None = None, preload: bool = True,
        cwd: Path | None = None, stdin_closed: bool = False) -> Run:
    """Run argv under the shim with env_set added to a clean environment (stdin_closed: the program
    starts without descriptor 0, so the first file it or the library opens gets it)."""
    env_set = dict(env_set or {})
    env = shim_env(env_set, preload=preload)
    shown = {"LD_PRELOAD": env["LD_PRELOAD"]} if preload else {}
    shown.update(env_set)
    try:
        done = subprocess.run([str(a) for a in argv], env=env, capture_output=True, text=True,
                              timeout=RUN_TIMEOUT_SECONDS, stdin=subprocess.DEVNULL, cwd=cwd,
                              preexec_fn=_close_stdin if stdin_closed else None)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return Run([str(a) for a in argv], shown, -1, out, err, timed_out=True)
    return Run([str(a) for a in argv], shown, done.returncode, done.stdout, done.stderr)


def run_python(args: list[str], env_set: dict[str, str] | None = None) -> Run:
    """Run this interpreter (the one that has pytest and numpy) under the shim.

    shim-tests/py is put on PYTHONPATH so the programs there can import
    their ctypes helper.
    """
    env_set = dict(env_set or {})
    path = os.environ.get("PYTHONPATH", "")
    env_set.setdefault("PYTHONPATH", f"{PY_PROGRAMS_DIR}{os.pathsep}{path}" if path else str(PY_PROGRAMS_DIR))
    return run([sys.executable, *args], env_set)


def expect_pass(result: Run, program: str, case: str, why: str = "") -> None:
    """A case of a C/C++ harness program passed: exit 0 and a PASS line."""
    passed = result.returncode == 0 and f"PASS {case}" in result.stdout.splitlines()
    assert passed, (
        f"expected {program} {case} to print 'PASS {case}' and exit 0"
        f"{' (' + why + ')' if why else ''}; got {result.exit_text()}:{result.describe()}")


def expect_table_covers_program(binary: Path, rows: list[str], table: str) -> None:
    """The pytest table names exactly the cases the program has (`--list`), so
    a case added to a C file cannot be forgotten."""
    listed = run([binary, "--list"], preload=False).stdout.split()
    assert sorted(listed) == sorted(rows), (
        f"expected {table} to name exactly the cases of {binary.name}; cases without a row: "
        f"{sorted(set(listed) - set(rows))}, rows without a case: {sorted(set(rows) - set(listed))}")
