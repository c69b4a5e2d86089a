"""Fixtures for the monitor's tests (helpers are in monitor_run.py)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import monitor_run  # noqa: E402


@pytest.fixture(scope="session")
def lib():
    if not monitor_run.LIB.exists():
        pytest.fail(f"{monitor_run.LIB} is missing: run `cargo build --release` first")
    return monitor_run.LIB


@pytest.fixture(scope="session")
def c_programs(lib):
    """The compiled shim-tests/monitor/c/*.c, by name."""
    return monitor_run.build_c_programs()
