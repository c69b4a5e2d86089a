"""Threads allocate blocks with the process's malloc (through ctypes), hand
them to the next thread which frees them, and exit. After the rounds, host live
is back to the byte where it was.

Python allocates too, so both readings are taken in the same state: right
after a full gc.collect() (which also empties CPython's free lists), after two
warm-up rounds that fill glibc's thread-stack cache (which keeps each stack's
calloc'ed TLS vector), with no new Python object alive in between. The
threads are started with _thread, not threading.Thread: threading keeps
module-wide dicts and weak sets of threads whose table sizes depend on how the
threads happened to interleave, which would move live by a few hundred bytes
for reasons that have nothing to do with the shim.

A worker's lock is released before the thread has freed its thread state
and run its pthread key destructors (where the shim takes back the thread's
credit), and before its stack is back in glibc's cache, so every round and
every reading waits until the OS threads are gone from /proc/self/task. The middle check shows the blocks really were counted while
they lived."""

import _thread
import ctypes
import gc
import os
import threading
import time

from shimstats import KIB, MIB, libc_free, libc_malloc, malloc_usable_size, read_host_live_into

N_THREADS = 4
BLOCKS_PER_THREAD = 300
ROUNDS = 5
_thread.stack_size(2 * MIB)


def block_size(t: int, i: int) -> int:
    return 16 << ((t + i) % 15)  # 16 bytes .. 256 KiB


def one_round(mid_readings, round_index: int, errors: list) -> int:
    """Runs one round; returns the usable bytes the threads held at the barrier."""
    blocks = [[0] * BLOCKS_PER_THREAD for _ in range(N_THREADS)]
    usable = [0] * N_THREADS
    barrier = threading.Barrier(N_THREADS)
    finished = [_thread.allocate_lock() for _ in range(N_THREADS)]

    def worker(t: int) -> None:
        try:
            own = blocks[t]
            total = 0
            for i in range(BLOCKS_PER_THREAD):
                p = libc_malloc(block_size(t, i))
                if not p:
                    raise MemoryError(f"malloc({block_size(t, i)}) failed in thread {t}")
                own[i] = p
                total += malloc_usable_size(p)
            usable[t] = total
            barrier.wait()
            if t == 0:
                read_host_live_into(mid_readings, round_index)
            barrier.wait()
            theirs = blocks[(t + 1) % N_THREADS]
            for i in range(BLOCKS_PER_THREAD):
                libc_free(theirs[i])
                theirs[i] = 0
        except BaseException as e:  # reported by the main thread
            errors.append(f"thread {t}: {e!r}")
            barrier.abort()
        finally:
            finished[t].release()

    for t in range(N_THREADS):
        finished[t].acquire()
        _thread.start_new_thread(worker, (t,))
    for t in range(N_THREADS):
        finished[t].acquire()
    # The next round must find these threads' stacks back in glibc's cache,
    # or it maps a new stack (and a new TLS vector) that the cache then keeps.
    wait_until_only_threads_left(THREADS_AT_START)
    return sum(usable)


def wait_until_only_threads_left(count: int) -> None:
    for _ in range(10_000):
        if len(os.listdir("/proc/self/task")) <= count:
            return
        time.sleep(0.001)
    raise AssertionError(f"expected the worker threads to exit within 10 s, {os.listdir('/proc/self/task')} live")


def quiet_reading(readings, index: int) -> None:
    wait_until_only_threads_left(THREADS_AT_START)
    gc.collect()
    read_host_live_into(readings, index)


def measure(readings, mid_readings, held_bytes, errors) -> None:
    quiet_reading(readings, 0)
    for r in range(ROUNDS):
        held_bytes[r] = one_round(mid_readings, r, errors)
    quiet_reading(readings, 1)


THREADS_AT_START = len(os.listdir("/proc/self/task"))  # main and the shim's monitor
errors: list = []
warm = (ctypes.c_uint64 * ROUNDS)()
one_round(warm, 0, errors)
one_round(warm, 1, errors)
readings = (ctypes.c_uint64 * 2)()
mid_readings = (ctypes.c_uint64 * ROUNDS)()
held_bytes = (ctypes.c_uint64 * ROUNDS)()
measure(readings, mid_readings, held_bytes, errors)
assert not errors, f"expected every worker thread to allocate and free, got {errors}"

start, end = readings[0], readings[1]
for r in range(ROUNDS):
    assert mid_readings[r] >= start + held_bytes[r], (
        f"expected live >= start {start} + {held_bytes[r]} bytes of blocks held by the threads in round {r}, "
        f"got {mid_readings[r]}")
print(f"host live {start} before and {end} after {ROUNDS} rounds of {N_THREADS} threads "
      f"({N_THREADS * BLOCKS_PER_THREAD} blocks a round, up to {held_bytes[0] // KIB} KiB held at once)")
assert end == start, (
    f"expected host live back at {start} after threads freed each other's blocks and exited, "
    f"got {end} (difference {end - start:+d})")
print("PASS")
