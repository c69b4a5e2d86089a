"""on_pressure registrations and the dispatch the library's relief calls (qvshim._on_pressure)."""

import pytest

import qvshim
from qvshim import pressure


@pytest.fixture(autouse=True)
def clean_registrations():
    saved = list(pressure._registrations)
    pressure._registrations.clear()
    yield
    pressure._registrations[:] = saved


def test_library_entry_point_is_the_dispatcher():
    assert callable(qvshim._on_pressure)
    assert qvshim._on_pressure is pressure.dispatch


@pytest.mark.parametrize(
    "registered, raised, expected_calls",
    [
        ("critical", "critical", [("critical", 0)]),
        ("critical", "warn", []),
        ("warn", "warn", [("warn", 3)]),
        ("warn", "critical", [("critical", 0)]),
        ("warn", "normal", []),
    ],
)
def test_callback_runs_when_the_level_reaches_its_own(registered, raised, expected_calls):
    calls = []
    qvshim.on_pressure(lambda level, pool: calls.append((level, pool)), level=registered)
    ran = qvshim._on_pressure(raised, 3 if raised == "warn" else 0)
    assert calls == expected_calls
    # dispatch says how many callbacks ran (its docstring): an unknown level runs none and says 0.
    assert ran == len(expected_calls), f"expected dispatch to report {len(expected_calls)} callbacks run, got {ran}"


def test_default_level_is_critical():
    calls = []
    qvshim.on_pressure(lambda level, pool: calls.append(level))
    qvshim._on_pressure("warn", 0)
    qvshim._on_pressure("critical", 0)
    assert calls == ["critical"]


def test_decorator_form_registers_and_returns_the_function():
    calls = []

    @qvshim.on_pressure(level="warn")
    def relieve(level, pool):
        calls.append(level)

    assert callable(relieve)
    qvshim._on_pressure("warn", 0)
    assert calls == ["warn"]


def test_failing_callback_is_reported_and_the_others_still_run(capsys):
    calls = []

    def broken(level, pool):
        raise RuntimeError("cache already gone")

    qvshim.on_pressure(broken)
    qvshim.on_pressure(lambda level, pool: calls.append(level))
    assert qvshim._on_pressure("critical", 0) == 2
    assert calls == ["critical"]
    err = capsys.readouterr().err
    assert "cache already gone" in err and "on_pressure callback" in err


def test_removed_callback_no_longer_runs():
    calls = []

    def relieve(level, pool):
        calls.append(level)

    qvshim.on_pressure(relieve)
    assert qvshim.remove_pressure_callback(relieve) is True
    assert qvshim.remove_pressure_callback(relieve) is False
    qvshim._on_pressure("critical", 0)
    assert calls == []


@pytest.mark.parametrize("bad_level", ["normal", "Critical", "90", None])
def test_unknown_level_is_refused(bad_level):
    with pytest.raises(ValueError, match="'warn' or 'critical'"):
        qvshim.on_pressure(lambda level, pool: None, level=bad_level)


def test_non_callable_is_refused_with_its_type_named():
    with pytest.raises(TypeError, match="callback must be callable, not str"):
        qvshim.on_pressure("gc.collect")
