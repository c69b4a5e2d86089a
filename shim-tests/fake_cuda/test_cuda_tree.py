"""QVSHIM_SCOPE=tree on the GPU: one budget per device for a process and its children
(docs/TREE.md), on the fake driver."""

from __future__ import annotations

import textwrap

import pytest

from fakecuda import CUDA_ERROR_OUT_OF_MEMORY, python, run

ALLOC = textwrap.dedent("""
    import ctypes
    def alloc(mib):
        cuda = ctypes.CDLL("libcuda.so.1")
        assert cuda.cuInit(0) == 0
        ctx = ctypes.c_void_p()
        assert cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0) == 0
        assert cuda.cuCtxSetCurrent(ctx) == 0
        return cuda.cuMemAlloc_v2(ctypes.byref(ctypes.c_uint64()), ctypes.c_size_t(mib << 20))
""")

PARENT = ALLOC + textwrap.dedent("""
    import os, subprocess, sys
    print("parent", alloc(768))
    child = ALLOC_CODE + "print('child_512', alloc(512)); print('child_256', alloc(256))"
    env = dict(os.environ)
    if sys.argv[1] != "inherit":
        env["QVSHIM_SCOPE"] = sys.argv[1]
    done = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True)
    print(done.stdout, end="")
    print(done.stderr, end="", file=sys.stderr)
""")

# (the child's QVSHIM_SCOPE, what its 512 MiB and then its 256 MiB get)
CASES = [
    ("inherit", CUDA_ERROR_OUT_OF_MEMORY, 0),
    ("process", 0, 0),
]


@pytest.mark.parametrize("scope,want_512,want_256", CASES, ids=[c[0] for c in CASES])
def test_a_child_shares_the_device_budget_unless_it_opts_out(fake_cuda, scope, want_512, want_256):
    code = f"ALLOC_CODE = {ALLOC!r}\n" + PARENT
    r = run([python(), "-c", code, scope], {"QVSHIM_SCOPE": "tree", "QVSHIM_GPU_BUDGET": "1G"})
    assert r.returncode == 0, r.describe()
    got = (r.number("parent"), r.number("child_512"), r.number("child_256"))
    assert got == (0, want_512, want_256), (
        f"child scope {scope}: expected the parent's 768 MiB granted and the child's 512 MiB "
        f"{'refused (the tree holds 768 MiB of 1 GiB)' if want_512 else 'granted'}, its 256 MiB "
        f"granted; got {got}\n{r.describe()}")
