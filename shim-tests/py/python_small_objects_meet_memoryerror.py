"""Growth made only of small Python objects (floats, in pymalloc's arenas by
default) meets MemoryError at the budget; after dropping them the process
allocates normally again, and the ledger is back near where it started."""

import gc

from shimstats import host_live

CHUNK_FLOATS = 100_000
MIB = 1 << 20

gc.collect()
start = host_live()
chunks = []
try:
    while True:
        chunks.append([float(i) + 0.5 for i in range(CHUNK_FLOATS)])
        assert len(chunks) < 10_000, "expected MemoryError long before 10000 chunks (24 GB)"
except MemoryError:
    held = len(chunks)
    del chunks
gc.collect()
print(f"MemoryError after {held} chunks of {CHUNK_FLOATS} floats")
assert held >= 10, f"expected at least 10 chunks under a 256 MiB budget, got {held}"
after = host_live()
assert after - start <= 4 * MIB, f"expected the ledger back near {start} after the drop, got {after}"
again = [str(i) for i in range(200_000)]
assert len(again) == 200_000
print("PASS")
