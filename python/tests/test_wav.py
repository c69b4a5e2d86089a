"""WavWriter and concat_wavs: what goes in comes out, headers stay valid, bad input is named."""

import array
import ctypes
import gc
import math
import warnings
import wave

import numpy
import pytest

import qvshim



def read_wav(path):
    with wave.open(str(path), "rb") as wav:
        return (wav.getframerate(), wav.getnchannels(), wav.getsampwidth(),
                array.array("h", wav.readframes(wav.getnframes())).tolist())


def test_pcm_bytes_round_trip(tmp_path):
    samples = array.array("h", [0, 1, -1, 32767, -32768, 1234])
    with qvshim.WavWriter(tmp_path / "a.wav", sample_rate=16000) as wav:
        assert wav.write(samples.tobytes()) == 6
        assert wav.write(samples) == 6  # any 16-bit buffer
    assert read_wav(tmp_path / "a.wav") == (16000, 1, 2, samples.tolist() * 2)


def test_default_rate_is_24000(tmp_path):
    with qvshim.WavWriter(tmp_path / "a.wav") as wav:
        wav.write(bytes(4))
    assert read_wav(tmp_path / "a.wav")[0] == 24000


def test_float_array_is_scaled_and_clipped(tmp_path):
    with qvshim.WavWriter(tmp_path / "f.wav") as wav:
        wav.write(numpy.array([0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -3.0], dtype=numpy.float32))
    assert read_wav(tmp_path / "f.wav")[3] == [0, 16384, -16384, 32767, -32767, 32767, -32767]


def test_int_arrays_are_written_as_int16(tmp_path):
    with qvshim.WavWriter(tmp_path / "i.wav") as wav:
        wav.write(numpy.array([1, -2, 3], dtype=numpy.int16))
        wav.write(numpy.array([100, -32768], dtype=numpy.int64))
    assert read_wav(tmp_path / "i.wav")[3] == [1, -2, 3, 100, -32768]


def test_int_array_past_16_bits_is_refused(tmp_path):
    with qvshim.WavWriter(tmp_path / "i.wav") as wav:
        with pytest.raises(ValueError, match="16 bits"):
            wav.write(numpy.array([40000], dtype=numpy.int32))


def test_long_float_array_is_converted_in_chunks_exactly(tmp_path):
    tone = numpy.sin(numpy.arange(200_000) * 2 * math.pi / 100).astype(numpy.float64) * 0.9
    with qvshim.WavWriter(tmp_path / "long.wav") as wav:
        assert wav.write(tone) == tone.size
        assert wav.seconds == pytest.approx(tone.size / 24000)
    written = numpy.array(read_wav(tmp_path / "long.wav")[3])
    assert numpy.array_equal(written, numpy.rint(tone * 32767).astype(numpy.int16))


def test_stereo_frames_interleave(tmp_path):
    frames = numpy.array([[0.5, -0.5], [0.25, -0.25]])
    with qvshim.WavWriter(tmp_path / "s.wav", channels=2) as wav:
        assert wav.write(frames) == 2
    rate, channels, width, samples = read_wav(tmp_path / "s.wav")
    assert channels == 2 and samples == [16384, -16384, 8192, -8192]


BUFFER_ROWS = [
    # (a buffer that is not a numpy array, its memoryview format): each holds 16-bit PCM
    (array.array("h", [1, -2]), "h"),
    ((ctypes.c_int16 * 2)(1, -2), "<h"),
    (array.array("h", [1, -2]).tobytes(), "B"),
    (array.array("b", array.array("h", [1, -2]).tobytes()), "b"),
    (memoryview(array.array("h", [1, -2]).tobytes()).cast("c"), "c"),
]


@pytest.mark.parametrize("samples,fmt", BUFFER_ROWS, ids=[r[1] for r in BUFFER_ROWS])
def test_16_bit_buffers_of_every_accepted_format_are_written(tmp_path, samples, fmt):
    assert memoryview(samples).format == fmt
    with qvshim.WavWriter(tmp_path / "b.wav") as wav:
        assert wav.write(samples) == 2, f"expected a buffer of format {fmt!r} to be written as 2 frames"
    assert read_wav(tmp_path / "b.wav")[3] == [1, -2]


@pytest.mark.parametrize(
    "samples, error, message",
    [
        (b"\x00\x01\x02", ValueError, "whole number"),
        (array.array("f", [0.5]), TypeError, "format"),
        (numpy.array(["a"]), TypeError, "dtype"),
        (numpy.zeros((2, 3)), ValueError, "shape"),
        (numpy.zeros((2, 2, 2)), ValueError, "shape"),
        ((ctypes.c_uint16 * 2)(1, 2), TypeError, "format '<H'"),  # unsigned 16-bit is not PCM16
    ],
)
def test_bad_samples_are_refused_with_the_reason(tmp_path, samples, error, message):
    with qvshim.WavWriter(tmp_path / "bad.wav") as wav:
        with pytest.raises(error, match=message):
            wav.write(samples)


def test_header_is_valid_before_close(tmp_path):
    wav = qvshim.WavWriter(tmp_path / "open.wav")
    wav.write(array.array("h", range(100)))
    wav.write(array.array("h", range(50)))
    assert read_wav(tmp_path / "open.wav")[3] == list(range(100)) + list(range(50))
    wav.close()


def test_a_writer_dropped_without_close_closes_its_file(tmp_path):
    wav = qvshim.WavWriter(tmp_path / "dropped.wav")
    wav.write(array.array("h", range(10)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del wav
        gc.collect()
    unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not unclosed, f"expected the writer to close its file when dropped, got {unclosed}"
    assert read_wav(tmp_path / "dropped.wav")[3] == list(range(10))


def test_write_after_close_is_refused(tmp_path):
    wav = qvshim.WavWriter(tmp_path / "c.wav")
    wav.close()
    wav.close()  # twice is fine
    with pytest.raises(ValueError, match="closed"):
        wav.write(bytes(2))


def test_concat_joins_in_order_with_silence_between(tmp_path):
    parts = []
    for index in range(3):
        path = tmp_path / f"{index}.wav"
        with qvshim.WavWriter(path, sample_rate=8000) as wav:
            wav.write(array.array("h", [index + 1] * (index + 2)))
        parts.append(path)
    frames = qvshim.concat_wavs(parts, tmp_path / "all.wav", gap_seconds=0.001)
    gap = [0] * 8
    expected = [1, 1] + gap + [2, 2, 2] + gap + [3, 3, 3, 3]
    assert frames == len(expected)
    assert read_wav(tmp_path / "all.wav") == (8000, 1, 2, expected)


def test_concat_refuses_mismatched_formats(tmp_path):
    for name, rate in (("a.wav", 8000), ("b.wav", 16000)):
        with qvshim.WavWriter(tmp_path / name, sample_rate=rate) as wav:
            wav.write(bytes(4))
    with pytest.raises(ValueError, match="16000 Hz.*first file is 8000 Hz"):
        qvshim.concat_wavs([tmp_path / "a.wav", tmp_path / "b.wav"], tmp_path / "out.wav")


def test_concat_of_nothing_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no WAV"):
        qvshim.concat_wavs([], tmp_path / "out.wav")
