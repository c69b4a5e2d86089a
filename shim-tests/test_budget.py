"""The host budget: refusals are NULL/ENOMEM (the return code for
posix_memalign) and the program goes on; small requests may use the reserve
up to budget + reserve; freeing makes room again (shim-tests/c/budget.c)."""

import pytest

import shimrun

BUDGET_ENV = {"QVSHIM_BUDGET": "64M"}

BUDGET_CASES = [
    "malloc_over_budget_fails_with_enomem_and_program_goes_on",
    "calloc_over_budget_fails_with_enomem",
    "realloc_over_budget_fails_and_keeps_the_old_block",
    "posix_memalign_over_budget_returns_enomem_code",
    "aligned_allocators_over_budget_fail_with_enomem",
    "large_allocations_reach_the_budget_but_never_cross_it",
    "small_allocations_run_into_the_reserve_until_budget_plus_reserve",
    "allocations_over_64kib_use_the_reserve_only_once_after_a_refusal",
]


@pytest.mark.parametrize("case", BUDGET_CASES)
def test_budget_refuses_gracefully(case, c_program, run_under_shim):
    result = run_under_shim([c_program("budget"), case], BUDGET_ENV)
    shimrun.expect_pass(result, "budget", case, "QVSHIM_BUDGET=64M")


def test_every_budget_case_has_a_row(c_program):
    shimrun.expect_table_covers_program(c_program("budget"), BUDGET_CASES, "BUDGET_CASES")
