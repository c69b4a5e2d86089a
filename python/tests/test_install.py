"""pip installs the package from the repository, and its `qvshim` command runs a script under the shim."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import PYTHON_DIR, REPO_DIR, plain_env


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The package pip-installed into a fresh folder (built from a copy, so the checkout stays clean)."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"
    shutil.copytree(PYTHON_DIR, source, ignore=shutil.ignore_patterns("tests", "build", "*.egg-info", "__pycache__"))
    target = root / "site"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                             "--target", str(target), str(source)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return target


def installed_env(target, **extra):
    env = plain_env(**extra)
    env["PYTHONPATH"] = str(target)
    return env


def test_install_brings_the_package_and_the_console_command(installed):
    assert (installed / "qvshim" / "__init__.py").is_file()
    assert os.access(installed / "bin" / "qvshim", os.X_OK)


@pytest.mark.live
def test_console_command_runs_a_script_under_the_repository_build(installed, library, tmp_path):
    script = tmp_path / "app.py"
    script.write_text("import sys, qvshim\nprint(qvshim.is_loaded(), qvshim.__file__.startswith(sys.argv[1]))\n")
    result = subprocess.run([str(installed / "bin" / "qvshim"), "run", str(script), str(installed)],
                            env=installed_env(installed), cwd=REPO_DIR, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True True"
    library_line = subprocess.run([str(installed / "bin" / "qvshim"), "library"], env=installed_env(installed),
                                  cwd=os.path.join(REPO_DIR, "examples"), capture_output=True, text=True, timeout=60)
    assert library_line.stdout.strip() == library


def test_console_command_outside_any_repository_says_where_to_find_the_library(installed, tmp_path):
    env = installed_env(installed)
    env.pop("QVSHIM_LIBRARY", None)
    result = subprocess.run([str(installed / "bin" / "qvshim"), "library"], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 127
    assert "cargo build --release" in result.stderr and "QVSHIM_LIBRARY" in result.stderr
