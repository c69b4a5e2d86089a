"""`qvshim run ...` (or `python -m qvshim run ...`): run a program under the shim.

A Python script (a path ending in .py) or module (`-m MODULE`) runs in this interpreter: when the
library is not in the process yet, the interpreter re-executes itself with LD_PRELOAD set (the
library has to be there before Python starts, to count every byte); then the script runs as
__main__, as `python script.py` would run it. Any other program is executed in place of this
process with LD_PRELOAD set, so its exit status and signals are its own.
"""

import importlib
import os
import runpy
import shutil
import sys

from . import _capi
from ._sizes import BadSize, check_budget

LIBRARY_NAME = "libqvshim.so"
EXIT_NOT_FOUND = 127  # what a shell says for a command it cannot find
EXIT_NOT_EXECUTABLE = 126  # what a shell says for a command it cannot execute
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl+C
_REEXEC_MARK = "QVSHIM_RUN_REEXEC"

USAGE = """\
usage: python -m qvshim run SCRIPT.py [ARGS...]     (the same with the `qvshim` command)
       python -m qvshim run -m MODULE [ARGS...]
       python -m qvshim run PROGRAM [ARGS...]
       python -m qvshim run [--budget SIZE] [--gpu-budget SIZE] [--tree] ...
       python -m qvshim library
       python -m qvshim status [PID] | top [--once] | dump PID [--json] | doctor

run      run a program with libqvshim.so preloaded (no LD_PRELOAD to type). A path ending in
         .py, or -m MODULE, runs in this Python interpreter; anything else is a program looked
         up like a shell does (PATH) and run in place of this command, so its exit status and
         signals are its own.
         --budget SIZE      the host memory budget (QVSHIM_BUDGET): 6G, 512MiB, 50%, off
         --gpu-budget SIZE  the budget of each CUDA device (QVSHIM_GPU_BUDGET): 20G, 90%, off
         --tree             it and every process it starts share one budget
                            (QVSHIM_SCOPE=tree, docs/TREE.md)
library  print the path of the libqvshim.so that `run` would preload
status   the live figures of your processes under qvshim (budget, live, peak, level, pools)
top      the status table refreshed every second, a bar per pool; --once prints one frame
dump     ask a process under qvshim for its diagnostic dump and print it (--json: JSON)
doctor   check the library, the allocator, the Python hook, CUDA, the budget, QVSHIM_* variables

The library is $QVSHIM_LIBRARY, else libqvshim.so inside this package (pip install),
else the repository's target/release/libqvshim.so. Configure it with QVSHIM_* variables,
e.g. QVSHIM_BUDGET=4G python -m qvshim run webui.py (see docs/CONFIGURATION.md)."""


class LibraryNotFound(Exception):
    pass


def candidate_paths(environ=None, package_dir=None, cwd=None):
    """Where the library is looked for, in order, as (path, how it was found)."""
    environ = os.environ if environ is None else environ
    package_dir = package_dir or os.path.dirname(os.path.abspath(__file__))
    explicit = environ.get("QVSHIM_LIBRARY")
    if explicit:
        return [(explicit, "QVSHIM_LIBRARY")]
    python_dir = os.path.dirname(package_dir)
    places = [
        (os.path.join(package_dir, LIBRARY_NAME), "next to the package"),
        (os.path.join(python_dir, LIBRARY_NAME), "next to the package"),
        (os.path.join(os.path.dirname(python_dir), "target", "release", LIBRARY_NAME), "the repository's build"),
    ]
    # An installed package no longer knows its repository: try the one we are standing in.
    directory = os.path.abspath(cwd or os.getcwd())
    while True:
        places.append((os.path.join(directory, "target", "release", LIBRARY_NAME), "the repository's build"))
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    return places


def find_library(environ=None, package_dir=None, cwd=None):
    """The library's absolute path, or LibraryNotFound saying where it looked and what to do."""
    places = candidate_paths(environ, package_dir, cwd)
    for path, _ in places:
        if os.path.isfile(path):
            return os.path.realpath(path)
    if places[0][1] == "QVSHIM_LIBRARY":
        raise LibraryNotFound(
            f"QVSHIM_LIBRARY={places[0][0]} is not a file; point it at libqvshim.so or unset it"
        )
    looked = ", ".join(dict.fromkeys(path for path, _ in places[:3]))
    raise LibraryNotFound(
        f"{LIBRARY_NAME} not found (looked at {looked} and target/release/ above the current "
        "directory); build it with `cargo build --release` in the qvshim repository, "
        "or set QVSHIM_LIBRARY=/path/to/libqvshim.so"
    )


def preload_environment(library, environ, mark=True):
    """environ with library first in LD_PRELOAD (once: an earlier copy of it is dropped)."""
    # The dynamic loader splits LD_PRELOAD on spaces and colons.
    if any(c in library for c in " \t:"):
        raise LibraryNotFound(
            f"the library path {library!r} contains a space or colon, which LD_PRELOAD cannot "
            "carry; copy or link it elsewhere and set QVSHIM_LIBRARY"
        )
    env = dict(environ)
    previous = env.get("LD_PRELOAD", "").replace(" ", ":").replace("\t", ":").split(":")
    env["LD_PRELOAD"] = ":".join([library] + [entry for entry in previous if entry and entry != library])
    if mark:
        env[_REEXEC_MARK] = "1"
    else:
        env.pop(_REEXEC_MARK, None)
    return env


def _fail(message, code=EXIT_NOT_FOUND):
    print(f"qvshim: {message}", file=sys.stderr)
    return code


