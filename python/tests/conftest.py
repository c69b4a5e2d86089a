"""Shared fixtures. Tests marked `live` need libqvshim.so preloaded in the pytest process:
run them with `python -m qvshim run -m pytest python/tests` (the light tier does)."""

import os
import signal
import subprocess
import sys

import pytest


# Started as a background job of a non-interactive shell (`cmd &` in a script), this process
# inherits SIGINT and SIGQUIT ignored, and so would every program a test starts: a Ctrl+C test
# would then see its SIGINT ignored. The tests expect the dispositions a terminal gives.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if signal.getsignal(signal.SIGQUIT) == signal.SIG_IGN:
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)

PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_DIR = os.path.dirname(PYTHON_DIR)
sys.path.insert(0, PYTHON_DIR)

import qvshim  # noqa: E402
from qvshim import launcher  # noqa: E402


def plain_env(**extra):
    """The environment for a child Python without the shim, with this checkout's package importable."""
    # QVSHIM_LIBRARY stays: it chooses the build under test; the other settings are each test's own.
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "PYTHONMALLOC") and (k == "QVSHIM_LIBRARY" or not k.startswith("QVSHIM_"))}
    env["PYTHONPATH"] = PYTHON_DIR + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def run_python(args, env, timeout=120, **kwargs):
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.fixture
def library():
    """The built libqvshim.so; a test that needs it fails (not skips) when it is missing."""
    try:
        return launcher.find_library(cwd=REPO_DIR)
    except launcher.LibraryNotFound as error:
        pytest.fail(f"{error} (the live tests need the library)")


@pytest.fixture
def shim():
    """The shim preloaded in this very process."""
    if not qvshim.is_loaded():
        pytest.fail("libqvshim.so is not preloaded in the test process: run `python -m qvshim run -m pytest python/tests`")
    return qvshim


@pytest.fixture
def fake(monkeypatch):
    """qvshim.memory's headroom and in_use answered by a FakeMemory of budget 1000 (fakememory.py)."""
    from fakememory import FakeMemory

    fake_memory = FakeMemory(budget=1000)
    monkeypatch.setattr(qvshim.memory, "headroom", fake_memory.headroom)
    monkeypatch.setattr(qvshim.memory, "in_use", fake_memory.in_use)
    return fake_memory
