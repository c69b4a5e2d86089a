"""Never calls itself: whatever the driver or another CUDA interposer answers, the function the
shim calls as the real one is never one of its own exports, the budget holds, and a second
interposer preloaded before or after the shim still sees its calls.

Drivers (shim-tests/fake_cuda): `symbolic` hands out internal entries (fake_cuda.c, like the
real libcuda); `exports` and `dlsym_default` are built without -Bsymbolic and hand out their
exported functions as the global scope resolves them (fake_cuda_global.c), so a preloaded
library's definition of the same name is what they give. The second interposer
(c/cuda_self_other.c) is shaped like HAMi-core. Each row is one lookup route and allocation
form, run against every driver in every preload order.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import shimrun

HERE = Path(__file__).resolve().parent
FAKE_DIR = shimrun.TESTS_DIR / "fake_cuda"
BUILD = shimrun.BUILD_DIR / "cuda_self"
C_FLAGS = ["-std=gnu11", "-O0", "-g", "-Wall", "-Wextra", "-Werror", f"-I{shimrun.INCLUDE_DIR}"]
DRIVER_FLAGS = ["-fPIC", "-shared", "-fvisibility=hidden", "-Wl,-soname,libcuda.so.1", "-pthread", "-ldl"]

MIB = 1024 * 1024
CHUNK_MIB = 256
BUDGET = "1G"
GRANTED_WITHIN_BUDGET = 4  # 4 x 256 MiB fill the 1 GiB budget; the fake device has 8 GiB
MAX_TRIES = 6
CUDA_ERROR_OUT_OF_MEMORY = 2

# driver variant -> (sources, extra compiler flags)
DRIVERS = {
    "symbolic": ([FAKE_DIR / "fake_cuda.c"], []),
    "exports": ([FAKE_DIR / "fake_cuda_global.c"], ["-DANSWER_EXPORTS"]),
    "dlsym_default": ([FAKE_DIR / "fake_cuda_global.c"], ["-DANSWER_DLSYM_DEFAULT"]),
}
# preload order -> LD_PRELOAD, in words the test names use
ORDERS = ["shim", "other_then_shim", "shim_then_other"]

# (route, form): how the program reaches the allocation call, and which one
ROWS = [
    ("dlsym", "alloc"),
    ("dlsym", "async_ptsz"),
    ("proc_v1", "alloc"),
    ("proc_v1", "async_ptsz"),
    ("proc_v2", "alloc"),
    ("proc_v2", "async_ptsz"),
    ("direct", "alloc"),
    ("direct", "async_ptsz"),
]


def _compile(output: Path, sources: list[Path], args: list[str]) -> Path:
    inputs = [*sources, Path(__file__), FAKE_DIR / "fake_cuda.c", shimrun.INCLUDE_DIR / "qvshim.h"]
    if output.exists() and output.stat().st_mtime >= max(p.stat().st_mtime for p in inputs):
        return output
    output.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["gcc", *C_FLAGS, "-o", str(output), *map(str, sources), *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"expected {output.name} to build:\n{' '.join(cmd)}\n{done.stdout}{done.stderr}")
    return output


@pytest.fixture(scope="module")
def built(shim_library) -> dict[str, Path]:
    try:
        for name, (sources, flags) in DRIVERS.items():
            _compile(BUILD / name / "libcuda.so.1", sources, [*flags, *DRIVER_FLAGS])
        other_flags = ["-fPIC", "-shared", "-fvisibility=hidden", "-pthread", "-ldl"]
        other = _compile(BUILD / "cuda_self_other.so", [HERE / "c" / "cuda_self_other.c"], other_flags)
        calling_back = _compile(BUILD / "cuda_self_other_global.so", [HERE / "c" / "cuda_self_other.c"],
                                ["-DREAL_THROUGH_GLOBAL_SCOPE", *other_flags])
        client = _compile(BUILD / "cuda_self_client", [HERE / "c" / "cuda_self_client.c"], ["-ldl"])
        direct = _compile(BUILD / "cuda_self_client_direct", [HERE / "c" / "cuda_self_client.c"],
                          ["-DDIRECT_LINK", f"-L{BUILD / 'symbolic'}", "-l:libcuda.so.1", "-ldl"])
    except RuntimeError as error:
        pytest.fail(str(error))
    return {"shim": shim_library, "other": other, "calling_back": calling_back, "client": client,
            "direct": direct}


def _preload(order: str, built: dict[str, Path], other: str = "other") -> str:
    shim, second = str(built["shim"]), str(built[other])
    return {"shim": shim, "other_then_shim": f"{second} {shim}", "shim_then_other": f"{shim} {second}"}[order]


def _facts(stdout: str) -> dict[str, str]:
    facts: dict[str, str] = {}
    for line in stdout.splitlines():
        key, _, value = line.partition(" ")
        facts.setdefault(key, value)
    return facts


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("driver", list(DRIVERS))
@pytest.mark.parametrize("route,form", ROWS)
def test_allocation_reaches_the_driver_once_within_budget_and_is_refused_past_it(built, route, form,
                                                                                 driver, order):
    _expect_budget_held(built, route, form, driver, order, "other")


@pytest.mark.parametrize("driver", list(DRIVERS))
@pytest.mark.parametrize("route,form", ROWS)
def test_interposer_after_the_shim_calling_back_through_the_global_scope_ends_in_the_driver(
        built, route, form, driver):
    """The second interposer takes its real functions with dlsym(RTLD_DEFAULT), which finds the
    shim's exports again: each of its calls comes back into the shim from below, and the shim
    must send it to the driver, uncharged, instead of round the loop."""
    _expect_budget_held(built, route, form, driver, "shim_then_other", "calling_back")


def _expect_budget_held(built, route: str, form: str, driver: str, order: str, other: str) -> None:
    program = built["direct" if route == "direct" else "client"]
    env = {"LD_PRELOAD": _preload(order, built, other), "LD_LIBRARY_PATH": str(BUILD / driver),
           "QVSHIM_GPU_BUDGET": BUDGET}
    result = shimrun.run([program, route, form, str(CHUNK_MIB), str(MAX_TRIES)], env, preload=False)
    case = f"{route}/{form} with the {driver} driver, preload {order} ({other})"
    assert result.returncode == 0 and not result.timed_out, (
        f"{case}: expected exit 0 (a recursion ends in SIGSEGV), got {result.exit_text()}"
        f"{result.describe()}")
    facts = _facts(result.stdout)
    expected = {
        "granted": str(GRANTED_WITHIN_BUDGET),
        "refused_rc": str(CUDA_ERROR_OUT_OF_MEMORY),
        "pool_live": str(GRANTED_WITHIN_BUDGET * CHUNK_MIB * MIB),
        "freed_ok": "1",
        "pool_live_end": "0",
        # each granted allocation reached the driver exactly once; the refused one never did
        "driver_calls": str(GRANTED_WITHIN_BUDGET),
    }
    got = {key: facts.get(key) for key in expected}
    assert got == expected, f"{case}: expected {expected}\ngot {got}{result.describe()}"
    other_calls = int(facts.get("other_calls", "-1"))
    if order == "shim":
        assert other_calls == 0, f"{case}: no second interposer, yet {other_calls} calls{result.describe()}"
    else:
        assert other_calls >= GRANTED_WITHIN_BUDGET, (
            f"{case}: expected the second interposer's hook to see every granted allocation "
            f"({GRANTED_WITHIN_BUDGET}), it saw {other_calls}{result.describe()}")


@pytest.mark.parametrize("driver", list(DRIVERS))
def test_control_without_the_shim_the_drivers_and_the_other_interposer_work(built, driver):
    """The fixtures themselves: without qvshim every driver serves the allocations and the other
    interposer alone sees them, unbounded by any budget."""
    for preload in ["", str(built["other"])]:
        env = {"LD_PRELOAD": preload, "LD_LIBRARY_PATH": str(BUILD / driver)}
        result = shimrun.run([built["client"], "proc_v2", "alloc", str(CHUNK_MIB), str(MAX_TRIES)], env,
                             preload=False)
        facts = _facts(result.stdout)
        assert result.returncode == 0 and facts.get("granted") == str(MAX_TRIES), (
            f"{driver} driver, preload {preload!r}: expected all {MAX_TRIES} granted without the "
            f"shim{result.describe()}")
        want_other = MAX_TRIES if preload else 0
        assert int(facts.get("other_calls", "-1")) == want_other, result.describe()
