#!/usr/bin/env python3
"""A stand-in for the leaking Qwen3-TTS web UI, to watch qvshim work.

It "loads" three models (CustomVoice, Base, VoiceDesign) as big buffers held at
once, then generates a batch of text lines. Each line yields a few MiB of
"audio" (a real sine tone, every page written) that is appended to a results
list nobody ever trims: the leak that froze the user's desktop.

Like a reasonable application it catches MemoryError per line: it spills the
results it holds to a file, drops them from memory and retries the line once.
Without qvshim nothing ever raises MemoryError (Linux overcommits and swaps
instead), so --cap-mib stops the run by itself once its own RSS passes a cap.

Standard library only. Run it under the shim with scripts/qvshim-run, e.g.

    QVSHIM_BUDGET=512M scripts/qvshim-run python3 examples/leaky_webui.py --cap-mib 1536
"""

import argparse
import array
import ctypes
import json
import math
import os
import shutil
import sys
import tempfile

MIB = 1024 * 1024
MODEL_NAMES = ("CustomVoice", "Base", "VoiceDesign")
SAMPLE_RATE_HZ = 24000
BYTES_PER_SAMPLE = 2  # 16-bit mono PCM
QVSHIM_UNLIMITED = 2**64 - 1
QVSHIM_POOL_HOST = 0
TRAIL_POINTS = 8  # RSS samples kept for the one-line growth trail
EXIT_MODELS_DO_NOT_FIT = 3


class QvshimPoolStats(ctypes.Structure):
    """struct qvshim_pool_stats from include/qvshim.h, field for field."""

    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("pool", ctypes.c_int32),
        ("level", ctypes.c_int32),
        ("device", ctypes.c_int32),
        ("budget", ctypes.c_uint64),
        ("effective_budget", ctypes.c_uint64),
        ("reserve", ctypes.c_uint64),
        ("reserve_in_use", ctypes.c_uint64),
        ("live", ctypes.c_uint64),
        ("peak", ctypes.c_uint64),
        ("allocs", ctypes.c_uint64),
        ("frees", ctypes.c_uint64),
        ("refusals", ctypes.c_uint64),
        ("largest_refused", ctypes.c_uint64),
        ("purges", ctypes.c_uint64),
        ("level_changes", ctypes.c_uint64),
        ("notifications", ctypes.c_uint64),
    ]


def find_shim_stats():
    """Return qvshim_pool_stats when the shim is loaded in this process, else None.

    Looked up in the process's global symbol table, as include/qvshim.h asks,
    so this works whether the library was preloaded or not present at all.
    """
    try:
        stats = ctypes.CDLL(None).qvshim_pool_stats
    except AttributeError:
        return None
    stats.argtypes = [ctypes.c_int, ctypes.POINTER(QvshimPoolStats)]
    stats.restype = ctypes.c_int
    return stats


def read_host_pool(stats_fn):
    out = QvshimPoolStats()
    out.struct_size = ctypes.sizeof(QvshimPoolStats)
    if stats_fn(QVSHIM_POOL_HOST, ctypes.byref(out)) != 0:
        return None
    return {name: getattr(out, name) for name, _ in QvshimPoolStats._fields_}


def proc_status_kib(field):
    """A memory field of /proc/self/status (VmRSS, VmHWM) in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def rss_bytes():
    # statm is one short line: cheaper than parsing status after every line.
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def load_model(size_bytes, seed):
    """A model's weights: one big buffer, every page written as real weights would be."""
    pattern = bytes((seed * 31 + i * 7) & 0xFF for i in range(4096))
    # Allocate, then fill by doubling copies. (bytearray * n would be shorter, but CPython 3.11
    # prints a spurious "SystemError: deallocated bytearray object has exported buffers" when
    # that repeat meets MemoryError.)
    weights = bytearray(size_bytes)
    view = memoryview(weights)
    filled = min(len(pattern), size_bytes)
    view[:filled] = pattern[:filled]
    while filled < size_bytes:
        step = min(filled, size_bytes - filled)
        view[filled : filled + step] = view[:step]
        filled += step
    view.release()
    return weights


