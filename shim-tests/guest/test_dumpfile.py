"""QVSHIM_DUMP_FILE cannot be turned against the process that writes it (issue 8, items 4 and 10).

Each row runs c/dumpfile_raise.c under the shim in a sticky, world-writable directory (like /tmp)
with QVSHIM_DUMP_FILE set, after arranging what a local attacker (uid 65534 here) or a careless
user could have put at the dump's path; the program asks for one dump and exits 0. The row then
says what must be true afterwards: what is at the path (and what it still points to), where the
dump went (the file, the log, a reader of a FIFO) and which line the shim printed. Nothing here may
hang: the runs have shimrun's deadline.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

import shimrun

GUEST_C_DIR = Path(__file__).resolve().parent / "c"
OTHER_UID = 65534
END_OF_TEXT_DUMP = "==== end of qvshim dump ===="
PLANTED_TEXT = "planted by another user\n"
VICTIM_TEXT = "a file the attacker wants root to overwrite\n"
MODE_PRIVATE = 0o600
# F_SETPIPE_SZ rounds up to one page.
PIPE_SMALLEST_BYTES = 4096


@pytest.fixture
def shared_dir():
    """A sticky, world-writable directory under /tmp (reachable by OTHER_UID, unlike tmp_path)."""
    path = Path(tempfile.mkdtemp(prefix="qvshim-dumpfile-", dir="/tmp"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def raise_program(shim_library):
    return shimrun.build(GUEST_C_DIR / "dumpfile_raise.c")


@pytest.fixture(scope="session")
def fixed_getrandom():
    """c/fixed_getrandom.c as a shared object for LD_PRELOAD: the shim's temporary names known."""
    source = GUEST_C_DIR / "fixed_getrandom.c"
    built = shimrun.BUILD_DIR / "fixed_getrandom.so"
    shimrun.BUILD_DIR.mkdir(parents=True, exist_ok=True)
    newest = max(source.stat().st_mtime, (GUEST_C_DIR / "fixed_getrandom.h").stat().st_mtime)
    if not built.exists() or built.stat().st_mtime < newest:
        cmd = ["gcc", "-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-o", str(built), str(source)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, f"expected {source.name} to compile:\n{done.stderr}"
    return built


def run_helper(argv, env_set, uid=None, cwd=None) -> shimrun.Run:
    """shimrun.run, optionally as another user (setuid in the child before exec)."""
    env = shimrun.shim_env(env_set)
    shown = {"LD_PRELOAD": env["LD_PRELOAD"], **env_set}
    argv = [str(a) for a in argv]
    pre = (lambda: (os.setgid(uid), os.setuid(uid))) if uid is not None else None
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=cwd,
                              timeout=shimrun.RUN_TIMEOUT_SECONDS, stdin=subprocess.DEVNULL,
                              preexec_fn=pre)
    except subprocess.TimeoutExpired as e:
        return shimrun.Run(argv, shown, -1, str(e.stdout or ""), str(e.stderr or ""), timed_out=True)
    return shimrun.Run(argv, shown, done.returncode, done.stdout, done.stderr)


# ---------------------------------------------------------------------------------------------
# What a row arranges before the run. Each returns the QVSHIM_DUMP_FILE value; `ctx` collects
# what the checks need (paths, inode numbers, a FIFO's reading end).

def arrange_nothing(d: Path, ctx: dict) -> str:
    return str(d / "dump.txt")


def arrange_own_old_dump(d: Path, ctx: dict) -> str:
    target = d / "dump.txt"
    target.write_text("an older dump of ours\n")
    target.chmod(0o644)
    return str(target)


def arrange_symlink_to_victim(d: Path, ctx: dict) -> str:
    victim = d / "victim"
    victim.write_text(VICTIM_TEXT)
    target = d / "dump.txt"
    target.symlink_to(victim)
    os.lchown(target, OTHER_UID, OTHER_UID)
    ctx["victim"] = victim
    return str(target)


def arrange_other_users_file(d: Path, ctx: dict) -> str:
    target = d / "dump.txt"
    target.write_text(PLANTED_TEXT)
    os.chown(target, OTHER_UID, OTHER_UID)
    target.chmod(0o666)
    ctx["inode"] = target.stat().st_ino
    return str(target)


def arrange_root_file_for_other_user(d: Path, ctx: dict) -> str:
    target = d / "dump.txt"
    target.write_text(PLANTED_TEXT)
    target.chmod(0o644)
    ctx["inode"] = target.stat().st_ino
    return str(target)


