#!/usr/bin/env python3
"""On a machine with an NVIDIA GPU and PyTorch: GPU memory held by garbage cycles comes back when
the GPU pool reaches critical, because the shim's relief runs gc.collect() and then
torch.cuda.empty_cache() in the main thread.

    python3 shim-tests/monitor/gpu_relief_check.py [--shim target/release/libqvshim.so]

A child interpreter under the shim (QVSHIM_GPU_BUDGET=2G, Python's collector off) makes two
garbage cycles holding CUDA tensors: 1 GiB (50% of the GPU budget), then 900 MiB (95%: straight
to critical). It then spins in Python until the GPU pool is back to normal. Checks: the pool
rose to critical and fell back, the relief emptied torch's cache (the dump's
runtime.python.cuda_cache_emptied, the log line), the pool's live bytes came back, and the dump
lists the GPU pool. Prints one line per check and the time from the allocation to the pool being
normal again; exit status 0 when every check passed. Needs no network and builds nothing.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import ctypes, gc, json, tempfile, time
import torch
gc.disable()
lib = ctypes.CDLL(None)
MIB = 1 << 20
torch.zeros(1, device="cuda")                 # CUDA initialised
first = [torch.empty(1024 * MIB, dtype=torch.uint8, device="cuda")]
first.append(first)                           # a garbage cycle holding 1 GiB
del first
level_before = lib.qvshim_level(1)
t0 = time.perf_counter()
second = [torch.empty(900 * MIB, dtype=torch.uint8, device="cuda")]
second.append(second)                         # and one holding 900 MiB: 95% of 2 GiB
del second
peak_level = lib.qvshim_level(1)
deadline = t0 + 10
while lib.qvshim_level(1) != 0 and time.perf_counter() < deadline:
    peak_level = max(peak_level, lib.qvshim_level(1))   # Python code runs: the relief gets its turn
back_ms = (time.perf_counter() - t0) * 1000
time.sleep(0.2)
with tempfile.TemporaryFile() as f:
    lib.qvshim_dump(f.fileno(), 1)
    f.seek(0)
    dump = json.load(f)
print(json.dumps({"level_before": level_before, "peak_level": peak_level,
                  "level_after": lib.qvshim_level(1), "back_ms": back_ms,
                  "reserved_after": torch.cuda.memory_reserved(),
                  "pools": dump["pools"], "python": dump["runtime"]["python"]}))
"""


def main():
    repo = Path(__file__).resolve().parents[2]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shim", default=str(repo / "target" / "release" / "libqvshim.so"))
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QVSHIM_")}
    env.pop("PYTHONMALLOC", None)
    env.update(LD_PRELOAD=str(Path(args.shim).resolve()), QVSHIM_GPU_BUDGET="2G",
               QVSHIM_BUDGET="24G")
    # sys.executable as it is: resolving a venv's symlink would leave the venv (and torch) behind.
    r = subprocess.run([sys.executable, "-c", CHILD], env=env,
                       capture_output=True, text=True, timeout=120)
    log = "\n".join(r.stderr.splitlines()[-25:])
    if r.returncode != 0 or not r.stdout.strip():
        print(f"FAIL the child exited {r.returncode}\n{log}")
        return 1
    res = json.loads(r.stdout.strip().splitlines()[-1])
    gpu = next((p for p in res["pools"] if p["pool"] == 1), None)
    checks = [
        # The relief can run (and the level fall) before the child reads the level back, so the
        # rise is read from the pool's peak and its level changes.
        ("the GPU pool rose to critical", gpu is not None and gpu["peak"] >= 0.9 * gpu["budget"]
         and gpu["level_changes"] >= 2,
         f"level before {res['level_before']}, seen by the child {res['peak_level']}, "
         f"pool peak {gpu and gpu['peak']}, level changes {gpu and gpu['level_changes']}"),
        ("the GPU pool fell back to normal", res["level_after"] == 0,
         f"level after {res['level_after']}, {res['back_ms']:.1f} ms after the allocation"),
        ("torch.cuda.empty_cache() ran in the relief", res["python"]["cuda_cache_emptied"] >= 1,
         f"runtime.python {res['python']}"),
        ("the log says so", "torch CUDA cache emptied" in r.stderr, ""),
        ("the dump lists the GPU pool", gpu is not None and gpu["device"] == 0,
         f"{gpu and {k: gpu[k] for k in ('name', 'level', 'live', 'peak', 'budget', 'level_changes', 'notifications')}}"),
        # The 1 GiB cycle was garbage before the level rose, so it must come back; the 900 MiB one
        # may still be referenced when a fast relief runs, right after its allocation.
        ("the 1 GiB garbage cycle came back", gpu is not None and gpu["live"] <= (900 + 64) << 20,
         f"live {gpu and gpu['live']}, torch reserved {res['reserved_after']}"),
    ]
    ok = True
    for name, passed, detail in checks:
        ok &= bool(passed)
        print(f"{'PASS' if passed else 'FAIL'} {name}" + (f": {detail}" if detail else ""))
    print("--- child's last log lines\n" + log)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
