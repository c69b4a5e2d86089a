"""ModelManager against a fake memory: lazy loads, idle timer, use() protection, LRU eviction,
clear refusals, critical pressure, logging. The real budget is in test_live.py."""

import gc
import logging
import threading
import time

import pytest

import qvshim
from qvshim import models
from qvshim._log import GIB, MIB

from fakememory import FakeModel

WAIT_S = 10  # generous bound for background events; the tests never assert speed




@pytest.fixture
def manager():
    managers = []

    def make(**kwargs):
        kwargs.setdefault("margin", 0)
        made = qvshim.ModelManager(**kwargs)
        managers.append(made)
        return made

    yield make
    for made in managers:
        made.close()


def loader(fake, size, calls=None):
    def load():
        if calls is not None:
            calls.append(size)
        return FakeModel(fake, size)
    return load


def wait_until(condition):
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_get_loads_once_and_returns_the_same_model(fake, manager):
    models_ = manager()
    calls = []
    first = models_.get("tts", loader(fake, 100, calls), size=100)
    assert models_.get("tts", loader(fake, 100, calls), size=100) is first
    assert calls == [100] and models_.loaded() == ["tts"]


def test_default_keep_alive_is_five_minutes():
    assert models.DEFAULT_KEEP_ALIVE_S == 300
    made = qvshim.ModelManager()
    assert made.keep_alive == 300
    made.close()


def test_idle_model_is_unloaded_by_the_timer_and_its_memory_returns(fake, manager):
    models_ = manager(keep_alive=0.2)
    models_.get("tts", loader(fake, 300), size=300)
    assert fake.held == 300
    assert wait_until(lambda: models_.loaded() == []), "the idle model was never unloaded"
    assert fake.held == 0


def test_model_idle_for_less_than_keep_alive_stays_loaded(fake, manager):
    models_ = manager(keep_alive=60)
    models_.get("tts", loader(fake, 300), size=300)
    with models_.use("vd", loader(fake, 200), size=200):
        pass
    # The timer looks at once when a model loads and again when a use ends; neither is old enough.
    time.sleep(0.5)
    assert models_.loaded() == ["tts", "vd"], f"models idle for 0.5 s of keep_alive 60 s left: {models_.loaded()}"
    assert fake.held == 500


def test_model_in_a_use_block_is_never_unloaded(fake, manager):
    models_ = manager(keep_alive=0.05)
    with models_.use("tts", loader(fake, 300), size=300) as model:
        time.sleep(0.5)  # ten keep_alives
        assert models_.loaded() == ["tts"] and model.size == 300
        with pytest.raises(qvshim.ModelInUse):
            models_.unload("tts")
        assert models_.unload_idle() == []
    assert wait_until(lambda: models_.loaded() == []), "unloaded once the block ended"


def test_keep_alive_none_keeps_models(fake, manager):
    models_ = manager(keep_alive=None)
    models_.get("tts", loader(fake, 10), size=10)
    time.sleep(0.3)
    assert models_.loaded() == ["tts"]


def test_eviction_makes_room_least_recently_used_first(fake, manager):
    models_ = manager(keep_alive=None)
    models_.get("a", loader(fake, 400), size=400)
    models_.get("b", loader(fake, 400), size=400)
    models_.get("a", loader(fake, 400), size=400)  # a is now the most recent
    models_.get("c", loader(fake, 400), size=400)
    assert models_.loaded() == ["a", "c"]
    assert fake.held == 800


def test_no_eviction_when_the_model_fits(fake, manager):
    models_ = manager(keep_alive=None)
    models_.get("a", loader(fake, 300), size=300)
    models_.get("b", loader(fake, 300), size=300)
    assert models_.loaded() == ["a", "b"]


def test_margin_is_kept_free(fake, manager):
    models_ = manager(keep_alive=None, margin=0.5)
    models_.get("a", loader(fake, 300), size=300)
    models_.get("b", loader(fake, 300), size=300)  # 600 > 1000 * 0.5: a must go
    assert models_.loaded() == ["b"]


