"""What needs the monitor issue's side of the library: real relief (a level rise makes
qvshim._on_pressure run our callbacks in the main thread) and the exit summary after Ctrl+C.
Each runs in a child process; the relief tests lower its budget with qvshim_set_budget."""

import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import plain_env, run_python

pytestmark = [pytest.mark.live, pytest.mark.monitor]

RISE_TO_CRITICAL = """
    import threading, time
    import qvshim

    MIB = 1024 * 1024
    seen = []
    qvshim.on_pressure(lambda level, pool: seen.append(("warn-callback", level, pool,
                                                         threading.current_thread() is threading.main_thread())),
                       level="warn")
    qvshim.on_pressure(lambda level, pool: seen.append(("critical-callback", level, pool,
                                                         threading.current_thread() is threading.main_thread())))
    {setup}
    held = bytearray(48 * MIB)
    live = qvshim.stats()[0]["live"]
    qvshim.set_budget(0, int(live / 0.95))  # 95% of the budget: past critical
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not {done}:
        small = [bytearray(1024) for _ in range(64)]  # keep allocating, as a working program does
        time.sleep(0.01)
    {report}
"""


def run_rise(tmp_path, setup="", done="any(s[0] == 'critical-callback' for s in seen)", report="print(seen)"):
    source = textwrap.dedent(RISE_TO_CRITICAL.format(setup=setup, done=done, report=report))
    script = tmp_path / "rise.py"
    script.write_text(source)
    return run_python(["-m", "qvshim", "run", str(script)], plain_env(QVSHIM_BUDGET="1G"), timeout=120)


def test_level_rise_runs_warn_and_critical_callbacks_in_the_main_thread(tmp_path, library):
    result = run_rise(tmp_path)
    assert result.returncode == 0, result.stderr
    seen = eval(result.stdout.strip().splitlines()[-1])
    assert ("critical-callback", "critical", 0, True) in seen, f"no critical callback in the main thread: {seen}\n{result.stderr}"
    assert any(entry[0] == "warn-callback" and entry[3] for entry in seen), f"warn callbacks run at critical too: {seen}"


def test_critical_pressure_unloads_idle_models(tmp_path, library):
    result = run_rise(
        tmp_path,
        setup="models = qvshim.ModelManager(keep_alive=None)\n"
              "    models.get('idle', lambda: bytearray(8 * MIB), size=8 * MIB)",
        done="models.loaded() == []",
        report="print(models.loaded(), [s[1] for s in seen])",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("[] "), result.stdout + result.stderr
    assert "unloaded model 'idle' (critical pressure)" in result.stderr


def test_ctrl_c_ends_with_the_shims_exit_summary(tmp_path, library):
    script = tmp_path / "serve.py"
    script.write_text("import time\nprint('serving', flush=True)\nwhile True:\n    time.sleep(0.05)\n")
    # QVSHIM_LOG=info asks for the exit summary (the shim is silent by default).
    child = subprocess.Popen([sys.executable, "-m", "qvshim", "run", str(script)], env=plain_env(QVSHIM_LOG="info"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "serving"
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=30)
    finally:
        child.kill()
    assert child.returncode == 130, err
    summary = [line for line in err.splitlines() if line.startswith("[qvshim] INFO exit pid")]
    assert len(summary) == 1 and "peak" in summary[0] and "refusals" in summary[0], err
