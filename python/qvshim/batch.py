"""Batch generation whose memory stays flat: each result goes to disk the moment it exists.

The seed's fix, made general: lines are read lazily, a batch at a time, every result is
written through WavWriter and dropped, so a million lines cost what one batch costs.
"""

import itertools
import os

from . import events, memory
from ._log import logger
from .wav import WavWriter

DEFAULT_BATCH_SIZE = 50  # the seed's batch size


class BatchSummary:
    """What generate_batches did: lines written, seconds of audio, files, MemoryErrors split around."""

    __slots__ = ("lines", "seconds", "out_dir", "combined", "splits")

    def __init__(self, out_dir, combined):
        self.lines = 0
        self.seconds = 0.0
        self.out_dir = out_dir
        self.combined = combined
        self.splits = 0

    def __repr__(self):
        return (f"BatchSummary(lines={self.lines}, seconds={self.seconds:.1f}, "
                f"out_dir={self.out_dir!r}, combined={self.combined!r}, splits={self.splits})")


def generate_batches(lines, generate, out_dir, batch_size=DEFAULT_BATCH_SIZE, sample_rate=24000,
                     name="{index:05d}.wav", combined=None, on_written=None, release_every_batch=True):
    """Run generate over lines in batches and write every result to its own WAV file at once.

    lines: any iterable of text, consumed lazily (a file object works).
    generate(batch): a list of audio for a list of lines, or (list, sample_rate) as qwen-tts
    returns it; audio is anything WavWriter.write takes.
    name: file name pattern in out_dir, formatted with index (0-based over all lines);
    None writes no file per line (then give combined).
    combined: a path; every result is also appended there, in order, as one WAV.
    on_written(index, path, seconds): called after each result is written (progress, say);
    path is None when name is None.
    When generate raises MemoryError on a batch of several lines, memory is released and the
    batch is retried in halves; a single line that still does not fit raises.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if name is None and combined is None:
        raise ValueError("with name=None, give combined: the results have to go somewhere")
    if name is not None:
        os.makedirs(out_dir, exist_ok=True)
    summary = BatchSummary(out_dir, combined)
    state = {"writer": None, "rate": sample_rate}
    iterator = iter(lines)
    try:
        while True:
            batch = list(itertools.islice(iterator, batch_size))
            if not batch:
                break
            _generate_and_write(batch, generate, out_dir, name, summary, state, on_written)
            if release_every_batch:
                memory.release_memory()
    finally:
        if state["writer"] is not None:
            state["writer"].close()
    return summary


def _generate_and_write(batch, generate, out_dir, name, summary, state, on_written):
    try:
        results = generate(batch)
    except MemoryError as error:
        first = summary.lines + 1  # lines are numbered from 1 for people
        if len(batch) == 1:
            events.record("line", f"line {first} could not fit: {error or 'MemoryError'}")
            raise
        memory.release_memory()
        half = len(batch) // 2
        summary.splits += 1
        logger.info("MemoryError generating %d lines; retrying as %d and %d", len(batch), half, len(batch) - half)
        events.record("split", f"lines {first}-{first + len(batch) - 1} could not fit together: "
                               f"retried as {half} and {len(batch) - half}")
        _generate_and_write(batch[:half], generate, out_dir, name, summary, state, on_written)
        _generate_and_write(batch[half:], generate, out_dir, name, summary, state, on_written)
        return
    if isinstance(results, tuple) and len(results) == 2 and isinstance(results[1], int):
        results, state["rate"] = results
    results = list(results)
    if len(results) != len(batch):
        raise ValueError(f"generate returned {len(results)} results for {len(batch)} lines")
    rate = state["rate"]
    if summary.combined is not None and state["writer"] is None:
        state["writer"] = WavWriter(summary.combined, sample_rate=rate)
    for position in range(len(results)):
        audio = results[position]
        results[position] = None  # each result leaves memory once it is on disk
        path = None
        if name is not None:
            path = os.path.join(out_dir, name.format(index=summary.lines))
            with WavWriter(path, sample_rate=rate) as writer:
                frames = writer.write(audio)
        if state["writer"] is not None:
            frames = state["writer"].write(audio)
        del audio
        seconds = frames / rate
        summary.lines += 1
        summary.seconds += seconds
        if on_written is not None:
            on_written(summary.lines - 1, path, seconds)
