"""ctypes view of libqvshim.so for the Python programs in this folder.

Everything is looked up once at import, and host_live() reads into a
preallocated struct, so a reading allocates nothing that is still alive when
the next reading is taken.
"""

import ctypes
import importlib.util
import sys
from pathlib import Path

KIB = 1024
MIB = 1024 * KIB


def _load_capi(path):
    """python/qvshim/_capi.py loaded on its own (it needs only ctypes), without importing the
    qvshim package: its one definition of struct qvshim_pool_stats."""
    spec = importlib.util.spec_from_file_location("_qvshim_capi", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PoolStats = _load_capi(Path(__file__).resolve().parents[2] / "python" / "qvshim" / "_capi.py").PoolStats


_process = ctypes.CDLL(None)
try:
    _pool_stats = _process.qvshim_pool_stats
except AttributeError:
    sys.exit("expected libqvshim.so preloaded: qvshim_pool_stats not found in the process")
_pool_stats.argtypes = [ctypes.c_int, ctypes.POINTER(PoolStats)]
_pool_stats.restype = ctypes.c_int

_reading = PoolStats()
_reading.struct_size = ctypes.sizeof(PoolStats)
_reading_ref = ctypes.byref(_reading)

# The process's malloc and free: the shim's, first in the global scope.
libc_malloc = _process.malloc
libc_malloc.argtypes = [ctypes.c_size_t]
libc_malloc.restype = ctypes.c_void_p
libc_free = _process.free
libc_free.argtypes = [ctypes.c_void_p]
libc_free.restype = None
malloc_usable_size = _process.malloc_usable_size
malloc_usable_size.argtypes = [ctypes.c_void_p]
malloc_usable_size.restype = ctypes.c_size_t


def pool_stats(pool: int) -> PoolStats:
    """A fresh copy of one pool's stats (0: the host, 1 + N: GPU N)."""
    out = PoolStats()
    out.struct_size = ctypes.sizeof(PoolStats)
    rc = _pool_stats(pool, ctypes.byref(out))
    assert rc == 0, f"expected qvshim_pool_stats({pool}) to return 0, got {rc}"
    return out


def host_stats() -> PoolStats:
    """A fresh copy of the host pool's stats."""
    return pool_stats(0)


def read_host_live_into(array, index: int) -> None:
    """Stores host live in array[index] (a ctypes c_uint64 array) without
    keeping any new Python object alive."""
    _pool_stats(0, _reading_ref)
    array[index] = _reading.live


def host_live() -> int:
    _pool_stats(0, _reading_ref)
    return _reading.live


def vmhwm_bytes() -> int:
    """The process's peak resident set (VmHWM of /proc/self/status)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * KIB
    raise AssertionError("expected a VmHWM line in /proc/self/status")
