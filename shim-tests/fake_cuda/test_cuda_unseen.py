"""Device memory qvshim does not count lowers the GPU budget: what NVML shows the process using
beyond the count (the fake NVML adds FAKE_NVML_EXTRA_MIB to what the fake driver holds), and
what the CUDA memory pools keep after cuMemFreeAsync (FAKE_CUDA_POOL_KEEPS=1). Before a refusal
the pools are trimmed and the allocation is tried once more. NVML missing or failing at any step
changes nothing: the budget is the budget, and nothing is printed."""

from __future__ import annotations

import json

import pytest

from fakecuda import CUDA_ERROR_OUT_OF_MEMORY, MIB, nvml_library_path, run

BUDGET_MIB = 1024
# What the fake NVML shows beyond the fake driver's figure: a driver context.
EXTRA_MIB = 300
# The fake NVML's log names each call; these are the forms of the process list.
FORM_OF_FUNCTION = {"nvmlDeviceGetComputeRunningProcesses_v3": "v3", "nvmlDeviceGetComputeRunningProcesses_v2": "v2",
                    "nvmlDeviceGetComputeRunningProcesses": "v1"}
READY_V3 = '"nvml":{"state":"ready","processes_version":3'

# (fake NVML form or None for no library, the fake's extra environment, what the dump must show
#  of NVML, what it must show of the device, effective budget in MiB, code of a 512 MiB
#  allocation on top of the first 256 MiB)
NVML_CASES = [
    ("v3", {}, READY_V3, f'"unseen":{EXTRA_MIB * MIB}', BUDGET_MIB - EXTRA_MIB, CUDA_ERROR_OUT_OF_MEMORY),
    ("v2", {}, '"state":"ready","processes_version":2', f'"nvml_used":{(256 + EXTRA_MIB) * MIB}',
     BUDGET_MIB - EXTRA_MIB, CUDA_ERROR_OUT_OF_MEMORY),
    ("v1", {}, '"state":"ready","processes_version":1', f'"nvml_used":{(256 + EXTRA_MIB) * MIB}',
     BUDGET_MIB - EXTRA_MIB, CUDA_ERROR_OUT_OF_MEMORY),
    # More processes than the first ask has room for: asked again with NVML's count.
    ("v3", {"FAKE_NVML_OTHERS": "100"}, READY_V3, f'"nvml_used":{(256 + EXTRA_MIB) * MIB}',
     BUDGET_MIB - EXTRA_MIB, CUDA_ERROR_OUT_OF_MEMORY),
    ("v1", {"FAKE_NVML_OTHERS": "100"}, '"state":"ready","processes_version":1',
     f'"nvml_used":{(256 + EXTRA_MIB) * MIB}', BUDGET_MIB - EXTRA_MIB, CUDA_ERROR_OUT_OF_MEMORY),
    (None, {}, '"state":"missing"', '"nvml_used":null', BUDGET_MIB, 0),
    ("none", {}, '"state":"no_function","processes_version":null', '"nvml_used":null', BUDGET_MIB, 0),
    ("v3", {"FAKE_NVML_FAIL": "init"}, '"state":"init_failed","processes_version":null,"init_error":9',
     '"nvml_used":null', BUDGET_MIB, 0),
    ("v3", {"FAKE_CUDA_FAIL": "uuid"}, READY_V3, '"nvml_error":-1', BUDGET_MIB, 0),
    ("v3", {"FAKE_NVML_FAIL": "handle"}, READY_V3, '"nvml_error":999', BUDGET_MIB, 0),
    ("v3", {"FAKE_NVML_FAIL": "processes"}, READY_V3, '"nvml_error":999', BUDGET_MIB, 0),
    # The list grows past the room on the second ask too: NVML's own code, 7 (insufficient size).
    ("v3", {"FAKE_NVML_FAIL": "growing"}, READY_V3, '"nvml_error":7', BUDGET_MIB, 0),
    ("v3", {"FAKE_NVML_FAIL": "not_listed"}, READY_V3, '"nvml_error":-2', BUDGET_MIB, 0),
    ("v3", {"FAKE_NVML_FAIL": "not_available"}, READY_V3, '"nvml_error":-3', BUDGET_MIB, 0),
]
# Rows whose process list is never called: no list in the library, or no device handle.
NO_LIST = [(None, {}), ("none", {}), ("v3", {"FAKE_NVML_FAIL": "init"}), ("v3", {"FAKE_CUDA_FAIL": "uuid"}),
           ("v3", {"FAKE_NVML_FAIL": "handle"})]


