"""What `pip install .` relies on that is quick to check; the wheel itself, built, audited,
installed and run, is python/tests/wheel (scripts/test-heavy)."""

import os
import re

import qvshim
from conftest import REPO_DIR


def test_package_version_is_the_crates():
    with open(os.path.join(REPO_DIR, "Cargo.toml"), encoding="utf-8") as cargo:
        crate = re.search(r'^version\s*=\s*"([^"]+)"', cargo.read(), re.M).group(1)
    assert qvshim.__version__ == crate, "python/qvshim/__init__.py's __version__ must be Cargo.toml's (setup.py refuses to build otherwise)"
