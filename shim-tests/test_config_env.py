"""Configuration from the environment (docs/CONFIGURATION.md).

A bad value prints exactly one ERROR line naming the variable, the value, the
reason and the default, the default is used, and the host program runs on with
its own output intact. Good values are accepted silently. One row per case:
adding a bad value is one line.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import shimrun
from shimrun import GIB, MIB

PROGRAM_LINE = "hello from the test program"
DEFAULT_BUDGET_BYTES = 6 * GIB
DEFAULT_RESERVE_BYTES = 64 * MIB
UNLIMITED = 2**64 - 1

# Defaults as the ERROR line names them.
DEFAULT_TEXT = {
    "QVSHIM_BUDGET": "6G",
    "QVSHIM_RESERVE": "64M",
    "QVSHIM_WARN": "70%?",
    "QVSHIM_CRITICAL": "90%?",
    "QVSHIM_LOG": re.escape("warn (info with QVSHIM_LOG_FILE)"),
    "QVSHIM_LOG_FILE": ".*stderr.*",
}


def error_line(variable: str, value: str, reason: str = ".+") -> str:
    """Regex of the one ERROR line for a bad value (format of docs/CONFIGURATION.md)."""
    return (rf'\[qvshim\] ERROR {variable}="{re.escape(value)}": {reason}; '
            rf"using default {DEFAULT_TEXT[variable]}")


def bad(env: dict[str, str], *lines: str, budget: int = DEFAULT_BUDGET_BYTES,
        reserve: int = DEFAULT_RESERVE_BYTES, why: str = ""):
    """A row: the environment, the ERROR line regexes it must print (one per bad
    variable), and the budget and reserve the shim must end up using."""
    shown = " ".join(f"{k}={v!r}" for k, v in env.items())
    return pytest.param(env, list(lines), budget, reserve, id=f"{shown} ({why})" if why else shown)


def bad_value(variable: str, value: str, why: str, **kw):
    return bad({variable: value}, error_line(variable, value), why=why, **kw)


BAD_VALUES = [
    # The example line of docs/CONFIGURATION.md, word for word.
    bad({"QVSHIM_BUDGET": "lots"},
        re.escape('[qvshim] ERROR QVSHIM_BUDGET="lots": not a size (e.g. 6G, 512MiB, 1.5G, 50%, off); '
                  "using default 6G"),
        why="documented example"),
    bad_value("QVSHIM_BUDGET", "G", "no number"),
    bad_value("QVSHIM_BUDGET", "1.2.3G", "not a number"),
    bad_value("QVSHIM_BUDGET", "-5G", "negative"),
    bad_value("QVSHIM_BUDGET", "-1", "negative"),
    bad_value("QVSHIM_BUDGET", "5X", "unknown unit"),
    bad_value("QVSHIM_BUDGET", "5 GiBs", "unknown unit"),
    bad_value("QVSHIM_BUDGET", "", "empty"),
    bad_value("QVSHIM_BUDGET", "   ", "only spaces"),
    bad_value("QVSHIM_BUDGET", "150%", "percentage over 100"),
    bad_value("QVSHIM_BUDGET", "0%", "percentage of zero"),
    bad_value("QVSHIM_BUDGET", "-10%", "negative percentage"),
    bad_value("QVSHIM_BUDGET", "512K", "budget under 16 MiB"),
    bad_value("QVSHIM_BUDGET", "1MiB", "budget under 16 MiB"),
    bad_value("QVSHIM_BUDGET", "16777215", "budget one byte under 16 MiB"),
    bad_value("QVSHIM_BUDGET", "0", "budget of zero"),
    bad_value("QVSHIM_BUDGET", "8388609T", "size past 2^63 bytes"),
    bad_value("QVSHIM_BUDGET", "99999999999999999999999", "number past 2^63"),
    bad_value("QVSHIM_RESERVE", "plenty", "not a number"),
    bad_value("QVSHIM_RESERVE", "-1M", "negative"),
    bad_value("QVSHIM_RESERVE", "64Q", "unknown unit"),
    bad_value("QVSHIM_RESERVE", "", "empty"),
    bad_value("QVSHIM_RESERVE", "10%", "a percentage is not a size"),
    bad_value("QVSHIM_RESERVE", "8388609T", "size past 2^63 bytes"),
    bad_value("QVSHIM_WARN", "high", "not a number"),
    bad_value("QVSHIM_WARN", "-70", "negative"),
    bad_value("QVSHIM_WARN", "", "empty"),
    bad_value("QVSHIM_WARN", "0", "level outside 1..100"),
    bad_value("QVSHIM_WARN", "101", "level outside 1..100"),
    bad_value("QVSHIM_WARN", "150%", "percentage over 100"),
    bad_value("QVSHIM_WARN", "70.5", "not a whole percentage"),
    bad_value("QVSHIM_WARN", "70M", "unknown unit"),
    bad_value("QVSHIM_CRITICAL", "very", "not a number"),
    bad_value("QVSHIM_CRITICAL", "-90", "negative"),
    bad_value("QVSHIM_CRITICAL", "", "empty"),
    bad_value("QVSHIM_CRITICAL", "0", "level outside 1..100"),
    bad_value("QVSHIM_CRITICAL", "101%", "percentage over 100"),
    bad_value("QVSHIM_CRITICAL", "90x", "unknown unit"),
    # QVSHIM_WARN not below QVSHIM_CRITICAL: the variable the user set is blamed.
    bad_value("QVSHIM_WARN", "95", "warn above the default critical 90"),
    bad_value("QVSHIM_WARN", "90", "warn equal to the default critical 90"),
    bad_value("QVSHIM_CRITICAL", "50", "critical below the default warn 70"),
    bad({"QVSHIM_WARN": "80", "QVSHIM_CRITICAL": "80"},
        rf'\[qvshim\] ERROR QVSHIM_WARN="80": .+; using default.*',
        why="both set and equal: QVSHIM_WARN is reported"),
    bad({"QVSHIM_WARN": "95", "QVSHIM_CRITICAL": "60"},
        rf'\[qvshim\] ERROR QVSHIM_WARN="95": .+; using default.*',
        why="both set, warn above critical: QVSHIM_WARN is reported"),
    # QVSHIM_WARN unreadable (so the default 70 stands) and QVSHIM_CRITICAL below it: the
    # critical value is the one blamed for the order, QVSHIM_WARN only for its own text.
    bad({"QVSHIM_WARN": "lots", "QVSHIM_CRITICAL": "50"},
        error_line("QVSHIM_WARN", "lots", "(?!not below).+"), error_line("QVSHIM_CRITICAL", "50", "not above .+"),
        why="bad warn, critical below the default warn: QVSHIM_CRITICAL is reported"),
    bad_value("QVSHIM_LOG", "loud", "unknown log level"),
    bad_value("QVSHIM_LOG", "", "empty"),
    bad_value("QVSHIM_LOG", "3", "unknown log level"),
    bad_value("QVSHIM_LOG_FILE", "/nonexistent-qvshim-dir/qvshim.log", "directory does not exist"),
    bad_value("QVSHIM_LOG_FILE", "/", "a directory"),
    bad_value("QVSHIM_LOG_FILE", "", "empty"),
    # A typo is never silent, not even with logging off.
    bad({"QVSHIM_BUDGET": "lots", "QVSHIM_LOG": "off"}, error_line("QVSHIM_BUDGET", "lots"),
        why="QVSHIM_LOG=off still prints the ERROR"),
    # Several bad variables: one line each, and each default used.
    bad({"QVSHIM_BUDGET": "-1G", "QVSHIM_RESERVE": "lots", "QVSHIM_LOG": "chatty"},
        error_line("QVSHIM_BUDGET", "-1G"), error_line("QVSHIM_RESERVE", "lots"),
        error_line("QVSHIM_LOG", "chatty"), why="three bad variables"),
    # A bad variable next to good ones: only the bad one falls back.
    bad({"QVSHIM_BUDGET": "512M", "QVSHIM_RESERVE": "5 parsecs"}, error_line("QVSHIM_RESERVE", "5 parsecs"),
        budget=512 * MIB, why="good budget kept"),
]


def program_output_intact(result: shimrun.Run, budget: int, reserve: int) -> list[str]:
    """What is wrong with the host program's own output, or nothing."""
    problems = []
    expected_stdout = f"{PROGRAM_LINE}\nbudget={budget} reserve={reserve}\n"
    if result.stdout != expected_stdout:
        problems.append(f"expected stdout {expected_stdout!r} (the program's output, with the budget and "
                        f"reserve the shim uses), got {result.stdout!r}")
    own_lines = [ln for ln in result.stderr.splitlines() if not ln.startswith("[qvshim]")]
    if own_lines != [PROGRAM_LINE]:
        problems.append(f"expected the program's one stderr line {PROGRAM_LINE!r} and only shim lines "
                        f"besides, got {own_lines!r}")
    if result.returncode != 0:
        problems.append(f"expected the program's normal exit 0, got {result.exit_text()}")
    return problems