@pytest.mark.parametrize("form,extra,nvml_text,device_text,effective_mib,second_rc", NVML_CASES)
def test_nvml_usage_beyond_the_count_lowers_the_gpu_budget_and_its_failures_change_nothing(
        fake_cuda, tmp_path, form, extra, nvml_text, device_text, effective_mib, second_rc):
    dump = tmp_path / "dump.json"
    env = {"QVSHIM_GPU_BUDGET": f"{BUDGET_MIB}M", "QVSHIM_INTERVAL": "20ms",
           "FAKE_NVML_EXTRA_MIB": str(EXTRA_MIB), "LD_LIBRARY_PATH": nvml_library_path(form),
           "FAKE_NVML_LOG": str(tmp_path / "forms"), **extra}
    r = run(["cuda_client", "steps", "a:alloc:256", f"dump:{dump}:{nvml_text}", f"dump:{dump}:{device_text}",
             f"eff:1:{effective_mib}", "a:alloc:512"], env)
    assert r.returncode == 0, r.describe()
    got = [r.number(f"s{i}") for i in range(5)]
    want = [0, 1, 1, effective_mib * MIB, second_rc]
    assert got == want, (
        f"NVML {form} with {extra}: expected allocation 0, dump with {nvml_text!r} and {device_text!r}, "
        f"effective budget {effective_mib} MiB, then code {second_rc}; got {got}\n"
        f"last dump: {dump.read_text() if dump.exists() else None}\n{r.describe()}")
    assert "nvml" not in r.stderr.lower(), f"NVML's absence or failure must print nothing\n{r.describe()}"
    log = tmp_path / "forms"
    forms = {FORM_OF_FUNCTION[line.split()[0]] for line in (log.read_text().splitlines() if log.exists() else [])
             if line.split()[0] in FORM_OF_FUNCTION}
    want_forms = set() if (form, extra) in NO_LIST else {form}
    assert forms == want_forms, f"expected the process list called in the forms {want_forms}, got {forms}"


def test_nvml_devices_are_matched_to_cuda_devices_by_uuid(fake_cuda, tmp_path):
    # Only the second device has memory NVML sees beyond the count: only its budget is lowered.
    env = {"QVSHIM_GPU_BUDGET": f"{BUDGET_MIB}M", "QVSHIM_INTERVAL": "20ms",
           "FAKE_NVML_EXTRA_MIB": f"0,{EXTRA_MIB}", "LD_LIBRARY_PATH": nvml_library_path("v3")}
    r = run(["cuda_client", "steps", "a:alloc:256", "dev:1", "a:alloc:256", f"eff:2:{BUDGET_MIB - EXTRA_MIB}",
             f"eff:1:{BUDGET_MIB}"], env)
    assert r.returncode == 0, r.describe()
    got = (r.number("s3"), r.number("s4"))
    assert got == ((BUDGET_MIB - EXTRA_MIB) * MIB, BUDGET_MIB * MIB), (
        f"expected gpu 1 lowered by {EXTRA_MIB} MiB and gpu 0 not, got {got}\n{r.describe()}")


