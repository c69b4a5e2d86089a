"""Under QVSHIM_BUDGET=512M: fill the budget with 32 MiB bytearrays until
MemoryError, catch it, drop everything, do ordinary work, three times over.
The interpreter must survive every refusal and exit 0."""

from shimstats import MIB, host_stats

CHUNK_BYTES = 32 * MIB
CYCLES = 3

budget = host_stats().budget
assert budget == 512 * MIB, f"expected QVSHIM_BUDGET=512M ({512 * MIB} bytes), got {budget}"

for cycle in range(CYCLES):
    held = []
    try:
        for _ in range(1000):
            held.append(bytearray(CHUNK_BYTES))
        raise AssertionError("expected MemoryError within 1000 x 32 MiB under a 512M budget")
    except MemoryError:
        served = len(held)
    del held
    assert served * CHUNK_BYTES <= budget, (
        f"expected at most {budget // CHUNK_BYTES} chunks under the budget, got {served}")
    assert served >= budget // CHUNK_BYTES // 2, (
        f"expected most of the budget usable (>= {budget // CHUNK_BYTES // 2} chunks), got {served}")
    live = host_stats().live
    assert live < 64 * MIB, f"expected live to drop after dropping the chunks, got {live}"

    # Ordinary work after the refusal.
    table = {i: str(i) * 3 for i in range(100_000)}
    assert len(table) == 100_000 and table[99_999] == "999999999999999"
    for _ in range(50):
        block = bytearray(4 * MIB)
        block[-1] = 1
        del block
    order = sorted(range(200_000), key=lambda x: -x)
    assert order[0] == 199_999
    del table, order
    print(f"cycle {cycle}: {served} chunks of 32 MiB before MemoryError, then went on")
print("PASS")
