"""Ray Serve for real: examples/ray_serve_tts.py on a local Ray cluster (CPU only), two replicas,
each worker process under libqvshim.so with its Ray `memory` as its budget.

The Ray tier of the heavy tests, in a venv of its own (scripts/test-heavy builds target/ray-venv
from python/requirements-ray.txt). By hand:

    PYTHONPATH=python target/ray-venv/bin/python -m pytest -q python/tests/serve

The cluster is small (2 CPUs, an 80 MB object store, no dashboard) and is torn down whatever the
test's outcome: every process `ray start` starts carries a marker variable in its environment,
and the fixture's finalizer ends exactly those processes and their descendants (not
`ray stop --force`, which ends every Ray process on the machine, other people's clusters
included).
"""

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest
import requests  # missing outside the Ray venv: then collection fails, it does not skip

from conftest import REPO_DIR, plain_env

MIB = 1024 * 1024
EXAMPLE = os.path.join(REPO_DIR, "examples", "ray_serve_tts.py")
REPLICA_MIB = 384
MODEL_MIB = 64
CLUSTER_CPUS = 2
OBJECT_STORE_BYTES = 80 * 1000 * 1000  # about Ray's smallest
SMALL_REQUEST = {"text": "hello", "lines": 2, "audio_mib": 1}
# 200 lines of 8 MiB held at once: 1600 MiB, far past a 384 MiB replica.
BIG_REQUEST = {"text": "a whole audiobook", "lines": 200, "audio_mib": 8}
# What a replica holds after a refused request, above what it held before: the partial batch
# must be gone, not kept.
# Normal requests sent while the big one is in flight, at least.
MIN_REQUESTS_ALONGSIDE = 3
LEFT_AFTER_REFUSAL_MAX_BYTES = 64 * MIB
RAY_START_TIMEOUT_S = 180
DEPLOY_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 120
FIND_REPLICAS_DEADLINE_S = 120
DRIVE_DEADLINE_S = 180
TEARDOWN_GRACE_S = 20
POLL_S = 0.2
MARKER_VARIABLE = "QVSHIM_RAY_TEST_CLUSTER"
HTTP_OK = 200
HTTP_SERVICE_UNAVAILABLE = 503


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def parent_pids():
    """{pid: parent pid} of every process."""
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                # The name in parentheses may hold spaces; the parent pid is the 2nd field after it.
                parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return parents


def cluster_pids(marker):
    """The cluster's processes: those whose environment carries its marker (inherited from
    `ray start`), and all their descendants. Descendants count too because a Ray process that sets
    its title (ray::DashboardAgent, ray::RuntimeEnvAgent, workers) may write the title over the
    memory /proc/<pid>/environ shows, marker included."""
    needle = f"{MARKER_VARIABLE}={marker}".encode()
    parents = parent_pids()
    found = set()
    for pid in parents:
        try:
            with open(f"/proc/{pid}/environ", "rb") as environ:
                if needle in environ.read().split(b"\0"):
                    found.add(pid)
        except OSError:
            continue  # gone, or not ours to read
    grown = True
    while grown:
        children = {pid for pid, parent in parents.items() if parent in found} - found
        found |= children
        grown = bool(children)
    return found


