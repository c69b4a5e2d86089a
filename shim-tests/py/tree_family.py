"""A family of processes under one tree budget (QVSHIM_SCOPE=tree), driven by
shim-tests/test_tree.py. Run under the shim; prints one JSON line with what it saw.

    tree_family.py pool fork|spawn   4 pool workers each grow until MemoryError and hold
    tree_family.py kill              4 workers fill the budget, one is SIGKILLed, a survivor
                                     then allocates its share
    tree_family.py grandchild        a grandchild holds memory; the top cannot have it
    tree_family.py optout process|tree   the top holds 600 MiB; a child whose own
                                     environment says QVSHIM_SCOPE=... allocates 600 MiB
    tree_family.py stats             a child's C API shows the tree's live bytes
    tree_family.py alone             allocates 600 MiB of a 1 GiB budget, nothing else
    tree_family.py exec              holds 600 MiB, then execs a program that allocates 600 MiB
"""

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

MIB = 1 << 20
BLOCK_BYTES = 8 * MIB
WORKERS = 4
# Every wait here is a deadline, never a measure: generous for a loaded machine.
DEADLINE_SECONDS = 60.0


PAGE_BYTES = 4096


def touched(nbytes):
    """A bytearray of nbytes with every page written, so it is resident."""
    block = bytearray(nbytes)
    block[::PAGE_BYTES] = b"\x01" * len(range(0, nbytes, PAGE_BYTES))
    return block


def grow():
    """Blocks of 8 MiB (written, so they are resident) until MemoryError."""
    blocks = []
    try:
        while True:
            blocks.append(touched(BLOCK_BYTES))
    except MemoryError:
        pass
    return blocks


def wait_for(predicate, what):
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"gave up waiting for {what}")
        time.sleep(0.02)


def pool_worker(args):
    done_dir, index = args
    blocks = grow()
    open(os.path.join(done_dir, str(index)), "w").close()
    # Hold until every worker met its MemoryError, so the sampler sees them all full at once.
    wait_for(lambda: len(os.listdir(done_dir)) >= WORKERS, "the other workers")
    return os.getpid(), len(blocks) * BLOCK_BYTES


def pool(method, done_dir):
    ctx = mp.get_context(method)
    with ctx.Pool(WORKERS) as p:
        held = p.map(pool_worker, [(done_dir, i) for i in range(WORKERS)])
    return {"held_bytes": [b for _, b in held], "pids": [pid for pid, _ in held]}


def kill_worker(conn):
    blocks = grow()
    conn.send(len(blocks) * BLOCK_BYTES)
    while True:
        command = conn.recv()
        if command == "stop":
            return
        # "grow N": allocate until N more bytes are held (the deadline is the parent's).
        want = int(command.split()[1])
        more = []
        deadline = time.monotonic() + DEADLINE_SECONDS
        while len(more) * BLOCK_BYTES < want and time.monotonic() < deadline:
            try:
                more.append(touched(BLOCK_BYTES))
            except MemoryError:
                time.sleep(0.005)
        conn.send(len(more) * BLOCK_BYTES)
        blocks.extend(more)


def kill():
    ctx = mp.get_context("fork")
    pipes, workers = [], []
    for _ in range(WORKERS):
        mine, theirs = ctx.Pipe()
        w = ctx.Process(target=kill_worker, args=(theirs,), daemon=True)
        w.start()
        pipes.append(mine)
        workers.append(w)
    held = [c.recv() for c in pipes]
    victim = workers[0]
    os.kill(victim.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    # Ask for most of the victim's share: what it held less one 8 MiB block for the credit
    # and rounding left in the ledger.
    want = max(held[0] - 2 * BLOCK_BYTES, BLOCK_BYTES)
    survivor = pipes[1]
    survivor.send(f"grow {want}")
    if not survivor.poll(DEADLINE_SECONDS):
        got = 0
    else:
        got = survivor.recv()
    came_back_seconds = time.monotonic() - killed_at
    for c in pipes[1:]:
        c.send("stop")
    for w in workers:
        w.join(DEADLINE_SECONDS)
    return {
        "held_bytes": held,
        "victim_share": held[0],
        "asked": want,
        "survivor_got": got,
        "came_back_seconds": came_back_seconds,
    }


GRANDCHILD_CODE = """
import sys, time
held = bytearray(600 << 20)
held[::4096] = b"\\x01" * ((600 << 20) // 4096)
print("holding", flush=True)
sys.stdin.readline()
"""

CHILD_CODE = """
import subprocess, sys
g = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdin=sys.stdin, stdout=sys.stdout)
sys.exit(g.wait())
"""


def try_alloc(nbytes):
    try:
        block = bytearray(nbytes)
        del block
        return True
    except MemoryError:
        return False


def grandchild():
    child = subprocess.Popen([sys.executable, "-c", CHILD_CODE, GRANDCHILD_CODE],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = child.stdout.readline()
    top_while_held = try_alloc(600 * MIB)
    child.stdin.write("\n")
    child.stdin.flush()
    child.wait(DEADLINE_SECONDS)
    return {"grandchild": line.strip(), "top_got_600M_while_held": top_while_held,
            "top_got_600M_after": try_alloc(600 * MIB)}


OPTOUT_CHILD_CODE = """
try:
    held = bytearray(600 << 20)
    print("got")
except MemoryError:
    print("MemoryError")
"""


def optout(scope):
    held = touched(600 * MIB)
    env = dict(os.environ, QVSHIM_SCOPE=scope)
    done = subprocess.run([sys.executable, "-c", OPTOUT_CHILD_CODE], env=env,
                          capture_output=True, text=True, timeout=DEADLINE_SECONDS)
    del held
    return {"child": done.stdout.strip(), "child_stderr": done.stderr}


STATS_CHILD_CODE = """
import shimstats
print(shimstats.host_live() >> 20)
"""


def stats():
    """The tree's figures in a member's C API: a child sees what the top holds."""
    held = touched(600 * MIB)
    done = subprocess.run([sys.executable, "-c", STATS_CHILD_CODE], capture_output=True,
                          text=True, timeout=DEADLINE_SECONDS)
    del held
    return {"child_sees_600M_or_more": int(done.stdout.strip() or 0) >= 600,
            "child_stderr": done.stderr}


EXEC_CODE = """
import json
try:
    held = bytearray(600 << 20)
    print(json.dumps({"after_exec": "got"}))
except MemoryError:
    print(json.dumps({"after_exec": "MemoryError"}))
"""


def exec_holding():
    """The same process after exec (same pid and start time): its old share went with its heap."""
    held = touched(600 * MIB)
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-c", EXEC_CODE])
    del held


def main():
    mode = sys.argv[1]
    if mode == "pool":
        done_dir = sys.argv[3]
        result = pool(sys.argv[2], done_dir)
    elif mode == "kill":
        result = kill()
    elif mode == "grandchild":
        result = grandchild()
    elif mode == "optout":
        result = optout(sys.argv[2])
    elif mode == "stats":
        result = stats()
    elif mode == "exec":
        exec_holding()
    elif mode == "alone":
        result = {"got_600M": try_alloc(600 * MIB)}
    else:
        raise SystemExit(f"unknown mode {mode}")
    result["ledger"] = os.environ.get("QVSHIM_TREE_LEDGER")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
