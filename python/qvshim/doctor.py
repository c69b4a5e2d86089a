"""`qvshim doctor`: what to run when something feels wrong. Each check is one line, `ok`, `FAIL`
or `info`; the exit status is 0 only when no check failed.

It finds the library the way `qvshim run` does, then starts one small Python process under it
(never loads it into this process: a malloc replacement cannot be loaded late) and asks that
process what it really got: the library mapped, whose `malloc` the program reaches, whether an
allocation is counted, whether the Python hook found the interpreter, and the budget the library
computed from the environment, the memory cgroup and MemAvailable. The QVSHIM_* variables are
parsed by the library itself in that process: a line it prints about a bad value is a failed
check. The CUDA driver (libcuda.so.1) is asked here for its version and devices; no driver is
reported and is not a failure.
"""

import ctypes
import json
import os
import stat
import subprocess
import sys

from . import launcher, status

USAGE = "usage: qvshim doctor"
PROBE_TIMEOUT_S = 60
PROBE_ALLOCATION_BYTES = 8 << 20

# Runs under the library; prints one JSON object on stdout.
_PROBE = r"""
import ctypes, json, os, sys, tempfile
out = {}
with open("/proc/self/maps") as f:
    out["mapped"] = any("libqvshim.so" in line for line in f)
class DlInfo(ctypes.Structure):
    _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p),
                ("sname", ctypes.c_char_p), ("saddr", ctypes.c_void_p)]
process = ctypes.CDLL(None)
info = DlInfo()
address = ctypes.cast(process.malloc, ctypes.c_void_p)
out["malloc_from"] = (process.dladdr(address, ctypes.byref(info)) and info.fname or b"?").decode()
import qvshim
from qvshim import _capi
out["loaded"] = _capi.is_loaded()
if out["loaded"]:
    before = _capi.pool_stats(0)["live"]
    block = bytearray(%d)
    out["counted"] = _capi.pool_stats(0)["live"] - before
    del block
    with tempfile.TemporaryFile() as f:
        _capi.dump(f.fileno(), True)
        f.seek(0)
        out["dump"] = json.loads(f.read())
print(json.dumps(out))
""" % PROBE_ALLOCATION_BYTES


class Report:
    def __init__(self):
        self.failed = 0

    def line(self, verdict, what, detail):
        if verdict == "FAIL":
            self.failed += 1
        print(f"{verdict:<4}  {what:<16} {detail}")


def _probe(library):
    # Without QVSHIM_LOG_FILE, so that the library's lines about bad values come back on stderr
    # (the log file itself is checked here, in _log_file).
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "PYTHONMALLOC", "QVSHIM_LOG_FILE")}
    env["LD_PRELOAD"] = library
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = package_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                          timeout=PROBE_TIMEOUT_S)


def _cuda(report, gpu_budget):
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        report.line("info", "CUDA driver", "no CUDA driver (libcuda.so.1 not found): the GPU pools stay unused")
        return
    code = cuda.cuInit(0)
    version = ctypes.c_int(0)
    cuda.cuDriverGetVersion(ctypes.byref(version))
    shown = f"{version.value // 1000}.{version.value % 1000 // 10}"
    if code == 100:  # CUDA_ERROR_NO_DEVICE
        report.line("info", "CUDA driver", f"libcuda.so.1 CUDA {shown}, no device")
        return
    if code != 0:
        report.line("FAIL", "CUDA driver", f"libcuda.so.1 CUDA {shown}: cuInit failed with error {code}")
        return
    count = ctypes.c_int(0)
    cuda.cuDeviceGetCount(ctypes.byref(count))
    report.line("ok", "CUDA driver", f"libcuda.so.1 CUDA {shown}, {count.value} device(s)")
    total_mem = getattr(cuda, "cuDeviceTotalMem_v2", None) or getattr(cuda, "cuDeviceTotalMem", None)
    for ordinal in range(count.value):
        device, total = ctypes.c_int(0), ctypes.c_size_t(0)
        if cuda.cuDeviceGet(ctypes.byref(device), ordinal) != 0 or total_mem is None \
                or total_mem(ctypes.byref(total), device) != 0:
            report.line("info", f"gpu {ordinal}", "memory unknown")
            continue
        report.line("info", f"gpu {ordinal}",
                    f"{status.size(total.value)}; GPU budget {gpu_budget_of(gpu_budget, total.value)}")


