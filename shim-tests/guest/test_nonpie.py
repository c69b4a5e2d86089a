"""A program built without PIE is governed like any other.

Debian's and Ubuntu's /usr/bin/python3 are linked without PIE and take malloc's address, so the
program's own symbol table lists malloc as undefined with the address of its PLT entry (a
canonical PLT entry), and a global lookup of "malloc" answers with that entry. The shim once took
that for "the program defines malloc itself", passed everything through and governed nothing:
`LD_PRELOAD=libqvshim.so /usr/bin/python3` ran without a budget. One row per case: the program,
how the shim is loaded, the request, what must happen, and whether the shim must say that the
host budget does not apply.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

import shimrun

GUEST_C = Path(__file__).resolve().parent / "c"
BUDGET = "64M"
OVER_BUDGET_MIB = 256
UNDER_BUDGET_MIB = 8
NOT_GOVERNED = "host budget does not apply"
JEMALLOC_CANDIDATES = [Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"),
                       Path("/usr/lib/aarch64-linux-gnu/libjemalloc.so.2")]
# Debian's interpreter (the .ci/run machine and every Debian/Ubuntu user have it).
SYSTEM_PYTHON = Path("/usr/bin/python3")


@dataclass(frozen=True)
class Row:
    name: str
    program: str            # "c": the non-PIE C program; "python": /usr/bin/python3
    jemalloc_first: bool    # another allocator preloaded before the shim
    mib: int
    expect: str             # "refused" or "granted"
    governed: bool          # False: exactly one line saying the host budget does not apply


ROWS = [
    Row("nonpie_program_over_budget_is_refused", "c", False, OVER_BUDGET_MIB, "refused", True),
    Row("nonpie_program_under_budget_is_granted", "c", False, UNDER_BUDGET_MIB, "granted", True),
    Row("nonpie_program_after_another_allocator_passes_through", "c", True, OVER_BUDGET_MIB, "granted",
        False),
    Row("system_python_over_budget_gets_memoryerror", "python", False, OVER_BUDGET_MIB, "refused", True),
    Row("system_python_after_another_allocator_passes_through", "python", True, OVER_BUDGET_MIB, "granted",
        False),
]

PYTHON_PROGRAM = """
import sys
mib, expect = int(sys.argv[1]), sys.argv[2]
try:
    block = bytearray(mib << 20)
    got = "granted"
except MemoryError:
    got = "refused"
print("PASS nonpie" if got == expect else f"FAIL: expected {mib} MiB {expect}, got {got}")
"""


def _nonpie_binary() -> Path:
    source = GUEST_C / "nonpie_malloc_address.c"
    shimrun.BUILD_DIR.mkdir(parents=True, exist_ok=True)
    out = shimrun.BUILD_DIR / "nonpie_malloc_address"
    if not out.exists() or out.stat().st_mtime < source.stat().st_mtime:
        cmd = ["gcc", "-O0", "-g", "-fno-builtin", "-fno-pie", "-no-pie", "-o", str(out), str(source)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, f"expected {source.name} to compile without PIE:\n{done.stderr}"
    readelf = subprocess.run(["readelf", "--dyn-syms", "-W", str(out)], capture_output=True, text=True)
    stub = [line.split() for line in readelf.stdout.splitlines() if " malloc@GLIBC_" in line]
    assert any(f[6] == "UND" and int(f[1], 16) != 0 for f in stub if len(f) > 6), (
        f"expected the program to carry a canonical PLT entry for malloc (UND with a value):\n{readelf.stdout}")
    return out


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_a_program_built_without_pie_is_governed(row, shim_library, tmp_path):
    if shutil.which("readelf") is None:
        pytest.fail("readelf (binutils) is needed to check the test program")
    if row.program == "c":
        argv = [_nonpie_binary(), str(row.mib), row.expect]
    else:
        assert SYSTEM_PYTHON.exists(), f"expected Debian's {SYSTEM_PYTHON} (apt-get install python3)"
        script = tmp_path / "nonpie.py"
        script.write_text(PYTHON_PROGRAM)
        argv = [SYSTEM_PYTHON, "-I", script, str(row.mib), row.expect]
    env = {"QVSHIM_BUDGET": BUDGET}
    if row.jemalloc_first:
        jemalloc = next((p for p in JEMALLOC_CANDIDATES if p.is_file()), None)
        assert jemalloc is not None, "expected Debian's libjemalloc2 (.ci/run installs it)"
        env["LD_PRELOAD"] = f"{jemalloc} {shim_library}"
    result = shimrun.run(argv, env, preload=not row.jemalloc_first)
    assert result.returncode == 0 and "PASS nonpie" in result.stdout.splitlines(), (
        f"expected {row.mib} MiB {row.expect} under QVSHIM_BUDGET={BUDGET}; "
        f"got {result.exit_text()}:{result.describe()}")
    said = [line for line in result.shim_lines() if NOT_GOVERNED in line]
    assert len(said) == (0 if row.governed else 1), (
        f"expected {'no' if row.governed else 'exactly one'} line saying {NOT_GOVERNED!r}, got {said}:"
        f"{result.describe()}")