def test_cuda_mem_get_info_reports_the_budget_as_total_and_the_effective_room_as_free(fake_cuda):
    env = {"QVSHIM_GPU_BUDGET": f"{BUDGET_MIB}M", "QVSHIM_INTERVAL": "20ms",
           "FAKE_NVML_EXTRA_MIB": str(EXTRA_MIB), "LD_LIBRARY_PATH": nvml_library_path("v3")}
    r = run(["cuda_client", "steps", "a:alloc:256", f"eff:1:{BUDGET_MIB - EXTRA_MIB}", "info"], env)
    assert r.returncode == 0, r.describe()
    got = (r.number("s2"), r.number("t2"))
    want = ((BUDGET_MIB - EXTRA_MIB - 256) * MIB, BUDGET_MIB * MIB)
    assert got == want, f"expected (free, total) {want}: the budget stays the device's size\n{r.describe()}"


# (allocation kind, FAKE_CUDA_POOL_KEEPS, steps after four 256 MiB allocations of that kind in a
#  1 GiB budget and two frees, expected values of those steps, the fake driver's calls after the
#  frees, refusals). "async" is cuMemAllocAsync from the device's default pool, "named_async"
#  cuMemAllocFromPoolAsync from a pool of the fake's that only that call names.
POOL_CASES = [
    # The pool keeps 512 MiB: it counts, the budget falls to 512 MiB; the next allocation is
    # refused by that budget, the pool is trimmed, and the retry fits.
    ("async", "1", ["eff:1:512", "a:async:256"], [512 * MIB, 0],
     "cuMemPoolTrimTo:0 cuMemAllocAsync:0", 0),
    # Full even after the trim: refused without calling the driver, the trim came first.
    ("async", "1", ["eff:1:512", "a:async:256", "a:async:256", "a:async:256"],
     [512 * MIB, 0, 0, CUDA_ERROR_OUT_OF_MEMORY],
     "cuMemPoolTrimTo:0 cuMemAllocAsync:0 cuMemAllocAsync:0 cuMemPoolTrimTo:0", 1),
    # A pool that gives memory back at once: nothing is cached, the budget stays.
    ("async", "0", ["eff:1:1024", "a:async:256", "a:async:256", "a:async:256"],
     [1024 * MIB, 0, 0, CUDA_ERROR_OUT_OF_MEMORY],
     "cuMemAllocAsync:0 cuMemAllocAsync:0 cuMemPoolTrimTo:0", 1),
    # A pool named in cuMemAllocFromPoolAsync is read and trimmed as the default one is (the
    # default pool is trimmed too: it holds nothing).
    ("named_async", "1", ["eff:1:512", "a:named_async:256"], [512 * MIB, 0],
     "cuMemPoolTrimTo:0 cuMemPoolTrimTo:0 cuMemAllocFromPoolAsync:0", 0),
]


@pytest.mark.parametrize("kind,keeps,steps,values,calls,refusals", POOL_CASES)
def test_memory_pools_reserve_counts_and_is_trimmed_before_a_refusal(fake_cuda, kind, keeps, steps, values, calls,
                                                                    refusals):
    fill = [f"a:{kind}:256"] * 4 + ["f", "f"]
    r = run(["cuda_client", "steps", *fill, *steps],
            {"QVSHIM_GPU_BUDGET": "1G", "QVSHIM_INTERVAL": "20ms", "FAKE_CUDA_POOL_KEEPS": keeps})
    assert r.returncode == 0, r.describe()
    got = [r.number(f"s{i}") for i in range(len(fill) + len(steps))]
    assert got == [0] * len(fill) + values, f"expected steps {fill + steps} to give {values}\n{r.describe()}"
    sequence = r.facts.get("sequence", "").split()
    after_frees = " ".join(sequence[4:])
    assert after_frees == calls, (
        f"expected the driver to see, after the fill: {calls!r}; it saw {after_frees!r}\n{r.describe()}")
    assert r.number("pool_refusals") == refusals, r.describe()


