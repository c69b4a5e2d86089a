"""What the process holds and how much room is left, from the shim when it is loaded.

Without the shim the answers come from /proc (RSS, MemAvailable), so a cooperating app
behaves sensibly either way; with it they are the shim's exact numbers.
"""

import collections
import gc
import os
import sys

from . import _capi

POOL_HOST = _capi.POOL_HOST


def gpu_pool(device):
    """The pool number of CUDA device `device` (pool 0 is host memory)."""
    return 1 + device


def pool_name(pool):
    return "host" if pool == POOL_HOST else f"gpu{pool - 1}"


def stats():
    """Every pool's counters, as in the dump: a list of dicts, host first.

    Keys: those of struct qvshim_pool_stats (pool, level, device, budget, effective_budget,
    reserve, reserve_in_use, live, peak, allocs, frees, refusals, largest_refused, purges,
    level_changes, notifications), plus name ("host", "gpu0", ...) and level_name.
    Raises NotLoaded when the library is not preloaded.
    """
    pools = []
    for pool in range(_capi.pool_count()):
        entry = _capi.pool_stats(pool)
        if entry is None:
            continue
        entry["name"] = pool_name(pool)
        entry["level_name"] = _capi.LEVEL_NAMES[entry["level"]]
        pools.append(entry)
    return pools


def level(pool=None):
    """"normal", "warn" or "critical": of one pool, or the highest of all pools when pool is None."""
    if pool is not None:
        value = _capi.level(pool)
        if value < 0:
            raise ValueError(f"unknown pool {pool}")
        return _capi.LEVEL_NAMES[value]
    return _capi.LEVEL_NAMES[max(_capi.level(p) for p in range(_capi.pool_count()))]


def purge():
    """Return freed heap pages to the system now; the bytes of resident memory given back."""
    return _capi.purge()


def set_budget(pool, budget_bytes):
    """Change a pool's budget at run time (None turns it off)."""
    value = _capi.UNLIMITED if budget_bytes is None else int(budget_bytes)
    if _capi.set_budget(pool, value) != 0:
        raise ValueError(f"unknown pool {pool}")


def _meminfo_bytes(field):
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return None


def rss_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def in_use():
    """{pool name: bytes held}: the shim's live bytes per pool, or {"rss": RSS} without it."""
    if not _capi.is_loaded():
        return {"rss": rss_bytes()}
    return {entry["name"]: entry["live"] for entry in stats()}


Room = collections.namedtuple("Room", "free limit held")


def headroom(pool, margin):
    """Bytes that can still be taken from pool while keeping margin (a fraction of the budget) free.

    None when there is no limit to check against: the budget is off, or the pool does not exist
    yet (a GPU the process has not touched). Without the shim, host room is MemAvailable.
    Returns Room(free, limit, held) so a refusal can name all three.
    """
    if not _capi.is_loaded():
        if pool != POOL_HOST:
            return None
        available = _meminfo_bytes("MemAvailable")
        total = _meminfo_bytes("MemTotal")
        if available is None or total is None:
            return None
        return Room(available - int(total * margin), total, rss_bytes())
    entry = _capi.pool_stats(pool)
    if entry is None or entry["effective_budget"] == _capi.UNLIMITED:
        return None
    limit = entry["effective_budget"]
    held = entry["live"] + entry["reserve_in_use"]
    return Room(int(limit * (1 - margin)) - held, limit, held)


def release_memory():
    """Collect garbage, empty torch's CUDA cache when torch uses CUDA, and purge the heap."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None:
        cuda = getattr(torch, "cuda", None)
        if cuda is not None and cuda.is_initialized():
            cuda.empty_cache()
    if _capi.is_loaded():
        _capi.purge()
