"""qvshim.ray.runtime_env(): the runtime_env that starts a Ray worker under the library, without Ray.

The Ray cluster itself is the heavy tier's (python/tests/serve); here: the dict, its checks, and the
exec chain Ray 2.60 runs for a worker (env_vars set, then `bash -c "exec python ..."`) replayed
without Ray.
"""

import json
import math
import os
import re
import subprocess
import sys

import pytest

from conftest import plain_env, run_python
from qvshim import ray as qray

MIB = 1024 * 1024
LIBRARY = "/opt/qvshim/libqvshim.so"

# (kwargs, the env_vars expected among the result's, variables that must be absent)
GOOD_CASES = [
    ({"memory": 512 * MIB}, {"QVSHIM_BUDGET": str(512 * MIB), "LD_PRELOAD": LIBRARY + ":${LD_PRELOAD}"},
     ["QVSHIM_GPU_BUDGET"]),
    ({"memory": 1.5 * 1024 * MIB}, {"QVSHIM_BUDGET": str(1536 * MIB)}, ["QVSHIM_GPU_BUDGET"]),
    ({"memory": 16 * MIB}, {"QVSHIM_BUDGET": str(16 * MIB)}, []),
    ({"memory": 512 * MIB, "gpu_fraction": 0.5}, {"QVSHIM_GPU_BUDGET": "50%"}, []),
    ({"memory": 512 * MIB, "gpu_fraction": 0.25}, {"QVSHIM_GPU_BUDGET": "25%"}, []),
    ({"memory": 512 * MIB, "gpu_fraction": 1 / 3}, {"QVSHIM_GPU_BUDGET": "33.3333%"}, []),
    ({"memory": 512 * MIB, "gpu_fraction": 1}, {"QVSHIM_GPU_BUDGET": "100%"}, []),
    ({"memory": 512 * MIB, "gpu_fraction": 2}, {"QVSHIM_GPU_BUDGET": "100%"}, []),
    ({"memory": 512 * MIB, "gpu_fraction": 0}, {}, ["QVSHIM_GPU_BUDGET"]),
    ({"memory": 512 * MIB, "gpu_fraction": None}, {}, ["QVSHIM_GPU_BUDGET"]),
    ({"memory": 512 * MIB, "env_vars": {"QVSHIM_LOG_FILE": "/tmp/replica.log"}},
     {"QVSHIM_LOG_FILE": "/tmp/replica.log", "QVSHIM_BUDGET": str(512 * MIB)}, []),
    ({"memory": 512 * MIB, "base": {"pip": ["numpy"], "env_vars": {"HF_HOME": "/models"}}},
     {"HF_HOME": "/models", "QVSHIM_BUDGET": str(512 * MIB)}, []),
]


@pytest.mark.parametrize("kwargs, expected, absent", GOOD_CASES)
def test_runtime_env_sets_preload_and_budgets_from_the_replica_resources(kwargs, expected, absent):
    env = qray.runtime_env(library=LIBRARY, **kwargs)
    env_vars = env["env_vars"]
    for name, value in expected.items():
        assert env_vars.get(name) == value, f"{kwargs}: expected {name}={value!r}, got {env_vars}"
    for name in absent:
        assert name not in env_vars, f"{kwargs}: {name} should not be set, got {env_vars}"
    assert env_vars["LD_PRELOAD"].startswith(LIBRARY + ":"), f"the library should be preloaded first: {env_vars}"
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items()), (
        f"Ray takes only strings in env_vars: {env_vars}"
    )


def test_runtime_env_keeps_the_base_and_never_changes_it():
    base = {"pip": ["numpy"], "env_vars": {"HF_HOME": "/models"}}
    snapshot = json.dumps(base, sort_keys=True)
    env = qray.runtime_env(memory=512 * MIB, library=LIBRARY, base=base)
    assert env["pip"] == ["numpy"], f"the base's other fields should stay: {env}"
    assert json.dumps(base, sort_keys=True) == snapshot, f"the base should not be changed: {base}"


