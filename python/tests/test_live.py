"""The companion against the real libqvshim.so: the C API, ModelManager on the shim's own numbers,
the launcher's re-exec and Ctrl+C, and the cooperative demo. Run under the shim:
`python -m qvshim run -m pytest python/tests` (tests that change budgets use child processes)."""

import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest

import qvshim
from conftest import REPO_DIR, plain_env, run_python

pytestmark = pytest.mark.live
MIB = 1024 * 1024


def run_script(tmp_path, source, env, *args, timeout=120):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    return run_python(["-m", "qvshim", "run", str(script), *args], env, timeout=timeout, cwd=tmp_path)


def test_stats_are_the_pools_of_the_dump(shim):
    pools = shim.stats()
    host = pools[0]
    assert host["name"] == "host" and host["pool"] == 0 and host["device"] == -1
    assert host["level_name"] in ("normal", "warn", "critical")
    assert 0 < host["live"] <= host["peak"] and host["allocs"] >= host["frees"] > 0
    assert set(qvshim._capi.STATS_FIELDS) <= set(host)


def test_level_of_a_pool_and_of_all_pools(shim):
    assert shim.level(0) == shim.stats()[0]["level_name"]
    assert shim.level() in ("normal", "warn", "critical")
    with pytest.raises(ValueError, match="unknown pool"):
        shim.level(99)


def test_live_bytes_follow_a_python_allocation(shim):
    before = shim.stats()[0]["live"]
    block = bytearray(64 * MIB)
    during = shim.stats()[0]["live"]
    del block
    after = shim.stats()[0]["live"]
    assert during - before >= 64 * MIB, "a 64 MiB bytearray must show in the host pool"
    assert during - after >= 64 * MIB, "and leave it when freed"


def test_purge_returns_the_bytes_it_gave_back(shim):
    shim.purge()
    # 64 blocks of 1 MiB, written so their pages are resident, then freed: jemalloc keeps them
    # dirty (its decay takes seconds) until a purge gives them back.
    blocks = [b"\x01" * MIB for _ in range(64)]
    del blocks
    returned = shim.purge()
    assert returned >= 32 * MIB, f"expected the purge to give back most of 64 MiB of freed pages, got {returned}"
    again = shim.purge()
    assert again < returned // 4, f"expected a second purge right after to find little left, got {again} after {returned}"


