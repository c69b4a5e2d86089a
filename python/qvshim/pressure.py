"""Python-side callbacks for the shim's relief.

On each level rise the library schedules, in the main thread, gc.collect() (and at critical
torch's cache release), then calls qvshim._on_pressure(level_name, pool). This module keeps the
registrations and dispatches to every callback whose level the new level has reached. One
callback's exception is reported and the others still run: relief must not stop half-way.
"""

import sys
import threading
import traceback

LEVELS = {"warn": 1, "critical": 2}

_lock = threading.Lock()
_registrations = []  # (callback, level rank), in registration order


def _rank(level):
    try:
        return LEVELS[level]
    except KeyError:
        raise ValueError(f"level must be 'warn' or 'critical', not {level!r}") from None


def on_pressure(callback=None, level="critical"):
    """Call callback(level_name, pool) in the main thread when a pool reaches level.

    level is "warn" (70% of the budget by default) or "critical" (90%). Usable as a
    decorator, with or without arguments. Returns the callback.
    """
    rank = _rank(level)
    if callback is None:
        return lambda function: on_pressure(function, level)
    if not callable(callback):
        raise TypeError(f"callback must be callable, not {type(callback).__name__}")
    with _lock:
        _registrations.append((callback, rank))
    return callback


def remove_pressure_callback(callback):
    """Forget every registration of callback. Returns True when there was one."""
    with _lock:
        kept = [entry for entry in _registrations if entry[0] is not callback]
        removed = len(kept) != len(_registrations)
        _registrations[:] = kept
    return removed


def dispatch(level_name, pool):
    """Run the callbacks registered at or below level_name; return how many ran."""
    rank = LEVELS.get(level_name)
    if rank is None:
        return 0
    with _lock:
        due = [callback for callback, wanted in _registrations if wanted <= rank]
    for callback in due:
        try:
            callback(level_name, pool)
        except Exception:
            print(f"[qvshim] on_pressure callback {callback!r} failed:", file=sys.stderr)
            traceback.print_exc()
    return len(due)
