"""A CPython that starts after the shim (a C program that dlopens libpython): the arena allocator
is installed from the first pending call in the main thread rather than at load, and from then
on pymalloc's arenas are counted and given back (src/runtime/arena.rs;
shim-tests/c/embedded_python.c). That arenas taken before installation are never taken back is
held by the unit test in arena.rs: here the pending call runs during the interpreter's own
start-up, before any code of the test's."""

import sys
import sysconfig
from pathlib import Path

import pytest

import shimrun

MIB = 1 << 20

CODE = r"""
import ctypes, gc, json, tempfile, time

def dump():
    with tempfile.TemporaryFile() as f:
        assert ctypes.CDLL(None).qvshim_dump(f.fileno(), 1) == 0
        f.seek(0)
        return json.load(f)

def live():
    return dump()["pools"][0]["live"]

deadline = time.time() + 10
while not dump()["runtime"]["python"]["arenas_counted"] and time.time() < deadline:
    time.sleep(0.01)                                   # bytecode runs: the pending call gets its turn
print("counted", dump()["runtime"]["python"]["arenas_counted"])
gc.collect()
base = live()
late = [float(i) + 0.5 for i in range(300_000)]
print("late_grew", live() - base)
del late
gc.collect()
print("late_back", live() - base)
"""


def libpython():
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return None
    path = Path(sysconfig.get_config_var("LIBDIR")) / sysconfig.get_config_var("LDLIBRARY")
    return path if path.exists() else None


@pytest.mark.skipif(libpython() is None, reason="this Python has no shared libpython to embed")
def test_a_cpython_started_after_the_shim_gets_its_arenas_counted(run_under_shim):
    program = shimrun.build(shimrun.TESTS_DIR / "c" / "embedded_python.c")
    result = run_under_shim([program, str(libpython()), CODE],
                            {"QVSHIM_LOG": "debug", "PYTHONHOME": sys.base_prefix})
    assert result.returncode == 0, f"expected the embedded code to run, got {result.exit_text()}" + result.describe()
    assert "counting CPython's small-object arenas (installed from the main thread)" in result.stderr, (
        "expected the arena allocator installed by the pending call, not at load" + result.describe())
    numbers = dict(zip(result.stdout.split()[0::2], result.stdout.split()[1::2]))
    assert numbers.get("counted") == "True", result.describe()
    floats_bytes = 300_000 * 32  # pymalloc puts a 24-byte float in a 32-byte block
    assert int(numbers["late_grew"]) >= floats_bytes, (
        "expected the arenas taken after installation to be counted" + result.describe())
    # pymalloc gives back an arena only when it is wholly empty; a partly used one may stay.
    assert abs(int(numbers["late_back"])) <= 2 * MIB, result.describe()
