"""`python -m qvshim run` without the library: where it looks, what it says when it finds nothing."""


import sys

import pytest

from conftest import plain_env, run_python
from qvshim import launcher


def make_file(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_qvshim_library_variable_wins(tmp_path):
    explicit = make_file(tmp_path / "custom" / "libqvshim.so")
    make_file(tmp_path / "pkg" / "libqvshim.so")
    found = launcher.find_library({"QVSHIM_LIBRARY": str(explicit)}, package_dir=str(tmp_path / "pkg"), cwd=str(tmp_path))
    assert found == str(explicit)


def test_qvshim_library_pointing_nowhere_is_an_error_not_a_fallback(tmp_path):
    make_file(tmp_path / "pkg" / "libqvshim.so")
    with pytest.raises(launcher.LibraryNotFound, match="QVSHIM_LIBRARY=.*is not a file"):
        launcher.find_library({"QVSHIM_LIBRARY": str(tmp_path / "nope.so")}, package_dir=str(tmp_path / "pkg"))


@pytest.mark.parametrize(
    "where",
    [
        "repo/python/qvshim/libqvshim.so",  # copied into the package
        "repo/python/libqvshim.so",  # next to the package
        "repo/target/release/libqvshim.so",  # the repository's build
    ],
)
def test_library_is_found_next_to_the_package_or_in_the_repository_build(tmp_path, where):
    library = make_file(tmp_path / where)
    found = launcher.find_library({}, package_dir=str(tmp_path / "repo/python/qvshim"), cwd="/")
    assert found == str(library)


def test_package_copy_comes_before_the_repository_build(tmp_path):
    copy = make_file(tmp_path / "repo/python/qvshim/libqvshim.so")
    make_file(tmp_path / "repo/target/release/libqvshim.so")
    assert launcher.find_library({}, package_dir=str(tmp_path / "repo/python/qvshim"), cwd="/") == str(copy)


def test_installed_package_finds_the_build_of_the_repository_it_runs_in(tmp_path):
    library = make_file(tmp_path / "checkout/target/release/libqvshim.so")
    (tmp_path / "checkout/examples").mkdir()
    found = launcher.find_library({}, package_dir=str(tmp_path / "site-packages/qvshim"), cwd=str(tmp_path / "checkout/examples"))
    assert found == str(library)


def test_nowhere_says_where_it_looked_and_how_to_build(tmp_path):
    with pytest.raises(launcher.LibraryNotFound) as missing:
        launcher.find_library({}, package_dir=str(tmp_path / "repo/python/qvshim"), cwd=str(tmp_path))
    message = str(missing.value)
    assert str(tmp_path / "repo/target/release/libqvshim.so") in message
    assert "cargo build --release" in message and "QVSHIM_LIBRARY" in message


def test_preload_goes_first_and_keeps_what_was_there():
    env = launcher.preload_environment("/lib/libqvshim.so", {"LD_PRELOAD": "/lib/other.so", "HOME": "/root"})
    assert env["LD_PRELOAD"] == "/lib/libqvshim.so:/lib/other.so" and env["HOME"] == "/root"
    assert launcher.preload_environment("/lib/libqvshim.so", {})["LD_PRELOAD"] == "/lib/libqvshim.so"


@pytest.mark.parametrize("path", ["/my libs/libqvshim.so", "/a:b/libqvshim.so"])
def test_path_that_ld_preload_cannot_carry_is_refused(path):
    with pytest.raises(launcher.LibraryNotFound, match="space or colon"):
        launcher.preload_environment(path, {})


@pytest.mark.parametrize(
    "args, env_extra, code, stderr_has",
    [
        (["run", "SCRIPT"], {"QVSHIM_LIBRARY": "/nonexistent/libqvshim.so"}, 127, "QVSHIM_LIBRARY=/nonexistent/libqvshim.so is not a file"),
        (["run", "missing.py"], {}, 2, "can't open file 'missing.py'"),
        (["run", "-m"], {}, 2, "needs a module name"),
        (["run"], {}, 2, "usage: python -m qvshim run"),
        ([], {}, 2, "python -m qvshim run SCRIPT"),  # no command: the usage, on stderr
        (["frobnicate"], {}, 2, "unknown command 'frobnicate'"),
        (["library"], {"QVSHIM_LIBRARY": "/nonexistent/libqvshim.so"}, 127, "is not a file"),
        (["run", "--budget", "lots", "SCRIPT"], {}, 2, "qvshim: --budget 'lots': not a size (e.g. 6G, 512MiB, 1.5G, 50%, off)"),
        (["run", "--budget=15M", "SCRIPT"], {}, 2, "qvshim: --budget '15M': below the 16 MiB minimum"),
        (["run", "--gpu-budget", "101%", "SCRIPT"], {}, 2, "qvshim: --gpu-budget '101%': a percentage over 100"),
        (["run", "--gpu-budget", "-1G", "SCRIPT"], {}, 2, "qvshim: --gpu-budget '-1G': negative"),
        (["run", "--budget"], {}, 2, "qvshim: --budget needs a size"),
        (["run", "--budget", "1G"], {}, 2, "qvshim: run needs a script, -m MODULE or a program"),
        (["run", "no-such-program-qvshim"], {}, 127, "qvshim: no-such-program-qvshim: command not found"),
        (["run", "NOT_EXECUTABLE"], {}, 126, "permission denied (not an executable file)"),
        (["run", "/bin/sh"], {"QVSHIM_LIBRARY": "/nonexistent/libqvshim.so"}, 127, "QVSHIM_LIBRARY=/nonexistent/libqvshim.so is not a file"),
    ],
)
def test_command_line_errors(tmp_path, args, env_extra, code, stderr_has):
    script = tmp_path / "script.py"
    script.write_text("print('ran')\n")
    not_executable = tmp_path / "tool"
    not_executable.write_text("echo ran\n")
    args = [{"SCRIPT": str(script), "NOT_EXECUTABLE": str(not_executable)}.get(arg, arg) for arg in args]
    result = run_python(["-m", "qvshim", *args], plain_env(**env_extra), cwd=tmp_path)
    assert result.returncode == code, result.stderr
    assert stderr_has in result.stderr
    assert "ran" not in result.stdout
    assert "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize("argv, settings, rest", [
    (["app.py", "--budget", "1G"], {}, ["app.py", "--budget", "1G"]),  # after the program: the program's
    (["--budget", "1G", "app.py"], {"QVSHIM_BUDGET": "1G"}, ["app.py"]),
    (["--budget=50%", "--gpu-budget", "off", "-m", "http.server"], {"QVSHIM_BUDGET": "50%", "QVSHIM_GPU_BUDGET": "off"}, ["-m", "http.server"]),
    (["--", "--budget"], {}, ["--budget"]),  # a program named like an option
    (["sh", "-c", "true"], {}, ["sh", "-c", "true"]),
])
def test_run_options_come_before_the_program(argv, settings, rest):
    assert launcher.parse_run_options(argv) == (settings, rest)