def test_load_that_cannot_fit_fails_naming_the_sizes_and_the_models_in_use(fake, manager):
    models_ = manager(keep_alive=None)
    calls = []
    models_.get("idle", loader(fake, 100), size=100)
    with models_.use("a", loader(fake, 600), size=600):
        with pytest.raises(qvshim.ModelDoesNotFit) as refused:
            models_.get("b", loader(fake, 500, calls), size=500)
    message = str(refused.value)
    assert "'b'" in message and "needs 500 B" in message and "only 300 B is free" in message
    assert "700 B held of 1000 B" in message and "models loaded: idle (100 B, idle), a (600 B, in use)" in message
    assert models_.loaded() == ["idle", "a"], "a load that cannot fit even after eviction evicts nothing"
    assert calls == [], "the loader must not run when the model cannot fit"
    assert isinstance(refused.value, MemoryError)


def test_model_larger_than_the_whole_budget_fails_with_nothing_loaded(fake, manager):
    models_ = manager(keep_alive=None)
    with pytest.raises(qvshim.ModelDoesNotFit, match="needs 2.0 KiB.*no other model is loaded"):
        models_.get("huge", loader(fake, 2000), size=2000)


def test_size_is_read_from_the_weight_files(fake, manager, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(bytes(700))
    (tmp_path / "speech_tokenizer").mkdir()
    (tmp_path / "speech_tokenizer" / "model.safetensors").write_bytes(bytes(200))
    (tmp_path / "config.json").write_bytes(bytes(5000))  # not weights
    assert qvshim.weights_size(tmp_path) == 900
    assert qvshim.weights_size(tmp_path / "model.safetensors") == 700
    models_ = manager(keep_alive=None)
    models_.get("small", loader(fake, 200), size=200)
    with pytest.raises(qvshim.ModelDoesNotFit, match="needs 900 B"):
        with models_.use("small", loader(fake, 200), size=200):
            models_.get("big", loader(fake, 900), path=tmp_path)


def test_directory_without_weights_is_an_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no weight files"):
        qvshim.weights_size(tmp_path)


def test_critical_pressure_unloads_idle_models_but_not_those_in_use(fake, manager):
    models_ = manager(keep_alive=None)
    models_.get("idle", loader(fake, 100), size=100)
    with models_.use("busy", loader(fake, 200), size=200):
        qvshim._on_pressure("warn", 0)
        assert models_.loaded() == ["idle", "busy"]
        qvshim._on_pressure("critical", 0)
        assert models_.loaded() == ["busy"]
    assert fake.held == 200


def test_pressure_during_a_load_is_deferred_to_the_timer_thread(fake, manager):
    models_ = manager(keep_alive=None)
    models_.get("idle", loader(fake, 100), size=100)
    seen_during_load = []

    def load_with_pressure():
        qvshim._on_pressure("critical", 0)  # as the library would, between two bytecodes
        seen_during_load.append(models_._models.copy())
        return FakeModel(fake, 50)

    models_.get("new", load_with_pressure, size=50)
    assert list(seen_during_load[0]) == ["idle"], "relief must not change the table under the loader"
    assert wait_until(lambda: models_.loaded() == []), "deferred relief never ran"


def test_closed_manager_stops_answering_pressure(fake):
    models_ = qvshim.ModelManager(keep_alive=None)
    models_.close()
    assert all(callback is not models_._pressure_callback for callback, _ in qvshim.pressure._registrations)
    with pytest.raises(RuntimeError, match=r"^this ModelManager is closed$"):
        models_.get("a", loader(fake, 1), size=1)


def test_dropped_manager_is_collected_with_its_timer(fake):
    made = qvshim.ModelManager(keep_alive=60)
    made.get("a", loader(fake, 100), size=100)
    timer = made._timer
    del made
    gc.collect()
    assert wait_until(lambda: fake.held == 0), "the dropped manager's models were never freed"
    assert wait_until(lambda: not timer.is_alive()), "the timer thread outlived its manager"


def test_two_threads_loading_at_once_each_load_once(fake, manager):
    models_ = manager(keep_alive=None)
    calls = []
    barrier = threading.Barrier(4)

    def worker():
        barrier.wait()
        models_.get("shared", loader(fake, 10, calls), size=10)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == [10]


def test_loads_and_unloads_are_logged_with_the_memory_moved(fake, manager):
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("qvshim")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    fake.budget = 10 * 1024 * 1024
    try:
        models_ = manager(keep_alive=None)
        models_.get("tts", loader(fake, 3 * 1024 * 1024), size=3 * 1024 * 1024)
        models_.unload("tts")
        models_.get("a", loader(fake, 1024 * 1024), size=1024 * 1024)
        models_.get("b", loader(fake, 2 * 1024 * 1024), size=2 * 1024 * 1024)
        models_.unload_idle()
        models_.get("c", loader(fake, 1024 * 1024), size=1024 * 1024)
        with models_.use("d", loader(fake, 2 * 1024 * 1024), size=2 * 1024 * 1024):
            models_.close()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert records[0].startswith("loaded model 'tts' in ") and "host +3.0 MiB (expected 3.0 MiB)" in records[0]
    assert records[1] == "unloaded model 'tts' (asked): host -3.0 MiB"
    # Two at once: one line, the plural, both names.
    assert records[4] == "unloaded models 'a', 'b' (asked): host -3.0 MiB", records[4]
    # close() unloads the idle model at once, the one in use when its block ends; both say why.
    assert records[7:] == ["unloaded model 'c' (closing): host -1.0 MiB",
                           "unloaded model 'd' (closing): host -2.0 MiB"], records


BAD_SETTING_ROWS = [
    # (settings, the message that names what is allowed)
    ({"keep_alive": -1}, "keep_alive must be >= 0 seconds, or None for never"),
    ({"margin": 1.0}, "margin must be a fraction in [0, 1)"),
    ({"margin": -0.1}, "margin must be a fraction in [0, 1)"),
]


@pytest.mark.parametrize("kwargs,message", BAD_SETTING_ROWS, ids=[str(r[0]) for r in BAD_SETTING_ROWS])
def test_bad_settings_are_refused_with_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError) as refused:
        qvshim.ModelManager(**kwargs)
    assert str(refused.value) == message, f"expected {message!r}, got {str(refused.value)!r}"


