"""Under QVSHIM_BUDGET=512M numpy's 2 GiB np.ones is refused with numpy's own
MemoryError (_ArrayMemoryError), and numpy works normally afterwards."""

import numpy as np

from shimstats import MIB, host_stats

assert host_stats().budget == 512 * MIB, "expected QVSHIM_BUDGET=512M"
try:
    huge = np.ones(1 << 28)
    raise AssertionError(f"expected np.ones(1 << 28) (2 GiB) to be refused, got an array of {huge.nbytes} bytes")
except MemoryError as refused:
    # numpy shows _ArrayMemoryError under its base's __name__; __qualname__ keeps the real one.
    kind = type(refused)
    assert kind.__qualname__ == "_ArrayMemoryError" and kind.__module__.startswith("numpy"), (
        f"expected numpy's own _ArrayMemoryError, got {kind.__module__}.{kind.__qualname__}: {refused}")
    print(f"refused with {kind.__module__}.{kind.__qualname__}: {refused}")

ok = np.ones(1 << 20)
assert ok.sum() == 1 << 20, f"expected numpy to work after the refusal, sum {ok.sum()}"
big = np.zeros((64, 1 << 20), dtype=np.uint8)
big += 1
assert int(big.sum()) == 64 << 20
print("PASS")
