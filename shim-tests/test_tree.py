"""QVSHIM_SCOPE=tree: one budget for a process and its descendants (docs/TREE.md).

The programs are modes of py/tree_family.py. The pool tests sample the anonymous memory
(/proc/<pid>/status RssAnon) of every process of the tree while it runs and hold its sum to the
budget plus one reserve per process; run with QVSHIM_SCOPE=process instead, the same workers
would hold four budgets.
"""

import json
import os
import pwd
import subprocess
import sys
import time

import pytest

import shimrun

PROGRAM = shimrun.PY_PROGRAMS_DIR / "tree_family.py"
BUDGET_BYTES = shimrun.GIB
RESERVE_BYTES = 64 * shimrun.MIB  # QVSHIM_RESERVE's default
# The first word of a ledger of this layout (src/ledger/tree.rs, MAGIC).
LEDGER_MAGIC = 0x7176_7472_6565_0001
TREE_ENV = {"QVSHIM_SCOPE": "tree", "QVSHIM_BUDGET": "1G", "QVSHIM_INTERVAL": "200ms"}


def descendants(top: int) -> list[int]:
    """top and every process below it, from the parent pids in /proc."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(name))
    found, todo = [], [top]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def rss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_sampled(args: list[str], env_set: dict[str, str]):
    """Runs tree_family.py under the shim, sampling the tree's RssAnon until it ends.
    Returns (result JSON or None, returncode, stderr, the worst sample as (sum, processes))."""
    env = shimrun.shim_env(env_set)
    env["PYTHONPATH"] = str(shimrun.PY_PROGRAMS_DIR)
    proc = subprocess.Popen([sys.executable, str(PROGRAM), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    worst = (0, 0, 0)  # (sum - allowed, sum, processes)
    deadline = time.monotonic() + shimrun.RUN_TIMEOUT_SECONDS
    while proc.poll() is None and time.monotonic() < deadline:
        pids = descendants(proc.pid)
        total = sum(rss_anon(p) for p in pids)
        over = total - (BUDGET_BYTES + RESERVE_BYTES * len(pids))
        if over > worst[0] or worst[1] == 0:
            worst = (over, total, len(pids))
        time.sleep(0.02)
    if proc.poll() is None:
        for pid in descendants(proc.pid):
            try:
                os.kill(pid, 9)
            except OSError:
                pass
    out, err = proc.communicate()
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    return (json.loads(lines[-1]) if lines else None), proc.returncode, err, worst


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_pool_workers_share_one_budget_and_stay_within_it_plus_a_reserve_each(method, tmp_path):
    result, rc, err, (over, total, processes) = run_sampled(
        ["pool", method, str(tmp_path)], TREE_ENV)
    assert rc == 0 and result, f"expected the {method} pool to finish; rc {rc}\n{err}"
    held = sum(result["held_bytes"])
    assert over <= 0, (
        f"expected the tree's RssAnon within 1 GiB + 64 MiB x {processes} processes; "
        f"saw {total / shimrun.MIB:.0f} MiB\n{err}")
    # Together the workers filled the one budget (less what the top and the credit hold), and
    # no more: four process budgets would let them hold 4 GiB.
    assert 600 * shimrun.MIB <= held <= BUDGET_BYTES, (
        f"expected the 4 workers to hold between 600 MiB and 1 GiB together; held "
        f"{[b // shimrun.MIB for b in result['held_bytes']]} MiB\n{err}")


def test_a_killed_workers_share_comes_back_to_the_others():
    result, rc, err, _ = run_sampled(["kill"], TREE_ENV)
    assert rc == 0 and result, f"expected the kill program to finish; rc {rc}\n{err}"
    assert sum(result["held_bytes"]) <= BUDGET_BYTES, result
    assert result["victim_share"] >= 100 * shimrun.MIB, (
        f"expected the victim to hold a fair share before it was killed: {result}")
    assert result["survivor_got"] >= result["asked"], (
        f"expected a survivor to allocate the killed worker's share within the deadline: "
        f"{result}\n{err}")


# (mode, its argument, what the JSON must say)
FAMILY_CASES = [
    ("grandchild", [], {"grandchild": "holding", "top_got_600M_while_held": False,
                        "top_got_600M_after": True}),
    ("optout", ["process"], {"child": "got"}),
    ("optout", ["tree"], {"child": "MemoryError"}),
    ("stats", [], {"child_sees_600M_or_more": True}),
    ("exec", [], {"after_exec": "got"}),
]


@pytest.mark.parametrize("mode,args,want", FAMILY_CASES,
                         ids=[f"{m}-{'-'.join(a)}" for m, a, _ in FAMILY_CASES])
def test_descendants_count_unless_they_opt_out(mode, args, want):
    result = shimrun.run_python([str(PROGRAM), mode, *args], TREE_ENV)
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("{")]
    assert result.returncode == 0 and lines, f"expected {mode} to finish:{result.describe()}"
    seen = json.loads(lines[-1])
    for key, value in want.items():
        assert seen.get(key) == value, (
            f"expected {key}={value!r} in {mode} {args}; saw {seen}:{result.describe()}")


# The top starts a member child and looks for the ledger's file after the child has exited.
LEDGER_FILE_PROGRAM = """
import json, os, subprocess, sys
path = os.environ.get("QVSHIM_TREE_LEDGER", "")
child = subprocess.run([sys.executable, "-c", "import os; print(os.environ['QVSHIM_TREE_LEDGER'])"],
                       capture_output=True, text=True)
