"""The wheel (docs/INSTALL.md): built from the repository by `pip wheel`, checked by auditwheel,
installed into a fresh venv and run from a folder outside the repository, with no PYTHONPATH and
no Rust on PATH, so the only libqvshim.so it can find is the one inside the package.

A tier of its own (building the library against glibc 2.17 takes minutes): scripts/test-heavy
runs it, or `python -m pytest python/tests/wheel` (QVSHIM_TEST_WHEEL=dist/qvshim-...whl tests
that wheel instead of building one).
"""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

REPO_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
AUDITWHEEL = "auditwheel==6.8.2"
BUILD_TIMEOUT_S = 1800
RUN_TIMEOUT_S = 120
MIB = 1024 * 1024


def clean_env(**extra):
    """This environment without anything that would point a child at the repository or a shim."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "LD_PRELOAD", "VIRTUAL_ENV", "PYTHONMALLOC")
           and not k.startswith("QVSHIM_")}
    env.update(extra)
    return env


def run(command, timeout=RUN_TIMEOUT_S, **kwargs):
    return subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=timeout, **kwargs)


def crate_version():
    with open(os.path.join(REPO_DIR, "Cargo.toml"), encoding="utf-8") as cargo:
        return re.search(r'^version\s*=\s*"([^"]+)"', cargo.read(), re.M).group(1)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel `pip wheel` builds from this checkout, or the one QVSHIM_TEST_WHEEL names (a
    wheel already built, e.g. the artifact about to be published)."""
    given = os.environ.get("QVSHIM_TEST_WHEEL")
    if given:
        assert os.path.isfile(given), f"QVSHIM_TEST_WHEEL={given} is not a file"
        return pathlib.Path(given)
    dist = tmp_path_factory.mktemp("dist")
    result = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-w", dist, REPO_DIR],
                 timeout=BUILD_TIMEOUT_S, env=clean_env(), cwd=dist)
    assert result.returncode == 0, "pip wheel failed:\n" + result.stdout[-4000:] + result.stderr[-4000:]
    wheels = sorted(dist.glob("qvshim-*.whl"))
    assert len(wheels) == 1, f"expected one qvshim wheel in {dist}, found {wheels}"
    return wheels[0]


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory):
    """A fresh venv with the wheel installed, and the environment and folder to run it in."""
    root = tmp_path_factory.mktemp("venv")
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    assert run([sys.executable, "-m", "venv", root], env=clean_env()).returncode == 0
    result = run([root / "bin" / "python", "-m", "pip", "install", "--disable-pip-version-check", wheel],
                 env=clean_env(), cwd=elsewhere, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    bundled = run([root / "bin" / "python", "-c", "import os, qvshim; print(os.path.dirname(qvshim.__file__))"],
                  env=clean_env(), cwd=elsewhere).stdout.strip()
    # No cargo, no repository, no PYTHONPATH: as on a machine without Rust.
    env = clean_env(PATH=os.pathsep.join([str(root / "bin"), "/usr/bin", "/bin"]))
    return {"root": root, "bin": root / "bin", "env": env, "cwd": elsewhere,
            "library": os.path.join(bundled, "libqvshim.so")}


def test_platform_tag_is_the_one_auditwheel_finds(wheel, tmp_path):
    tools = tmp_path / "tools"
    assert run([sys.executable, "-m", "venv", tools], env=clean_env()).returncode == 0
    installed = run([tools / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check", AUDITWHEEL],
                    env=clean_env(), timeout=600)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    shown = run([tools / "bin" / "auditwheel", "show", wheel], env=clean_env())
    assert shown.returncode == 0, shown.stdout + shown.stderr
    text = " ".join(shown.stdout.split())
    found = re.search(r'consistent with the following platform tag: "([^"]+)"', text)
    assert found, f"auditwheel show did not name a platform tag:\n{shown.stdout}"
    assert wheel.name.endswith(f"-py3-none-{found.group(1)}.whl"), \
        f"the wheel {wheel.name} claims a tag other than the one auditwheel finds ({found.group(1)})"
    assert found.group(1).startswith("manylinux_2_17_"), \
        f"expected the library built against glibc 2.17 (docs/INSTALL.md), auditwheel says {found.group(1)}"


def test_package_version_is_the_crates(wheel, venv):
    assert wheel.name.startswith(f"qvshim-{crate_version()}-"), wheel.name
    result = run([venv["bin"] / "python", "-c", "import qvshim; print(qvshim.__version__)"], env=venv["env"], cwd=venv["cwd"])
    assert result.stdout.strip() == crate_version(), result.stderr


def test_the_library_found_is_the_packages_own(venv):
    assert os.path.isfile(venv["library"]), f"expected libqvshim.so inside the installed package at {venv['library']}"
    result = run([venv["bin"] / "qvshim", "library"], env=venv["env"], cwd=venv["cwd"])
    assert (result.returncode, result.stdout.strip()) == (0, os.path.realpath(venv["library"])), result.stderr


def test_qvshim_library_still_overrides_the_bundled_one(venv, tmp_path):
    other = tmp_path / "other" / "libqvshim.so"
    other.parent.mkdir()
    shutil.copy(venv["library"], other)
    env = {**venv["env"], "QVSHIM_LIBRARY": str(other)}
    result = run([venv["bin"] / "qvshim", "run", "/bin/sh", "-c", "echo $LD_PRELOAD"], env=env, cwd=venv["cwd"])
    assert (result.returncode, result.stdout.strip()) == (0, str(other)), result.stderr


GOVERNED_SCRIPT = """
    import os, qvshim
    try:
        block = bytearray(200 * 1024 * 1024)
        refused = False
    except MemoryError:
        refused = True
    print(qvshim.is_loaded(), qvshim.stats()[0]["budget"], os.environ["LD_PRELOAD"].split(":")[0], refused)
"""


@pytest.mark.parametrize("launch", [
    ["{bin}/qvshim", "run", "--budget", "100M", "{script}"],
    ["{bin}/python", "-m", "qvshim", "run", "--budget=100M", "{script}"],
    ["{bin}/qvshim", "run", "--budget", "100M", "{bin}/python", "{script}"],  # a program that is Python
])
def test_a_script_run_by_the_installed_command_is_governed_by_the_bundled_library(venv, tmp_path, launch):
    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent(GOVERNED_SCRIPT))
    command = [part.format(bin=venv["bin"], script=script) for part in launch]
    result = run(command, env=venv["env"], cwd=venv["cwd"])
    assert result.returncode == 0, result.stderr
    expected = f"True {100 * MIB} {os.path.realpath(venv['library'])} True"
    assert result.stdout.strip() == expected, \
        f"expected the script loaded under a 100M budget by the bundled library and refused 200 MiB; stderr:\n{result.stderr}"


# (run's arguments, expected status, stdout, a line stderr must hold); {library} is the bundled one.
PROGRAM_ROWS = [
    (["/bin/sh", "-c", "echo $LD_PRELOAD"], 0, "{library}", None),
    (["--gpu-budget", "50%", "--budget", "1G", "sh", "-c", "echo $QVSHIM_BUDGET $QVSHIM_GPU_BUDGET"], 0, "1G 50%", None),
    (["sh", "-c", "exit 7"], 7, "", None),
    (["sh", "-c", "kill -TERM $$"], -15, "", None),  # killed by SIGTERM, as a shell would see it
    (["no-such-program-qvshim"], 127, "", "qvshim: no-such-program-qvshim: command not found"),
    (["--budget", "lots", "sh", "-c", "echo ran"], 2, "", "qvshim: --budget 'lots': not a size"),
    (["--budget", "1M", "sh", "-c", "echo ran"], 2, "", "qvshim: --budget '1M': below the 16 MiB minimum"),
    (["--gpu-budget", "0%", "sh", "-c", "echo ran"], 2, "", "qvshim: --gpu-budget '0%': a percentage of zero"),
    (["--budget"], 2, "", "qvshim: --budget needs a size"),
]


@pytest.mark.parametrize("args, code, stdout, stderr_has", PROGRAM_ROWS)
def test_any_program_runs_under_the_bundled_library(venv, args, code, stdout, stderr_has):
    result = run([venv["bin"] / "qvshim", "run", *args], env=venv["env"], cwd=venv["cwd"])
    assert result.returncode == code, f"expected status {code}, got {result.returncode}; stderr:\n{result.stderr}"
    assert result.stdout.strip() == stdout.format(library=os.path.realpath(venv["library"]))
    if stderr_has:
        assert result.stderr.strip() == stderr_has or result.stderr.strip().startswith(stderr_has), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