@pytest.mark.parametrize("target, is_script", [
    ("webui.py", True), ("./app/webui.py", True), ("gui.pyw", True),
    ("python3", False), ("/bin/sh", False), ("webui", False), ("notes.py.txt", False),
])
def test_a_path_ending_in_py_is_a_script_anything_else_a_program(target, is_script):
    assert launcher.is_python_script(target) == is_script


def test_preload_is_not_repeated_when_already_there():
    env = launcher.preload_environment("/lib/libqvshim.so", {"LD_PRELOAD": "/lib/other.so /lib/libqvshim.so::"})
    assert env["LD_PRELOAD"] == "/lib/libqvshim.so:/lib/other.so"


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_run_help_prints_the_usage_on_stdout_and_exits_zero(flag):
    result = run_python(["-m", "qvshim", "run", flag], plain_env())
    assert result.returncode == 0, f"expected `qvshim run {flag}` to exit 0: {result.stderr}"
    assert "usage: python -m qvshim run" in result.stdout, f"expected the usage on stdout, got {result.stdout!r}"


SUBCOMMAND_USAGE = [("status", "usage: qvshim status [PID]"), ("top", "usage: qvshim top [--once]"),
                    ("dump", "usage: qvshim dump PID [--json]"), ("doctor", "usage: qvshim doctor")]


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("command,usage", SUBCOMMAND_USAGE, ids=[c[0] for c in SUBCOMMAND_USAGE])
def test_each_subcommands_help_prints_its_usage_and_exits_zero(command, usage, flag):
    result = run_python(["-m", "qvshim", command, flag], plain_env())
    assert (result.returncode, result.stdout) == (0, usage + "\n"), (
        f"expected `qvshim {command} {flag}` to print {usage!r} and exit 0, got exit {result.returncode}: "
        f"{result.stdout!r} {result.stderr!r}")


