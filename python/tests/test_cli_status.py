"""`qvshim status`, `top --once`, `dump` and `doctor` against a process under the library and
against bad PIDs; the counters file those read: its permissions, its contents following the
process, its removal at exit and after SIGKILL, a hostile run directory, a fork child's own file."""

import json
import os
import re
import select
import signal
import stat
import subprocess
import sys
import time

import pytest

from conftest import plain_env

DEADLINE_S = 20
MIB = 1 << 20

# A governed program: holds 32 MiB, says "ready", then obeys lines on stdin:
# "grow" (64 MiB more), "fork" (a child that waits for stdin to close), "exit".
HOLDER = r"""
import os, sys
held = [bytearray(32 << 20)]
child = None
print("ready", flush=True)
for line in sys.stdin:
    word = line.strip()
    if word == "grow":
        held.append(bytearray(64 << 20))
        print("grown", flush=True)
    elif word == "fork":
        r, w = os.pipe()
        child = os.fork()
        if child == 0:
            os.close(w)
            os.read(r, 1)
            sys.exit(0)
        os.close(r)
        print(child, flush=True)
    elif word == "end-child":
        os.close(w)
        os.waitpid(child, 0)
        print("child ended", flush=True)
    elif word == "exit":
        break
"""


def run_dir(env=None):
    env = os.environ if env is None else env
    xdg = env.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg) and not os.path.islink(xdg) and os.stat(xdg).st_uid == os.geteuid() \
            and stat.S_IMODE(os.stat(xdg).st_mode) == 0o700:
        return os.path.join(xdg, "qvshim")
    return f"/dev/shm/qvshim-{os.geteuid()}"


def stderr_until(proc, text, deadline_s=DEADLINE_S):
    """What proc wrote on stderr up to the line that holds text (read without blocking past the deadline)."""
    seen = b""
    deadline = time.monotonic() + deadline_s
    fd = proc.stderr.fileno()
    while text.encode() not in seen:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            pytest.fail(f"waited {deadline_s} s for {text!r} on stderr; saw:\n{seen.decode(errors='replace')}")
        chunk = os.read(fd, 4096)
        if not chunk:
            pytest.fail(f"stderr ended before {text!r}; saw:\n{seen.decode(errors='replace')}")
        seen += chunk
    return seen.decode(errors="replace")


def wait_for(what, check, deadline_s=DEADLINE_S):
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"waited {deadline_s} s for {what}")