def arrange_victim_for_partial(d: Path, ctx: dict) -> str:
    victim = d / "victim"
    victim.write_text(VICTIM_TEXT)
    ctx["victim"] = victim
    return str(d / "dump.txt")


def arrange_dangling_victim_for_partial(d: Path, ctx: dict) -> str:
    ctx["victim"] = d / "created-by-the-shim"
    return str(d / "dump.txt")


def arrange_null_device(d: Path, ctx: dict) -> str:
    node = d / "null"
    os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    ctx["rdev"] = node.stat().st_rdev
    return str(node)


def arrange_fifo_with_reader(d: Path, ctx: dict) -> str:
    fifo = d / "fifo"
    os.mkfifo(fifo, 0o600)
    ctx["reader"] = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    return str(fifo)


def arrange_full_fifo(d: Path, ctx: dict) -> str:
    """A FIFO whose reader never reads, its buffer already full: a write can only wait."""
    fifo = d / "fifo"
    os.mkfifo(fifo, 0o600)
    ctx["reader"] = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    ctx["filler"] = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    fcntl.fcntl(ctx["filler"], fcntl.F_SETPIPE_SZ, PIPE_SMALLEST_BYTES)
    try:
        while True:
            os.write(ctx["filler"], b"x" * PIPE_SMALLEST_BYTES)
    except BlockingIOError:
        pass
    return str(fifo)


def arrange_fifo_without_reader(d: Path, ctx: dict) -> str:
    fifo = d / "fifo"
    os.mkfifo(fifo, 0o600)
    return str(fifo)


def arrange_directory(d: Path, ctx: dict) -> str:
    (d / "dumps").mkdir()
    return str(d / "dumps")


def arrange_empty(d: Path, ctx: dict) -> str:
    ctx["before"] = sorted(os.listdir(d))
    return ""


def arrange_own_stderr(d: Path, ctx: dict) -> str:
    return "/dev/fd/2"


# ---------------------------------------------------------------------------------------------
# What must be seen after the run.

def shim_errors(run) -> list[str]:
    return [ln for ln in run.shim_lines() if " ERROR " in ln or " WARN " in ln]


def expect_refusal_line(run, value: str, reason: str):
    lines = [ln for ln in shim_errors(run) if f"QVSHIM_DUMP_FILE=\"{value}\"" in ln]
    assert any(reason in ln for ln in lines), (
        f"expected one line naming QVSHIM_DUMP_FILE=\"{value}\" and saying {reason!r}; "
        f"got {lines or 'none'}:{run.describe()}")


def expect_dump_in_log(run):
    assert END_OF_TEXT_DUMP in run.stderr, (
        f"expected the refused dump to be written to the log (stderr) whole:{run.describe()}")


def expect_no_dump_lines(run):
    lines = [ln for ln in shim_errors(run) if "dump" in ln.lower()]
    assert not lines, f"expected no error or warning about the dump, got {lines}:{run.describe()}"


def expect_whole_dump_file(path: Path, uid: int, run):
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode), f"expected {path} to be a regular file:{run.describe()}"
    assert stat.S_IMODE(st.st_mode) == MODE_PRIVATE, (
        f"expected the dump {path} to have mode 0600 (it can hold code addresses), got "
        f"{oct(stat.S_IMODE(st.st_mode))}")
    assert st.st_uid == uid, f"expected the dump {path} to belong to uid {uid}, got {st.st_uid}"
    text = path.read_text()
    assert text.rstrip().endswith(END_OF_TEXT_DUMP), (
        f"expected {path} to hold one whole text dump, got {len(text)} bytes: {text[-200:]!r}")


def expect_no_partials(d: Path):
    left = sorted(p.name for p in d.iterdir() if p.name.endswith(".partial") and "dump.txt." in p.name
                  and not p.is_symlink() and p.read_text() != PLANTED_TEXT)
    assert not left, f"expected no temporary dump file of the shim's left in {d}, found {left}"


def seen_written(d, target, ctx, run, uid=0):
    expect_whole_dump_file(Path(target), uid, run)
    expect_no_partials(d)
    expect_no_dump_lines(run)


def seen_written_by_other_user(d, target, ctx, run):
    seen_written(d, target, ctx, run, uid=OTHER_UID)


def seen_symlink_kept(d, target, ctx, run):
    assert os.path.islink(target) and os.readlink(target) == str(ctx["victim"]), (
        f"expected the symlink planted at {target} to be left as it was (never replaced):"
        f"{run.describe()}")
    assert ctx["victim"].read_text() == VICTIM_TEXT, (
        f"expected the symlink's target {ctx['victim']} to be untouched, it now holds "
        f"{ctx['victim'].read_text()[:200]!r}")
    expect_refusal_line(run, target, "symbolic link")
    expect_dump_in_log(run)
    expect_no_partials(d)


