"""qvshim.events: a bounded, thread-safe feed of what the companion did, and what records into it."""

import threading
import time

import pytest

import qvshim
from qvshim import _capi, events

from fakememory import FakeModel

WAIT_S = 10  # generous bound for the idle timer; the tests never assert speed


@pytest.fixture(autouse=True)
def empty_feed():
    events.clear()
    yield
    events.clear()


def messages(kind=None):
    return [event.message for event in events.recent() if kind is None or event.kind == kind]


def test_feed_keeps_the_newest_max_events():
    first = events.record("load", "first").seq
    for n in range(events.MAX_EVENTS + 4):
        events.record("load", f"line {n}")
    kept = events.recent()
    assert len(kept) == events.MAX_EVENTS, f"the feed must hold at most {events.MAX_EVENTS}, holds {len(kept)}"
    assert kept[0].seq == first + 5 and kept[-1].message == f"line {events.MAX_EVENTS + 3}"


def test_recent_after_a_seq_gives_only_newer_events():
    seen = events.record("unload", "a").seq
    events.record("unload", "b")
    assert [event.message for event in events.recent(after=seen)] == ["b"]
    assert events.recent(after=seen + 1) == []


def test_records_from_many_threads_get_distinct_contiguous_seqs():
    threads_n, each_n = 4, 40  # 160 < MAX_EVENTS: every one is kept
    start = threading.Barrier(threads_n)

    def work(name):
        start.wait()
        for n in range(each_n):
            events.record("load", f"{name} {n}")

    threads = [threading.Thread(target=work, args=(f"t{i}",)) for i in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seqs = [event.seq for event in events.recent()]
    assert seqs == list(range(seqs[0], seqs[0] + threads_n * each_n)), "seqs must be unique, ordered, no gaps"


def test_record_inside_record_in_one_thread_does_not_deadlock(monkeypatch):
    # Relief runs in the main thread between bytecodes: an unload may record while record() runs.
    nested = []
    real_time = time.time

    def time_that_records():
        if not nested:
            nested.append(True)  # before recording, so the nested record's own time() does not recurse
            events.record("unload", "from relief")
        return real_time()

    monkeypatch.setattr(events.time, "time", time_that_records)
    worker = threading.Thread(target=events.record, args=("load", "outer"), daemon=True)
    worker.start()
    worker.join(WAIT_S)
    assert not worker.is_alive(), "record() inside record() in one thread deadlocked (a non-re-entrant lock?)"
    assert sorted(messages()) == ["from relief", "outer"]




def test_model_manager_records_load_idle_unload_and_refusal(fake):
    with qvshim.ModelManager(keep_alive=0.2, margin=0) as models:
        models.get("vd", lambda: FakeModel(fake, 300), size=300)
        deadline = time.monotonic() + WAIT_S
        while models.loaded() and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(qvshim.ModelDoesNotFit):
            models.get("huge", lambda: FakeModel(fake, 2000), size=2000)
    assert messages("load") and messages("load")[0].startswith("model 'vd' loaded in "), messages()
    assert "host +300 B" in messages("load")[0], messages()
    assert messages("unload") == ["model 'vd' unloaded, after 0.2 s idle: host -300 B"], messages()
    assert len(messages("refusal")) == 1 and "cannot load model 'huge'" in messages("refusal")[0], messages()


def test_batch_records_splits_and_the_line_that_does_not_fit(tmp_path):
    def generate(batch):
        if "big" in batch or len(batch) > 2:
            raise MemoryError("no room")
        return [b"\0\0" * 10 for _ in batch]

    with pytest.raises(MemoryError):
        qvshim.generate_batches(["a", "b", "c", "big"], generate, tmp_path, batch_size=4)
    assert messages("split") == ["lines 1-4 could not fit together: retried as 2 and 2",
                                 "lines 3-4 could not fit together: retried as 1 and 1"], messages()
    assert messages("line") == ["line 4 could not fit: no room"], messages()


def pool(refusals=0, level_name="normal", live=100, largest_refused=0, name="host"):
    return {"name": name, "refusals": refusals, "level_name": level_name, "live": live,
            "largest_refused": largest_refused}


@pytest.mark.parametrize(
    "before, after, expected",
    [
        ([pool()], [pool()], []),
        ([pool(refusals=1)], [pool(refusals=3, largest_refused=2048)],
         [("shim", "host: the shim refused 2 allocations (largest refused so far 2.0 KiB)")]),
        ([pool(refusals=1)], [pool(refusals=2, largest_refused=10)],
         [("shim", "host: the shim refused 1 allocation (largest refused so far 10 B)")]),
        ([pool()], [pool(level_name="critical", live=1 << 20)],
         [("level", "host: pressure normal -> critical (1.0 MiB live)")]),
        ([pool()], [pool(), pool(name="gpu0", refusals=5)], []),  # a new pool: its first look is the baseline
    ],
)
def test_stats_watcher_turns_changes_into_lines(before, after, expected):
    reads = iter([before, after])
    watcher = events.StatsWatcher(read_stats=lambda: next(reads))
    assert watcher.poll() == before
    assert watcher.poll() == after
    assert [(event.kind, event.message) for event in events.recent()] == expected


def test_stats_watcher_without_the_library_returns_none():
    def not_loaded():
        raise _capi.NotLoaded()

    assert events.StatsWatcher(read_stats=not_loaded).poll() is None
