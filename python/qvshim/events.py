"""What the companion did about memory, as lines a person can read: loads, unloads, refusals.

A bounded feed (the newest MAX_EVENTS are kept) that a UI polls with recent(after=seq) to show
each line once. ModelManager and generate_batches record into it; StatsWatcher turns changes in
qvshim.stats() (a refusal by the shim, a pressure level crossed) into lines too.

The lock is re-entrant on purpose: relief from the shim runs in the main thread between any two
bytecodes, so an unload it causes may record an event while the same thread is inside record().
"""

import collections
import threading
import time

from . import _capi, memory
from ._log import size_text

MAX_EVENTS = 200  # lines kept; the oldest leave first, so a long-running app holds a bounded feed

Event = collections.namedtuple("Event", "seq time kind message")
Event.__doc__ = """One line of the feed: seq (1, 2, ...), time (time.time()), kind, message.

kind: "load", "unload", "refusal" (the companion refused a load), "split" (a batch retried in
halves), "line" (one line did not fit), "shim" (the shim refused allocations), "level"."""

_lock = threading.RLock()
_events = collections.deque(maxlen=MAX_EVENTS)
_last_seq = 0


def record(kind, message):
    """Add one line to the feed; returns its Event."""
    global _last_seq
    with _lock:
        _last_seq += 1
        event = Event(_last_seq, time.time(), kind, message)
        _events.append(event)
    return event


def recent(after=0):
    """The events kept with seq > after, oldest first."""
    with _lock:
        return [event for event in _events if event.seq > after]


def clear():
    """Forget every event (the sequence numbers keep counting up)."""
    with _lock:
        _events.clear()


class StatsWatcher:
    """Polls qvshim.stats() and records a line when a pool's refusals grow or its level changes.

    poll() returns the pools it read (as stats() gives them), or None when the library is not
    loaded. Safe to call from several threads (a UI timer per browser tab, say).
    """

    def __init__(self, read_stats=None):
        self._read = read_stats or memory.stats
        self._lock = threading.Lock()
        self._seen = {}  # pool name -> (refusals, level_name), from the previous poll

    def poll(self):
        try:
            pools = self._read()
        except _capi.NotLoaded:
            return None
        with self._lock:
            for entry in pools:
                name = entry["name"]
                refusals, level_name = entry["refusals"], entry["level_name"]
                seen = self._seen.get(name)
                self._seen[name] = (refusals, level_name)
                if seen is None:
                    continue  # the first look only sets the baseline
                if refusals > seen[0]:
                    count = refusals - seen[0]
                    record("shim", f"{name}: the shim refused {count} allocation{'s' if count > 1 else ''} "
                                   f"(largest refused so far {size_text(entry['largest_refused'])})")
                if level_name != seen[1]:
                    record("level", f"{name}: pressure {seen[1]} -> {level_name} "
                                    f"({size_text(entry['live'])} live)")
        return pools
