"""The C API of include/qvshim.h, from a C program linked against the library."""

from monitor_run import json_dump, run_program


def test_c_api_level_callbacks_budget_and_dump(c_programs, tmp_path):
    out = tmp_path / "dump.json"
    r = run_program(c_programs["capi"], out, QVSHIM_BUDGET="1G")
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert "FAIL" not in r.stdout
    for check in ("callback called after the rise", "callback ran on another thread (the monitor)",
                  "callback got warn -> normal", "removed callback not called again",
                  "the callback table fills and then refuses", "level of an unknown pool",
                  "a purge returns freed dirty pages to the kernel", "JSON dump written",
                  "dump to a bad fd fails"):
        assert f"ok {check}" in r.stdout, f"missing check {check!r}:\n{r.stdout}"
    d = json_dump(out.read_text())
    assert d["pools"][0]["budget"] == 64 << 20, "the budget set through the C API"
    assert d["runtime"]["callbacks"]["calls"] >= 2
    assert d["runtime"]["callbacks"]["registered"] == 2, "the two left registered, not the free slots"
