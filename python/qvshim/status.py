"""`qvshim status [PID]`: the live figures of the processes of this user that run under the library.

Each such process publishes its counters as `<pid>.json` in the user's private run directory
($XDG_RUNTIME_DIR/qvshim, or /dev/shm/qvshim-<uid>; docs/MONITOR.md). They are read here
without signalling anybody. A file whose process is gone (killed with SIGKILL, so it could not
remove it), or whose pid now belongs to another process (a different start time), or whose
process no longer has the library mapped (it exec'd a program without it) is skipped and removed.
`top.py` and `dump.py` use the same reading.
"""

import json
import os
import stat
import sys

EXIT_BAD_USAGE = 2
EXIT_NOT_FOUND = 1
UNLIMITED = 2**64 - 1

USAGE = "usage: qvshim status [PID]"


class BadTarget(Exception):
    """A PID that cannot be shown, with the one line that says why."""


def fail(message, code=EXIT_NOT_FOUND):
    print(f"qvshim: {message}", file=sys.stderr)
    return code


def _private_dir(path):
    """True when path is a directory of this user with mode 0700 (never a link)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o700


def run_dirs(environ=None):
    """The run directories a process of this user may publish in, as the library chooses them:
    under XDG_RUNTIME_DIR when that is a private directory, and /dev/shm/qvshim-<uid>. Both are
    read, since the process may have had another XDG_RUNTIME_DIR than this shell."""
    environ = os.environ if environ is None else environ
    dirs = []
    xdg = environ.get("XDG_RUNTIME_DIR")
    if xdg and xdg.startswith("/") and _private_dir(xdg):
        dirs.append(os.path.join(xdg, "qvshim"))
    dirs.append(f"/dev/shm/qvshim-{os.geteuid()}")
    return [d for d in dirs if _private_dir(d)]


def start_ticks(pid):
    """The process's start time (field 22 of /proc/PID/stat), or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rfind(b")") + 1:].split()
    try:
        return int(fields[22 - 3])
    except (IndexError, ValueError):
        return None


def process_uid(pid):
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def command_line(pid, width=40):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            parts = [p.decode(errors="replace") for p in f.read().split(b"\0") if p]
    except OSError:
        parts = []
    if parts:
        parts[0] = os.path.basename(parts[0])
    text = " ".join(parts) or "?"
    return text if len(text) <= width else text[: width - 3] + "..."


def has_library(pid):
    """True when the library is mapped in the process, False when it is not, None when unreadable.
    Any mapped path that holds "qvshim" counts, so a library copied under another file name
    (QVSHIM_LIBRARY=/opt/qvshim-1.0.so) is never taken for a process that exec'd away."""
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            return b"qvshim" in f.read()
    except OSError:
        return None


def _remove(directory, pid):
    for name in os.listdir(directory):
        # The temporary files of a write the process's end cut short too (".<pid>.json.<hex>").
        if name in (f"{pid}.json", f"{pid}.dump", f"{pid}.dump-ask") or name.startswith(f".{pid}."):
            try:
                os.unlink(os.path.join(directory, name))
            except OSError:
                pass


def _read_record(path):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            return None
        with os.fdopen(fd, "rb", closefd=False) as f:
            return json.loads(f.read(1 << 20))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def records(clean=True):
    """{pid: record} of every live process under the library, each record its counters file plus
    "dir" and "command"; stale files are removed (clean) or skipped."""
    found = {}
    for directory in run_dirs():
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        seen = set()
        for name in names:
            base = name[1:] if name.startswith(".") else name
            head = base.split(".", 1)[0]
            if head.isdigit():
                seen.add(int(head))
        for pid in sorted(seen):
            record = _read_record(os.path.join(directory, f"{pid}.json"))
            alive = start_ticks(pid)
            stale = alive is None  # the process is gone
            if record is not None and alive is not None:
                # The pid now names another process, or the process exec'd away from the library.
                stale = record.get("start_ticks") != alive or has_library(pid) is False
            if stale:
                if clean:
                    _remove(directory, pid)
                continue
            if record is None or record.get("pid") != pid or pid in found:
                continue
            record["dir"] = directory
            record["command"] = command_line(pid)
            found[pid] = record
    return found


