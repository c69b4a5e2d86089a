"""ModelManager: models load on first use, leave when idle, and never crowd out the budget.

One lock guards the table and is held while a model loads, so two threads asking for models
at once load them one after the other, each against the room the other left. The lock is not
re-entrant on purpose: relief from the shim runs in the main thread between any two bytecodes,
and when that thread is itself inside the manager, relief is handed to the timer thread
instead of changing the table under the code that is reading it. Unloading drops
the manager's reference; memory comes back once the app holds no reference of its own either,
which is why `use()` (a reference that ends with its block) is the safe way to hold a model.
"""

import collections
import contextlib
import os
import threading
import time
import weakref

from . import events, memory, pressure
from ._log import logger, size_text

DEFAULT_KEEP_ALIVE_S = 300  # five minutes, as the seed's manager and Ollama
DEFAULT_MARGIN = 0.10  # of the budget left free for the work the models do (the shim's critical is at 90%)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".npz", ".h5")


class ModelDoesNotFit(MemoryError):
    """A model's expected size exceeds the room left even with every idle model unloaded."""


class ModelInUse(RuntimeError):
    """unload() was asked for a model that a `use()` block still holds."""


def weights_size(path):
    """Bytes of the weight files in a model directory (recursively), or of one weight file."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    found = False
    for directory, _, files in os.walk(path):
        for name in files:
            if name.endswith(WEIGHT_SUFFIXES):
                total += os.path.getsize(os.path.join(directory, name))
                found = True
    if not found:
        raise ValueError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) under {path}; pass size= instead")
    return total


class _Entry:
    __slots__ = ("model", "expected", "moved", "last_used", "uses")

    def __init__(self, model, expected, moved, now):
        self.model = model
        self.expected = expected
        self.moved = moved
        self.last_used = now
        self.uses = 0


def _moved_text(before, after):
    """The pools whose holdings changed, e.g. "host +312.0 MiB, gpu0 +1.20 GiB"."""
    parts = [
        f"{name} {'+' if after.get(name, 0) >= before.get(name, 0) else ''}"
        f"{size_text(after.get(name, 0) - before.get(name, 0))}"
        for name in sorted(set(before) | set(after))
    ]
    return ", ".join(parts)


class ModelManager:
    """Loads models lazily, unloads idle ones, and checks each load against the shim's headroom.

    keep_alive: seconds a model may stay idle before a background timer unloads it (None: never).
    pool: the shim pool the models live in (qvshim.POOL_HOST, or qvshim.gpu_pool(0)).
    margin: fraction of that pool's budget a load must leave free.
    unload_at_critical: unload every idle model when the shim reports critical pressure.
    """

    def __init__(self, keep_alive=DEFAULT_KEEP_ALIVE_S, pool=memory.POOL_HOST, margin=DEFAULT_MARGIN,
                 unload_at_critical=True):
        if keep_alive is not None and keep_alive < 0:
            raise ValueError("keep_alive must be >= 0 seconds, or None for never")
        if not 0 <= margin < 1:
            raise ValueError("margin must be a fraction in [0, 1)")
        self.keep_alive = keep_alive
        self.pool = pool
        self.margin = margin
        self._lock = threading.Lock()
        self._models = collections.OrderedDict()  # name -> _Entry, least recently used first
        self._wakeup = threading.Event()
        self._relief_pending = False
        self._timer = None
        self._closed = False
        self._pressure_callback = None
        if unload_at_critical:
            self._pressure_callback = _relief_for(weakref.ref(self))
            pressure.on_pressure(self._pressure_callback, "critical")

    # -- the app's side -------------------------------------------------------------------

    def get(self, name, loader, size=None, path=None):
        """The model called name, loading it with loader() first if needed.

        size: expected bytes; else path: a model directory or file whose weights give it.
        The model counts as idle as soon as this returns; hold it with use() instead while
        working with it, or the timer may drop the manager's reference meanwhile.
        """
        with self._lock:
            entry = self._entry(name, loader, size, path)
            return entry.model

    @contextlib.contextmanager
    def use(self, name, loader, size=None, path=None):
        """`with manager.use(name, loader) as model:` the model is never unloaded inside the block."""
        with self._lock:
            entry = self._entry(name, loader, size, path)
            entry.uses += 1
        try:
            yield entry.model
        finally:
            with self._lock:
                entry.uses -= 1
                entry.last_used = time.monotonic()
                if self._closed and not entry.uses and self._models.get(name) is entry:
                    self._unload([name], "closing")
            self._wakeup.set()

    def loaded(self):
        """The names of the models loaded now, least recently used first."""
        with self._lock:
            return list(self._models)

    def unload(self, name):
        """Unload one model now. Returns False when it was not loaded; ModelInUse when in a use() block."""
        with self._lock:
            entry = self._models.get(name)
            if entry is None:
                return False
            if entry.uses:
                raise ModelInUse(f"model {name!r} is in use ({entry.uses} use() blocks)")
            self._unload([name], "asked")
            return True

    def unload_idle(self):
        """Unload every model no use() block holds. Returns their names."""
        with self._lock:
            return self._unload_idle("asked")

    def close(self):
        """Unload every idle model (one in a use() block when the block ends); stop the timer and relief."""
        self._closed = True
        if self._pressure_callback is not None:
            pressure.remove_pressure_callback(self._pressure_callback)
        self._wakeup.set()
        with self._lock:
            self._unload_idle("closing")

    def __del__(self):
        wakeup = getattr(self, "_wakeup", None)
        if wakeup is not None:
            wakeup.set()  # the timer thread finds its manager gone and ends

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # -- loading ---------------------------------------------------------------------------

    def _entry(self, name, loader, size, path):
        """The loaded entry for name, marked as just used; loads it first if needed. Lock held."""
        if self._closed:
            raise RuntimeError("this ModelManager is closed")
        entry = self._models.get(name)
        if entry is None:
            entry = self._load(name, loader, size, path)
        self._models.move_to_end(name)
        entry.last_used = time.monotonic()
        return entry

    def _load(self, name, loader, size, path):
        expected = size if size is not None else (weights_size(path) if path is not None else None)
        if expected is not None:
            self._make_room(name, expected)
        before = memory.in_use()
        started = time.monotonic()
        model = loader()
        after = memory.in_use()
        moved = sum(after.values()) - sum(before.values())
        expected_note = f" (expected {size_text(expected)})" if expected is not None else ""
        logger.info(
            "loaded model %r in %.1f s: %s%s",
            name, time.monotonic() - started, _moved_text(before, after), expected_note,
        )
        events.record("load", f"model {name!r} loaded in {time.monotonic() - started:.1f} s: "
                              f"{_moved_text(before, after)}{expected_note}")
        entry = _Entry(model, expected, moved, time.monotonic())
        self._models[name] = entry
        self._start_timer()
        return entry

    def _make_room(self, name, expected):
        """Unload idle models, least recently used first, until expected bytes fit; else refuse."""
        room = memory.headroom(self.pool, self.margin)
        idle = [other for other, entry in self._models.items() if not entry.uses]
        # Evict nothing for a load that could not fit even with every idle model gone.
        reclaimable = sum(max(self._models[other].moved, 0) for other in idle)
        if room is not None and room.free + reclaimable < expected:
            idle = []
        while room is not None and room.free < expected and idle:
            self._unload([idle.pop(0)], f"making room for {name!r}")
            room = memory.headroom(self.pool, self.margin)
        if room is None or room.free >= expected:
            return
        loaded = ", ".join(
            f"{other} ({size_text(entry.moved)}, {'in use' if entry.uses else 'idle'})"
            for other, entry in self._models.items()
        )
        refusal = ModelDoesNotFit(
            f"cannot load model {name!r}: it needs {size_text(expected)} but only "
            f"{size_text(max(room.free, 0))} is free in {memory.pool_name(self.pool)} memory "
            f"({size_text(room.held)} held of {size_text(room.limit)}, "
            f"{self.margin:.0%} kept free)"
            + (f"; models loaded: {loaded}" if loaded else "; no other model is loaded")
        )
        events.record("refusal", str(refusal))
        raise refusal

    def _unload_idle(self, reason):
        names = [name for name, entry in self._models.items() if not entry.uses]
        self._unload(names, reason)
        return names

    def _unload(self, names, reason):
        """Drop the entries named, then give their memory back and log what moved. Lock held."""
        if not names:
            return
        entries = [self._models.pop(name) for name in names]
        before = memory.in_use()
        for entry in entries:
            entry.model = None
        del entries
        memory.release_memory()
        after = memory.in_use()
        moved = _moved_text(before, after)
        logger.info("unloaded model%s %s (%s): %s",
                    "s" if len(names) > 1 else "", ", ".join(map(repr, names)), reason, moved)
        events.record("unload", f"model{'s' if len(names) > 1 else ''} {', '.join(map(repr, names))} "
                                f"unloaded, {reason}: {moved}")

    # -- the idle timer and pressure -------------------------------------------------------

    def _start_timer(self):
        # Started even with keep_alive None: deferred relief runs on it too.
        if self._timer is None:
            self._timer = threading.Thread(
                target=_timer_loop, args=(weakref.ref(self), self._wakeup),
                name="qvshim-model-timer", daemon=True,
            )
            self._timer.start()

    def _expire(self):
        """Unload models idle for keep_alive (or all idle ones after a deferred relief).

        Returns the seconds until the next model may expire, or None when none is idle.
        """
        with self._lock:
            if self._relief_pending:
                self._relief_pending = False
                self._unload_idle("critical pressure")
            if self.keep_alive is None:
                return None
            now = time.monotonic()
            expired = [
                name for name, entry in self._models.items()
                if not entry.uses and now - entry.last_used >= self.keep_alive
            ]
            self._unload(expired, f"after {self.keep_alive:g} s idle")
            waits = [entry.last_used + self.keep_alive - now
                     for entry in self._models.values() if not entry.uses]
            return max(min(waits), 0) if waits else None

    def _relieve(self):
        # Runs in the main thread, possibly in the middle of the app's own code: when any thread,
        # this one included, holds the lock, the timer thread does the unloading instead.
        if self._lock.acquire(blocking=False):
            try:
                self._unload_idle("critical pressure")
            finally:
                self._lock.release()
        else:
            self._relief_pending = True
            self._wakeup.set()


def _relief_for(manager_ref):
    def relieve(level_name, pool):
        manager = manager_ref()
        if manager is None:
            pressure.remove_pressure_callback(relieve)
        else:
            manager._relieve()

    return relieve


def _timer_loop(manager_ref, wakeup):
    """The background timer; holds the manager only weakly, so a dropped manager ends it."""
    while True:
        manager = manager_ref()
        if manager is None or manager._closed:
            return
        wakeup.clear()  # before looking, so a wake-up while looking is not lost
        timeout = manager._expire()
        del manager
        wakeup.wait(timeout)