# (kwargs, what the ValueError must say)
BAD_CASES = [
    ({"memory": MIB}, "below qvshim's smallest budget"),
    ({"memory": 0}, "below qvshim's smallest budget"),
    ({"memory": "1G"}, "in bytes"),
    ({"memory": True}, "in bytes"),
    ({"memory": math.nan}, "in bytes"),
    ({"memory": None}, "in bytes"),
    ({"memory": 512 * MIB, "gpu_fraction": 1.5}, "whole number"),
    ({"memory": 512 * MIB, "gpu_fraction": -0.5}, "negative"),
    ({"memory": 512 * MIB, "gpu_fraction": "0.5"}, "num_gpus"),
    ({"memory": 512 * MIB, "gpu_fraction": True}, "num_gpus"),
    ({"memory": 512 * MIB, "library": "/opt/my libs/libqvshim.so"}, "space or colon"),
    ({"memory": 512 * MIB, "library": "/opt/a:b/libqvshim.so"}, "space or colon"),
    ({"memory": 512 * MIB, "env_vars": {"LD_PRELOAD": "/x.so"}}, "sets LD_PRELOAD"),
    ({"memory": 512 * MIB, "env_vars": {"QVSHIM_BUDGET": "1G"}}, "sets QVSHIM_BUDGET"),
    ({"memory": 512 * MIB, "base": {"env_vars": {"QVSHIM_GPU_BUDGET": "1G"}}}, "sets QVSHIM_GPU_BUDGET"),
    ({"memory": 512 * MIB, "env_vars": {"QVSHIM_WARN": 60}}, "only string"),
]


@pytest.mark.parametrize("kwargs, message", BAD_CASES)
def test_runtime_env_refuses_what_the_library_or_ray_could_not_take(kwargs, message):
    kwargs = {"library": LIBRARY, **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        qray.runtime_env(**kwargs)


def test_qvshim_ray_imports_without_ray():
    # A module named `ray` that raises on import stands in for any Ray install on the path.
    probe = (
        "import sys; sys.modules['ray'] = None\n"
        "import qvshim.ray\n"
        "print(sorted(qvshim.ray.runtime_env(memory=1 << 30, library='/x/libqvshim.so')['env_vars']))"
    )
    result = run_python(["-c", probe], plain_env())
    assert result.returncode == 0, f"qvshim.ray should import and work without Ray: {result.stderr}"
    assert "QVSHIM_BUDGET" in result.stdout, result.stdout


def ray_update_envs(environ, env_vars):
    """What Ray 2.60's setup_worker.py does with env_vars (ray._private.utils.update_envs):
    ${NAME} expanded from its own environment, unknown ones removed."""
    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(environ)
        for name, value in env_vars.items():
            environ[name] = re.sub(r"\$\{[A-Z0-9_]+\}", "", os.path.expandvars(value))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return environ


# (what the raylet's environment already preloads, or None)
EXISTING_PRELOADS = [None, "libc.so.6"]


@pytest.mark.parametrize("existing", EXISTING_PRELOADS)
def test_a_worker_exec_chain_as_ray_runs_it_starts_under_the_library_with_the_budget(library, existing):
    memory = 300 * MIB
    environ = plain_env()
    if existing:
        environ["LD_PRELOAD"] = existing
    env = ray_update_envs(environ, qray.runtime_env(memory=memory, gpu_fraction=0.5, library=library)["env_vars"])
    assert env["LD_PRELOAD"] == library + ":" + (existing or ""), f"the library comes first: {env['LD_PRELOAD']}"
    worker = (
        "import json, os, qvshim; host = qvshim.stats()[0]; "
        "print(json.dumps({'loaded': qvshim.is_loaded(), 'budget': host['budget'], "
        "'gpu': os.environ.get('QVSHIM_GPU_BUDGET')}))"
    )
    # setup_worker.py ends in os.execvp("bash", ["bash", "-c", "exec <python> default_worker.py ..."]).
    command = f"exec {sys.executable} -c \"{worker}\""
    result = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"the worker should start: {result.stderr}"
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen == {"loaded": True, "budget": memory, "gpu": "50%"}, (
        f"the worker should run under the library with a {memory}-byte budget: {seen}"
    )
    assert result.stderr == "", f"nothing should be printed at the defaults: {result.stderr!r}"
