#!/usr/bin/env python3
"""On a machine with an NVIDIA GPU and PyTorch: the companion's ModelManager on a GPU pool.

    PYTHONPATH=python QVSHIM_GPU_BUDGET=2G python3 -m qvshim run python/tests/gpu_companion_check.py

"Models" are CUDA tensors of known size. Checks: loading a third model that does not fit evicts
the least recently used idle one; a model in a use() block is never evicted, and a load that
cannot fit even with every idle model gone is refused with ModelDoesNotFit before anything is
unloaded; a load with no size given that passes the budget gets torch.OutOfMemoryError and the
next load works; close() gives the GPU pool back. Prints one line per check; exit status 0 when
every check passed. Not collected by pytest (it needs a GPU); needs no network.
"""

import sys

import torch

import qvshim

MIB = 1 << 20
MODEL_MIB = 700
POOL = qvshim.gpu_pool(0)
failures = []


def check(name, ok, detail):
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        failures.append(name)


def loader(mib):
    return lambda: torch.empty(mib * MIB, dtype=torch.uint8, device="cuda")


def gpu_live():
    return next(p["live"] for p in qvshim.stats() if p["pool"] == POOL)


def main():
    if not qvshim.is_loaded():
        print("FAIL the shim is not loaded: run under `python3 -m qvshim run`")
        return 1
    torch.zeros(1, device="cuda")  # the GPU pool exists from here on
    budget = next(p["budget"] for p in qvshim.stats() if p["pool"] == POOL)
    print(f"GPU pool budget {budget / MIB:.0f} MiB; models of {MODEL_MIB} MiB", flush=True)

    models = qvshim.ModelManager(keep_alive=None, pool=POOL, margin=0.05)
    models.get("a", loader(MODEL_MIB), size=MODEL_MIB * MIB)
    models.get("b", loader(MODEL_MIB), size=MODEL_MIB * MIB)
    check("two models loaded", models.loaded() == ["a", "b"], f"loaded {models.loaded()}")
    models.get("c", loader(MODEL_MIB), size=MODEL_MIB * MIB)
    check("a third model evicts the least recently used", models.loaded() == ["b", "c"],
          f"loaded {models.loaded()}, GPU pool live {gpu_live() / MIB:.0f} MiB")
    check("the pool stays under its budget", gpu_live() <= budget,
          f"live {gpu_live() / MIB:.0f} MiB of {budget / MIB:.0f} MiB")

    with models.use("b", loader(MODEL_MIB), size=MODEL_MIB * MIB):
        try:
            models.get("d", loader(1500), size=1500 * MIB)
            refused = None
        except qvshim.ModelDoesNotFit as error:
            refused = str(error)
        check("a load that cannot fit is refused up front", refused is not None, refused or "loaded")
        check("nothing was unloaded for it", sorted(models.loaded()) == ["b", "c"], f"loaded {models.loaded()}")

    try:
        models.get("huge", loader(4000))  # no size: the manager cannot check first
        oom = None
    except torch.OutOfMemoryError as error:
        oom = str(error).splitlines()[0]
    check("a load past the budget without a size gets torch.OutOfMemoryError", oom is not None,
          oom or "no error")
    models.get("small", loader(100), size=100 * MIB)
    check("the next load works", "small" in models.loaded(), f"loaded {models.loaded()}")

    models.close()
    torch.cuda.empty_cache()
    check("close() gives the GPU pool back", gpu_live() <= 64 * MIB,
          f"live {gpu_live() / MIB:.0f} MiB, torch reserved {torch.cuda.memory_reserved() / MIB:.0f} MiB")
    print(f"{len(failures)} failed" if failures else "all passed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
