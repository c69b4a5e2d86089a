"""Build the fake CUDA driver and its test programs, and run them under libqvshim.so.

Everything lands in shim-tests/build/fake_cuda/: libcuda.so.1 (the fake driver, found first
through LD_LIBRARY_PATH), cuda_client (reaches the driver like a CUDA runtime: dlopen, then
cuGetProcAddress_v2), cuda_client_direct (linked against libcuda, calls the exports by name),
and the RTLD_NEXT pair (libwrapwrite.so, rtld_next_main) with its control, naive_dlsym.so.
The fake NVML (libnvidia-ml.so.1) is built in four directories, one per newest form of the
process list it exports: nvml_v3/, nvml_v2/, nvml_v1/, and nvml_none/ without any (see
nvml_library_path).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SHIM = REPO / "target" / "release" / "libqvshim.so"
INCLUDE_DIR = REPO / "include"
BUILD_DIR = REPO / "shim-tests" / "build" / "fake_cuda"

MIB = 1024 * 1024
GIB = 1024 * MIB
# The fake's devices unless FAKE_CUDA_MEMORY_MIB says otherwise.
DEVICE_MEMORY = (8 * GIB, 4 * GIB)
CUDA_ERROR_OUT_OF_MEMORY = 2

RUN_TIMEOUT_SECONDS = 60
C_FLAGS = ["-std=gnu11", "-O0", "-g", "-Wall", "-Wextra", "-Werror"]

_SHIM_VARIABLE = re.compile(r"^(QVSHIM_|FAKE_CUDA_|FAKE_NVML_|LD_PRELOAD$|LD_LIBRARY_PATH$|PYTHONMALLOC$)")


def _compile(output: Path, sources: list[Path], args: list[str]) -> Path:
    inputs = [*sources, INCLUDE_DIR / "qvshim.h", Path(__file__)]
    if output.exists() and output.stat().st_mtime >= max(p.stat().st_mtime for p in inputs):
        return output
    cmd = ["gcc", *C_FLAGS, f"-I{INCLUDE_DIR}", "-o", str(output), *map(str, sources), *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"expected {output.name} to build:\n{' '.join(cmd)}\n{done.stdout}{done.stderr}")
    return output


def build_all() -> Path:
    """Builds every program (when its sources changed); returns the build directory."""
    if not SHIM.is_file():
        raise RuntimeError(f"expected {SHIM}: run `cargo build --release` first")
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    b = BUILD_DIR
    _compile(b / "libcuda.so.1", [HERE / "fake_cuda.c"],
             ["-fPIC", "-shared", "-fvisibility=hidden", "-Wl,-soname,libcuda.so.1", "-pthread"])
    _compile(b / "cuda_client", [HERE / "cuda_client.c"], ["-ldl", "-pthread"])
    _compile(b / "cuda_client_direct", [HERE / "cuda_client.c"],
             ["-DDIRECT_LINK", f"-L{b}", "-l:libcuda.so.1", "-ldl", "-pthread"])
    _compile(b / "libwrapwrite.so", [HERE / "wrap_write.c"], ["-fPIC", "-shared", "-ldl"])
    _compile(b / "naive_dlsym.so", [HERE / "naive_dlsym.c"], ["-fPIC", "-shared", "-ldl"])
    _compile(b / "rtld_next_main", [HERE / "rtld_next_main.c"], [f"-L{b}", "-lwrapwrite"])
    for form, hidden in NVML_FORMS.items():
        (b / f"nvml_{form}").mkdir(exist_ok=True)
        _compile(b / f"nvml_{form}" / "libnvidia-ml.so.1", [HERE / "fake_nvml.c"],
                 ["-fPIC", "-shared", "-fvisibility=hidden", "-Wl,-soname,libnvidia-ml.so.1", "-ldl",
                  *hidden])
    return b


# The fake NVML's builds: the newest form of nvmlDeviceGetComputeRunningProcesses each exports
# ("none": a library without the process list).
NVML_FORMS = {"v3": [], "v2": ["-DNO_V3"], "v1": ["-DNO_V3", "-DNO_V2"], "none": ["-DNO_V3", "-DNO_V2", "-DNO_V1"]}


def nvml_library_path(form: str | None) -> str:
    """LD_LIBRARY_PATH with the fake driver and, unless form is None, the fake NVML of that form."""
    return str(BUILD_DIR) if form is None else f"{BUILD_DIR}:{BUILD_DIR / f'nvml_{form}'}"


def environment(extra: dict[str, str] | None = None, preload: str | None = str(SHIM)) -> dict[str, str]:
    """The caller's environment without the shim's or the fake's variables, then the fake driver
    first on LD_LIBRARY_PATH, the shim preloaded (unless preload is None) and the test's own."""
    env = {k: v for k, v in os.environ.items() if not _SHIM_VARIABLE.match(k)}
    env["LD_LIBRARY_PATH"] = str(BUILD_DIR)
    if preload:
        env["LD_PRELOAD"] = preload
    env.update(extra or {})
    return env


@dataclass
class Run:
    argv: list[str]
    env: dict[str, str]
    returncode: int
    stdout: str
    stderr: str
    facts: dict[str, str] = field(default_factory=dict)
    lookups: dict[tuple[str, str, int, int], dict[str, str]] = field(default_factory=dict)

    def describe(self) -> str:
        shown = {k: v for k, v in self.env.items() if _SHIM_VARIABLE.match(k)}
        return (f"command {' '.join(self.argv)} with {shown}\nexit {self.returncode}\n"
                f"stdout:\n{self.stdout}\nstderr:\n{self.stderr}")

    def number(self, key: str) -> int:
        assert key in self.facts, f"expected a line '{key} N'\n{self.describe()}"
        return int(self.facts[key])


_LOOKUP = re.compile(r"^lookup (\S+) (\S+) (-?\d+) (\d+) (.*)$")


def run(argv: list[str], extra_env: dict[str, str] | None = None, preload: str | None = str(SHIM)) -> Run:
    """Runs a program from the build directory (or any argv) and parses its fact lines."""
    env = environment(extra_env, preload)
    if not os.path.isabs(argv[0]) and (BUILD_DIR / argv[0]).exists():
        argv = [str(BUILD_DIR / argv[0]), *argv[1:]]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_SECONDS)
    result = Run(argv, env, done.returncode, done.stdout, done.stderr)
    for line in done.stdout.splitlines():
        match = _LOOKUP.match(line)
        if match:
            route, name, version, flags, rest = match.groups()
            fields = dict(part.split("=", 1) for part in rest.split())
            result.lookups[(route, name, int(version), int(flags))] = fields
        elif " " in line:
            key, value = line.split(" ", 1)
            result.facts.setdefault(key, value)
    return result


def python() -> str:
    """The real interpreter (not a pyenv shim that would exec other programs under the shim)."""
    return sys.executable
