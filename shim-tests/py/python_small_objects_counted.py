"""With PYTHONMALLOC unset the shim sets PYTHONMALLOC=malloc before CPython
reads it, so small objects (which pymalloc would take from mmap'ed arenas the
ledger cannot see) are counted. Run with the expected PYTHONMALLOC value as
argv[1]; 'malloc' must count the floats, 'pymalloc' (the user's own choice,
left alone) must not."""

import gc
import os
import sys

from shimstats import host_live

N_FLOATS = 200_000
FLOAT_BYTES = 24  # sizeof(PyFloatObject) on 64-bit

expected = sys.argv[1]
got = os.environ.get("PYTHONMALLOC")
assert got == expected, f"expected PYTHONMALLOC={expected!r} in the Python process, got {got!r}"

gc.collect()
before = host_live()
floats = [float(i) + 0.5 for i in range(N_FLOATS)]
grown = host_live() - before
list_bytes = sys.getsizeof(floats)
floats_bytes = N_FLOATS * FLOAT_BYTES
print(f"PYTHONMALLOC={got}: live grew {grown} bytes for a {list_bytes}-byte list of {N_FLOATS} floats")
if expected == "malloc":
    assert grown >= list_bytes + floats_bytes, (
        f"expected the floats counted: live to grow >= {list_bytes + floats_bytes}, got {grown}")
else:
    assert grown < list_bytes + floats_bytes, (
        f"expected pymalloc's floats outside the ledger: growth < {list_bytes + floats_bytes}, got {grown}")
del floats
print("PASS")
