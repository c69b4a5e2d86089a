"""struct qvshim_pool_stats has one layout everywhere: the C header (include/qvshim.h), the Rust
struct (src/ledger/stats.rs, checked by the unit test in src/surface/capi.rs against the same
probe) and every ctypes copy in
Python. The probe shim-tests/abi/stats_layout.c prints the header's layout as gcc compiles it;
each Python copy must match it field for field: name, offset, size, and the total size.

The Python copies: python/qvshim/_capi.py (the one definition, which shim-tests/py/shimstats.py
and scripts/gpu-check load) and examples/leaky_webui.py (a standard-library-only example that
keeps its own copy so it runs without the package).
"""

import ctypes
import importlib.util
import subprocess

import pytest

import shimrun

PROBE = shimrun.TESTS_DIR / "abi" / "stats_layout.c"


def load(path, name):
    spec = importlib.util.spec_from_loader(name, importlib.machinery.SourceFileLoader(name, str(path)))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def c_layout():
    """([(name, offset, size)], sizeof) of the struct as the C compiler lays it out."""
    done = subprocess.run([str(shimrun.build(PROBE))], capture_output=True, text=True, check=True)
    fields, total = [], None
    for line in done.stdout.splitlines():
        parts = line.split()
        if parts[0] == "sizeof":
            total = int(parts[1])
        else:
            fields.append((parts[0], int(parts[1]), int(parts[2])))
    return fields, total


def ctypes_layout(structure):
    fields = [(name, getattr(structure, name).offset, getattr(structure, name).size)
              for name, _ in structure._fields_]
    return fields, ctypes.sizeof(structure)


COPIES = [
    ("python/qvshim/_capi.py", lambda: load(shimrun.REPO / "python" / "qvshim" / "_capi.py", "_abi_capi").PoolStats),
    ("scripts/gpu-check (loads _capi.py)",
     lambda: load(shimrun.REPO / "scripts" / "gpu-check", "_abi_gpu_check").PoolStats),
    ("examples/leaky_webui.py", lambda: load(shimrun.REPO / "examples" / "leaky_webui.py", "_abi_leaky").QvshimPoolStats),
]


@pytest.mark.parametrize("where,get", COPIES, ids=[w for w, _ in COPIES])
def test_every_python_copy_of_the_stats_struct_has_the_c_layout(where, get):
    want = c_layout()
    got = ctypes_layout(get())
    assert got == want, (
        f"expected the ctypes struct in {where} to match struct qvshim_pool_stats in "
        f"include/qvshim.h (fields, offsets, sizes; sizeof):\n  C:      {want}\n  Python: {got}")


def test_the_probe_sees_every_byte_of_the_struct():
    # A field added to the header but not to the probe would leave bytes no line accounts for.
    fields, total = c_layout()
    last_name, last_offset, last_size = fields[-1]
    end = last_offset + last_size
    assert total - end < 8, (
        f"expected the probe's fields to reach the end of the struct (sizeof {total}), the last "
        f"({last_name}) ends at {end}: list the header's new fields in {PROBE.name}")


def test_shimstats_uses_the_packages_definition_instead_of_a_copy():
    # shimstats.py exits at import outside a preloaded process, so it is read, not imported.
    text = (shimrun.TESTS_DIR / "py" / "shimstats.py").read_text()
    assert "_fields_" not in text and "_capi.py" in text, (
        "expected shim-tests/py/shimstats.py to load python/qvshim/_capi.py's PoolStats, "
        "not to define its own ctypes fields")
