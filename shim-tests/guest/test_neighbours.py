"""Odd neighbours are named, not fatal (issue 8, item 7, and the malloc
surface of item 10): a library opened with RTLD_DEEPBIND, another allocator
preloaded before the shim, a program that dlopens the shim itself, and the
corners of the malloc surface. C programs in shim-tests/guest/c/neighbours_*.c.

One row per case: the program and its arguments, how the shim is loaded, the
environment, the exit status and PASS line it must give, and the one line the
shim must (or must not) write.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import shimrun

GUEST_C = Path(__file__).resolve().parent / "c"

# Debian's libjemalloc2: another allocator a user may preload before the shim.
JEMALLOC_CANDIDATES = [Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"),
                       Path("/usr/lib/aarch64-linux-gnu/libjemalloc.so.2")]

# How the shim is brought into the process.
PRELOADED = "preloaded"            # LD_PRELOAD=libqvshim.so
AFTER_JEMALLOC = "after jemalloc"  # LD_PRELOAD="libjemalloc.so.2 libqvshim.so"
NOT_LOADED = "not preloaded"       # the program dlopens it itself


@dataclass(frozen=True)
class Row:
    name: str
    program: str                   # neighbours_<program>.c
    args: tuple[str, ...]          # "{lib}" and "{shim}" are filled in
    loading: str = PRELOADED
    env: dict[str, str] = field(default_factory=dict)
    passes: str = ""               # the PASS line the program must print
    one_line: str | None = None    # exactly one shim line must match this
    never: str | None = None       # no shim line may match this


SURFACE_ENV = {"QVSHIM_BUDGET": "1G"}

ROWS = [
    Row("deepbind_library_shares_the_processs_malloc_and_is_named", "deepbind", ("{lib}",),
        passes="PASS deepbind",
        one_line=r"neighbours_deepbind_lib\.so.*without RTLD_DEEPBIND"),
    Row("allocator_preloaded_first_is_named_and_nothing_breaks", "other_allocator", (),
        loading=AFTER_JEMALLOC, passes="PASS other_allocator",
        one_line=r"libjemalloc\.so\.2.*host budget does not apply.*GPU"),
    Row("dlopen_of_the_shim_works_and_the_c_api_answers", "dlopen_shim", ("{shim}",),
        loading=NOT_LOADED, passes="PASS dlopen_shim",
        one_line=r"not preloaded.*host budget does not apply"),
    *[Row(case, "malloc_surface", (case,), env=SURFACE_ENV, passes=f"PASS {case}")
      for case in ["realloc_growing_is_not_a_new_allocation",
                   "malloc_statistics_functions_are_the_shims",
                   "mallinfo2_counts_live_bytes",
                   "mallopt_succeeds_without_effect",
                   "malloc_info_writes_xml_and_rejects_options",
                   "huge_alignment_is_refused_without_reserving_address_space"]],
    Row("impossible_requests_fail_without_counting_a_refusal", "malloc_surface",
        ("impossible_requests_fail_without_counting_a_refusal",), env=SURFACE_ENV,
        passes="PASS impossible_requests_fail_without_counting_a_refusal",
        never=r"refused|largest|\b[1-9]\d* refusals"),
]


def _jemalloc() -> Path | None:
    return next((p for p in JEMALLOC_CANDIDATES if p.is_file()), None)


def _build_library(source: Path) -> Path:
    shimrun.BUILD_DIR.mkdir(parents=True, exist_ok=True)
    out = shimrun.BUILD_DIR / f"{source.stem}.so"
    if out.exists() and out.stat().st_mtime >= source.stat().st_mtime:
        return out
    cmd = ["gcc", "-shared", "-fPIC", "-O0", "-g", "-fno-builtin", "-o", str(out), str(source)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"expected {source.name} to compile:\n{done.stderr}"
    return out


def _run(row: Row, shim: Path):
    binary = shimrun.build(GUEST_C / f"neighbours_{row.program}.c")
    lib = _build_library(GUEST_C / "neighbours_deepbind_lib.c")
    argv = [binary, *(a.format(lib=lib, shim=shim) for a in row.args)]
    env = dict(row.env)
    if row.loading == AFTER_JEMALLOC:
        jemalloc = _jemalloc()
        if jemalloc is None:
            pytest.skip("Debian's libjemalloc2 is not installed (apt-get install libjemalloc2); "
                        "the other-allocator row needs it")
        env["LD_PRELOAD"] = f"{jemalloc} {shim}"
    return shimrun.run(argv, env, preload=row.loading == PRELOADED)


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_neighbour(row, shim_library):
    result = _run(row, shim_library)
    assert result.returncode == 0 and row.passes in result.stdout.splitlines(), (
        f"expected {row.program} to print {row.passes!r} and exit 0 ({row.loading}); "
        f"got {result.exit_text()}:{result.describe()}")
    lines = result.shim_lines()
    if row.one_line is not None:
        matching = [ln for ln in lines if re.search(row.one_line, ln)]
        assert len(matching) == 1, (
            f"expected exactly one shim line matching {row.one_line!r}, got "
            f"{len(matching)}:{result.describe()}")
    if row.never is not None:
        bad = [ln for ln in lines if re.search(row.never, ln)]
        assert not bad, f"expected no shim line matching {row.never!r}, got {bad}:{result.describe()}"


def test_surface_table_covers_the_program(shim_library):
    binary = shimrun.build(GUEST_C / "neighbours_malloc_surface.c")
    rows = [r.args[0] for r in ROWS if r.program == "malloc_surface"]
    shimrun.expect_table_covers_program(binary, rows, "test_neighbours.py ROWS")