def test_model_in_use_when_the_manager_closes_leaves_when_its_block_ends(fake):
    models_ = qvshim.ModelManager(keep_alive=None)
    with models_.use("busy", loader(fake, 100), size=100):
        models_.get("idle", loader(fake, 10), size=10)
        models_.close()
        assert models_.loaded() == ["busy"]
    assert models_.loaded() == [] and fake.held == 0


MOVED_ROWS = [
    # (in use before, in use after, the text of a load or unload line)
    ({"host": 0}, {"host": 312 * MIB}, "host +312.0 MiB"),
    ({"host": 2 * GIB}, {"host": GIB}, "host -1.00 GiB"),
    ({"host": 5}, {"host": 5}, "host +0 B"),
    ({"host": 1}, {}, "host -1 B"),  # a pool gone from the figures counts as 0
    ({}, {"gpu0": 1}, "gpu0 +1 B"),
    ({}, {"gpu0": 0}, "gpu0 +0 B"),  # a new pool is counted from 0 too
    ({"host": MIB, "gpu0": 0}, {"host": 0, "gpu0": GIB}, "gpu0 +1.00 GiB, host -1.0 MiB"),
]


@pytest.mark.parametrize("before,after,text", MOVED_ROWS, ids=[r[2] for r in MOVED_ROWS])
def test_moved_text_names_each_pool_with_its_signed_change(before, after, text):
    assert models._moved_text(before, after) == text, (
        f"expected {text!r} for {before} -> {after}, got {models._moved_text(before, after)!r}")
