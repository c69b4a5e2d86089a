"""Python's small objects are counted whichever allocator CPython uses: with
pymalloc (the default, PYTHONMALLOC unset, which the shim leaves alone) the
shim's arena allocator charges each 1 MiB arena; with PYTHONMALLOC=malloc every
object goes through the shim's malloc. Only with QVSHIM_PYTHON=off are
pymalloc's arenas left outside the ledger.

argv[1]: the PYTHONMALLOC the process must see ('unset' for none);
argv[2]: 'counted' or 'uncounted'."""

import gc
import os
import sys

from shimstats import host_live

N_FLOATS = 200_000
FLOAT_BYTES = 24  # sizeof(PyFloatObject) on 64-bit
ARENA_BYTES = 1 << 20
# The interpreter's own few mallocs between the two readings (seen: 768 bytes), far below the
# 8 MiB the floats take, so a leak of them still fails.
SLACK_BYTES = 64 << 10

expected, counting = sys.argv[1], sys.argv[2]
got = os.environ.get("PYTHONMALLOC", "unset")
assert got == expected, f"expected PYTHONMALLOC={expected!r} in the Python process, got {got!r}"

gc.collect()
before = host_live()
floats = [float(i) + 0.5 for i in range(N_FLOATS)]
grown = host_live() - before
list_bytes = sys.getsizeof(floats)
floats_bytes = N_FLOATS * FLOAT_BYTES
print(f"PYTHONMALLOC={got}: live grew {grown} bytes for a {list_bytes}-byte list of {N_FLOATS} floats")
if counting == "counted":
    assert grown >= list_bytes + floats_bytes, (
        f"expected the floats counted: live to grow >= {list_bytes + floats_bytes}, got {grown}")
    # Counted by arena or by object, never wildly more than the objects take (pymalloc puts a
    # 24-byte float in a 32-byte block, and arenas are charged whole).
    assert grown <= 2 * (list_bytes + floats_bytes), (
        f"expected live to grow by about the floats and the list, got {grown}")
else:
    assert grown < list_bytes + floats_bytes, (
        f"expected pymalloc's floats outside the ledger: growth < {list_bytes + floats_bytes}, got {grown}")
del floats
gc.collect()
back = host_live() - before
print(f"after del: live {back:+d} bytes from before")
# pymalloc gives an arena back only when it is wholly empty; a few partly used ones may stay.
assert back <= 2 * ARENA_BYTES + SLACK_BYTES, f"expected the floats' memory given back to the ledger, still {back} bytes"
print("PASS")