@pytest.mark.parametrize("env,lines,budget,reserve", BAD_VALUES)
def test_bad_value_prints_one_error_line_and_the_program_runs_on(env, lines, budget, reserve, c_program,
                                                               run_under_shim):
    result = run_under_shim([c_program("hello")], env)
    problems = program_output_intact(result, budget, reserve)
    errors = [ln for ln in result.shim_lines() if " ERROR " in ln]
    if len(errors) != len(lines):
        problems.append(f"expected exactly {len(lines)} ERROR line(s), one per bad variable, got {len(errors)}")
    for pattern in lines:
        matching = [ln for ln in errors if re.fullmatch(pattern, ln)]
        if len(matching) != 1:
            problems.append(f"expected exactly one ERROR line matching {pattern!r}, got {len(matching)}")
    assert not problems, "\n".join(problems) + result.describe()


def percent_of_memory(percent: float) -> int:
    """The budget a percentage means: of physical memory, or of the cgroup v2
    memory.max when that is lower (docs/CONFIGURATION.md)."""
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            limit_file = Path("/sys/fs/cgroup") / line[3:].lstrip("/") / "memory.max"
            if limit_file.is_file():
                text = limit_file.read_text().strip()
                if text.isdigit():
                    memory = min(memory, int(text))
    return int(memory * percent / 100)


