"""Python under the shim: a refused allocation is a MemoryError that the
program can catch and survive (numpy's own too), the real memory stays within
budget + reserve under threads, the ledger stays exact across threads, and
CPython's small objects are counted (shim-tests/py/*.py)."""

import pytest

import shimrun

BUDGET_512M = {"QVSHIM_BUDGET": "512M"}


def test_bytearray_over_budget_raises_memoryerror(python_under_shim):
    result = python_under_shim(["-c", "x = bytearray(1 << 30)"], BUDGET_512M)
    # The shim's own refusal warning may come before or after the traceback (the monitor says it).
    python_lines = [l for l in result.stderr.strip().splitlines() if not l.startswith("[qvshim] ")]
    last = python_lines[-1:]
    assert result.returncode == 1 and last == ["MemoryError"] and "Traceback" in result.stderr, (
        "expected bytearray(1 GiB) under QVSHIM_BUDGET=512M to end in an uncaught MemoryError "
        f"(traceback ending 'MemoryError', exit 1), got {result.exit_text()}, last line {last}"
        + result.describe())


# (program in shim-tests/py, arguments, environment): each prints PASS when
# every expectation held, or raises an AssertionError that says what it expected.
PYTHON_PROGRAMS = [
    ("catch_memoryerror_and_go_on.py", [], BUDGET_512M),
    ("numpy_refused_with_array_memory_error.py", [], BUDGET_512M),
    ("threads_stay_under_budget_plus_reserve.py", [], BUDGET_512M),
    ("threads_leave_host_live_exact.py", [], {}),
    ("python_small_objects_counted.py", ["unset", "counted"], {}),
    ("python_small_objects_counted.py", ["malloc", "counted"], {"PYTHONMALLOC": "malloc"}),
    ("python_small_objects_counted.py", ["pymalloc", "counted"], {"PYTHONMALLOC": "pymalloc"}),
    ("python_small_objects_counted.py", ["unset", "uncounted"], {"QVSHIM_PYTHON": "off"}),
    ("python_small_objects_meet_memoryerror.py", [], {"QVSHIM_BUDGET": "256M"}),
]


@pytest.mark.parametrize("program,args,env", PYTHON_PROGRAMS,
                         ids=[f"{p[:-3]}{'-' + '-'.join(a) if a else ''}" for p, a, _ in PYTHON_PROGRAMS])
def test_python_program_under_shim(program, args, env, python_under_shim):
    result = python_under_shim([str(shimrun.PY_PROGRAMS_DIR / program), *args], env)
    passed = result.returncode == 0 and result.stdout.splitlines()[-1:] == ["PASS"]
    assert passed, f"expected {program} to print PASS and exit 0, got {result.exit_text()}" + result.describe()