def expect_untouched_plant(path: Path, inode: int, owner: int, run):
    st = os.lstat(path)
    assert st.st_ino == inode and st.st_uid == owner, (
        f"expected {path} (uid {owner}, inode {inode}) to be left in place, found uid {st.st_uid}, "
        f"inode {st.st_ino}:{run.describe()}")
    assert path.read_text() == PLANTED_TEXT, (
        f"expected {path} not to be written, it now holds {path.read_text()[:200]!r}")


def seen_other_users_file_kept(d, target, ctx, run):
    expect_untouched_plant(Path(target), ctx["inode"], OTHER_UID, run)
    expect_refusal_line(run, target, f"uid {OTHER_UID}")
    expect_dump_in_log(run)
    expect_no_partials(d)


def seen_root_file_kept_for_other_user(d, target, ctx, run):
    expect_untouched_plant(Path(target), ctx["inode"], 0, run)
    expect_refusal_line(run, target, "uid 0")
    expect_dump_in_log(run)


def planted_partials(run) -> list[Path]:
    """The names the shim tries first under fixed_getrandom.so, where the program planted (it
    prints them); four of them."""
    planted = [Path(ln.split(" ", 1)[1]) for ln in run.stdout.splitlines() if ln.startswith("planted ")]
    assert len(planted) == 4, f"expected the program to plant at four names:{run.describe()}"
    return planted


def seen_planted_link_unused(d, target, ctx, run):
    for partial in planted_partials(run):
        assert partial.is_symlink() and os.readlink(partial) == str(ctx["victim"]), (
            f"expected the symlink planted at {partial} to be left alone:{run.describe()}")
    assert ctx["victim"].read_text() == VICTIM_TEXT, (
        f"expected {ctx['victim']} (the planted links' target) untouched, it now holds "
        f"{ctx['victim'].read_text()[:200]!r}")
    seen_written(d, target, ctx, run)


def seen_dangling_planted_link_unused(d, target, ctx, run):
    assert not ctx["victim"].exists(), (
        f"expected the shim not to create {ctx['victim']} through the symlink planted at the "
        f"temporary name; it exists:{run.describe()}")
    seen_written(d, target, ctx, run)


def seen_planted_file_unused(d, target, ctx, run):
    for partial in planted_partials(run):
        assert partial.exists() and partial.read_text() == PLANTED_TEXT, (
            f"expected the file planted at {partial} to be left alone:{run.describe()}")
        assert os.lstat(partial).st_uid == OTHER_UID
    seen_written(d, target, ctx, run)


def seen_still_null_device(d, target, ctx, run):
    st = os.lstat(target)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == ctx["rdev"], (
        f"expected {target} to still be the null character device after the dump, got mode "
        f"{oct(st.st_mode)}:{run.describe()}")
    expect_no_dump_lines(run)


def read_fifo(fd: int) -> str:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def seen_fifo_read_whole(d, target, ctx, run):
    received = read_fifo(ctx["reader"])
    assert stat.S_ISFIFO(os.lstat(target).st_mode), (
        f"expected {target} to still be a FIFO after the dump:{run.describe()}")
    assert received.rstrip().endswith(END_OF_TEXT_DUMP), (
        f"expected the FIFO's reader to receive one whole dump, got {len(received)} bytes "
        f"{received[-200:]!r}:{run.describe()}")
    expect_no_dump_lines(run)


def seen_fifo_refused(d, target, ctx, run):
    assert stat.S_ISFIFO(os.lstat(target).st_mode), (
        f"expected {target} to still be a FIFO after the dump:{run.describe()}")
    expect_refusal_line(run, target, "no reader")
    expect_dump_in_log(run)


def seen_full_fifo_given_up(d, target, ctx, run):
    assert stat.S_ISFIFO(os.lstat(target).st_mode), (
        f"expected {target} to still be a FIFO after the dump:{run.describe()}")
    expect_refusal_line(run, target, "stopped reading")
    expect_dump_in_log(run)


def seen_directory_refused(d, target, ctx, run):
    assert os.path.isdir(target) and not os.listdir(target), (
        f"expected the directory {target} to be left as it was:{run.describe()}")
    expect_refusal_line(run, target, "directory")
    expect_dump_in_log(run)
    expect_no_partials(d)