def test_budget_from_the_environment_and_set_at_run_time(tmp_path, library):
    result = run_script(tmp_path, """
        import qvshim
        print(qvshim.stats()[0]["budget"])
        qvshim.set_budget(0, 300 * 1024 * 1024)
        print(qvshim.stats()[0]["budget"])
        try:
            qvshim.set_budget(42, 1)
        except ValueError as error:
            print(error)
        qvshim.set_budget(0, None)  # None turns the budget off
        print(qvshim.stats()[0]["budget"])
    """, plain_env(QVSHIM_BUDGET="256M"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:4] == [str(256 * MIB), str(300 * MIB), "unknown pool 42", str(2**64 - 1)], (
        result.stdout)


def test_model_manager_evicts_on_the_shims_own_headroom(tmp_path, library):
    result = run_script(tmp_path, """
        import qvshim
        MIB = 1024 * 1024
        models = qvshim.ModelManager(keep_alive=None)
        load = lambda: bytearray(60 * MIB)
        for name in ("a", "b", "c", "a"):
            models.get(name, load, size=60 * MIB)
        print(",".join(models.loaded()))
        host = qvshim.stats()[0]
        print(host["refusals"], host["peak"] < host["budget"])
        with models.use("a", load, size=60 * MIB):
            try:
                models.get("huge", load, size=400 * MIB)
            except qvshim.ModelDoesNotFit as error:
                print(error)
            print(",".join(models.loaded()))
    """, plain_env(QVSHIM_BUDGET="200M"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # 0.9 * 200 MiB leaves room for two 60 MiB models next to the interpreter, not three.
    assert lines[0] == "c,a", result.stderr
    assert lines[1] == "0 True"
    assert "cannot load model 'huge': it needs 400.0 MiB" in lines[2] and "of 200.0 MiB" in lines[2]
    assert lines[3] == "c,a", "a load that cannot fit must not evict anything"
    assert "unloaded model 'a' (making room for 'c'): host -6" in result.stderr


def test_run_reexecs_under_the_library_with_argv_and_exit_code(tmp_path, library):
    result = run_script(tmp_path, """
        import os, sys
        import qvshim
        print(__name__, sys.argv[1:], qvshim.is_loaded(), os.environ["LD_PRELOAD"].split(":")[0])
        print("QVSHIM_RUN_REEXEC" in os.environ)
        sys.exit(7)
    """, plain_env(), "one", "two words")
    assert result.returncode == 7, result.stderr
    first, second = result.stdout.splitlines()
    assert first == f"__main__ ['one', 'two words'] True {library}"
    assert second == "False", "the re-exec mark must not leak into the program"


def test_run_script_imports_its_neighbours_from_its_own_folder(tmp_path, library):
    # As `python app/main.py` does: the script's folder, not the working directory, comes first.
    app = tmp_path / "app"
    app.mkdir()
    (app / "helper.py").write_text("WHERE = 'next to the script'\n")
    (app / "main.py").write_text("import helper\nprint(helper.WHERE)\n")
    result = run_python(["-m", "qvshim", "run", str(app / "main.py")], plain_env(), cwd=tmp_path)
    assert result.returncode == 0, f"expected the script to import helper.py beside it: {result.stderr[-2000:]}"
    assert result.stdout.strip() == "next to the script"


def test_run_module_and_console_style_invocation(tmp_path, library):
    (tmp_path / "mymod.py").write_text("import sys, qvshim\nprint(__name__, sys.argv[1:], qvshim.is_loaded())\n")
    result = run_python(["-m", "qvshim", "run", "-m", "mymod", "x"], plain_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "__main__ ['x'] True"


def test_run_inside_an_already_preloaded_process_does_not_reexec(tmp_path, library):
    # A re-exec puts the library in front of LD_PRELOAD again and marks the environment; the
    # script sees the environment the program was really started with.
    script = "import os; print(repr(os.environ.get('LD_PRELOAD')), sorted(k for k in os.environ if k.startswith('QVSHIM')))\n"
    result = run_script(tmp_path, script, plain_env(LD_PRELOAD=library))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{library!r} []", (
        f"expected the script to run in the process as started (LD_PRELOAD={library!r}, no QVSHIM "
        f"variables), got {result.stdout.strip()}: the launcher re-executed")


def test_ctrl_c_ends_the_program_cleanly(tmp_path, library):
    script = tmp_path / "serve.py"
    script.write_text(textwrap.dedent("""
        import atexit, time
        atexit.register(lambda: print("atexit ran", flush=True))
        print("serving", flush=True)
        while True:
            time.sleep(0.05)
    """))
    child = subprocess.Popen([sys.executable, "-m", "qvshim", "run", str(script)], env=plain_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "serving"
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=30)
    finally:
        child.kill()
    assert child.returncode == 130, err
    assert "atexit ran" in out and "qvshim: interrupted" in err
    assert "Traceback" not in err


def test_cooperative_demo_stays_under_the_budget_without_a_refusal(library):
    env = plain_env(QVSHIM_BUDGET="512M")
    demo = os.path.join(REPO_DIR, "examples", "cooperative_webui.py")
    result = run_python(["-m", "qvshim", "run", demo, "--lines", "150"], env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "refusals 0" in result.stdout and "stayed under the budget" in result.stdout
    assert "making room for" in result.stderr, "the demo's budget is meant to force an eviction"


TREE_SCRIPT = """
import os, subprocess, sys
child = subprocess.run([sys.executable, "-c",
                        "import os; print(os.environ.get('QVSHIM_TREE_LEDGER'))"],
                       capture_output=True, text=True)
print(os.environ.get("QVSHIM_SCOPE"), os.environ.get("QVSHIM_TREE_LEDGER"),
      child.stdout.strip())
"""


@pytest.mark.parametrize("preloaded", [False, True], ids=["not-loaded", "loaded-in-process-scope"])
def test_run_tree_puts_the_program_and_its_children_in_one_tree(tmp_path, library, preloaded):
    env = plain_env(**({"LD_PRELOAD": str(library), "QVSHIM_SCOPE": "process"} if preloaded else {}))
    script = tmp_path / "script.py"
    script.write_text(TREE_SCRIPT)
    result = run_python(["-m", "qvshim", "run", "--tree", str(script)], env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    scope, ledger, childs = result.stdout.split()
    assert scope == "tree" and ledger.startswith("/") and childs == ledger, (
        f"expected QVSHIM_SCOPE=tree and one ledger path seen by the program and its child; "
        f"got {result.stdout!r}\n{result.stderr}")


# `run PROGRAM`: any program, exec'd with the library preloaded. (run's arguments, expected status,
# expected stdout); {library} is the build under test. A signal shows as -N, as for a shell.
PROGRAM_ROWS = [
    (["/bin/sh", "-c", "echo $LD_PRELOAD"], 0, "{library}"),
    (["sh", "-c", "echo $LD_PRELOAD"], 0, "{library}"),  # looked up in PATH
    (["--budget", "1G", "--gpu-budget=50%", "sh", "-c", "echo $QVSHIM_BUDGET $QVSHIM_GPU_BUDGET"], 0, "1G 50%"),
    (["sh", "-c", "exit 7"], 7, ""),
    (["sh", "-c", "kill -TERM $$"], -signal.SIGTERM, ""),
    (["--budget", "100M", "PYTHON", "-c", "import qvshim; print(qvshim.is_loaded(), qvshim.stats()[0]['budget'])"], 0, f"True {100 * MIB}"),
]


@pytest.mark.parametrize("args, code, stdout", PROGRAM_ROWS)
def test_run_any_program_under_the_library(tmp_path, library, args, code, stdout):
    args = [sys.executable if arg == "PYTHON" else arg for arg in args]
    result = run_python(["-m", "qvshim", "run", *args], plain_env(), cwd=tmp_path)
    assert result.returncode == code, f"expected status {code}, got {result.returncode}: {result.stderr}"
    assert result.stdout.strip() == stdout.format(library=library), result.stderr


def test_run_with_the_library_already_preloaded_keeps_one_copy(tmp_path, library):
    env = plain_env(LD_PRELOAD=library)
    result = run_python(["-m", "qvshim", "run", "/bin/sh", "-c", "echo $LD_PRELOAD"], env, cwd=tmp_path)
    assert (result.returncode, result.stdout.strip()) == (0, library), result.stderr


def test_budget_flag_reaches_a_script_even_when_python_already_runs_under_the_library(tmp_path, library):
    # The library reads QVSHIM_BUDGET when it loads: a flag the process did not start with needs a re-exec.
    result = run_script(tmp_path, """
        import qvshim
        print(qvshim.stats()[0]["budget"])
    """, plain_env(LD_PRELOAD=library, QVSHIM_BUDGET="1G"))
    assert (result.returncode, result.stdout.strip()) == (0, str(1024 * MIB)), result.stderr
    script = tmp_path / "script.py"
    flagged = run_python(["-m", "qvshim", "run", "--budget", "200M", str(script)],
                         plain_env(LD_PRELOAD=library, QVSHIM_BUDGET="1G"), cwd=tmp_path)
    assert (flagged.returncode, flagged.stdout.strip()) == (0, str(200 * MIB)), flagged.stderr


# Values of a budget, good and bad: the launcher checks --budget before it starts anything.
BUDGET_VALUES = ["lots", "-5%", "150%", "0%", "%", "x%", "1.5.%", "50 %", "\t50%", "100.0%", "100.01%", "0.5%",
                 "15M", "16777215", "16777216", "5X", "5BiB", "5GiBs", "5Bb", "5B", "5b", "5 G", "5 KiB", "5kb",
                 "5K B", "5GIB", "-1G", "", " ", "1.2.3G", ".5G", "5.G", ".", "1e3", "8388609T", "8388608T", "0",
                 "2G", " 2G ", "1.5G", "50%", "off", "OFF", "512MiB", "1tb", "2\u212a", "\uff15G", "2G\u00a0"]


@pytest.mark.parametrize("value", BUDGET_VALUES)
def test_the_launcher_judges_a_budget_as_the_library_does(library, value):
    library_says = run_python(["-c", "pass"], plain_env(LD_PRELOAD=library, QVSHIM_BUDGET=value)).stderr
    launcher_says = run_python(["-m", "qvshim", "run", "--budget", value, "-m", "this"],
                               plain_env()).stderr
    # The library's line shows a byte outside printable ASCII as '?': the reason is what follows the value.
    library_reason = [m.group(1) for line in library_says.splitlines()
                      if (m := re.fullmatch(r'\[qvshim\] ERROR QVSHIM_BUDGET=".*?": (.*); using default \S+', line))]
    launcher_reason = [line.split(f"--budget {value!r}: ", 1)[1]
                       for line in launcher_says.splitlines() if f"--budget {value!r}: " in line]
    assert launcher_reason == library_reason, (
        f"--budget {value!r}: the launcher says {launcher_says!r}, the library {library_says!r}")
