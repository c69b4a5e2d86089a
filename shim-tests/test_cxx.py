"""C++ under the shim: new/delete and std::vector are counted, and a `new`
over the budget throws std::bad_alloc that the program survives
(shim-tests/cpp/newdelete.cpp)."""

import pytest

import shimrun

UNDER_64M_BUDGET = {"QVSHIM_BUDGET": "64M"}

# (case, environment)
CXX_CASES = [
    ("new_and_delete_are_counted_by_the_shim", {}),
    ("vector_growth_keeps_contents_and_is_counted", {}),
    ("aligned_new_is_aligned_and_counted", {}),
    ("new_over_budget_throws_bad_alloc_and_program_goes_on", UNDER_64M_BUDGET),
    ("nothrow_new_over_budget_returns_nullptr", UNDER_64M_BUDGET),
]


@pytest.mark.parametrize("case,env", CXX_CASES, ids=[c for c, _ in CXX_CASES])
def test_cxx_allocation_goes_through_the_shim(case, env, cpp_program, run_under_shim):
    result = run_under_shim([cpp_program("newdelete"), case], env)
    shimrun.expect_pass(result, "newdelete", case)


def test_every_cxx_case_has_a_row(cpp_program):
    shimrun.expect_table_covers_program(cpp_program("newdelete"), [c for c, _ in CXX_CASES], "CXX_CASES")
