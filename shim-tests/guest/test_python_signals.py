"""CPython's signal module sees the dump signal as it would without the library.

The signal module records the handlers it finds when the interpreter starts; a handler it did
not install itself reads back as None from signal.signal(), and None cannot be put back (CPython's
test_threadsignals failed in its teardown this way). So in a process that may run CPython the
dump handler is installed only once the interpreter is up (from the pending call that registers
the exit report), or after the start-up watch when no interpreter starts.
"""

import signal
import subprocess
import sys
import time

import pytest

import shimrun

SIGNAL_PROGRAM = """
import signal
print("at start", signal.getsignal(signal.SIGUSR2))
old = signal.signal(signal.SIGUSR2, lambda *a: None)
print("old", old)
signal.signal(signal.SIGUSR2, old)
print("restored", signal.getsignal(signal.SIGUSR2))
"""

ROWS = [
    # (id, environment)
    ("defaults", {}),
    ("dump_signal_chosen", {"QVSHIM_DUMP_SIGNAL": "USR2"}),
]


@pytest.mark.parametrize("env", [env for _, env in ROWS], ids=[i for i, _ in ROWS])
def test_python_sees_the_dump_signal_as_without_the_library(env):
    without = shimrun.run([sys.executable, "-c", SIGNAL_PROGRAM], preload=False)
    under = shimrun.run([sys.executable, "-c", SIGNAL_PROGRAM], env)
    assert without.returncode == 0, without.describe()
    assert (under.returncode, under.stdout) == (0, without.stdout), (
        f"expected CPython to see SIGUSR2's handler as without the library and to put it back:"
        f"\nwithout the library: {without.stdout!r}{under.describe()}")


def test_the_dump_signal_still_dumps_once_python_is_up(tmp_path):
    dump = tmp_path / "dump.txt"
    code = ("import time, sys\n"
            "print('up', flush=True)\n"
            "time.sleep(20)\n")
    child = subprocess.Popen([sys.executable, "-c", code], env=shimrun.shim_env({"QVSHIM_DUMP_FILE": str(dump)}),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "up"
        deadline = time.monotonic() + 10
        # The handler arrives from a pending call soon after start: ask until a dump appears.
        while not dump.exists() and time.monotonic() < deadline and child.poll() is None:
            if _handler_installed(child.pid):
                child.send_signal(signal.SIGUSR2)
            time.sleep(0.05)
        assert dump.exists(), f"expected a dump at {dump} after SIGUSR2 (status {child.poll()})"
        assert child.poll() is None, "expected the process to live on after its dump"
    finally:
        child.kill()
        child.communicate()


def _handler_installed(pid):
    """True when SIGUSR2 is caught by the process (SigCgt in /proc/PID/status): only then is
    it safe to send, since its default action ends the process."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (12 - 1)))
    return False
