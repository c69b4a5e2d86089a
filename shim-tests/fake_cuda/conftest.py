"""Fixtures for the fake-driver tests: everything is built once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fakecuda  # noqa: E402


@pytest.fixture(scope="session")
def fake_cuda() -> Path:
    """The build directory holding libcuda.so.1 (the fake) and the test programs."""
    try:
        return fakecuda.build_all()
    except RuntimeError as error:
        pytest.fail(str(error))