def read_counters(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def qvshim(*args, env=None):
    result = subprocess.run([sys.executable, "-m", "qvshim", *args], env=env or plain_env(),
                            capture_output=True, text=True, timeout=120)
    assert "Traceback" not in result.stderr, f"qvshim {' '.join(args)} raised:\n{result.stderr}"
    return result


class Governed:
    """A HOLDER process under the library."""

    def __init__(self, library, **env):
        self.env = plain_env(LD_PRELOAD=library, **env)
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER], env=self.env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        self.counters = os.path.join(run_dir(self.env), f"{self.pid}.json")
        assert self.proc.stdout.readline().strip() == "ready"

    def say(self, word):
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def published(self, dump_signal=True):
        """The counters file, once it is there (and, when asked, once the dump signal is set up)."""
        return wait_for(f"{self.counters}", lambda: (c := read_counters(self.counters))
                        and (c["dump_signal"] or not dump_signal) and c)

    def end(self):
        if self.proc.poll() is None:
            try:
                self.say("exit")
            except (BrokenPipeError, OSError):
                pass
        try:
            out, err = self.proc.communicate(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        return err


@pytest.fixture
def governed(library):
    process = Governed(library)
    yield process
    process.end()


@pytest.fixture
def plain_sleeper():
    """A process of this user that is not under the library."""
    proc = subprocess.Popen(["sleep", "60"], env=plain_env())
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.fixture
def dead_pid():
    proc = subprocess.Popen(["true"], env=plain_env())
    proc.wait()
    return proc.pid


@pytest.fixture
def other_users_pid():
    """A process of another user: pid 1 when we are not root, else a sleep run as nobody."""
    if os.geteuid() != 0:
        yield 1
        return
    proc = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sleep", "60"])
    wait_for("the sleep to run as nobody", lambda: os.stat(f"/proc/{proc.pid}").st_uid == 65534)
    yield proc.pid
    proc.kill()
    proc.wait()


def test_counters_file_is_private_and_follows_the_process(governed):
    before = governed.published()
    directory = os.path.dirname(governed.counters)
    dir_stat, file_stat = os.lstat(directory), os.lstat(governed.counters)
    assert stat.S_ISDIR(dir_stat.st_mode) and stat.S_IMODE(dir_stat.st_mode) == 0o700, \
        f"{directory}: expected a directory of mode 0700, found {oct(dir_stat.st_mode)}"
    assert stat.S_ISREG(file_stat.st_mode) and stat.S_IMODE(file_stat.st_mode) == 0o600, \
        f"{governed.counters}: expected a regular file of mode 0600, found {oct(file_stat.st_mode)}"
    assert dir_stat.st_uid == file_stat.st_uid == os.geteuid()
    assert before["format"] == 1 and before["pid"] == governed.pid
    host = before["pools"][0]
    assert host["pool"] == "host" and host["live"] >= 32 * MIB, f"host pool should hold the 32 MiB: {host}"
    assert governed.say("grow") == "grown"
    after = wait_for("live to grow by 64 MiB in the counters file",
                     lambda: (c := read_counters(governed.counters))
                     and c["pools"][0]["live"] >= host["live"] + 64 * MIB and c)
    assert after["pools"][0]["peak"] >= after["pools"][0]["live"] - MIB


# (arguments, with {pid} for the governed process; what stdout must hold)
GOOD_CASES = [
    (["status", "{pid}"], ["{pid}", "host", "normal", "MiB"]),
    (["status"], ["{pid}", "host"]),
    (["top", "--once"], ["qvshim top", "{pid}", "host", "["]),
    (["dump", "{pid}"], ["==== qvshim", "dump: pid {pid}", "pool"]),
    (["doctor"], ["ok    library", "ok    allocator",
                  "ok    python hook      the interpreter was found (pymalloc arenas counted)", "all checks passed"]),
]


@pytest.mark.parametrize("args,want", GOOD_CASES, ids=[" ".join(c[0]) for c in GOOD_CASES])
def test_subcommands_show_a_governed_process(governed, args, want):
    governed.published()
    args = [a.format(pid=governed.pid) for a in args]
    result = qvshim(*args)
    assert result.returncode == 0, f"qvshim {' '.join(args)}: exit {result.returncode}\n{result.stderr}"
    for text in want:
        assert text.format(pid=governed.pid) in result.stdout, \
            f"qvshim {' '.join(args)} should print {text!r}:\n{result.stdout}"
    assert governed.proc.poll() is None, "the governed process must survive being looked at"


def test_dump_json_is_one_object_of_that_process(governed):
    governed.published()
    result = qvshim("dump", str(governed.pid), "--json")
    assert result.returncode == 0, result.stderr
    dump = json.loads(result.stdout)
    assert dump["pid"] == governed.pid and dump["pools"][0]["live"] >= 32 * MIB
    leftovers = [n for n in os.listdir(os.path.dirname(governed.counters)) if n.startswith(f"{governed.pid}.dump")]
    assert not leftovers, f"the ask and the reply should be gone: {leftovers}"


# (arguments, with {dead}, {plain} or {other}; exit status; what the one line on stderr says)
BAD_CASES = [
    (["status", "{dead}"], 1, "no process {dead}"),
    (["status", "{plain}"], 1, "is not under qvshim"),
    (["status", "{other}"], 1, "belongs to another user"),
    (["status", "garbage"], 1, "'garbage' is not a process id"),
    (["status", "-5"], 2, "bad arguments"),
    (["status", "1", "2"], 2, "bad arguments"),
    (["dump", "{dead}"], 1, "no process {dead}"),
    (["dump", "{plain}"], 1, "is not under qvshim"),
    (["dump", "{other}"], 1, "belongs to another user"),
    (["dump", "0"], 1, "'0' is not a process id"),
    (["dump"], 2, "bad arguments"),
    (["top", "--forever"], 2, "bad arguments"),
    (["doctor", "--fix"], 2, "doctor takes no arguments"),
]


@pytest.mark.parametrize("args,code,message", BAD_CASES, ids=[" ".join(c[0]) for c in BAD_CASES])
def test_bad_input_gets_one_clear_line_and_a_failure_status(args, code, message, dead_pid, plain_sleeper,
                                                             other_users_pid):
    pids = {"dead": dead_pid, "plain": plain_sleeper, "other": other_users_pid}
    args = [a.format(**pids) for a in args]
    result = qvshim(*args)
    assert result.returncode == code, f"qvshim {' '.join(args)}: expected exit {code}, got " \
                                      f"{result.returncode}\n{result.stderr}"
    first = result.stderr.splitlines()[0] if result.stderr else ""
    assert message.format(**pids) in first, f"qvshim {' '.join(args)}: expected {message!r}, got:\n{result.stderr}"
    # The dump signal (SIGUSR2 kills a process that does not handle it) never went out.
    assert os.path.exists(f"/proc/{plain_sleeper}"), "the process not under qvshim must not be signalled"


def test_dump_of_a_process_that_takes_no_dump_signal_says_why_and_sends_none(library):
    process = Governed(library, QVSHIM_DUMP_SIGNAL="off")
    try:
        process.published(dump_signal=False)
        result = qvshim("dump", str(process.pid))
        assert result.returncode == 1, f"expected exit 1, got {result.returncode}\n{result.stderr}"
        assert result.stderr.splitlines() == [
            f"qvshim: process {process.pid} takes no dump signal now (QVSHIM_DUMP_SIGNAL=off, the program "
            "handles the signal itself, or Python is still starting)"], result.stderr
        assert process.proc.poll() is None, "the process must not be signalled"
    finally:
        process.end()


# Waits until the library published its counters file (it has opened its run directory by then),
# closes its standard input and waits: descriptor 0 is then the lowest free one, the one the next
# file the library opens gets (the ask file of `qvshim dump`).
STDIN_CLOSER = r"""
import os, sys, time
counters = os.path.join(sys.argv[1], f"{os.getpid()}.json")
while not os.path.exists(counters):
    time.sleep(0.05)
os.close(0)
print("closed", flush=True)
time.sleep(60)
"""


def test_dump_of_a_process_whose_descriptor_0_is_free_is_answered(library):
    env = plain_env(LD_PRELOAD=library)
    proc = subprocess.Popen([sys.executable, "-c", STDIN_CLOSER, run_dir(env)], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "closed", proc.stderr.read() if proc.poll() is not None else ""
        wait_for("the dump signal to be set up", lambda: (c := read_counters(
            os.path.join(run_dir(env), f"{proc.pid}.json"))) and c["dump_signal"])
        result = qvshim("dump", str(proc.pid))
        assert result.returncode == 0 and f"dump: pid {proc.pid}" in result.stdout, (
            f"expected the dump of a process whose descriptor 0 is free, got exit {result.returncode}:\n"
            f"{result.stderr}")
    finally:
        proc.kill()
        proc.wait()


def test_the_dump_signal_goes_through_a_pidfd_where_there_is_one(monkeypatch, plain_sleeper):
    # A pidfd opened before the start time is checked pins the process: a plain kill after the
    # check could reach another process that took the pid in between.
    from qvshim import dump, status

    sent = []
    with monkeypatch.context() as patch:
        patch.setattr(os, "kill", lambda *args: pytest.fail("os.kill used where a pidfd was at hand"))
        patch.setattr(signal, "pidfd_send_signal", lambda fd, number: sent.append(number))
        dump._signal(plain_sleeper, signal.SIGCONT, status.start_ticks(plain_sleeper))
    assert sent == [signal.SIGCONT]


# (environment, exit status, lines doctor must print)
DOCTOR_VARIABLE_CASES = [
    ({"QVSHIM_BUDGET": "lots", "QVSHIM_WARN": "50"}, 1,
     ['FAIL  QVSHIM_BUDGET    QVSHIM_BUDGET="lots": not a size', "ok    QVSHIM_WARN      '50' -> warn_percent 50"]),
    ({"QVSHIM_BUDGET": "1G", "QVSHIM_PUBLISH": "0"}, 0,
     ["ok    QVSHIM_BUDGET    '1G' -> budget 1073741824", "ok    QVSHIM_PUBLISH   '0'"]),
    # With a log file the library's line about a bad value would go there: doctor still sees it.
    ({"QVSHIM_LOG_FILE": "{tmp}/log", "QVSHIM_INTERVAL": "1ms"}, 1,
     ["ok    QVSHIM_LOG_FILE  '{tmp}/log'", 'FAIL  QVSHIM_INTERVAL  QVSHIM_INTERVAL="1ms": shorter than 10ms']),
    ({"QVSHIM_LOG_FILE": "{tmp}/link"}, 1, ["FAIL  QVSHIM_LOG_FILE  '{tmp}/link' is a symbolic link"]),
    # A path that cannot even be looked at: the reason, from the system.
    ({"QVSHIM_LOG_FILE": "{tmp}/file/log"}, 1,
     ["FAIL  QVSHIM_LOG_FILE  '{tmp}/file/log': Not a directory; the log stays on stderr"]),
    ({"QVSHIM_LOG_FILE": "{tmp}/file"}, 0, ["ok    QVSHIM_LOG_FILE  '{tmp}/file'"]),
    ({"QVSHIM_PYTHON": "off"}, 0,
     ["info  python hook      off (QVSHIM_PYTHON=off)", "ok    QVSHIM_PYTHON    'off' -> python false"]),
]


@pytest.mark.parametrize("env,code,want", DOCTOR_VARIABLE_CASES, ids=[" ".join(c[0]) for c in DOCTOR_VARIABLE_CASES])
def test_doctor_shows_how_each_variable_parses_and_fails_on_a_bad_one(library, tmp_path, env, code, want):
    os.symlink(tmp_path / "elsewhere", tmp_path / "link")
    (tmp_path / "file").write_text("")
    env = {k: v.format(tmp=tmp_path) for k, v in env.items()}
    result = qvshim("doctor", env=plain_env(**env))
    assert result.returncode == code, f"{env}: expected exit {code}, got {result.returncode}\n{result.stdout}"
    for line in want:
        assert line.format(tmp=tmp_path) in result.stdout, f"{env}: expected {line!r}:\n{result.stdout}"


def test_status_rows_show_each_pools_own_figures():
    from qvshim import status

    record = {"pid": 42, "command": "webui", "pools": [
        {"pool": "host", "level": "warn", "live": 3 * MIB, "peak": 5 * MIB, "budget": 8 * MIB,
         "effective_budget": 4 * MIB, "refusals": 2, "purges": 7},
        {"pool": "gpu0", "level": "normal", "live": 512, "peak": 1536, "budget": status.UNLIMITED,
         "effective_budget": status.UNLIMITED, "refusals": 0, "purges": 3},
    ]}
    assert status.rows(record) == [
        ("42", "webui", "host", "warn", "3.0 MiB", "5.0 MiB", "4.0 MiB (of 8.0 MiB)", "75%", "2", "7"),
        ("", "", "gpu0", "normal", "512 B", "1.5 KiB", "unlimited", "-", "0", "3"),
    ]
    # Names left-aligned, figures right-aligned, two spaces between columns.
    assert status.table(status.rows(record)).splitlines() == [
        "PID  COMMAND  POOL  LEVEL      LIVE     PEAK                BUDGET  USE  REFUSED  PURGES",
        "42   webui    host  warn    3.0 MiB  5.0 MiB  4.0 MiB (of 8.0 MiB)  75%        2       7",
        "              gpu0  normal    512 B  1.5 KiB             unlimited    -        0       3",
    ]


def test_doctor_shows_the_machines_memory_and_what_is_kept_for_it(library):
    from qvshim import status

    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    result = qvshim("doctor", env=plain_env(QVSHIM_SYSTEM_RESERVE="256M"))
    lines = [line for line in result.stdout.splitlines() if line.startswith("info  MemAvailable")]
    want = rf"info  MemAvailable     [0-9.]+ [KMGT]?i?B of {re.escape(status.size(total))}; 256.0 MiB kept for the machine"
    assert len(lines) == 1 and re.fullmatch(want, lines[0]), f"expected a line matching {want!r}:\n{result.stdout}"


def test_doctor_reports_a_cgroups_limit_and_use_and_the_host_budget(capsys):
    # No cgroup limit here to run under: the lines doctor makes of a dump that has one.
    from qvshim import doctor

    gib = 1 << 30
    dump = {"pools": [{"pool": 0, "budget": 2 * gib, "effective_budget": gib, "effective_reason": "cgroup"}],
            "system": {"cgroup": {"memory_max": 4 * gib, "memory_current": 3 * gib}, "mem_available": 8 * gib,
                       "mem_total": 16 * gib, "system_reserve": 512 * MIB}}
    report = doctor.Report()
    doctor._host(report, dump)
    assert capsys.readouterr().out.splitlines() == [
        "info  cgroup           memory limit 4.0 GiB, using 3.0 GiB",
        "info  MemAvailable     8.0 GiB of 16.0 GiB; 512.0 MiB kept for the machine",
        "ok    host budget      2.0 GiB, effective 1.0 GiB (cgroup)",
    ]
    assert report.failed == 0


def test_doctor_fails_when_its_test_process_does_not_end(monkeypatch, capsys):
    from qvshim import doctor

    def hangs(library):
        raise subprocess.TimeoutExpired("python", doctor.PROBE_TIMEOUT_S)

    monkeypatch.setattr(doctor, "_probe", hangs)
    assert doctor.main([]) == 1
    assert f"FAIL  test process     did not end within {doctor.PROBE_TIMEOUT_S} s" in capsys.readouterr().out


def test_doctor_fails_without_the_library(tmp_path):
    result = qvshim("doctor", env=plain_env(QVSHIM_LIBRARY=str(tmp_path / "missing.so")))
    assert result.returncode == 1 and "FAIL  library" in result.stdout, result.stdout


def _say_exit(process):
    process.say("exit")


# (how the process ends, whether it removes its file itself; a file left behind is removed by
# the next `qvshim status`, which must not list the process)
ENDINGS = [
    ("normal exit", _say_exit, True),
    ("Ctrl+C (KeyboardInterrupt, then SIGINT)", lambda p: p.proc.send_signal(signal.SIGINT), True),
    ("SIGTERM, default action", lambda p: p.proc.terminate(), False),
    ("SIGKILL", lambda p: p.proc.kill(), False),
]


@pytest.mark.parametrize("how,end,removes", ENDINGS, ids=[e[0] for e in ENDINGS])
def test_counters_file_is_removed_at_exit_or_by_status_after(library, how, end, removes):
    process = Governed(library)
    process.published(dump_signal=False)
    end(process)
    process.proc.wait(timeout=DEADLINE_S)
    process.end()
    assert os.path.exists(process.counters) != removes, \
        f"{how}: expected the file {'removed by the process' if removes else 'left (nothing runs then)'}"
    result = qvshim("status")
    assert result.returncode == 0 and f"\n{process.pid} " not in result.stdout, result.stdout
    assert not os.path.exists(process.counters), f"{how}: status should remove the file of a dead process"
    result = qvshim("status", str(process.pid))
    assert result.returncode == 1 and f"no process {process.pid}" in result.stderr, result.stderr


def _private_xdg(tmp_path):
    base = tmp_path / "xdg"
    base.mkdir()
    os.chmod(base, 0o700)
    os.mkdir(base / "qvshim", 0o700)
    return base


# (whose pid the planted file names, added to its start time, whether status keeps it)
STALE_CASES = [
    ("governed", 0, True),  # the control: a live process under the library, its own start time
    ("governed", 1, False),  # the pid names a later process now (pid reuse)
    ("plain", 0, False),  # the process lives but the library is not mapped (it exec'd away)
    ("dead", 0, False),  # killed: nothing removed the file
]


@pytest.mark.parametrize("whose,ticks_delta,kept", STALE_CASES, ids=[f"{c[0]}{c[1]:+d}" for c in STALE_CASES])
def test_status_skips_and_removes_files_of_processes_that_are_gone(library, tmp_path, governed, plain_sleeper,
                                                                 dead_pid, whose, ticks_delta, kept):
    from qvshim import status as status_module
    pid = {"governed": governed.pid, "plain": plain_sleeper, "dead": dead_pid}[whose]
    ticks = (status_module.start_ticks(pid) or 0) + ticks_delta
    # Planted in a second run directory (as one under another XDG_RUNTIME_DIR would be), so
    # the governed process's own file is left alone.
    base = _private_xdg(tmp_path)
    path = base / "qvshim" / f"{pid}.json"
    record = {"format": 1, "pid": pid, "start_ticks": ticks, "dump_signal": 0,
              "pools": [{"pool": "host", "level": "normal", "live": 1, "peak": 1, "budget": 2,
                         "effective_budget": 2, "refusals": 0, "purges": 0}]}
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        json.dump(record, f)
    governed.published(dump_signal=False)
    result = qvshim("status", env=plain_env(XDG_RUNTIME_DIR=str(base)))
    assert result.returncode == 0, result.stderr
    assert os.path.exists(path) == kept, f"{whose} pid, start time {ticks_delta:+d}: expected the file " \
                                         f"{'kept' if kept else 'removed'}"
    assert (f"\n{pid} " in result.stdout) == (whose == "governed"), result.stdout


def test_status_removes_the_temporary_file_a_dead_process_left_alone(tmp_path, dead_pid):
    # A write the process's end cut short leaves ".<pid>.json.<hex>" and nothing else.
    base = _private_xdg(tmp_path)
    left = base / "qvshim" / f".{dead_pid}.json.5f3a"
    with open(os.open(left, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write("{")
    result = qvshim("status", env=plain_env(XDG_RUNTIME_DIR=str(base)))
    assert not result.stderr, result.stderr
    assert not left.exists(), f"expected {left.name} of the dead process {dead_pid} removed"


def test_fork_child_publishes_its_own_file_and_leaves_the_parents(governed):
    governed.published(dump_signal=False)
    child = int(governed.say("fork"))
    child_file = os.path.join(os.path.dirname(governed.counters), f"{child}.json")
    record = wait_for("the fork child's counters file", lambda: read_counters(child_file))
    assert record["pid"] == child
    result = qvshim("status")
    assert f"\n{child} " in result.stdout and f"\n{governed.pid} " in result.stdout, result.stdout
    assert governed.say("end-child") == "child ended"
    assert not os.path.exists(child_file), "the child removes its own file at exit"
    assert os.path.exists(governed.counters), "and never its parent's"


# Publishes, forks, and has the child look for its own counters file during its first 0.45 s;
# prints when the child first saw it (null: not in that time).
SHORT_CHILD = r"""
import json, os, sys, time
mine = os.path.join(sys.argv[1], f"{os.getpid()}.json")
deadline = time.monotonic() + 20
while not os.path.exists(mine) and time.monotonic() < deadline:
    time.sleep(0.02)
time.sleep(0.1)
r, w = os.pipe()
forked_at = time.monotonic()
pid = os.fork()
if pid == 0:
    own = os.path.join(sys.argv[1], f"{os.getpid()}.json")
    seen_at = None
    while seen_at is None and time.monotonic() - forked_at < 0.45:
        if os.path.exists(own):
            seen_at = time.monotonic() - forked_at
        time.sleep(0.005)
    os.write(w, json.dumps({"seen_at": seen_at}).encode())
    os._exit(0)
os.close(w)
print("parent published", os.path.exists(mine), os.read(r, 200).decode(), flush=True)
os.waitpid(pid, 0)
"""


def test_fork_child_waits_its_own_half_second_before_publishing(library):
    # A fork child is a new process: like one just loaded, it publishes only once it has lived
    # FIRST_PUBLISH_AFTER_MS (500 ms), so short children leave no files. The parent's schedule
    # (every 250 ms) is not its own. A quick monitor would publish at once on the parent's one.
    env = plain_env(LD_PRELOAD=library, QVSHIM_INTERVAL="100ms")
    result = subprocess.run([sys.executable, "-c", SHORT_CHILD, run_dir(env)], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "parent published True" in result.stdout, result.stdout + result.stderr
    seen_at = json.loads(result.stdout.split("True", 1)[1])["seen_at"]
    # The coarse clock's tick (a few ms) is the only slack.
    assert seen_at is None or seen_at >= 0.48, (
        f"the fork child published {seen_at:.3f} s after the fork, before its own 0.5 s")


def _symlink(base):
    os.makedirs(base / "elsewhere", mode=0o700)
    os.symlink(base / "elsewhere", base / "qvshim")
    return base / "elsewhere"


def _wide(base):
    os.mkdir(base / "qvshim")
    os.chmod(base / "qvshim", 0o755)
    return base / "qvshim"


def _not_a_directory(base):
    (base / "qvshim").write_text("planted")
    return None


def _others(base):
    if os.geteuid() != 0:
        pytest.fail("needs root to make a directory of another user")
    os.mkdir(base / "qvshim", 0o700)
    os.chown(base / "qvshim", 65534, 65534)
    return base / "qvshim"


# (what is planted at $XDG_RUNTIME_DIR/qvshim, the reason the line gives)
HOSTILE_CASES = [
    (_symlink, "is a symbolic link"),
    (_wide, "its mode is not 0700"),
    (_not_a_directory, "not a directory"),
    (_others, "belongs to another user"),
]


@pytest.mark.parametrize("plant,reason", HOSTILE_CASES, ids=[c[0].__name__.strip("_") for c in HOSTILE_CASES])
def test_a_hostile_run_directory_is_refused_and_the_host_runs_on(library, tmp_path, plant, reason):
    base = tmp_path / "xdg"
    base.mkdir()
    os.chmod(base, 0o700)
    target = plant(base)
    process = Governed(library, XDG_RUNTIME_DIR=str(base))
    # The refusal is said when the monitor first publishes; the host works on meanwhile.
    seen = stderr_until(process.proc, "run directory")
    assert process.say("grow") == "grown"
    err = seen + process.end()
    assert process.proc.returncode == 0, f"the host must not fail: exit {process.proc.returncode}\n{err}"
    lines = [line for line in err.splitlines() if "run directory" in line]
    assert len(lines) == 1 and reason in lines[0] and str(base / "qvshim") in lines[0], \
        f"expected one warning line saying {reason!r}, got:\n{err}"
    if target is not None and os.path.isdir(target):
        assert not os.listdir(target), f"nothing may be written into {target}: {os.listdir(target)}"


def test_publish_off_writes_no_file(library):
    quiet = Governed(library, QVSHIM_PUBLISH="0")
    loud = Governed(library)
    try:
        # The loud one, started after the quiet one, has published twice: the quiet one would have.
        first = loud.published(dump_signal=False)
        wait_for("a second publication", lambda: (c := read_counters(loud.counters))
                 and c["updated_ms"] != first["updated_ms"])
        assert not os.path.exists(quiet.counters), "QVSHIM_PUBLISH=0 must not publish"
        result = qvshim("status", str(quiet.pid))
        assert result.returncode == 1 and "not under qvshim" in result.stderr
    finally:
        quiet.end()
        loud.end()



def test_top_refreshes_until_ctrl_c_and_then_exits_0_quietly(governed):
    governed.published()
    top = subprocess.Popen([sys.executable, "-m", "qvshim", "top"], env=plain_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        frames = 0
        for line in top.stdout:
            frames += line.startswith("qvshim top")
            if frames == 2:  # a second frame: it refreshes
                break
        assert frames == 2, "expected top to print a second frame"
        top.send_signal(signal.SIGINT)
        out, err = top.communicate(timeout=DEADLINE_S)
    finally:
        if top.poll() is None:
            top.kill()
            top.wait()
    assert top.returncode == 0 and err == "", f"Ctrl+C: expected exit 0 and nothing on stderr, got " \
                                              f"{top.returncode}:\n{err}"
