"""The malloc family under the shim keeps glibc's semantics and every block
it returns is counted in the host pool (shim-tests/c/malloc_family.c).

One row per case; each case is a function of the same name in the C file,
and it prints what it expected when it fails.
"""

import pytest

import shimrun

MALLOC_FAMILY_CASES = [
    "malloc_zero_returns_unique_non_null_blocks",
    "a_request_jemalloc_itself_fails_leaves_live_exact",
    "aligned_spans_past_the_address_space_are_enomem_not_budget_refusals",
    "malloc_counts_usable_size_and_free_gives_it_back",
    "free_null_does_nothing_and_keeps_errno",
    "free_preserves_errno_for_small_block",
    "free_preserves_errno_for_large_block",
    "calloc_returns_zeroed_memory_even_when_reusing_dirty_blocks",
    "calloc_zero_returns_non_null_block",
    "calloc_detects_size_overflow_with_enomem",
    "realloc_of_null_acts_as_malloc",
    "realloc_to_zero_frees_block_and_returns_null",
    "realloc_growing_keeps_contents",
    "realloc_shrinking_keeps_contents",
    "failed_realloc_leaves_old_block_intact",
    "reallocarray_detects_overflow_with_enomem",
    "posix_memalign_rejects_bad_alignment_with_einval",
    "posix_memalign_honours_alignment_from_16_bytes_to_1mib",
    "posix_memalign_returns_enomem_code_for_impossible_size",
    "aligned_alloc_honours_alignment",
    "aligned_alloc_rejects_non_power_of_two_alignment_with_einval",
    "memalign_honours_alignment",
    "memalign_rounds_non_power_of_two_alignment_up",
    "memalign_rejects_huge_alignment_with_einval",
    "memalign_of_the_largest_power_of_two_is_enomem_not_einval",
    "valloc_returns_page_aligned_blocks",
    "pvalloc_rounds_size_up_to_whole_pages",
    "pvalloc_of_zero_gives_one_page",
    "pvalloc_overflow_returns_enomem",
    "malloc_usable_size_of_null_is_zero",
    "malloc_usable_size_covers_the_request",
    "cfree_is_exported_by_the_shim_and_frees",
    "libc_aliases_are_defined_by_the_shim",
    "libc_aliases_allocate_through_the_ledger",
    "libc_internal_allocations_come_from_the_shim",
    "peak_of_a_single_thread_is_exact",
    "malloc_of_impossible_size_returns_null_with_enomem",
    "malloc_trim_returns_and_malloc_still_works",
    "malloc_trim_gives_freed_pages_back",
    "malloc_stats_reports_the_heap_on_stderr",
]


@pytest.mark.parametrize("case", MALLOC_FAMILY_CASES)
def test_malloc_family_matches_glibc_and_is_counted(case, c_program, run_under_shim):
    result = run_under_shim([c_program("malloc_family"), case])
    shimrun.expect_pass(result, "malloc_family", case)


# jemalloc gives freed pages back inside free at once when its decay is 0; the case's own madvise
# then changes errno there, so a free that does not put errno back fails (the errno rows above
# cannot: jemalloc's free leaves errno alone unless a syscall inside it fails).
ERRNO_AT_RISK_CASE = "free_restores_errno_that_jemalloc_changed_inside_free"
ERRNO_AT_RISK_ENV = {"_RJEM_MALLOC_CONF": "dirty_decay_ms:0,muzzy_decay_ms:0"}


def test_free_restores_errno_that_jemalloc_changed_inside_free(c_program, run_under_shim):
    result = run_under_shim([c_program("malloc_family"), ERRNO_AT_RISK_CASE], ERRNO_AT_RISK_ENV)
    shimrun.expect_pass(result, "malloc_family", ERRNO_AT_RISK_CASE)


# The shim's start-up runs partly on its own thread, so whether it is still
# going when main starts is a race: each run of this case can only catch it
# when it loses. Run it often enough that a shim which allocates behind main's
# back is all but certain to be caught; a correct shim passes every run.
START_UP_CASE = "live_is_constant_from_main_while_the_program_allocates_nothing"
START_UP_RUNS = 12


def test_shim_start_up_is_over_before_main(c_program, run_under_shim):
    failures = []
    for _ in range(START_UP_RUNS):
        result = run_under_shim([c_program("malloc_family"), START_UP_CASE])
        if result.returncode != 0 or f"PASS {START_UP_CASE}" not in result.stdout.splitlines():
            failures.append(result)
    assert not failures, (
        f"expected host live to stay constant from the first line of main in all {START_UP_RUNS} runs "
        f"(the shim, its monitor thread included, must not allocate through the host ledger after "
        f"load), it moved in {len(failures)} run(s); the first:{failures[0].describe()}")


def test_every_malloc_family_case_has_a_row(c_program):
    shimrun.expect_table_covers_program(c_program("malloc_family"), MALLOC_FAMILY_CASES + [START_UP_CASE, ERRNO_AT_RISK_CASE],
                                        "MALLOC_FAMILY_CASES, START_UP_CASE and ERRNO_AT_RISK_CASE")