def seen_empty_refused_at_load(d, target, ctx, run):
    lines = [ln for ln in shim_errors(run) if 'QVSHIM_DUMP_FILE=""' in ln and "using default" in ln]
    assert lines, (f"expected one line at load naming QVSHIM_DUMP_FILE=\"\" and the default used"
                   f":{run.describe()}")
    expect_dump_in_log(run)
    assert sorted(os.listdir(d)) == ctx["before"], (
        f"expected no file created in the working directory {d}, found {sorted(os.listdir(d))}")


def seen_on_own_stderr(d, target, ctx, run):
    expect_dump_in_log(run)
    expect_no_dump_lines(run)


@dataclass
class Row:
    case: str
    arrange: Callable[[Path, dict], str]
    seen: Callable
    plant: list[str] = field(default_factory=list)
    uid: int | None = None


ROWS = [
    Row("absent_target_gets_a_whole_private_dump", arrange_nothing, seen_written),
    Row("own_older_dump_is_replaced_by_a_private_one", arrange_own_old_dump, seen_written),
    Row("symlink_at_target_is_refused_and_kept", arrange_symlink_to_victim, seen_symlink_kept),
    Row("other_users_0666_file_at_target_is_neither_written_nor_replaced", arrange_other_users_file,
        seen_other_users_file_kept),
    Row("symlink_at_the_guessable_partial_name_is_not_used", arrange_victim_for_partial,
        seen_planted_link_unused, plant=["plant-link", "{target}", "{victim}"]),
    Row("dangling_symlink_at_the_guessable_partial_name_creates_nothing",
        arrange_dangling_victim_for_partial, seen_dangling_planted_link_unused,
        plant=["plant-link", "{target}", "{victim}"]),
    Row("other_users_file_at_the_guessable_partial_name_is_not_used", arrange_nothing,
        seen_planted_file_unused, plant=["plant-file", "{target}", str(OTHER_UID)]),
    Row("null_device_stays_a_device", arrange_null_device, seen_still_null_device),
    Row("fifo_with_a_reader_gets_the_dump_and_stays_a_fifo", arrange_fifo_with_reader,
        seen_fifo_read_whole),
    Row("fifo_whose_reader_never_reads_is_given_up_without_hanging", arrange_full_fifo,
        seen_full_fifo_given_up),
    Row("fifo_without_a_reader_is_refused_without_hanging", arrange_fifo_without_reader,
        seen_fifo_refused),
    Row("directory_is_refused_and_the_dump_goes_to_the_log", arrange_directory,
        seen_directory_refused),
    Row("empty_value_is_a_bad_value_at_load", arrange_empty, seen_empty_refused_at_load),
    Row("own_stderr_by_its_dev_fd_name_is_written_in_place", arrange_own_stderr, seen_on_own_stderr),
    Row("non_root_user_writes_a_private_dump_in_a_sticky_directory", arrange_nothing,
        seen_written_by_other_user, uid=OTHER_UID),
    Row("non_root_user_does_not_replace_roots_file_in_a_sticky_directory",
        arrange_root_file_for_other_user, seen_root_file_kept_for_other_user, uid=OTHER_UID),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.case for r in ROWS])
def test_dump_file(row, raise_program, fixed_getrandom, shared_dir):
    ctx: dict = {}
    target = row.arrange(shared_dir, ctx)
    args = [a.format(target=target, victim=ctx.get("victim", "")) for a in row.plant]
    env_set = {"QVSHIM_DUMP_FILE": target}
    if row.plant:
        # The planted names are the ones the shim tries first only with its random draws fixed.
        env_set["LD_PRELOAD"] = f"{fixed_getrandom} {shimrun.SHIM}"
    try:
        run = run_helper([raise_program, *args], env_set, uid=row.uid, cwd=shared_dir)
        assert not run.timed_out and run.returncode == 0 and run.stdout.startswith("pid "), (
            f"expected the program to ask for a dump and exit 0, got {run.exit_text()}:"
            f"{run.describe()}")
        row.seen(shared_dir, target, ctx, run)
    finally:
        for end in ("reader", "filler"):
            if end in ctx:
                os.close(ctx[end])


def test_json_dump_file_is_one_whole_object(raise_program, shared_dir):
    target = shared_dir / "dump-%p.json"
    run = run_helper([raise_program], {"QVSHIM_DUMP_FILE": str(target), "QVSHIM_DUMP_FORMAT": "json"})
    assert run.returncode == 0, f"expected exit 0:{run.describe()}"
    pid = int(run.stdout.split()[1])
    written = shared_dir / f"dump-{pid}.json"
    assert written.exists(), f"expected the dump at {written}:{run.describe()}"
    assert json.loads(written.read_text())["pid"] == pid
    assert stat.S_IMODE(written.stat().st_mode) == MODE_PRIVATE
