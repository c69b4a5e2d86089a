"""Ray workers (Ray Serve replicas, actors, tasks) under libqvshim.so, with budgets from their resources.

    from qvshim.ray import runtime_env
    REPLICA_MEMORY_BYTES = 2 << 30
    @serve.deployment(num_replicas=2, ray_actor_options={
        "memory": REPLICA_MEMORY_BYTES, "num_gpus": 0.5,
        "runtime_env": runtime_env(memory=REPLICA_MEMORY_BYTES, gpu_fraction=0.5)})

Ray's `memory` and `num_gpus` only schedule; nothing in Ray holds a replica to them. The
runtime_env built here makes each worker process start with the library preloaded and a budget
of its own: QVSHIM_BUDGET is the replica's `memory`, QVSHIM_GPU_BUDGET its fraction as a
percentage of each device the worker is given (Ray sets CUDA_VISIBLE_DEVICES to those devices,
and the library reads each one's size from the driver in the worker itself).

Why `env_vars` is enough (Ray 2.60; docs/RAY.md has the details): a worker whose runtime_env
is not empty is started by the raylet as `python setup_worker.py default_worker.py ...`, and
setup_worker.py puts the runtime_env's env_vars into its own environment and then execs
`bash -c "exec python default_worker.py ..."`. So LD_PRELOAD is in place when the worker's
interpreter is exec'ed, before any of its code runs, which is what the library needs.

This module does not import Ray: building the dict needs nothing but the standard library.
"""

import math
import numbers
import os

from . import launcher

MIB = 1024 * 1024
# The library's smallest budget (docs/CONFIGURATION.md): a smaller `memory` could not be honoured.
MIN_BUDGET_BYTES = 16 * MIB
# Ray takes fractional GPUs only below one device; above it, whole devices.
WHOLE_DEVICE_FRACTION = 1.0
# setup_worker.py expands ${NAME} in env_vars from the raylet's environment, so a preload the
# cluster already uses stays after ours; when there is none the expansion leaves an empty
# entry, which the dynamic loader skips.
_PRELOAD_KEEP_EXISTING = ":${LD_PRELOAD}"
# What this module sets itself; `env_vars` may add other QVSHIM_* settings but not these.
_OWN_VARIABLES = ("LD_PRELOAD", "QVSHIM_BUDGET", "QVSHIM_GPU_BUDGET")


def host_budget(memory):
    """QVSHIM_BUDGET for a worker whose Ray `memory` is `memory` bytes."""
    if isinstance(memory, bool) or not isinstance(memory, numbers.Real) or not math.isfinite(memory):
        raise ValueError(f"memory={memory!r}: give the replica's memory in bytes, as Ray's `memory` option takes it")
    if memory < MIN_BUDGET_BYTES:
        raise ValueError(
            f"memory={memory!r} bytes is below qvshim's smallest budget of {MIN_BUDGET_BYTES} bytes (16 MiB)"
        )
    return str(int(memory))


def gpu_budget(gpu_fraction):
    """QVSHIM_GPU_BUDGET for a worker given `gpu_fraction` of a GPU (Ray's `num_gpus`), or None for none."""
    if gpu_fraction is None or (not isinstance(gpu_fraction, bool) and gpu_fraction == 0):
        return None
    if isinstance(gpu_fraction, bool) or not isinstance(gpu_fraction, numbers.Real) or not math.isfinite(gpu_fraction):
        raise ValueError(f"gpu_fraction={gpu_fraction!r}: give the replica's num_gpus, e.g. 0.5")
    if gpu_fraction < 0:
        raise ValueError(f"gpu_fraction={gpu_fraction!r} is negative")
    if gpu_fraction > WHOLE_DEVICE_FRACTION:
        if gpu_fraction != int(gpu_fraction):
            raise ValueError(
                f"gpu_fraction={gpu_fraction!r}: above 1 Ray gives whole devices, so it must be a whole number"
            )
        # Each of the devices the worker is given is its own, whole.
        return "100%"
    # Each device's own size is read in the worker (the library asks the driver), so a fraction
    # means the same on a 24 GiB card and an 80 GiB one.
    return f"{gpu_fraction * 100:.6g}%"


def _checked_library(library):
    path = os.path.abspath(library) if library else launcher.find_library()
    # The dynamic loader splits LD_PRELOAD on spaces and colons.
    if any(c in path for c in " \t:"):
        raise ValueError(
            f"the library path {path!r} contains a space or colon, which LD_PRELOAD cannot carry; "
            "copy or link it elsewhere and pass library="
        )
    return path


def runtime_env(memory, gpu_fraction=None, *, library=None, env_vars=None, base=None):
    """The runtime_env that starts a Ray worker under libqvshim.so with a budget from its resources.

    memory: the replica's Ray `memory` in bytes; it becomes the worker's host budget.
    gpu_fraction: the replica's `num_gpus` (None or 0 for no GPU): each device it is given gets
        that fraction of the device's memory as its budget (a whole device for 1 or more).
    library: libqvshim.so's path on the worker's node (default: the one `python -m qvshim run`
        would preload here, from QVSHIM_LIBRARY, the package or the repository's build). Every
        node that may run the replica needs the library at this path.
    env_vars: more variables for the worker, e.g. {"QVSHIM_LOG_FILE": "/tmp/replica.log"}.
    base: a runtime_env to extend (pip, working_dir, ...); it is copied, never changed.

    Raises ValueError for a budget the library could not honour, a library path LD_PRELOAD cannot
    carry, or env_vars that would override what this function sets; launcher.LibraryNotFound
    when no library is found.
    """
    own = {"LD_PRELOAD": _checked_library(library) + _PRELOAD_KEEP_EXISTING, "QVSHIM_BUDGET": host_budget(memory)}
    per_device = gpu_budget(gpu_fraction)
    if per_device is not None:
        own["QVSHIM_GPU_BUDGET"] = per_device
    merged = dict(base or {})
    extra = dict(merged.get("env_vars") or {})
    extra.update(env_vars or {})
    clashes = sorted(name for name in _OWN_VARIABLES if name in extra)
    if clashes:
        raise ValueError(
            f"env_vars sets {', '.join(clashes)}, which runtime_env() derives from memory, gpu_fraction "
            "and library; pass those instead"
        )
    for name, value in extra.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise ValueError(f"env_vars[{name!r}]={value!r}: Ray takes only string names and values")
    merged["env_vars"] = {**extra, **own}
    return merged