def test_the_dump_shows_what_the_memory_pools_keep(fake_cuda, tmp_path):
    # Four 256 MiB from the default pool, two freed: the pool keeps 512 MiB, which lowers the
    # budget and is the dump's pools_cached figure for the device.
    dump = tmp_path / "dump.json"
    fill = ["a:async:256"] * 4 + ["f", "f"]
    r = run(["cuda_client", "steps", *fill, "eff:1:512", f'dump:{dump}:"pools_cached":{512 * MIB}'],
            {"QVSHIM_GPU_BUDGET": "1G", "QVSHIM_INTERVAL": "20ms", "FAKE_CUDA_POOL_KEEPS": "1"})
    assert r.returncode == 0, r.describe()
    got = [r.number(f"s{i}") for i in range(len(fill) + 2)]
    assert got == [0] * len(fill) + [512 * MIB, 1], (
        f"expected the budget at 512 MiB and the dump to say the pools keep 512 MiB; got {got}\n"
        f"last dump: {dump.read_text() if dump.exists() else None}\n{r.describe()}")


def test_the_monitor_reads_only_the_devices_the_process_uses(fake_cuda, tmp_path):
    # Two devices, only the second allocated on: about 15 looks at 20 ms read its memory pool,
    # never the first device's, whose pool in the ledger (below the second's) stays unused and
    # out of the dump.
    dump = tmp_path / "dump.json"
    r = run(["cuda_client", "steps", "dev:1", "a:alloc:256", "sleep:300", f'dump:{dump}:"name":"gpu 1"'],
            {"QVSHIM_GPU_BUDGET": "1G", "QVSHIM_INTERVAL": "20ms"})
    assert r.returncode == 0, r.describe()
    assert r.number("default_pool_asks1") > 0, f"the used device's pool was never read\n{r.describe()}"
    assert r.number("default_pool_asks0") == 0, f"the unused device was asked about\n{r.describe()}"
    assert r.number("s3") == 1, f"the dump never listed gpu 1\n{r.describe()}"
    names = [p["name"] for p in json.loads(dump.read_text())["pools"]]
    assert names == ["host", "gpu 1"], f"the dump lists {names}: only pools in use belong there"


def test_a_null_default_pool_from_the_driver_is_never_handed_back_to_it(fake_cuda):
    # A driver that says success and gives a null pool: the looks (and a refusal's trim) skip it.
    r = run(["cuda_client", "steps", "a:alloc:512", "a:alloc:512", "a:alloc:512", "sleep:200"],
            {"QVSHIM_GPU_BUDGET": "1G", "QVSHIM_INTERVAL": "20ms", "FAKE_CUDA_FAIL": "nullpool"})
    assert r.returncode == 0, r.describe()
    assert [r.number(f"s{i}") for i in range(3)] == [0, 0, CUDA_ERROR_OUT_OF_MEMORY], r.describe()
    assert r.number("default_pool_asks0") > 0, f"the device's pool was never asked for\n{r.describe()}"
    assert r.number("null_pool_calls") == 0, f"the null pool went back to the driver\n{r.describe()}"


def test_a_pinned_host_refusal_leaves_the_host_effective_budget_to_the_monitor(fake_cuda):
    # 256 MiB of anonymous memory the ledger does not see lowers the host's effective budget
    # below 320 MiB of its 512 MiB (to 290-320 MiB, with the process's own noise); a 400 MiB
    # pinned allocation must be refused by it, not let through by a retry that took the budget
    # back up to 512 MiB (pinned memory has no pool to trim).
    r = run(["cuda_client", "steps", "touch:256", "effbelow:0:320", "a:host_alloc:400"],
            {"QVSHIM_BUDGET": "512M", "QVSHIM_INTERVAL": "20ms"})
    assert r.returncode == 0, r.describe()
    assert r.number("s1") < 320 * MIB, f"expected the host effective budget lowered\n{r.describe()}"
    assert r.number("s2") == CUDA_ERROR_OUT_OF_MEMORY, (
        f"expected the pinned allocation refused by the lowered host budget\n{r.describe()}")
