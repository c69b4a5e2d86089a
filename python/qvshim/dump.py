"""`qvshim dump PID [--json]`: asks a process under the library for its diagnostic dump and prints it.

The process must be one of this user's that publishes its counters (`qvshim status` lists it), so
the dump signal never reaches a process that would die of it. The ask goes through the run
directory: `<pid>.dump-ask` (`json` or `text`), then the dump signal (SIGUSR2 unless
QVSHIM_DUMP_SIGNAL chose another); the process writes `<pid>.dump` there instead of its usual
place (docs/DUMP.md), and it is printed and removed here.
"""

import os
import signal
import sys
import time

from . import status

USAGE = "usage: qvshim dump PID [--json]"
REPLY_WAIT_S = 10.0
POLL_S = 0.05


def _signal(pid, number, ticks):
    """Sends the dump signal to pid, after checking (through a pidfd where there is one, so the
    pid cannot be reused in between) that it is still the process that published."""
    pidfd = None
    if hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal"):
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            pidfd = None
    try:
        if status.start_ticks(pid) != ticks:
            raise status.BadTarget(f"process {pid} ended")
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, number)
        else:
            os.kill(pid, number)
    except ProcessLookupError:
        raise status.BadTarget(f"process {pid} ended") from None
    finally:
        if pidfd is not None:
            os.close(pidfd)


def ask(record, as_json, wait_s=REPLY_WAIT_S):
    """The dump text of the process a record describes, or BadTarget."""
    pid = record["pid"]
    number = record.get("dump_signal") or 0
    if number <= 0:
        raise status.BadTarget(
            f"process {pid} takes no dump signal now (QVSHIM_DUMP_SIGNAL=off, the program handles "
            "the signal itself, or Python is still starting)"
        )
    directory = record["dir"]
    ask_path = os.path.join(directory, f"{pid}.dump-ask")
    reply_path = os.path.join(directory, f"{pid}.dump")
    for path in (ask_path, reply_path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    fd = os.open(ask_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("json\n" if as_json else "text\n")
    try:
        _signal(pid, number, record.get("start_ticks"))
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                fd = os.open(reply_path, os.O_RDONLY | os.O_NOFOLLOW)
            except FileNotFoundError:
                if status.start_ticks(pid) is None:
                    raise status.BadTarget(f"process {pid} ended before it answered") from None
                time.sleep(POLL_S)
                continue
            with os.fdopen(fd, "rb") as f:
                text = f.read().decode(errors="replace")
            os.unlink(reply_path)
            return text
        raise status.BadTarget(f"process {pid} did not answer within {wait_s:.0f} s")
    finally:
        try:
            os.unlink(ask_path)
        except FileNotFoundError:
            pass


def main(argv):
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    as_json = "--json" in argv
    rest = [a for a in argv if a != "--json"]
    if len(rest) != 1 or rest[0].startswith("-"):
        return status.fail(f"{' '.join(argv) or 'no PID'!r}: bad arguments\n{USAGE}", status.EXIT_BAD_USAGE)
    try:
        text = ask(status.governed(rest[0]), as_json)
    except status.BadTarget as error:
        return status.fail(str(error))
    except OSError as error:
        return status.fail(f"the dump could not be asked for: {error}")
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0
