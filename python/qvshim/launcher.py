"""`python -m qvshim run script.py args...`: run a Python program under the shim.

When the library is not in the process yet, the interpreter re-executes itself with
LD_PRELOAD set (the library has to be there before Python starts, to count every byte);
then the script runs in this interpreter as __main__, as `python script.py` would run it.
"""

import importlib
import os
import runpy
import sys

from . import _capi

LIBRARY_NAME = "libqvshim.so"
EXIT_NOT_FOUND = 127  # what a shell says for a command it cannot find
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl+C
_REEXEC_MARK = "QVSHIM_RUN_REEXEC"

USAGE = """\
usage: python -m qvshim run SCRIPT [ARGS...]
       python -m qvshim run -m MODULE [ARGS...]
       python -m qvshim run --tree SCRIPT|-m MODULE [ARGS...]
       python -m qvshim library
       python -m qvshim status [PID] | top [--once] | dump PID [--json] | doctor

run      run a Python script or module with libqvshim.so preloaded (no LD_PRELOAD to type);
         --tree: it and every process it starts share one budget (QVSHIM_SCOPE=tree,
         docs/TREE.md)
library  print the path of the libqvshim.so that `run` would preload
status   the live figures of your processes under qvshim (budget, live, peak, level, pools)
top      the status table refreshed every second, a bar per pool; --once prints one frame
dump     ask a process under qvshim for its diagnostic dump and print it (--json: JSON)
doctor   check the library, the allocator, the Python hook, CUDA, the budget, QVSHIM_* variables

The library is $QVSHIM_LIBRARY, else libqvshim.so next to this package, else the
repository's target/release/libqvshim.so. Configure it with QVSHIM_* variables,
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


def preload_environment(library, environ):
    """environ with library first in LD_PRELOAD."""
    # The dynamic loader splits LD_PRELOAD on spaces and colons.
    if any(c in library for c in " \t:"):
        raise LibraryNotFound(
            f"the library path {library!r} contains a space or colon, which LD_PRELOAD cannot "
            "carry; copy or link it elsewhere and set QVSHIM_LIBRARY"
        )
    env = dict(environ)
    previous = env.get("LD_PRELOAD")
    env["LD_PRELOAD"] = library + (":" + previous if previous else "")
    env[_REEXEC_MARK] = "1"
    return env


def _fail(message, code=EXIT_NOT_FOUND):
    print(f"qvshim: {message}", file=sys.stderr)
    return code


def _ensure_preloaded(argv):
    """Return None when the shim is in this process, else re-exec (no return) or an exit code."""
    if _capi.is_loaded():
        os.environ.pop(_REEXEC_MARK, None)
        return None
    if os.environ.get(_REEXEC_MARK):
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


def _enter_tree_scope(argv):
    """QVSHIM_SCOPE=tree for this process and its children: the library reads it at load, so a
    process that already has the library in another scope starts again (no return)."""
    if os.environ.get("QVSHIM_SCOPE") == "tree":
        return None
    os.environ["QVSHIM_SCOPE"] = "tree"
    if not _capi.is_loaded():
        return None  # _ensure_preloaded re-executes with the variable
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable,
              getattr(sys, "orig_argv", [sys.executable, "-m", "qvshim", "run", *argv]),
              dict(os.environ))
    return None  # not reached


def run(argv):
    """`run` with its arguments: [-m MODULE | SCRIPT] ARGS..."""
    if argv and argv[0] == "--tree":
        code = _enter_tree_scope(argv)
        if code is not None:
            return code
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr if not argv else sys.stdout)
        return 2 if not argv else 0
    as_module = argv[0] == "-m"
    target_args = argv[1:] if as_module else argv
    if not target_args:
        return _fail("run -m needs a module name", 2)
    target = target_args[0]
    if not as_module and not os.path.exists(target):
        return _fail(f"can't open file {target!r}: no such file", 2)
    code = _ensure_preloaded(["run", *argv])
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


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "run":
        return run(rest)
    if command in ("status", "top", "dump", "doctor"):  # docs/CLI.md
        return importlib.import_module(f".{command}", __package__).main(rest)
    if command == "library":
        try:
            print(find_library())
        except LibraryNotFound as error:
            return _fail(str(error))
        return 0
    return _fail(f"unknown command {command!r}\n{USAGE}", 2)