def gpu_budget_of(spec, device_bytes):
    """What QVSHIM_GPU_BUDGET (as given, default 90%) comes to on a device (docs/GPU.md)."""
    spec = (spec or "90%").strip()
    if spec.lower() == "off":
        return "off (unlimited)"
    if spec.endswith("%"):
        try:
            return status.size(int(device_bytes * float(spec[:-1]) / 100))
        except ValueError:
            return f"QVSHIM_GPU_BUDGET={spec!r} (see the variables above)"
    return f"QVSHIM_GPU_BUDGET={spec}"


def _host(report, dump):
    host = next((p for p in dump.get("pools", []) if p.get("pool") == 0), {})
    system = dump.get("system") or {}
    cgroup = system.get("cgroup")
    if cgroup:
        report.line("info", "cgroup", f"memory limit {status.size(cgroup.get('memory_max'))}, "
                                      f"using {status.size(cgroup.get('memory_current') or 0)}")
    else:
        report.line("info", "cgroup", "no memory limit")
    report.line("info", "MemAvailable",
                f"{status.size(system.get('mem_available'))} of {status.size(system.get('mem_total'))}; "
                f"{status.size(system.get('system_reserve'))} kept for the machine")
    report.line("ok", "host budget",
                f"{status.size(host.get('budget'))}, effective {status.size(host.get('effective_budget'))} "
                f"({host.get('effective_reason', '?')})")