def good(env: dict[str, str], budget: int | None = DEFAULT_BUDGET_BYTES, reserve: int = DEFAULT_RESERVE_BYTES,
         log: str = "warn"):
    """A row: a good environment, the budget and reserve it means (None: a
    percentage, checked separately), and the log level it runs with."""
    shown = " ".join(f"{k}={v!r}" for k, v in env.items())
    return pytest.param({"QVSHIM_LOG": log, **env}, budget, reserve, id=shown)


GOOD_VALUES = [
    good({"QVSHIM_BUDGET": "512MiB"}, budget=512 * MIB),
    good({"QVSHIM_BUDGET": "512M"}, budget=512 * MIB),
    good({"QVSHIM_BUDGET": "512MB"}, budget=512 * MIB),
    good({"QVSHIM_BUDGET": "512m"}, budget=512 * MIB),
    good({"QVSHIM_BUDGET": "0.5G"}, budget=512 * MIB),
    good({"QVSHIM_BUDGET": "1.5g"}, budget=1536 * MIB),
    good({"QVSHIM_BUDGET": "1073741824"}, budget=GIB),
    good({"QVSHIM_BUDGET": " 64 M "}, budget=64 * MIB),
    good({"QVSHIM_BUDGET": "65536 kib"}, budget=64 * MIB),
    good({"QVSHIM_BUDGET": "2T"}, budget=2 * 1024 * GIB),
    good({"QVSHIM_BUDGET": "6G"}, budget=6 * GIB),
    good({"QVSHIM_BUDGET": "16MiB"}, budget=16 * MIB, log="error"),
    good({"QVSHIM_BUDGET": "off"}, budget=UNLIMITED),
    good({"QVSHIM_BUDGET": "OFF"}, budget=UNLIMITED),
    good({"QVSHIM_RESERVE": "0"}, reserve=0),
    good({"QVSHIM_RESERVE": "16K"}, reserve=16 * 1024),
    good({"QVSHIM_RESERVE": "1.5M"}, reserve=MIB + MIB // 2),
    good({"QVSHIM_RESERVE": "128MiB"}, reserve=128 * MIB),
    good({"QVSHIM_WARN": "60", "QVSHIM_CRITICAL": "80"}),
    good({"QVSHIM_WARN": "70%", "QVSHIM_CRITICAL": "100%"}),
    good({"QVSHIM_WARN": "1"}),
    good({"QVSHIM_CRITICAL": "95"}),
    good({}, log="off"),
    good({}, log="error"),
    good({}, log="warn"),
    good({}, log="info"),
    good({}, log="debug"),
]

# Levels at which a short, well-configured run prints nothing at all.
SILENT_LOG_LEVELS = {"off", "error", "warn"}


@pytest.mark.parametrize("env,budget,reserve", GOOD_VALUES)
def test_good_value_is_accepted_without_error(env, budget, reserve, c_program, run_under_shim):
    result = run_under_shim([c_program("hello")], env)
    problems = program_output_intact(result, budget, reserve)
    errors = [ln for ln in result.shim_lines() if " ERROR " in ln]
    if errors:
        problems.append(f"expected no ERROR line for good values, got {errors}")
    if env["QVSHIM_LOG"] in SILENT_LOG_LEVELS and result.shim_lines():
        problems.append(f"expected no shim line at all at QVSHIM_LOG={env['QVSHIM_LOG']}, got {result.shim_lines()}")
    assert not problems, "\n".join(problems) + result.describe()


# Budgets below 1 MiB are refused, so the smallest percentage that could be
# tested depends on the machine; these are far above it on any test machine.
@pytest.mark.parametrize("percent", ["50%", "12.5%", "100%", " 25 % "])
def test_budget_percentage_is_of_physical_memory(percent, c_program, run_under_shim):
    expected = percent_of_memory(float(percent.strip().rstrip("%")))
    result = run_under_shim([c_program("hello")], {"QVSHIM_BUDGET": percent, "QVSHIM_LOG": "warn"})
    assert result.returncode == 0 and not result.shim_lines(), (
        f"expected QVSHIM_BUDGET={percent!r} accepted silently" + result.describe())
    found = re.search(r"^budget=(\d+) ", result.stdout, re.M)
    assert found, f"expected the program to print its budget{result.describe()}"
    got = int(found.group(1))
    assert abs(got - expected) <= MIB, (
        f"expected QVSHIM_BUDGET={percent!r} to mean {expected} bytes (of physical memory or the cgroup v2 "
        f"memory.max), got {got}{result.describe()}")


START_ENV = {"QVSHIM_LOG": "info", "QVSHIM_BUDGET": "512M", "QVSHIM_RESERVE": "32M",
             "QVSHIM_WARN": "65", "QVSHIM_CRITICAL": "85"}
# The start line states these, in whatever unit it prints them.
START_LINE_FACTS = {
    "budget 512 MiB": r"\b(512(\.0+)?\s*M(i?B)?|536870912)\b",
    "reserve 32 MiB": r"\b(32(\.0+)?\s*M(i?B)?|33554432)\b",
    "warn 65%": r"\b65\s*%?",
    "critical 85%": r"\b85\s*%?",
}


def start_line_problems(lines: list[str]) -> list[str]:
    """What is wrong with the shim lines written before the program's own line."""
    if len(lines) != 1:
        return [f"expected exactly one start line before the program's output, got {lines!r}"]
    line = lines[0]
    problems = []
    if not line.startswith("[qvshim] INFO "):
        problems.append(f"expected the start line to begin with '[qvshim] INFO ', got {line!r}")
    for fact, pattern in START_LINE_FACTS.items():
        if not re.search(pattern, line, re.I):
            problems.append(f"expected the start line to state the {fact}, got {line!r}")
    return problems


def test_info_level_prints_one_start_line_with_budget_thresholds_and_reserve(c_program, run_under_shim):
    result = run_under_shim([c_program("hello")], START_ENV)
    problems = program_output_intact(result, 512 * MIB, 32 * MIB)
    stderr = result.stderr.splitlines()
    before_program = stderr[:stderr.index(PROGRAM_LINE)] if PROGRAM_LINE in stderr else stderr
    problems += start_line_problems(before_program)
    assert not problems, "\n".join(problems) + result.describe()


def test_log_file_receives_the_log_lines_appended(tmp_path, c_program, run_under_shim):
    log_file = tmp_path / "qvshim.log"
    log_file.write_text("a line written before the run\n")
    result = run_under_shim([c_program("hello")], {**START_ENV, "QVSHIM_LOG_FILE": str(log_file)})
    problems = program_output_intact(result, 512 * MIB, 32 * MIB)
    if result.shim_lines():
        problems.append(f"expected no shim line on stderr with QVSHIM_LOG_FILE set, got {result.shim_lines()}")
    logged = log_file.read_text().splitlines()
    if not logged or logged[0] != "a line written before the run":
        problems.append(f"expected QVSHIM_LOG_FILE appended to, keeping its first line; it holds {logged!r}")
    problems += start_line_problems(logged[1:2])
    assert not problems, "\n".join(problems) + f"\n  log file:\n{logged!r}" + result.describe()


def test_log_file_opened_as_descriptor_0_is_used(tmp_path, c_program):
    # A program started with its standard input closed: the log file is the first file opened.
    log_file = tmp_path / "qvshim.log"
    result = shimrun.run([c_program("hello")], {**START_ENV, "QVSHIM_LOG_FILE": str(log_file)}, stdin_closed=True)
    problems = program_output_intact(result, 512 * MIB, 32 * MIB)
    if result.shim_lines():
        problems.append(f"expected no shim line on stderr with QVSHIM_LOG_FILE set, got {result.shim_lines()}")
    logged = log_file.read_text().splitlines() if log_file.exists() else []
    problems += start_line_problems(logged[:1])
    assert not problems, "\n".join(problems) + f"\n  log file:\n{logged!r}" + result.describe()


def test_unopenable_log_file_reports_and_logging_stays_on_stderr(c_program, run_under_shim):
    path = "/nonexistent-qvshim-dir/qvshim.log"
    result = run_under_shim([c_program("hello")], {**START_ENV, "QVSHIM_LOG_FILE": path})
    problems = program_output_intact(result, 512 * MIB, 32 * MIB)
    errors = [ln for ln in result.shim_lines() if " ERROR " in ln]
    if len(errors) != 1 or not re.fullmatch(error_line("QVSHIM_LOG_FILE", path), errors[0]):
        problems.append(f"expected one ERROR line for QVSHIM_LOG_FILE={path!r}, got {errors!r}")
    infos = [ln for ln in result.shim_lines() if " ERROR " not in ln]
    problems += start_line_problems(infos[:1])
    assert not problems, "\n".join(problems) + result.describe()
