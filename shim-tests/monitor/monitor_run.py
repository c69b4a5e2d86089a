"""Helpers for the monitor's tests: paths, runners that preload the shim into one child process
only (pytest itself never runs under the shim), and small readers."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LIB = REPO / "target" / "release" / "libqvshim.so"
BUILD = REPO / "shim-tests" / "build" / "monitor"
C_DIR = Path(__file__).resolve().parent / "c"
# The real interpreter: a pyenv shim would exec several programs, each loading the shim.
PYTHON = os.path.realpath(sys.executable)
TIMEOUT_S = 60


def shim_env(**variables):
    """The environment with the shim preloaded and only the given QVSHIM_* variables set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QVSHIM_")}
    env.pop("PYTHONMALLOC", None)
    env["LD_PRELOAD"] = str(LIB)
    env.update({k: str(v) for k, v in variables.items()})
    return env


def run_python(code, timeout=TIMEOUT_S, **variables):
    return subprocess.run(
        [PYTHON, "-c", code],
        env=shim_env(**variables),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_program(path, *args, timeout=TIMEOUT_S, **variables):
    return subprocess.run(
        [str(path), *map(str, args)],
        env=shim_env(**variables),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def build_c_programs():
    """Builds every shim-tests/monitor/c/*.c against include/qvshim.h and libqvshim.so."""
    BUILD.mkdir(parents=True, exist_ok=True)
    built = {}
    for source in sorted(C_DIR.glob("*.c")):
        out = BUILD / source.stem
        subprocess.run(
            [
                "cc", "-O1", "-g", "-Wall", "-Werror", "-std=c11", "-D_GNU_SOURCE",
                f"-I{REPO / 'include'}", str(source), "-o", str(out),
                f"-L{LIB.parent}", "-lqvshim", f"-Wl,-rpath,{LIB.parent}", "-pthread",
            ],
            check=True,
        )
        built[source.stem] = out
    return built


def read_meminfo(key):
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def json_dump(text):
    """The one JSON object of a dump (a file's whole text)."""
    return json.loads(text)