def _ensure_preloaded(argv, force=False):
    """Return None when the shim is in this process, else re-exec (no return) or an exit code.
    force: re-exec even when it is here (its settings changed)."""
    if _capi.is_loaded() and not force:
        os.environ.pop(_REEXEC_MARK, None)
        return None
    if os.environ.get(_REEXEC_MARK) and not _capi.is_loaded():
        return _fail(
            f"LD_PRELOAD={os.environ.get('LD_PRELOAD', '')} was set but the library did not load "
            "(the dynamic loader's message, if any, is above)"
        )
    try:
        env = preload_environment(find_library(), os.environ)
    except LibraryNotFound as error:
        return _fail(str(error))
    sys.stdout.flush()
    sys.stderr.flush()
    # orig_argv keeps the interpreter's own flags (-X, -u, ...) and works for the console script.
    os.execve(sys.executable, getattr(sys, "orig_argv", [sys.executable, "-m", "qvshim", *argv]), env)
    return None  # not reached


# `run` options: (flag, environment variable it sets).
RUN_OPTIONS = (("--budget", "QVSHIM_BUDGET"), ("--gpu-budget", "QVSHIM_GPU_BUDGET"))
# `run` flags without a value: (flag, environment variable, the value it sets).
RUN_FLAGS = (("--tree", "QVSHIM_SCOPE", "tree"),)


def parse_run_options(argv):
    """Splits `run`'s own options off argv: ({variable: value}, the rest), or BadSize/ValueError.
    Options come before the program; everything from the program on is the program's."""
    settings = {}
    rest = list(argv)
    while rest:
        word = rest[0]
        if word == "--":
            rest.pop(0)
            break
        switch = [(variable, value) for flag, variable, value in RUN_FLAGS if flag == word]
        if switch:
            settings[switch[0][0]] = switch[0][1]
            rest.pop(0)
            continue
        flag, _, inline = word.partition("=")
        variable = dict(RUN_OPTIONS).get(flag)
        if variable is None:
            break
        if inline or "=" in word:
            value, rest = inline, rest[1:]
        elif len(rest) > 1:
            value, rest = rest[1], rest[2:]
        else:
            raise ValueError(f"{flag} needs a size (e.g. 6G, 512MiB, 50%, off)")
        try:
            check_budget(value)
        except BadSize as reason:
            raise BadSize(f"{flag} {value!r}: {reason}") from None
        settings[variable] = value
    return settings, rest


def is_python_script(target):
    """A path ending in .py runs in this interpreter; any other word is a program."""
    return target.endswith((".py", ".pyw"))


def run_program(argv, settings):
    """exec argv[0] (looked up in PATH as a shell does) with the library preloaded; returns only
    an exit status when it cannot."""
    program = argv[0]
    path = program if "/" in program else shutil.which(program)
    if path is None or not os.path.exists(path):
        return _fail(f"{program}: command not found", EXIT_NOT_FOUND)
    if os.path.isdir(path) or not os.access(path, os.X_OK):
        return _fail(f"{program}: permission denied (not an executable file)", EXIT_NOT_EXECUTABLE)
    try:
        env = preload_environment(find_library(), {**os.environ, **settings}, mark=False)
    except LibraryNotFound as error:
        return _fail(str(error))
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(path, argv, env)
    except OSError as error:  # e.g. ENOEXEC: not a binary, no #! line
        return _fail(f"{program}: {error.strerror}", EXIT_NOT_EXECUTABLE)
    return None  # not reached


def run(argv):
    """`run` with its arguments: [OPTIONS] (-m MODULE | SCRIPT.py | PROGRAM) ARGS..."""
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr if not argv else sys.stdout)
        return EXIT_USAGE if not argv else 0
    try:
        settings, argv = parse_run_options(argv)
    except ValueError as error:
        return _fail(str(error), EXIT_USAGE)
    if not argv:
        return _fail("run needs a script, -m MODULE or a program", EXIT_USAGE)
    as_module = argv[0] == "-m"
    target_args = argv[1:] if as_module else argv
    if not target_args:
        return _fail("run -m needs a module name", EXIT_USAGE)
    target = target_args[0]
    if not as_module and not is_python_script(target):
        return run_program(target_args, settings)
    if not as_module and not os.path.exists(target):
        return _fail(f"can't open file {target!r}: no such file", EXIT_USAGE)
    # The library reads its settings when it loads: a flag this process did not start with
    # needs the re-exec even when the library is already here.
    changed = any(os.environ.get(variable) != value for variable, value in settings.items())
    os.environ.update(settings)
    code = _ensure_preloaded(["run", *argv], force=changed)
    if code is not None:
        return code
    try:
        if as_module:
            sys.argv = list(target_args)
            sys.path.insert(0, os.getcwd())
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(target_args)
            sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
            runpy.run_path(target, run_name="__main__")
    except KeyboardInterrupt:
        # A normal interpreter exit, so atexit handlers and the shim's summary line still run.
        print("qvshim: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def library_command(argv):
    """`library`: the path `run` would preload."""
    try:
        print(find_library())
    except LibraryNotFound as error:
        return _fail(str(error))
    return 0


# Subcommand name -> function(argv) -> exit status.
def _inspector(name):
    """status, top, dump, doctor: each a module of its own, imported when used (docs/CLI.md)."""
    return lambda argv: importlib.import_module(f".{name}", __package__).main(argv)


COMMANDS = {
    "run": run,
    "library": library_command,
    **{name: _inspector(name) for name in ("status", "top", "dump", "doctor")},
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        return _fail(f"unknown command {command!r}\n{USAGE}", EXIT_USAGE)
    return COMMANDS[command](rest)
