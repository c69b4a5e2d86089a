"""`qvshim top [--once]`: the `qvshim status` table refreshed every second (like `nvidia-smi -l 1`),
with a bar of each pool's use of its budget and a sparkline of its recent live bytes.
`--once` prints one frame and exits (for scripts and tests); Ctrl+C exits quietly with status 0.
"""

import sys
import time

from . import status

USAGE = "usage: qvshim top [--once]"
REFRESH_S = 1.0
BAR_WIDTH = 20
HISTORY_POINTS = 30
SPARKS_UNICODE = "▁▂▃▄▅▆▇█"
SPARKS_ASCII = "_.-=+*#@"
CLEAR_SCREEN = "\x1b[H\x1b[2J"


def _unicode_ok(stream):
    try:
        (SPARKS_UNICODE + "█░").encode(stream.encoding or "ascii")
        return True
    except (UnicodeEncodeError, LookupError):
        return False


def bar(fraction, unicode_ok):
    """A bar of BAR_WIDTH cells filled to fraction (0..1; None: no budget)."""
    if fraction is None:
        return "[" + " " * BAR_WIDTH + "]"
    filled = max(0, min(BAR_WIDTH, round(fraction * BAR_WIDTH)))
    full, empty = ("█", "░") if unicode_ok else ("#", ".")
    return "[" + full * filled + empty * (BAR_WIDTH - filled) + "]"


def sparkline(values, unicode_ok):
    """The recent live bytes of a pool, scaled between their own least and greatest."""
    marks = SPARKS_UNICODE if unicode_ok else SPARKS_ASCII
    if not values:
        return ""
    low, high = min(values), max(values)
    span = high - low
    return "".join(marks[0 if span == 0 else min(len(marks) - 1, int((v - low) * len(marks) / (span + 1)))] for v in values)


def frame(history, unicode_ok):
    """One frame of text; history ({(pid, pool): [live, ...]}) gets this frame's figures."""
    found = status.records()
    all_rows, extra = [], []
    for pid, record in found.items():
        for pool, row in zip(record.get("pools", []), status.rows(record)):
            key = (pid, pool.get("pool"))
            points = history.setdefault(key, [])
            points.append(pool.get("live", 0))
            del points[:-HISTORY_POINTS]
            use = status.percent(pool.get("live", 0), pool.get("effective_budget"))
            all_rows.append(row)
            extra.append(bar(None if use is None else use / 100, unicode_ok) + " " + sparkline(points, unicode_ok))
    for key in [k for k in history if k[0] not in found]:
        del history[key]
    stamp = time.strftime("%H:%M:%S")
    if not all_rows:
        return f"qvshim top  {stamp}\nno process of yours runs under qvshim"
    return f"qvshim top  {stamp}  ({len(found)} process{'es' if len(found) != 1 else ''})\n" + status.table(all_rows, extra)


def main(argv):
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv not in ([], ["--once"]):
        return status.fail(f"{' '.join(argv)!r}: bad arguments\n{USAGE}", status.EXIT_BAD_USAGE)
    once = argv == ["--once"]
    unicode_ok = _unicode_ok(sys.stdout)
    history = {}
    try:
        while True:
            text = frame(history, unicode_ok)
            if once:
                print(text)
                return 0
            clear = CLEAR_SCREEN if sys.stdout.isatty() else ""
            sys.stdout.write(clear + text + "\n")
            sys.stdout.flush()
            time.sleep(REFRESH_S)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # `qvshim top | head`: the reader went away; nothing more to say.
        sys.stderr.close()
        return 0