def alive(pid):
    """True unless the process is gone or a zombie (dead, waiting for its parent to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stop_cluster(marker):
    """SIGTERM, then SIGKILL, the cluster's processes; returns those still alive.

    The set is taken before anything is signalled: once a parent dies its children are
    re-parented, and only the marker would still tie them to this cluster."""
    pids = cluster_pids(marker)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = {pid for pid in pids | cluster_pids(marker) if alive(pid)}
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + TEARDOWN_GRACE_S
        while pids and time.monotonic() < deadline:
            time.sleep(POLL_S)
            pids = {pid for pid in pids if alive(pid)}
        if not pids:
            return []
    return sorted(pids)


@pytest.fixture(scope="module")
def ray_cluster():
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    if not os.path.exists(ray_cli):
        pytest.fail(f"no `ray` next to {sys.executable}: run this tier in target/ray-venv (scripts/test-heavy)")
    marker = uuid.uuid4().hex
    temp_dir = tempfile.mkdtemp(prefix="qvshim-ray-")
    gcs_port, http_port = free_port(), free_port()
    env = plain_env(**{
        MARKER_VARIABLE: marker,
        "RAY_USAGE_STATS_ENABLED": "0",
        # Ray's own memory monitor kills workers when the shared machine is nearly full; here the
        # replicas' budgets are what is under test, and a kill would read as a lost replica.
        "RAY_memory_monitor_refresh_ms": "0",
    })
    command = [
        ray_cli, "start", "--head", f"--port={gcs_port}", f"--num-cpus={CLUSTER_CPUS}",
        f"--object-store-memory={OBJECT_STORE_BYTES}", "--include-dashboard=false", "--disable-usage-stats",
        f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
        f"--temp-dir={temp_dir}",
    ]
    try:
        started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=RAY_START_TIMEOUT_S)
        assert started.returncode == 0, (
            f"`ray start` should start a local cluster, exit status {started.returncode}:\n"
            f"{started.stdout[-3000:]}\n{started.stderr[-3000:]}"
        )
        yield {"address": f"127.0.0.1:{gcs_port}", "http_port": http_port, "env": env, "temp_dir": temp_dir}
    finally:
        left = stop_cluster(marker)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"the cluster's processes {left} outlived SIGKILL"


def get(url, params=None):
    return requests.get(url, params=params, timeout=REQUEST_TIMEOUT_S)


def ask(base_url, request):
    """(pid, request, status, problem or None) of one request for audio."""
    answer = get(base_url, request)
    return int(answer.headers.get("x-replica-pid", "0")), request, answer.status_code, check_audio(answer, request)


def find_replicas(base_url, count):
    """{pid: stats} of `count` replicas, from /stats answers until each has answered once."""
    seen = {}
    deadline = time.monotonic() + FIND_REPLICAS_DEADLINE_S
    while len(seen) < count and time.monotonic() < deadline:
        answer = get(base_url + "/stats")
        if answer.status_code == HTTP_OK:
            stats = answer.json()
            seen[stats["pid"]] = stats
        else:
            time.sleep(POLL_S)
    return seen


def check_audio(answer, request):
    """None when `answer` is the WAV `request` asked for, else what is wrong with it."""
    if answer.status_code != HTTP_OK:
        return f"status {answer.status_code}: {answer.text[:300]}"
    if answer.headers.get("content-type") != "audio/wav" or answer.content[:4] != b"RIFF":
        return f"not a WAV: {answer.headers.get('content-type')} {answer.content[:16]!r}"
    audio_bytes = request["lines"] * request["audio_mib"] * MIB
    # Each line is whole cycles of its tone, so a little under the bytes asked for.
    if not 0.99 * audio_bytes <= len(answer.content) <= audio_bytes + 64:
        return f"{len(answer.content)} bytes of WAV for {audio_bytes} bytes of audio"
    return None


def deploy(ray_cluster, *extra):
    return subprocess.run(
        [sys.executable, EXAMPLE, "--address", ray_cluster["address"], "--deploy-only",
         "--http-port", str(ray_cluster["http_port"]), "--replica-mib", str(REPLICA_MIB),
         "--model-mib", str(MODEL_MIB), *extra],
        env=ray_cluster["env"], capture_output=True, text=True, timeout=DEPLOY_TIMEOUT_S,
    )


def test_two_replicas_one_refuses_over_budget_with_503_serves_again_and_the_other_never_notices(ray_cluster):
    started = time.monotonic()
    deployed = deploy(ray_cluster)
    assert deployed.returncode == 0, (
        f"the example should deploy two replicas, exit status {deployed.returncode}:\n"
        f"{deployed.stdout[-3000:]}\n{deployed.stderr[-5000:]}"
    )
    base_url = f"http://127.0.0.1:{ray_cluster['http_port']}/tts"

    before = find_replicas(base_url, 2)
    assert len(before) == 2, f"two replicas should answer /stats within {FIND_REPLICAS_DEADLINE_S} s, saw {before}"
    for pid, stats in before.items():
        assert stats["budget"] == REPLICA_MIB * MIB, (
            f"replica {pid} should have its Ray memory ({REPLICA_MIB} MiB) as its qvshim budget: {stats}"
        )
        with open(f"/proc/{pid}/maps") as maps:
            assert "libqvshim.so" in maps.read(), f"replica {pid}'s process should have libqvshim.so mapped"

    # Drive requests until a replica refuses one; while the big request is in flight, normal
    # ones keep coming (Serve sends them to the less busy replica, the other one).
    answers = []  # (pid, request, status, problem) in order
    refused_pid = None
    deadline = time.monotonic() + DRIVE_DEADLINE_S
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        while refused_pid is None and time.monotonic() < deadline:
            big = pool.submit(get, base_url, BIG_REQUEST)
            sent_alongside = 0
            while not big.done() or sent_alongside < MIN_REQUESTS_ALONGSIDE:
                answers.append(ask(base_url, SMALL_REQUEST))
                sent_alongside += 1
            answer = big.result()
            assert answer.status_code == HTTP_SERVICE_UNAVAILABLE, (
                f"a request for {BIG_REQUEST['lines'] * BIG_REQUEST['audio_mib']} MiB should be refused "
                f"with 503 by a {REPLICA_MIB} MiB replica, got {answer.status_code}: {answer.text[:300]}"
            )
            body = answer.json()
            refused_pid = int(answer.headers.get("x-replica-pid", "0"))
            assert "memory budget" in body["error"] and body["pid"] == refused_pid, (
                f"the 503 should say it is the replica's memory budget and name the replica: {body}"
            )
    assert refused_pid in before, f"a known replica should have refused the big request, refused by {refused_pid}"
    other_pid = next(pid for pid in before if pid != refused_pid)

    # Then the refusing replica's own process must answer again, and the other keep answering.
    after = []
    deadline = time.monotonic() + DRIVE_DEADLINE_S
    while time.monotonic() < deadline:
        after.append(ask(base_url, SMALL_REQUEST))
        good_from = {pid for pid, _, _, problem in after if problem is None}
        if {refused_pid, other_pid} <= good_from:
            break
    answers += after
    assert any(pid == refused_pid and problem is None for pid, _, _, problem in after), (
        f"replica {refused_pid} should serve a normal request after refusing one: {after}"
    )
    other_answers = [(status, problem) for pid, _, status, problem in answers if pid == other_pid]
    assert other_answers and all(problem is None for _, problem in other_answers), (
        f"every answer of the other replica {other_pid} should be good audio: {other_answers}"
    )
    strangers = {pid for pid, _, _, _ in answers} - set(before)
    assert not strangers, f"only the two first replica processes should answer (none restarted), also saw {strangers}"

    final = find_replicas(base_url, 2)
    assert set(final) == set(before), f"the same two replica processes should be there at the end: {set(before)} -> {set(final)}"
    assert final[refused_pid]["refusals"] >= 1 and final[refused_pid]["refused"] >= 1, (
        f"replica {refused_pid} should count its refusal: {final[refused_pid]}"
    )
    assert final[refused_pid]["live"] < before[refused_pid]["live"] + LEFT_AFTER_REFUSAL_MAX_BYTES, (
        f"replica {refused_pid} should have let go of the refused request's memory: "
        f"{json.dumps(before[refused_pid])} -> {json.dumps(final[refused_pid])}"
    )
    assert final[other_pid]["refusals"] == 0 and final[other_pid]["refused"] == 0, (
        f"the other replica {other_pid} should never have met its budget: {final[other_pid]}"
    )
    print(f"ray serve: {len(answers)} answers, replica {refused_pid} refused and served again, "
          f"{len(other_answers)} good answers from replica {other_pid}, {time.monotonic() - started:.0f} s after deploy started")


def test_a_replica_whose_node_lacks_the_library_fails_the_deployment_instead_of_running_unlimited(ray_cluster):
    deployed = deploy(ray_cluster, "--library", "/nonexistent/qvshim/libqvshim.so", "--app-name", "unguarded",
                      "--route", "/unguarded", "--replicas", "1")
    output = deployed.stdout + deployed.stderr
    assert deployed.returncode != 0, f"the deployment should fail when its replicas cannot load the library:\n{output[-3000:]}"
    assert "not under libqvshim.so" in output, f"the failure should say the replica is not under the library:\n{output[-5000:]}"
