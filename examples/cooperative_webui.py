#!/usr/bin/env python3
"""The leaking web UI stand-in (examples/leaky_webui.py), rewritten to cooperate with qvshim.

Same shape: three "models" (CustomVoice, Base, VoiceDesign) and a batch of text lines whose
audio used to pile up in memory. The changes are the few lines a real app needs:
  - the models come from qvshim.ModelManager: loaded on first use, unloaded when idle, and
    evicted least-recently-used first when the next one would not fit the budget;
  - the audio goes through qvshim.generate_batches into a WAV on disk, line by line.
So the program stays under its budget without ever meeting a refusal. Run it with

    QVSHIM_BUDGET=512M python -m qvshim run examples/cooperative_webui.py

It exits 1 if the shim refused anything or the peak passed the budget, 0 otherwise.
"""

import argparse
import array
import math
import os
import sys
import tempfile

import qvshim

MIB = 1024 * 1024
MODEL_NAMES = ("CustomVoice", "Base", "VoiceDesign")
SAMPLE_RATE_HZ = 24000


def load_model(size_bytes, seed):
    """A model's weights: one big buffer, every page written as real weights would be."""
    pattern = bytes((seed * 31 + i * 7) & 0xFF for i in range(4096))
    return bytearray(pattern) * (size_bytes // len(pattern))


def synthesize(text, size_bytes):
    """Audio for one line: a sine tone whose pitch depends on the text, as 16-bit PCM."""
    frequency_hz = 110 + (sum(text.encode()) % 770)
    cycle_samples = max(2, round(SAMPLE_RATE_HZ / frequency_hz))
    one_cycle = array.array(
        "h", (round(12000 * math.sin(2 * math.pi * i / cycle_samples)) for i in range(cycle_samples))
    ).tobytes()
    return one_cycle * max(1, size_bytes // len(one_cycle))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=300, help="text lines in the batch (300)")
    parser.add_argument("--model-mib", type=int, default=150, help="size of each of the 3 models (150)")
    parser.add_argument("--audio-mib", type=float, default=1, help="audio produced per line (1)")
    parser.add_argument("--lines-per-mode", type=int, default=50, help="lines each model speaks in turn (50)")
    parser.add_argument("--keep-alive", type=float, default=300, help="seconds an idle model stays (300)")
    parser.add_argument("--out", help="write the joined audio here (default: a temporary file, removed)")
    args = parser.parse_args(argv)
    if min(args.lines, args.model_mib, args.lines_per_mode) < 1 or args.audio_mib <= 0:
        parser.error("--lines, --model-mib, --lines-per-mode and --audio-mib must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not qvshim.is_loaded():
        print("run me under the shim: python -m qvshim run examples/cooperative_webui.py", file=sys.stderr)
        return 2
    models = qvshim.ModelManager(keep_alive=args.keep_alive)
    model_bytes = args.model_mib * MIB
    audio_bytes = int(args.audio_mib * MIB)
    loads = []

    def model_for(mode):
        def loader():
            loads.append(mode)
            return load_model(model_bytes, MODEL_NAMES.index(mode))
        return models.use(mode, loader, size=model_bytes)

    def generate(batch):
        # One batch is one mode, as when a user switches tabs in the web UI.
        mode = MODEL_NAMES[generate.batches % len(MODEL_NAMES)]
        generate.batches += 1
        with model_for(mode) as model:
            assert len(model) == model_bytes
            return [synthesize(line, audio_bytes) for line in batch]

    generate.batches = 0

    print(f"{args.lines} lines, {args.audio_mib:g} MiB of audio each, spoken by 3 models of "
          f"{args.model_mib} MiB in turns of {args.lines_per_mode} lines")
    with tempfile.TemporaryDirectory(prefix="cooperative_webui-") as scratch:
        out = args.out or os.path.join(scratch, "batch.wav")
        lines = (f"Line {n}: the quick brown fox reads the batch aloud." for n in range(1, args.lines + 1))
        summary = qvshim.generate_batches(lines, generate, scratch, batch_size=args.lines_per_mode,
                                          sample_rate=SAMPLE_RATE_HZ, name=None, combined=out)
        written_mib = os.path.getsize(out) / MIB
    still_loaded = models.loaded()
    models.close()

    host = qvshim.stats()[0]
    budget = host["budget"]
    print(f"lines generated: {summary.lines}/{args.lines}, {written_mib:.0f} MiB of audio written to disk")
    print(f"model loads: {len(loads)} ({', '.join(loads)}); loaded at the end: {', '.join(still_loaded) or 'none'}")
    print(f"qvshim: budget {budget / MIB:.0f} MiB, peak {host['peak'] / MIB:.0f} MiB, "
          f"refusals {host['refusals']}, purges {host['purges']}")
    if host["refusals"] or host["peak"] > budget:
        print("FAILED: the shim had to refuse memory or the peak passed the budget")
        return 1
    print("stayed under the budget without a single refusal")
    return 0


if __name__ == "__main__":
    sys.exit(main())
