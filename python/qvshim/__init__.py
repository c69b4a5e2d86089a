"""qvshim's Python companion: talk to the preloaded libqvshim.so and cooperate with its budget.

    import qvshim
    qvshim.stats()                       # the pools, as in the dump
    qvshim.events.recent()               # loads, unloads and refusals, as lines for people
    qvshim.on_pressure(lambda level, pool: cache.clear(), level="warn")
    models = qvshim.ModelManager(keep_alive=300)
    with models.use("tts", load_tts, path="/models/tts") as tts: ...
    with qvshim.WavWriter("out.wav") as wav: wav.write(samples)

Run a program under the shim with `python -m qvshim run script.py` (or the `qvshim` command).
Standard library only; numpy and torch are used when the app passes their objects.
"""

from . import events
from ._capi import NotLoaded, is_loaded
from .batch import BatchSummary, generate_batches
from .memory import POOL_HOST, gpu_pool, headroom, in_use, level, purge, release_memory, set_budget, stats
from .models import ModelDoesNotFit, ModelInUse, ModelManager, weights_size
from .pressure import on_pressure, remove_pressure_callback
from .pressure import dispatch as _on_pressure  # called by the library's relief, in the main thread
from .wav import WavWriter, concat_wavs

__version__ = "0.1.0"

__all__ = [
    "BatchSummary",
    "ModelDoesNotFit",
    "ModelInUse",
    "ModelManager",
    "NotLoaded",
    "POOL_HOST",
    "WavWriter",
    "concat_wavs",
    "events",
    "generate_batches",
    "gpu_pool",
    "headroom",
    "in_use",
    "is_loaded",
    "level",
    "on_pressure",
    "purge",
    "release_memory",
    "remove_pressure_callback",
    "set_budget",
    "stats",
    "weights_size",
]
