"""Audio straight to disk: a WAV writer that appends as it goes, and a constant-memory concatenation.

Nothing here holds more than one write's samples (or one copy chunk) in memory, whatever the
length of the file. numpy (and torch) are used only when the caller passes their arrays.
"""

import os
import wave

SAMPLE_WIDTH_BYTES = 2  # 16-bit PCM
PCM16_MAX = 32767
CONVERT_CHUNK_SAMPLES = 1 << 16  # float -> int16 conversion works on this many samples at a time
COPY_CHUNK_BYTES = 1 << 20
WAV_DATA_LIMIT_BYTES = 0xFFFFFFFF - 36  # the RIFF size field is 32 bits


class WavWriter:
    """16-bit PCM WAV written as it comes: `write(samples)` appends, `close()` finishes the file.

    samples: bytes-like 16-bit little-endian PCM (interleaved when several channels), or a
    numpy array (or torch tensor): floats in [-1, 1] (clipped) or integers in the int16 range,
    shape (frames,) or (frames, channels). The header is brought up to date and the file
    flushed after every write, so the file on disk is a valid WAV even if the program dies
    before close().
    """

    def __init__(self, path, sample_rate=24000, channels=1):
        if sample_rate <= 0 or channels <= 0:
            raise ValueError("sample_rate and channels must be positive")
        self.path = os.fspath(path)
        self.sample_rate = sample_rate
        self.channels = channels
        self.frames = 0
        self._file = open(self.path, "wb")
        self._wave = wave.open(self._file, "wb")
        self._wave.setnchannels(channels)
        self._wave.setsampwidth(SAMPLE_WIDTH_BYTES)
        self._wave.setframerate(sample_rate)

    @property
    def seconds(self):
        return self.frames / self.sample_rate

    def write(self, samples):
        """Append samples; returns the number of frames written."""
        if self._wave is None:
            raise ValueError(f"write to closed WavWriter({self.path!r})")
        frame_bytes = SAMPLE_WIDTH_BYTES * self.channels
        written = 0
        for chunk in _pcm16_chunks(samples, self.channels):
            size = memoryview(chunk).nbytes
            if size % frame_bytes:
                raise ValueError(
                    f"{size} bytes of PCM is not a whole number of {self.channels}-channel 16-bit frames"
                )
            if (self.frames + written) * frame_bytes + size > WAV_DATA_LIMIT_BYTES:
                raise ValueError(f"{self.path}: a WAV file holds at most 4 GiB of audio; start another file")
            self._wave.writeframes(chunk)  # also brings the header's sizes up to date
            written += size // frame_bytes
        self._file.flush()
        self.frames += written
        return written

    def close(self):
        if self._wave is not None:
            self._wave.close()
            self._file.close()
            self._wave = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __del__(self):
        if getattr(self, "_wave", None) is not None:
            self.close()


def _pcm16_chunks(samples, channels):
    """samples as a sequence of little-endian int16 buffers, converting at most a chunk at a time."""
    if hasattr(samples, "detach"):  # a torch tensor
        samples = samples.detach().cpu().numpy()
    if not hasattr(samples, "dtype"):
        view = memoryview(samples)
        if view.itemsize not in (1, 2) or view.format not in ("B", "b", "c", "h", "<h"):
            raise TypeError(
                f"write() takes 16-bit PCM bytes or a numpy array, not a buffer of format {view.format!r}"
            )
        yield view
        return
    import numpy

    array = numpy.asarray(samples)
    if array.ndim == 2 and array.shape[1] != channels:
        raise ValueError(f"array of shape {array.shape} given to a {channels}-channel writer")
    if array.ndim > 2:
        raise ValueError(f"array of shape {array.shape}: expected (frames,) or (frames, channels)")
    flat = array.reshape(-1)
    kind = flat.dtype.kind
    if kind not in "fiu":
        raise TypeError(f"cannot write an array of dtype {flat.dtype} as audio")
    for start in range(0, flat.size, CONVERT_CHUNK_SAMPLES):
        part = flat[start:start + CONVERT_CHUNK_SAMPLES]
        if kind == "f":
            part = numpy.clip(part, -1.0, 1.0) * PCM16_MAX
            part = numpy.rint(part, out=part)
        elif part.size and (part.min() < -PCM16_MAX - 1 or part.max() > PCM16_MAX):
            raise ValueError("integer samples must fit in 16 bits (-32768..32767); scale them first")
        yield numpy.ascontiguousarray(part, dtype="<i2")


def concat_wavs(paths, out_path, gap_seconds=0.0):
    """Join WAV files (same rate and channels, 16-bit) into out_path in constant memory.

    gap_seconds of silence go between consecutive files. Returns the frames written.
    """
    paths = list(paths)
    if not paths:
        raise ValueError("no WAV files to join")
    with wave.open(os.fspath(paths[0]), "rb") as first:
        rate, channels, width = first.getframerate(), first.getnchannels(), first.getsampwidth()
    if width != SAMPLE_WIDTH_BYTES:
        raise ValueError(f"{paths[0]}: {8 * width}-bit audio; only 16-bit PCM can be joined")
    frame_bytes = SAMPLE_WIDTH_BYTES * channels
    frames_per_chunk = COPY_CHUNK_BYTES // frame_bytes
    silence = bytes(min(int(round(gap_seconds * rate)), frames_per_chunk) * frame_bytes)
    gap_frames = int(round(gap_seconds * rate))
    with WavWriter(out_path, sample_rate=rate, channels=channels) as out:
        for index, path in enumerate(paths):
            with wave.open(os.fspath(path), "rb") as source:
                found = (source.getframerate(), source.getnchannels(), source.getsampwidth())
                if found != (rate, channels, width):
                    raise ValueError(
                        f"{path}: {found[0]} Hz, {found[1]} channel(s), {8 * found[2]}-bit; "
                        f"the first file is {rate} Hz, {channels} channel(s), 16-bit"
                    )
                if index and gap_frames:
                    left = gap_frames
                    while left:
                        step = min(left, len(silence) // frame_bytes)
                        out.write(silence[:step * frame_bytes])
                        left -= step
                while True:
                    data = source.readframes(frames_per_chunk)
                    if not data:
                        break
                    out.write(data)
        return out.frames
