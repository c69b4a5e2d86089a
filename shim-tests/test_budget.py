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
    "a_refusal_up_to_64kib_alignment_is_of_the_size_asked_for",
    "credit_of_exited_threads_comes_back_to_the_budget",
    "a_fork_child_gets_the_credit_of_the_threads_it_did_not_inherit",
    "the_reserve_grant_after_a_refusal_reaches_exactly_half_the_reserve",
    "large_allocations_reach_the_budget_but_never_cross_it",
    "small_allocations_run_into_the_reserve_until_budget_plus_reserve",
    "allocations_over_64kib_use_the_reserve_only_once_after_a_refusal",
]


@pytest.mark.parametrize("case", BUDGET_CASES)
def test_budget_refuses_gracefully(case, c_program, run_under_shim):
    result = run_under_shim([c_program("budget"), case], BUDGET_ENV)
    shimrun.expect_pass(result, "budget", case, "QVSHIM_BUDGET=64M")


# Cases that need a reserve of their own: (case, environment).
SMALL_RESERVE_CASES = [
    ("an_aligned_span_of_exactly_budget_plus_reserve_is_served", {"QVSHIM_BUDGET": "64M", "QVSHIM_RESERVE": "16M"}),
]


@pytest.mark.parametrize("case,env", SMALL_RESERVE_CASES)
def test_budget_with_a_small_reserve(case, env, c_program, run_under_shim):
    result = run_under_shim([c_program("budget"), case], env)
    shimrun.expect_pass(result, "budget", case, " ".join(f"{k}={v}" for k, v in env.items()))


def test_every_budget_case_has_a_row(c_program):
    shimrun.expect_table_covers_program(c_program("budget"), BUDGET_CASES + [c for c, _ in SMALL_RESERVE_CASES],
                                        "BUDGET_CASES and SMALL_RESERVE_CASES")


# QVSHIM_WARN and QVSHIM_CRITICAL move the levels: (environment, percent of a 100 MiB budget the
# program brings live to, the host level then: 0 normal, 1 warn, 2 critical).
LEVEL_CASES = [
    ({}, 60, 0),
    ({}, 80, 1),
    ({"QVSHIM_WARN": "50", "QVSHIM_CRITICAL": "70"}, 60, 1),
    ({"QVSHIM_WARN": "50", "QVSHIM_CRITICAL": "70"}, 80, 2),
    ({"QVSHIM_WARN": "85%", "QVSHIM_CRITICAL": "95%"}, 80, 0),
]

# Brings host live to the given percent of the budget (the interpreter already holds some of it),
# in blocks that each fill one 1 MiB size class of jemalloc's.
LEVEL_PROGRAM = """
import ctypes, sys
import shimstats
stats = shimstats.host_stats()
held = [bytearray((1 << 20) - 4096) for _ in range((int(sys.argv[1]) * stats.budget // 100 - stats.live) >> 20)]
print(ctypes.CDLL(None).qvshim_level(0))
"""


@pytest.mark.parametrize("env,percent,level", LEVEL_CASES)
def test_configured_thresholds_set_the_level(env, percent, level, python_under_shim):
    result = python_under_shim(["-c", LEVEL_PROGRAM, str(percent)], {"QVSHIM_BUDGET": "100M", **env})
    assert result.returncode == 0 and result.stdout.strip() == str(level), (
        f"expected host level {level} with live at {percent}% of a 100 MiB budget under "
        f"{env or 'the defaults'}, got {result.stdout.strip()!r}{result.describe()}")
