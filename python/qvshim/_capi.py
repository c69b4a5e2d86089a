"""The C API of a preloaded libqvshim.so (include/qvshim.h), through ctypes.

The library is looked up in the process's global symbol table, never loaded from here:
loading it with dlopen would give a second, empty ledger that governs nothing. A process
that was started without the shim gets NotLoaded with the command that fixes it.
"""

import ctypes

API_VERSION = 1
POOL_HOST = 0
UNLIMITED = 2**64 - 1
LEVEL_NAMES = ("normal", "warn", "critical")


class NotLoaded(RuntimeError):
    """libqvshim.so is not preloaded in this process."""

    def __init__(self):
        super().__init__(
            "libqvshim.so is not preloaded in this process: start the program with "
            "`python -m qvshim run script.py` (or LD_PRELOAD=/path/to/libqvshim.so)"
        )


class _PoolStats(ctypes.Structure):
    """struct qvshim_pool_stats, field for field."""

    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("pool", ctypes.c_int32),
        ("level", ctypes.c_int32),
        ("device", ctypes.c_int32),
        ("budget", ctypes.c_uint64),
        ("effective_budget", ctypes.c_uint64),
        ("reserve", ctypes.c_uint64),
        ("reserve_in_use", ctypes.c_uint64),
        ("live", ctypes.c_uint64),
        ("peak", ctypes.c_uint64),
        ("allocs", ctypes.c_uint64),
        ("frees", ctypes.c_uint64),
        ("refusals", ctypes.c_uint64),
        ("largest_refused", ctypes.c_uint64),
        ("purges", ctypes.c_uint64),
        ("level_changes", ctypes.c_uint64),
        ("notifications", ctypes.c_uint64),
    ]


# The one Python definition of the struct: shim-tests/py/shimstats.py and scripts/gpu-check load
# this file rather than repeat it; shim-tests/abi/test_abi.py checks it against the C header.
PoolStats = _PoolStats

STATS_FIELDS = tuple(name for name, _ in _PoolStats._fields_ if name != "struct_size")

# (name, restype, argtypes) of every function this package calls.
_SIGNATURES = (
    ("qvshim_api_version", ctypes.c_int, ()),
    ("qvshim_pool_count", ctypes.c_int, ()),
    ("qvshim_pool_stats", ctypes.c_int, (ctypes.c_int, ctypes.POINTER(_PoolStats))),
    ("qvshim_level", ctypes.c_int, (ctypes.c_int,)),
    ("qvshim_set_budget", ctypes.c_int, (ctypes.c_int, ctypes.c_uint64)),
    ("qvshim_purge", ctypes.c_uint64, ()),
    ("qvshim_dump", ctypes.c_int, (ctypes.c_int, ctypes.c_int)),
)

_functions = None


def _lookup():
    """The library's functions by name, or None when it is not in this process."""
    global _functions
    if _functions is None:
        process = ctypes.CDLL(None)
        if not hasattr(process, "qvshim_api_version"):
            return None
        table = {}
        for name, restype, argtypes in _SIGNATURES:
            function = getattr(process, name, None)
            if function is not None:  # an older library may lack a newer function
                function.restype = restype
                function.argtypes = argtypes
                table[name] = function
        _functions = table
    return _functions


def is_loaded():
    return _lookup() is not None


def _call(name, *args):
    functions = _lookup()
    if functions is None:
        raise NotLoaded()
    function = functions.get(name)
    if function is None:
        raise NotImplementedError(f"the loaded libqvshim.so has no {name}()")
    return function(*args)


def api_version():
    return _call("qvshim_api_version")


def pool_count():
    return _call("qvshim_pool_count")


def pool_stats(pool):
    """One pool's counters as a dict keyed like the C struct, or None for an unknown pool."""
    out = _PoolStats()
    out.struct_size = ctypes.sizeof(_PoolStats)
    if _call("qvshim_pool_stats", pool, ctypes.byref(out)) != 0:
        return None
    return {name: getattr(out, name) for name in STATS_FIELDS}


def level(pool):
    return _call("qvshim_level", pool)


def set_budget(pool, budget_bytes):
    return _call("qvshim_set_budget", pool, budget_bytes)


def purge():
    return _call("qvshim_purge")


def dump(fd, json):
    return _call("qvshim_dump", fd, 1 if json else 0)

