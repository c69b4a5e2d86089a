"""Fixtures for the shim tests: the built library, compiled test programs,
and runners that start a program or python3 with libqvshim.so preloaded."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest


# Started as a background job of a non-interactive shell (`cmd &` in a script), this process
# inherits SIGINT and SIGQUIT ignored, and so would every program a test starts: a Ctrl+C test
# would then see its SIGINT ignored. The tests expect the dispositions a terminal gives.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if signal.getsignal(signal.SIGQUIT) == signal.SIG_IGN:
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)

sys.path.insert(0, str(Path(__file__).resolve().parent))

import shimrun  # noqa: E402


@pytest.fixture(scope="session")
def shim_library() -> Path:
    """target/release/libqvshim.so, which `cargo build --release` makes."""
    if not shimrun.SHIM.is_file():
        pytest.fail(f"expected {shimrun.SHIM} to exist: run `cargo build --release` first "
                    f"(scripts/test does)")
    return shimrun.SHIM


@pytest.fixture(scope="session")
def c_program(shim_library):
    """c_program("malloc_family") -> the compiled shim-tests/c/malloc_family.c."""
    def get(name: str) -> Path:
        return shimrun.build(shimrun.TESTS_DIR / "c" / f"{name}.c")
    return get


@pytest.fixture(scope="session")
def cpp_program(shim_library):
    """cpp_program("newdelete") -> the compiled shim-tests/cpp/newdelete.cpp."""
    def get(name: str) -> Path:
        return shimrun.build(shimrun.TESTS_DIR / "cpp" / f"{name}.cpp")
    return get


@pytest.fixture
def run_under_shim(shim_library):
    """run_under_shim([binary, args...], {"QVSHIM_BUDGET": "64M"}) -> shimrun.Run."""
    return shimrun.run


@pytest.fixture
def python_under_shim(shim_library):
    """python_under_shim(["-c", code], env) runs this interpreter under the shim."""
    return shimrun.run_python
