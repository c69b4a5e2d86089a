"""The traps listed in DESIGN.md that are not shown elsewhere (docs/TRAPS.md maps every trap to
its test): signal handlers that only set a flag, the shim's own allocations kept out of the
ledger, glibc internals at the budget, and no unwinding into C (shim-tests/c/traps.c)."""

import tomllib

import pytest

import shimrun

TRAP_CASES = [
    # (case, environment)
    ("signal_storm_during_allocation_neither_deadlocks_nor_crashes", {"QVSHIM_LOG": "error"}),
    ("shim_own_work_leaves_the_ledger_alone", {"QVSHIM_LOG": "error", "QVSHIM_DUMP_FILE": "/dev/null"}),
    ("glibc_internals_still_work_at_the_budget", {"QVSHIM_BUDGET": "64M", "QVSHIM_LOG": "error"}),
    ("frees_in_thread_exit_destructors_are_counted", {"QVSHIM_LOG": "error"}),
]


@pytest.mark.parametrize("case,env", TRAP_CASES, ids=[c for c, _ in TRAP_CASES])
def test_trap(case, env, c_program, run_under_shim):
    result = run_under_shim([c_program("traps"), case], env)
    shimrun.expect_pass(result, "traps", case)


def test_signal_storm_dumps_are_written_by_the_monitor(c_program, run_under_shim, tmp_path):
    dump = tmp_path / "dump-%p.json"
    case = "signal_storm_during_allocation_neither_deadlocks_nor_crashes"
    result = run_under_shim([c_program("traps"), case],
                            {"QVSHIM_LOG": "error", "QVSHIM_DUMP_FILE": str(dump),
                             "QVSHIM_DUMP_FORMAT": "json"})
    shimrun.expect_pass(result, "traps", case)
    written = list(tmp_path.glob("dump-*.json"))
    assert written and written[0].stat().st_size > 0, (
        f"expected the monitor to write the signalled dumps to {dump}, found {written}")


def test_every_trap_case_has_a_row(c_program):
    shimrun.expect_table_covers_program(c_program("traps"), [c for c, _ in TRAP_CASES], "TRAP_CASES")


def test_release_build_aborts_on_panic_instead_of_unwinding_into_c():
    cargo = tomllib.loads((shimrun.REPO / "Cargo.toml").read_text())
    profile = cargo.get("profile", {}).get("release", {})
    assert profile.get("panic") == "abort", (
        f"expected [profile.release] panic = \"abort\" in Cargo.toml (a panic must never unwind "
        f"into the host's C frames), got {profile.get('panic')!r}")
