"""The traps listed in DESIGN.md that are not shown elsewhere (docs/TRAPS.md maps every trap to
its test): signal handlers that only set a flag, the shim's own allocations kept out of the
ledger, glibc internals at the budget, and no unwinding into C (shim-tests/c/traps.c)."""

import json
import tomllib

import pytest

import shimrun

TRAP_CASES = [
    # (case, environment)
    ("signal_storm_during_allocation_neither_deadlocks_nor_crashes", {}),
    ("glibc_internals_still_work_at_the_budget", {"QVSHIM_BUDGET": "64M"}),
    ("frees_in_thread_exit_destructors_are_counted", {}),
    ("a_realloc_in_a_thread_exit_destructor_keeps_live_exact", {}),
]


@pytest.mark.parametrize("case,env", TRAP_CASES, ids=[c for c, _ in TRAP_CASES])
def test_trap(case, env, c_program, run_under_shim):
    result = run_under_shim([c_program("traps"), case], env)
    shimrun.expect_pass(result, "traps", case)


def test_shim_own_work_leaves_the_ledger_alone(c_program, run_under_shim, tmp_path):
    # The case waits for each signalled dump at this path before the next signal.
    case = "shim_own_work_leaves_the_ledger_alone"
    result = run_under_shim([c_program("traps"), case], {"QVSHIM_DUMP_FILE": str(tmp_path / "dump.txt")})
    shimrun.expect_pass(result, "traps", case)


def written_dumps(directory):
    """The dump files in `directory`, each checked to be one whole JSON object, and no partial
    file left beside them."""
    leftovers = list(directory.glob("*.partial"))
    assert not leftovers, f"expected no partially written dump to be left, found {leftovers}"
    dumps = list(directory.glob("dump-*.json"))
    for path in dumps:
        text = path.read_text()
        try:
            report = json.loads(text)
        except json.JSONDecodeError as error:
            raise AssertionError(f"expected {path} to hold one whole JSON dump, got {len(text)} "
                                 f"bytes that do not parse ({error}): {text[:200]!r}") from None
        assert "pid" in report, f"expected the dump in {path} to name the pid, got {sorted(report)}"
    return dumps


def dumps_of_case(case, c_program, run_under_shim, tmp_path):
    """Runs a traps case with JSON dumps going to tmp_path; the case must pass. Returns the dump
    files written (each checked whole by written_dumps)."""
    result = run_under_shim([c_program("traps"), case],
                            {"QVSHIM_DUMP_FILE": str(tmp_path / "dump-%p.json"),
                             "QVSHIM_DUMP_FORMAT": "json"})
    shimrun.expect_pass(result, "traps", case)
    return written_dumps(tmp_path)


def test_signal_storm_dumps_are_written_by_the_monitor(c_program, run_under_shim, tmp_path):
    written = dumps_of_case("signal_storm_during_allocation_neither_deadlocks_nor_crashes",
                            c_program, run_under_shim, tmp_path)
    assert len(written) == 1, f"expected the signalled dumps in {tmp_path}, found {written}"


@pytest.mark.parametrize("attempt", range(10))
def test_a_dump_asked_for_just_before_exit_is_whole(c_program, run_under_shim, tmp_path, attempt):
    # Timing-dependent, so run several times. Before the exit path finished the dumps, this case
    # left no dump at all, and in CI the signal-storm case above once left an empty file.
    written = dumps_of_case("dump_requested_just_before_exit", c_program, run_under_shim, tmp_path)
    assert len(written) == 1, f"expected the dump asked for before exit in {tmp_path}, found {written}"


def test_every_trap_case_has_a_row(c_program):
    run_by_their_own_test = ["dump_requested_just_before_exit", "shim_own_work_leaves_the_ledger_alone"]
    shimrun.expect_table_covers_program(c_program("traps"),
                                        [c for c, _ in TRAP_CASES] + run_by_their_own_test,
                                        "TRAP_CASES")


def test_release_build_aborts_on_panic_instead_of_unwinding_into_c():
    cargo = tomllib.loads((shimrun.REPO / "Cargo.toml").read_text())
    profile = cargo.get("profile", {}).get("release", {})
    assert profile.get("panic") == "abort", (
        f"expected [profile.release] panic = \"abort\" in Cargo.toml (a panic must never unwind "
        f"into the host's C frames), got {profile.get('panic')!r}")