def test_help_exits_zero():
    result = run_python(["-m", "qvshim", "--help"], plain_env())
    assert result.returncode == 0 and "python -m qvshim run SCRIPT" in result.stdout


def test_stats_without_the_library_says_how_to_run_under_it():
    result = run_python(["-c", "import qvshim; print(qvshim.is_loaded()); qvshim.stats()"], plain_env())
    assert result.stdout.strip() == "False"
    assert "NotLoaded: libqvshim.so is not preloaded" in result.stderr
    assert "python -m qvshim run script.py" in result.stderr


def test_headroom_without_the_library_comes_from_meminfo():
    code = "import qvshim; r = qvshim.headroom(qvshim.POOL_HOST, 0.1); print(r.free > 0, r.limit > r.free, r.held > 0, qvshim.headroom(qvshim.gpu_pool(0), 0.1))"
    result = run_python(["-c", code], plain_env())
    assert result.stdout.split() == ["True", "True", "True", "None"], result.stderr


def test_reexec_without_orig_argv_runs_the_package_again(tmp_path, monkeypatch):
    # Python 3.9 (pyproject allows it) has no sys.orig_argv: the re-exec then names the package.
    library = make_file(tmp_path / "libqvshim.so")
    execs = []
    monkeypatch.setattr(launcher._capi, "is_loaded", lambda: False)
    monkeypatch.delenv(launcher._REEXEC_MARK, raising=False)
    monkeypatch.setenv("QVSHIM_LIBRARY", str(library))
    monkeypatch.delattr(sys, "orig_argv", raising=False)
    monkeypatch.setattr(launcher.os, "execve", lambda path, args, env: execs.append((path, args)))
    launcher._ensure_preloaded(["run", "script.py", "x"])
    expected = (sys.executable, [sys.executable, "-m", "qvshim", "run", "script.py", "x"])
    assert execs == [expected], f"expected one re-exec {expected}, got {execs}"


def test_library_that_does_not_load_is_reported_once_not_looped(tmp_path):
    broken = tmp_path / "libqvshim.so"
    broken.write_text("not an ELF file\n")
    script = tmp_path / "script.py"
    script.write_text("print('ran')\n")
    result = run_python(["-m", "qvshim", "run", str(script)], plain_env(QVSHIM_LIBRARY=str(broken)), cwd=tmp_path)
    assert result.returncode == 127, result.stderr
    line = (f"LD_PRELOAD={broken} was set but the library did not load "
            "(the dynamic loader's message, if any, is above)")
    assert line in result.stderr, f"expected {line!r} in {result.stderr!r}"
    assert "ld.so" in result.stderr.split(line)[0], "the dynamic loader's own message comes first"
    assert "ran" not in result.stdout