def parse_pid(text):
    if not text.isdigit() or int(text) <= 0 or int(text) > 2**22:
        raise BadTarget(f"{text!r} is not a process id")
    return int(text)


def governed(text):
    """The record of the process PID names, or BadTarget with the reason it has none."""
    pid = parse_pid(text)
    record = records().get(pid)
    if record is not None:
        return record
    if start_ticks(pid) is None:
        raise BadTarget(f"no process {pid}")
    uid = process_uid(pid)
    if uid is not None and uid != os.geteuid():
        raise BadTarget(f"process {pid} belongs to another user (uid {uid}); qvshim only looks at your own processes")
    raise BadTarget(
        f"process {pid} ({command_line(pid)}) is not under qvshim "
        "(or publishes no counters: QVSHIM_PUBLISH=0, or it started less than a second ago)"
    )


def size(n):
    if n is None or n >= UNLIMITED:
        return "unlimited"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # not reached


def percent(part, whole):
    if not whole or whole >= UNLIMITED:
        return None
    return 100.0 * part / whole


HEADER = ("PID", "COMMAND", "POOL", "LEVEL", "LIVE", "PEAK", "BUDGET", "USE", "REFUSED", "PURGES")


def rows(record):
    """One table row per pool of a record."""
    out = []
    for index, pool in enumerate(record.get("pools", [])):
        budget = pool.get("effective_budget")
        shown = size(budget)
        if pool.get("budget") != budget:
            shown += f" (of {size(pool.get('budget'))})"
        use = percent(pool.get("live", 0), budget)
        out.append((
            str(record["pid"]) if index == 0 else "",
            record["command"] if index == 0 else "",
            pool.get("pool", "?"),
            pool.get("level", "?"),
            size(pool.get("live", 0)),
            size(pool.get("peak", 0)),
            shown,
            "-" if use is None else f"{use:.0f}%",
            str(pool.get("refusals", 0)),
            str(pool.get("purges", 0)),
        ))
    return out


def device_lines(found):
    """Under the table, one line per GPU pool: what the ledger counts, what NVML shows for the
    process and what it holds unseen (the driver's context, a memory pool's cache), which
    lowers the pool's budget (docs/GPU.md)."""
    out = []
    for record in found:
        for pool in record.get("pools", []):
            if "counted" not in pool:
                continue
            nvml = pool.get("nvml_used")
            out.append(
                f"{record['pid']} {pool.get('pool', '?')}: counted {size(pool['counted'])}, "
                f"unseen {size(pool.get('unseen', 0))}, "
                f"NVML {'n/a' if nvml is None else size(nvml)}, "
                f"pools keep {size(pool.get('pools_cached', 0))}"
            )
    return out


def table(all_rows, extra=None):
    """The rows as aligned text; extra: a column of text (bars) added at the end of each row."""
    lines = [HEADER] + list(all_rows)
    widths = [max(len(r[i]) for r in lines) for i in range(len(HEADER))]
    text = []
    for n, r in enumerate(lines):
        line = "  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        if extra is not None and n > 0:
            line += "  " + extra[n - 1]
        text.append(line.rstrip())
    return "\n".join(text)


def main(argv):
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        return fail(f"{' '.join(argv)!r}: bad arguments\n{USAGE}", EXIT_BAD_USAGE)
    try:
        if argv:
            found = [governed(argv[0])]
        else:
            found = list(records().values())
    except BadTarget as error:
        return fail(str(error))
    if not found:
        print("no process of yours runs under qvshim")
        return 0
    print(table([r for record in found for r in rows(record)]))
    for line in device_lines(found):
        print(line)
    return 0
