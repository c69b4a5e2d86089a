/*
 * stats_layout.c - prints the layout of struct qvshim_pool_stats as the C compiler sees it in
 * include/qvshim.h: one "name offset size" line per field, then "sizeof N". The Rust struct
 * (src/ledger/stats.rs, by a unit test in src/surface/capi.rs) and every Python ctypes copy
 * (shim-tests/abi/test_abi.py) are compared with this output, so a field that drifts in any
 * copy fails a test.
 *
 * A field added to the header but not listed here changes sizeof, which the comparisons see.
 */
#include <stddef.h>
#include <stdio.h>

#include "qvshim.h"

#define FIELD(name)                                                                      \
    printf("%s %zu %zu\n", #name, offsetof(struct qvshim_pool_stats, name),              \
           sizeof(((struct qvshim_pool_stats *)0)->name))

int main(void)
{
    FIELD(struct_size);
    FIELD(pool);
    FIELD(level);
    FIELD(device);
    FIELD(budget);
    FIELD(effective_budget);
    FIELD(reserve);
    FIELD(reserve_in_use);
    FIELD(live);
    FIELD(peak);
    FIELD(allocs);
    FIELD(frees);
    FIELD(refusals);
    FIELD(largest_refused);
    FIELD(purges);
    FIELD(level_changes);
    FIELD(notifications);
    printf("sizeof %zu\n", sizeof(struct qvshim_pool_stats));
    return 0;
}
