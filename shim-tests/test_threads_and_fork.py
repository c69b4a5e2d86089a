"""The ledger across threads and processes: blocks freed by other threads and
threads that exit leave live exact to the byte (shim-tests/c/threads.c); a
forked child allocates freely, its ledger is its own, and exec brings the shim
back (shim-tests/c/fork.c)."""

import pytest

import shimrun

# (program, case): one row per behaviour.
THREAD_AND_FORK_CASES = [
    ("threads", "blocks_freed_by_other_threads_return_live_to_start"),
    ("threads", "blocks_of_exited_threads_stay_counted_until_freed"),
    ("threads", "many_short_lived_threads_leave_live_unchanged"),
    ("threads", "a_thread_that_frees_before_it_allocates_keeps_live_exact"),
    ("threads", "a_new_thread_does_not_get_back_the_foreign_block_it_freed_first"),
    ("fork", "child_can_allocate_and_free"),
    ("fork", "child_allocations_do_not_touch_the_parent_ledger"),
    ("fork", "fork_while_another_thread_allocates_does_not_deadlock"),
    ("fork", "fork_then_exec_runs_the_new_program_under_the_shim"),
]


@pytest.mark.parametrize("program,case", THREAD_AND_FORK_CASES)
def test_ledger_stays_exact_across_threads_and_processes(program, case, c_program, run_under_shim):
    result = run_under_shim([c_program(program), case])
    shimrun.expect_pass(result, program, case)


@pytest.mark.parametrize("program", sorted({p for p, _ in THREAD_AND_FORK_CASES}))
def test_every_thread_and_fork_case_has_a_row(program, c_program):
    rows = [c for p, c in THREAD_AND_FORK_CASES if p == program]
    shimrun.expect_table_covers_program(c_program(program), rows, "THREAD_AND_FORK_CASES")
