"""Two threads allocate bytearrays as fast as they can for a while, each
keeping a list, catching MemoryError and dropping its list. The process's
peak resident set (VmHWM) must stay within budget + reserve + the VmHWM it had
at the start: the shim keeps the real memory, not just its count, in bounds."""

import threading
import time

from shimstats import KIB, MIB, host_stats, vmhwm_bytes

DURATION_S = 2.0
SIZES_BYTES = [64 * KIB, 1 * MIB, 3 * MIB, 8 * MIB, 16 * MIB, 33 * MIB, 200 * KIB]

stats = host_stats()
budget, reserve = stats.budget, stats.reserve
assert budget == 512 * MIB, f"expected QVSHIM_BUDGET=512M, got {budget}"
baseline = vmhwm_bytes()

refusals = [0, 0]
allocations = [0, 0]
deadline = time.monotonic() + DURATION_S


def allocate_until_deadline(t: int) -> None:
    held = []
    i = t * 3
    while time.monotonic() < deadline:
        try:
            held.append(bytearray(SIZES_BYTES[i % len(SIZES_BYTES)]))
            allocations[t] += 1
        except MemoryError:
            refusals[t] += 1
            held = []
        i += 1


threads = [threading.Thread(target=allocate_until_deadline, args=(t,)) for t in range(2)]
for th in threads:
    th.start()
for th in threads:
    th.join()

peak = vmhwm_bytes()
limit = budget + reserve + baseline
print(f"baseline VmHWM {baseline} bytes, peak VmHWM {peak} bytes, limit {limit} bytes "
      f"(budget {budget} + reserve {reserve} + baseline); allocations {allocations}, refusals {refusals}")
assert sum(refusals) > 0, f"expected the threads to reach the budget and see MemoryError, got none"
assert peak <= limit, (
    f"expected peak VmHWM <= budget + reserve + baseline = {limit} bytes, got {peak} "
    f"({(peak - limit) / MIB:.1f} MiB over)")
print("PASS")