print(json.dumps({"path": path, "child_saw": child.stdout.strip(),
                  "kept_after_the_child_exited": os.path.exists(path)}))
"""


def test_the_ledger_file_outlives_a_member_and_goes_with_the_last():
    result = shimrun.run_python(["-c", LEDGER_FILE_PROGRAM], TREE_ENV)
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("{")]
    assert result.returncode == 0 and lines, f"expected the program to finish:{result.describe()}"
    seen = json.loads(lines[-1])
    assert seen["path"].startswith("/") and seen["child_saw"] == seen["path"], seen
    assert seen["kept_after_the_child_exited"], (
        f"a member's exit removed the ledger its tree still uses: {seen}{result.describe()}")
    assert not os.path.exists(seen["path"]), (
        f"the last member left the ledger's file behind: {seen['path']}")


def test_a_joining_child_says_how_many_members_the_tree_has():
    # At INFO the top says it created the ledger and the child that it joined, counting itself.
    child = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'pass'], check=True)"
    result = shimrun.run_python(["-c", child], {**TREE_ENV, "QVSHIM_LOG": "info"})
    assert result.returncode == 0, f"expected the program to finish:{result.describe()}"
    assert "tree scope: created the tree's ledger" in result.stderr, result.describe()
    joined = [ln for ln in result.stderr.splitlines() if "tree scope: joined the tree's ledger" in ln]
    assert len(joined) == 1 and "(2 members, host budget 1.00 GiB)" in joined[0], (
        f"expected the child to join a tree of 2 members:{result.describe()}")


def _make_ledger_cases(tmp_path):
    """(name, path, expected reason) for ledgers a process must refuse."""
    link = tmp_path / "link"
    target = tmp_path / "target"
    target.write_bytes(b"\0" * (1 << 20))
    target.chmod(0o600)
    link.symlink_to(target)
    readable = tmp_path / "readable"
    readable.write_bytes(b"\0" * (1 << 20))
    readable.chmod(0o644)
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\xff" * (1 << 20))
    garbage.chmod(0o600)
    # The right magic word, another layout's size: a library of another version made it.
    other_layout = tmp_path / "other-layout"
    other_layout.write_bytes(LEDGER_MAGIC.to_bytes(8, "little") + (12345).to_bytes(8, "little")
                             + b"\0" * ((1 << 20) - 16))
    other_layout.chmod(0o600)
    short = tmp_path / "short"
    short.write_bytes(b"\0" * 100)
    short.chmod(0o600)
    cases = [
        ("absent", str(tmp_path / "absent"), "no such file"),
        ("symlink", str(link), "a symbolic link (never followed)"),
        ("readable", str(readable), "others may read or write it (mode is not 0600)"),
        ("garbage", str(garbage), "not a ledger of this version of the library"),
        ("other_layout", str(other_layout), "not a ledger of this version of the library"),
        ("short", str(short), "too short to be a ledger"),
        ("relative", "tree-ledger", "not an absolute path"),
    ]
    foreign = tmp_path / "foreign"
    foreign.write_bytes(b"\0" * (1 << 20))
    foreign.chmod(0o600)
    if os.geteuid() == 0:
        os.chown(foreign, pwd.getpwnam("nobody").pw_uid, -1)
        cases.append(("foreign", str(foreign), "owned by another user"))
    else:
        # Not root: a file of another user cannot be made; root's own is refused at open.
        cases.append(("foreign", "/etc/passwd", "permission denied"))
    return cases


def test_a_foreign_or_unreachable_ledger_is_named_once_and_the_process_keeps_its_budget(
        tmp_path):
    for name, path, reason in _make_ledger_cases(tmp_path):
        result = shimrun.run_python([str(PROGRAM), "alone"],
                                    dict(TREE_ENV, QVSHIM_TREE_LEDGER=path))
        want = (f'[qvshim] ERROR QVSHIM_TREE_LEDGER="{path}": {reason}; '
                f"using default this process's own budget")
        assert result.returncode == 0 and result.shim_lines() == [want], (
            f"{name}: expected exactly the line {want!r} and a run to the end:"
            f"{result.describe()}")
        seen = json.loads(result.stdout.splitlines()[-1])
        assert seen["got_600M"], f"{name}: expected its own 1 GiB budget to hold 600 MiB"
