"""generate_batches: lazy batches, every result on disk at once, MemoryError split in halves."""

import array
import logging
import os
import wave

import pytest

import qvshim


def tone(line, frames=80):
    return array.array("h", [len(line)] * frames).tobytes()


def frames_in(path):
    with wave.open(str(path), "rb") as wav:
        return wav.getnframes(), wav.getframerate()


def test_lines_are_generated_in_batches_and_each_result_written(tmp_path):
    sizes = []

    def generate(batch):
        sizes.append(len(batch))
        return [tone(line) for line in batch]

    lines = [f"line {n}" for n in range(120)]
    written = []
    summary = qvshim.generate_batches(lines, generate, tmp_path, batch_size=50, sample_rate=8000,
                                      on_written=lambda index, path, seconds: written.append((index, path, seconds)))
    assert sizes == [50, 50, 20]
    assert summary.lines == 120 and summary.seconds == pytest.approx(120 * 80 / 8000)
    assert sorted(os.listdir(tmp_path)) == [f"{n:05d}.wav" for n in range(120)]
    assert [index for index, _, _ in written] == list(range(120))
    assert frames_in(written[7][1]) == (80, 8000)


def test_lines_are_read_lazily_one_batch_ahead_at_most(tmp_path):
    consumed = []

    def lines():
        for n in range(35):
            consumed.append(n)
            yield f"line {n}"

    def generate(batch):
        assert len(consumed) <= (generate.calls + 1) * 10
        generate.calls += 1
        return [tone(line) for line in batch]

    generate.calls = 0
    assert qvshim.generate_batches(lines(), generate, tmp_path, batch_size=10).lines == 35
    assert generate.calls == 4


def test_results_with_sample_rate_like_qwen_tts_set_the_rate(tmp_path):
    def generate(batch):
        return [tone(line) for line in batch], 12000

    qvshim.generate_batches(["a", "bb"], generate, tmp_path)
    assert frames_in(tmp_path / "00001.wav") == (80, 12000)


def test_combined_file_holds_every_result_in_order(tmp_path):
    def generate(batch):
        return [array.array("h", [int(line)] * 3).tobytes() for line in batch]

    combined = tmp_path / "all.wav"
    qvshim.generate_batches([str(n) for n in range(7)], generate, tmp_path / "lines", batch_size=3, combined=combined)
    with wave.open(str(combined), "rb") as wav:
        assert array.array("h", wav.readframes(100)).tolist() == [n for n in range(7) for _ in range(3)]


def test_memory_error_on_a_batch_retries_it_in_halves(tmp_path, caplog):
    attempts = []
    # The package's logger does not propagate: caplog's handler is put on it.
    logger = logging.getLogger("qvshim")
    logger.addHandler(caplog.handler)

    def generate(batch):
        attempts.append(len(batch))
        if len(batch) > 2:
            raise MemoryError("batch too big for the budget")
        return [tone(line) for line in batch]

    try:
        summary = qvshim.generate_batches([str(n) for n in range(8)], generate, tmp_path, batch_size=8)
    finally:
        logger.removeHandler(caplog.handler)
    assert summary.lines == 8 and summary.splits == 3
    assert attempts == [8, 4, 2, 2, 4, 2, 2]
    assert len(os.listdir(tmp_path)) == 8
    splits = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert splits == ["MemoryError generating 8 lines; retrying as 4 and 4",
                      "MemoryError generating 4 lines; retrying as 2 and 2",
                      "MemoryError generating 4 lines; retrying as 2 and 2"], splits


def test_memory_error_on_a_single_line_is_raised(tmp_path):
    def generate(batch):
        raise MemoryError("even one line does not fit")

    with pytest.raises(MemoryError, match="one line"):
        qvshim.generate_batches(["x", "y"], generate, tmp_path, batch_size=2)


def test_wrong_number_of_results_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="1 results for 2 lines"):
        qvshim.generate_batches(["a", "b"], lambda batch: [tone("a")], tmp_path)


def test_batch_size_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match=r"^batch_size must be at least 1$"):
        qvshim.generate_batches(["a"], lambda batch: [tone("a")], tmp_path, batch_size=0)


def test_combined_only_writes_no_file_per_line(tmp_path):
    written = []
    summary = qvshim.generate_batches(["a", "bb", "ccc"], lambda batch: [tone(line) for line in batch],
                                      tmp_path / "unused", name=None, combined=tmp_path / "all.wav",
                                      on_written=lambda index, path, seconds: written.append(path))
    assert summary.lines == 3 and written == [None, None, None]
    assert not (tmp_path / "unused").exists()
    assert frames_in(tmp_path / "all.wav") == (240, 24000)


def test_no_destination_at_all_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="combined"):
        qvshim.generate_batches(["a"], lambda batch: [tone("a")], tmp_path, name=None)