def main(argv):
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv:
        return status.fail(f"{' '.join(argv)!r}: doctor takes no arguments\n{USAGE}", status.EXIT_BAD_USAGE)
    report = Report()
    probe = result = None
    try:
        library = launcher.find_library()
    except launcher.LibraryNotFound as error:
        report.line("FAIL", "library", str(error))
        library = None
    if library:
        report.line("ok", "library", library)
        try:
            probe = _probe(library)
        except subprocess.TimeoutExpired:
            report.line("FAIL", "test process", f"did not end within {PROBE_TIMEOUT_S} s")
        if probe is not None:
            try:
                result = json.loads(probe.stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                tail = (probe.stderr.strip().splitlines() or ["no output"])[-1]
                report.line("FAIL", "test process", f"exit status {probe.returncode}: {tail}")
        if result is not None:
            _checks(report, library, result, probe.stderr)
    config = ((result or {}).get("dump") or {}).get("config") or {}
    _variables(report, os.environ, probe.stderr if probe is not None else "", config)
    _cuda(report, os.environ.get("QVSHIM_GPU_BUDGET"))
    print(f"{'all checks passed' if not report.failed else f'{report.failed} check(s) failed'}")
    return 0 if not report.failed else 1


def _checks(report, library, result, stderr):
    if not result.get("mapped") or not result.get("loaded"):
        report.line("FAIL", "loadable", "the library did not load into a test process "
                    f"({(stderr.strip().splitlines() or ['no message'])[-1]})")
        return
    report.line("ok", "loadable", "a test process runs with it preloaded")
    source = result.get("malloc_from", "?")
    if os.path.realpath(source) == os.path.realpath(library) or source.endswith("libqvshim.so"):
        counted = result.get("counted", 0)
        verdict = "ok" if counted >= PROBE_ALLOCATION_BYTES else "FAIL"
        report.line(verdict, "allocator", f"malloc is qvshim's; an allocation of "
                    f"{status.size(PROBE_ALLOCATION_BYTES)} was counted as {status.size(counted)}")
    else:
        report.line("FAIL", "allocator", f"malloc comes from {source}, not from qvshim: the heap is not "
                    "governed (another allocator preloaded first? see docs/COMPATIBILITY.md)")
    dump = result.get("dump") or {}
    python = ((dump.get("runtime") or {}).get("python")) or {}
    if not python.get("enabled", True):
        report.line("info", "python hook", "off (QVSHIM_PYTHON=off)")
    elif python.get("detected"):
        arenas = "pymalloc arenas counted" if python.get("arenas_counted") else "pymalloc arenas not counted"
        report.line("ok", "python hook", f"the interpreter was found ({arenas})")
    else:
        report.line("FAIL", "python hook", "the library did not find the CPython interpreter of the test process")
    _host(report, dump)


# Which key of the dump's "config" shows how the library parsed each variable (docs/DUMP.md).
CONFIG_KEYS = {
    "QVSHIM_BUDGET": "budget", "QVSHIM_RESERVE": "reserve", "QVSHIM_WARN": "warn_percent",
    "QVSHIM_CRITICAL": "critical_percent", "QVSHIM_INTERVAL": "interval_ms",
    "QVSHIM_PURGE_INTERVAL": "purge_interval_ms", "QVSHIM_SYSTEM_RESERVE": "system_reserve",
    "QVSHIM_PYTHON": "python", "QVSHIM_SIGNAL": "signal", "QVSHIM_DUMP_SIGNAL": "dump_signal",
    "QVSHIM_DUMP_FORMAT": "dump_format", "QVSHIM_DUMP_FILE": "dump_file",
    "QVSHIM_BACKTRACE": "backtrace", "QVSHIM_LOG": "log_level",
}


def _log_file(report, path):
    """QVSHIM_LOG_FILE as the library will take it (CONFIGURATION.md, Logging)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        directory = os.path.dirname(os.path.abspath(path))
        if os.access(directory, os.W_OK | os.X_OK):
            report.line("ok", "QVSHIM_LOG_FILE", f"{path!r} (created mode 0600 on first use)")
        else:
            report.line("FAIL", "QVSHIM_LOG_FILE", f"{path!r}: {directory} is not writable; the log stays on stderr")
        return
    except OSError as error:
        report.line("FAIL", "QVSHIM_LOG_FILE", f"{path!r}: {error.strerror}; the log stays on stderr")
        return
    if stat.S_ISLNK(st.st_mode):
        report.line("FAIL", "QVSHIM_LOG_FILE", f"{path!r} is a symbolic link, which the library never follows; "
                    "the log stays on stderr")
    elif not (stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode)):
        report.line("FAIL", "QVSHIM_LOG_FILE", f"{path!r} is not a regular file, FIFO or character device; "
                    "the log stays on stderr")
    elif not os.access(path, os.W_OK):
        report.line("FAIL", "QVSHIM_LOG_FILE", f"{path!r} is not writable; the log stays on stderr")
    else:
        report.line("ok", "QVSHIM_LOG_FILE", repr(path))


def _variables(report, environ, stderr, config):
    names = sorted(k for k in environ if k.startswith("QVSHIM_"))
    bad = [line for line in stderr.splitlines() if line.startswith("[qvshim] ERROR QVSHIM_")]
    for name in names:
        lines = [line for line in bad if line.startswith(f"[qvshim] ERROR {name}=")]
        if name == "QVSHIM_LOG_FILE":
            _log_file(report, environ[name])
        elif lines:
            for line in lines:
                report.line("FAIL", name, line[len("[qvshim] ERROR "):])
        else:
            key = CONFIG_KEYS.get(name)
            parsed = f" -> {key} {json.dumps(config[key])}" if key in config else ""
            report.line("ok", name, f"{environ[name]!r}{parsed}")
    for line in bad:
        if not any(line.startswith(f"[qvshim] ERROR {name}=") for name in names):
            report.line("FAIL", "variables", line[len("[qvshim] ERROR "):])
    if not names:
        report.line("info", "variables", "no QVSHIM_* variable is set: the defaults apply")
