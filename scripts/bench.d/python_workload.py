"""A Python-heavy allocation workload for scripts/bench.

Builds and drops the objects a web UI's Python side churns through: dicts of
strings and numbers, lists, joined and split strings, json round-trips. Each
round builds a batch of records, serialises it, parses it back, reshapes it,
and drops it all. Deterministic, standard library only.

usage: python3 python_workload.py [ROUNDS]

Prints one line: the allocator found in the process, the PYTHONMALLOC the
interpreter saw, and a checksum so no work can be optimised out.
"""

import ctypes
import json
import os
import sys

RECORDS_PER_ROUND = 2000


def make_record(i, round_number):
    name = f"speaker-{i % 97}-{round_number}"
    return {
        "id": i,
        "speaker": name,
        "text": " ".join(f"word{(i * 7 + k) % 1000}" for k in range(12)),
        "tags": [f"t{(i + k) % 31}" for k in range(5)],
        "scores": [((i * 31 + k) % 1000) / 1000.0 for k in range(8)],
        "meta": {"round": round_number, "even": i % 2 == 0, "lang": ("en", "de", "zh")[i % 3]},
    }


def one_round(round_number):
    records = [make_record(i, round_number) for i in range(RECORDS_PER_ROUND)]
    encoded = json.dumps(records)
    decoded = json.loads(encoded)
    by_speaker = {}
    for record in decoded:
        by_speaker.setdefault(record["speaker"], []).append(record["text"].upper())
    words = sum(len(text.split()) for texts in by_speaker.values() for text in texts)
    tags = {tag for record in decoded for tag in record["tags"]}
    total = sum(sum(record["scores"]) for record in decoded)
    return len(encoded) + words + len(tags) + int(total)


def allocator_name():
    process = ctypes.CDLL(None)
    # the extent-hook prototype (docs/BENCHMARKS.md) also exports qvshim_pool_stats: ask for it first
    for symbol, name in (("qvshim_extent_prototype", "qvshim-extent"), ("qvshim_bench_forwarder", "jemalloc-same-build"),
                         ("qvshim_pool_stats", "qvshim"),
                         ("mallctl", "jemalloc")):
        if hasattr(process, symbol):
            return name
    return "glibc"


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    checksum = 0
    for round_number in range(rounds):
        checksum += one_round(round_number)
    print(
        f"allocator={allocator_name()} "
        f"PYTHONMALLOC={os.environ.get('PYTHONMALLOC', '(unset)')} checksum={checksum}"
    )


if __name__ == "__main__":
    main()