def synthesize(text, size_bytes):
    """Audio for one line: a sine tone whose pitch depends on the text."""
    frequency_hz = 110 + (sum(text.encode()) % 770)
    cycle_samples = max(2, round(SAMPLE_RATE_HZ / frequency_hz))
    one_cycle = array.array(
        "h",
        (round(12000 * math.sin(2 * math.pi * i / cycle_samples)) for i in range(cycle_samples)),
    ).tobytes()
    # Whole cycles only, so the tone is built in one allocation with no trimming copy.
    return one_cycle * max(1, size_bytes // len(one_cycle))


def spill(results, spill_dir, spill_index):
    """Write the held results to one file and return the bytes written."""
    path = os.path.join(spill_dir, f"batch-{spill_index:03d}.pcm")
    written = 0
    with open(path, "wb") as out:
        for audio in results:
            out.write(audio)
            written += len(audio)
    return written


def mib(n_bytes):
    return n_bytes / MIB


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=400, help="text lines in the batch (400)")
    parser.add_argument("--model-mib", type=int, default=96, help="size of each of the 3 models (96)")
    parser.add_argument("--audio-mib", type=float, default=4, help="audio produced per line (4)")
    parser.add_argument(
        "--cap-mib",
        type=int,
        default=None,
        help="stop once this process's RSS passes this many MiB (protects the machine without the shim)",
    )
    parser.add_argument(
        "--on-memory-error",
        choices=("spill", "drop"),
        default="spill",
        help="spill held results to a temp file (default) or just drop them",
    )
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    parser.add_argument("--summary-json", metavar="PATH", help="also write the summary as JSON here")
    args = parser.parse_args(argv)
    if args.lines < 1 or args.model_mib < 1 or args.audio_mib <= 0:
        parser.error("--lines, --model-mib and --audio-mib must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    # Resolved before any memory pressure: importing or loading anything later may itself fail.
    shim_stats = find_shim_stats()
    audio_bytes = int(args.audio_mib * MIB)
    cap_bytes = args.cap_mib * MIB if args.cap_mib else None
    spill_dir = tempfile.mkdtemp(prefix="leaky_webui-") if args.on_memory_error == "spill" else None

    models = {}
    for seed, name in enumerate(MODEL_NAMES):
        try:
            models[name] = load_model(args.model_mib * MIB, seed)
        except MemoryError:
            # Without its models the app cannot serve anything: say so and stop, as a web UI would.
            print(
                f"cannot load model {name} ({args.model_mib} MiB): MemoryError with "
                f"{len(models)} of {len(MODEL_NAMES)} models loaded; is the budget smaller than the models?",
                file=sys.stderr,
            )
            return EXIT_MODELS_DO_NOT_FIT
    say(
        f"loaded {len(models)} models ({', '.join(MODEL_NAMES)}), {args.model_mib} MiB each: "
        f"RSS {mib(rss_bytes()):.0f} MiB"
    )
    say(f"generating {args.lines} lines, {args.audio_mib:g} MiB of audio each, all kept in memory")

    results = []  # the leak: appended to for every line, never trimmed
    trail = [(0, rss_bytes())]
    every = max(1, args.lines // TRAIL_POINTS)
    generated = memory_errors = handled = spills = spilled_bytes = 0
    stopped_by_cap = None

    for number in range(1, args.lines + 1):
        text = f"Line {number}: the quick brown fox reads the batch aloud."
        for attempt in (1, 2):
            try:
                results.append(synthesize(text, audio_bytes))
                generated += 1
                break
            except MemoryError:
                memory_errors += 1
                if attempt == 2 or not results:
                    say(f"  line {number}: MemoryError again with nothing left to free; skipping the line")
                    break
                held = sum(len(audio) for audio in results)
                what = f"dropped {len(results)} held lines ({mib(held):.0f} MiB)"
                if spill_dir:
                    try:
                        spilled_bytes += spill(results, spill_dir, spills)
                        spills += 1
                        what = f"spilled {len(results)} lines ({mib(held):.0f} MiB) to disk"
                    except (MemoryError, OSError) as error:
                        what += f" (spilling them failed: {type(error).__name__})"
                results.clear()
                handled += 1
                say(f"  line {number}: MemoryError; {what}, retrying")
        rss = rss_bytes()
        if number % every == 0 or number == args.lines:
            trail.append((number, rss))
            say(f"  line {number}: RSS {mib(rss):.0f} MiB, {len(results)} lines held")
        if cap_bytes and rss > cap_bytes:
            trail.append((number, rss))
            stopped_by_cap = number
            say(f"  line {number}: RSS {mib(rss):.0f} MiB passed the cap of {args.cap_mib} MiB; stopping")
            break

    trail = sorted(set(trail))
    held_at_end = sum(len(audio) for audio in results)
    results.clear()
    peak_rss = proc_status_kib("VmHWM") * 1024
    shim = read_host_pool(shim_stats) if shim_stats else None
    if spill_dir:
        shutil.rmtree(spill_dir, ignore_errors=True)

    summary = {
        "lines_requested": args.lines,
        "lines_generated": generated,
        "memory_errors": memory_errors,
        "memory_errors_handled": handled,
        "spills": spills,
        "spilled_bytes": spilled_bytes,
        "held_at_end_bytes": held_at_end,
        "stopped_by_cap_at_line": stopped_by_cap,
        "cap_bytes": cap_bytes,
        "peak_rss_bytes": peak_rss,
        "rss_trail": trail,
        "shim": shim,
    }
    if args.summary_json:
        with open(args.summary_json, "w") as out:
            json.dump(summary, out)

    stop_note = f" (stopped by the cap at line {stopped_by_cap})" if stopped_by_cap else ""
    print(f"lines generated: {generated}/{args.lines}{stop_note}")
    print(f"MemoryErrors met: {memory_errors}, handled: {handled}")
    print(f"peak RSS (VmHWM): {mib(peak_rss):.0f} MiB")
    if shim is None:
        print("qvshim: not loaded (qvshim_pool_stats not found)")
    else:
        budget = "off" if shim["budget"] == QVSHIM_UNLIMITED else f"{mib(shim['budget']):.0f} MiB"
        print(
            f"qvshim: budget {budget}, peak {mib(shim['peak']):.0f} MiB, "
            f"refusals {shim['refusals']}, purges {shim['purges']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
