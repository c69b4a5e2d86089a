"""Builds libqvshim.so with cargo and puts it inside the `qvshim` package (docs/INSTALL.md).

`pip install .` and `pip wheel . -w dist` run this through pyproject.toml. The library is built
against glibc 2.17 with cargo-zigbuild and zig (both from PyPI, pinned in pyproject.toml), so the
wheel runs on any Linux with glibc 2.17 or later; its platform tag is computed from the glibc
symbol versions the built library really needs, never assumed. QVSHIM_WHEEL_BUILD=native builds
with plain `cargo build` for this machine's glibc instead (the tag then says so).
"""

import os
import platform
import re
import shutil
import struct
import subprocess
import sys

from setuptools import Distribution, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
LIBRARY_NAME = "libqvshim.so"
# The oldest glibc Rust's std supports on x86_64 and aarch64 Linux, and manylinux2014's.
OLDEST_GLIBC = "2.17"
RUST_TARGETS = {"x86_64": "x86_64-unknown-linux-gnu", "aarch64": "aarch64-unknown-linux-gnu"}
BUILD_MODE_VARIABLE = "QVSHIM_WHEEL_BUILD"
SHT_GNU_VERNEED = 0x6FFFFFFE  # the ELF section of the symbol versions a library needs


def crate_version():
    """Cargo.toml's package version: the one version number of the crate and the package."""
    with open(os.path.join(ROOT, "Cargo.toml"), encoding="utf-8") as cargo:
        match = re.search(r'^\[package\][^\[]*?^version\s*=\s*"([^"]+)"', cargo.read(), re.M | re.S)
    if not match:
        sys.exit("setup.py: no version in Cargo.toml's [package]")
    version = match.group(1)
    with open(os.path.join(ROOT, "python", "qvshim", "__init__.py"), encoding="utf-8") as init:
        package = re.search(r'^__version__\s*=\s*"([^"]+)"', init.read(), re.M)
    if not package or package.group(1) != version:
        found = package.group(1) if package else "nothing"
        sys.exit(f"setup.py: python/qvshim/__init__.py has __version__ {found}, Cargo.toml has {version}; make them equal")
    return version


def glibc_needed(library):
    """The newest GLIBC_2.N symbol version the library asks for, as (2, N), read from its ELF
    version-needs section (.gnu.version_r); a 64-bit little-endian ELF, as on x86_64 and aarch64."""
    with open(library, "rb") as elf:
        data = elf.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        sys.exit(f"setup.py: {library} is not a 64-bit little-endian ELF file")
    section_offset, = struct.unpack_from("<Q", data, 0x28)
    entry_size, count = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, section_offset + i * entry_size) for i in range(count)]
    minors = set()
    for _, kind, _, _, offset, _, link, entries, _, _ in sections:
        if kind != SHT_GNU_VERNEED:
            continue
        strings = sections[link][4]
        need = offset
        for _ in range(entries):
            _, aux_count, _, aux, next_need = struct.unpack_from("<HHIII", data, need)
            entry = need + aux
            for _ in range(aux_count):
                _, _, _, name, next_aux = struct.unpack_from("<IHHII", data, entry)
                text = data[strings + name:data.index(b"\x00", strings + name)].decode("ascii", "replace")
                match = re.fullmatch(r"GLIBC_2\.(\d+)(?:\.\d+)?", text)
                if match:
                    minors.add(int(match.group(1)))
                entry += next_aux
            need += next_need
    return (2, max(minors)) if minors else (2, int(OLDEST_GLIBC.split(".")[1]))


def run(command, env=None):
    print("setup.py: " + " ".join(command), flush=True)
    try:
        subprocess.run(command, cwd=ROOT, env=env, check=True)
    except FileNotFoundError:
        sys.exit(f"setup.py: {command[0]} not found; building qvshim from source needs a Rust toolchain "
                 "(https://rustup.rs), or install a prebuilt wheel (docs/INSTALL.md)")
    except subprocess.CalledProcessError as error:
        sys.exit(f"setup.py: {' '.join(command)} failed with status {error.returncode}")


def build_library():
    """Runs cargo and returns the path of the built libqvshim.so."""
    if shutil.which("cargo") is None:
        sys.exit("setup.py: cargo not found; building qvshim from source needs a Rust toolchain "
                 "(https://rustup.rs), or install a prebuilt wheel (docs/INSTALL.md)")
    target_dir = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
    triple = RUST_TARGETS.get(platform.machine())
    mode = os.environ.get(BUILD_MODE_VARIABLE, "zig")
    if mode not in ("zig", "native"):
        sys.exit(f"setup.py: {BUILD_MODE_VARIABLE}={mode!r} is neither 'zig' nor 'native'")
    if mode == "native" or triple is None:
        run(["cargo", "build", "--release", "--lib"])
        return os.path.join(target_dir, "release", LIBRARY_NAME)
    # cargo-zigbuild runs zig as `PYTHON -m ziglang`: this interpreter is the one whose build
    # environment holds ziglang (a build requirement), whatever python3 is first on PATH.
    env = dict(os.environ, CARGO_ZIGBUILD_PYTHON_PATH=sys.executable)
    zigbuild = shutil.which("cargo-zigbuild", path=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))
    if zigbuild is None:
        sys.exit("setup.py: cargo-zigbuild not found (a build requirement in pyproject.toml)")
    run([zigbuild, "zigbuild", "--release", "--lib", "--target", f"{triple}.{OLDEST_GLIBC}"], env)
    return os.path.join(target_dir, triple, "release", LIBRARY_NAME)


class BuildWithLibrary(build_py):
    """Copies the freshly built library into the package, never into the source tree."""

    def run(self):
        super().run()
        library = build_library()
        destination = os.path.join(self.build_lib, "qvshim", LIBRARY_NAME)
        self.copy_file(library, destination)
        self.distribution.qvshim_glibc = glibc_needed(library)


class WithLibrary(Distribution):
    """A distribution with a compiled part: installed into platlib, its wheel not pure."""

    def has_ext_modules(self):
        return True


class PlatformWheel(bdist_wheel):
    """A wheel for any Python 3 (the package is pure Python; the library does not link Python),
    tagged manylinux for the glibc the library needs."""

    def get_tag(self):
        major, minor = getattr(self.distribution, "qvshim_glibc", None) or glibc_needed_of_build(self)
        return "py3", "none", f"manylinux_{major}_{minor}_{platform.machine()}"


def glibc_needed_of_build(command):
    library = os.path.join(command.get_finalized_command("build_py").build_lib, "qvshim", LIBRARY_NAME)
    return glibc_needed(library)


if __name__ == "__main__":  # as setuptools runs it; the tests import it for glibc_needed
    setup(
        version=crate_version(),
        distclass=WithLibrary,
        cmdclass={"build_py": BuildWithLibrary, "bdist_wheel": PlatformWheel},
    )
