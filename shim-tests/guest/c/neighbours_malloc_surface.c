/*
 * neighbours_malloc_surface.c - the corners of the malloc surface the shim
 * must answer itself: realloc in the statistics, mallinfo/mallinfo2/mallopt/
 * malloc_stats/malloc_info, requests no machine can satisfy, and alignments
 * too large for the budget. Run under the shim with QVSHIM_BUDGET=1G.
 */
#include "../../c/shimcheck.h"

#include <stdint.h>

static volatile size_t size_max_v = SIZE_MAX;

#define TIB ((size_t)1 << 40)

/* This process's virtual size in bytes (VmSize), 0 when unreadable. */
static size_t vm_size_bytes(void)
{
    char line[256];
    size_t kib = 0;
    FILE *f = fopen("/proc/self/status", "r");
    if (f == NULL)
        return 0;
    while (fgets(line, sizeof line, f) != NULL)
        if (sscanf(line, "VmSize: %zu kB", &kib) == 1)
            break;
    fclose(f);
    return kib * KIB;
}

static void realloc_growing_is_not_a_new_allocation(void)
{
    struct qvshim_pool_stats before = host_stats();
    char *p = malloc(100);
    REQUIRE(p != NULL, "expected malloc(100)");
    const size_t sizes[] = {1000, 100000, 4 * MIB, 50};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        p = realloc(p, sizes[i]);
        REQUIRE(p != NULL, "expected realloc to %zu bytes", sizes[i]);
    }
    free(p);
    struct qvshim_pool_stats after = host_stats();
    EXPECT(after.allocs - before.allocs == 1,
           "expected one malloc and four reallocs to count as 1 allocation, got %llu",
           (unsigned long long)(after.allocs - before.allocs));
    EXPECT(after.frees - before.frees == 1, "expected 1 free, got %llu",
           (unsigned long long)(after.frees - before.frees));
    EXPECT(after.live == before.live, "expected host live back at %llu, got %llu",
           (unsigned long long)before.live, (unsigned long long)after.live);
}

static void malloc_statistics_functions_are_the_shims(void)
{
    const char *names[] = {"mallinfo", "mallinfo2", "mallopt", "malloc_stats", "malloc_info",
                           "malloc_trim"};
    const char *shim = shim_path();
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        const char *where = defining_file(dlsym(RTLD_DEFAULT, names[i]));
        EXPECT(same_file(where, shim), "expected %s to be defined by %s, got %s", names[i], shim,
               where);
    }
}

static void mallinfo2_counts_live_bytes(void)
{
    const size_t n = 10 * MIB;
    char *p = malloc(n);
    REQUIRE(p != NULL, "expected malloc(10 MiB)");
    memset(p, 1, n);
    struct mallinfo2 info = mallinfo2();
    EXPECT(info.uordblks >= n, "expected mallinfo2().uordblks >= %zu with 10 MiB live, got %zu", n,
           info.uordblks);
    EXPECT(info.arena >= info.uordblks, "expected mallinfo2().arena (%zu) >= uordblks (%zu)",
           info.arena, info.uordblks);
    EXPECT(info.arena == info.uordblks + info.fordblks,
           "expected arena (%zu) = uordblks (%zu) + fordblks (%zu)", info.arena, info.uordblks,
           info.fordblks);
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
    struct mallinfo old = mallinfo();
#pragma GCC diagnostic pop
    EXPECT((size_t)old.uordblks >= n, "expected mallinfo().uordblks >= %zu, got %d", n, old.uordblks);
    free(p);
}

/* glibc's answer for a parameter it takes (1), and for one it ignores (also 1). */
static void mallopt_succeeds_without_effect(void)
{
    EXPECT(mallopt(M_ARENA_MAX, 2) == 1, "expected mallopt(M_ARENA_MAX, 2) to return 1");
    EXPECT(mallopt(M_MMAP_THRESHOLD, 1 << 20) == 1, "expected mallopt(M_MMAP_THRESHOLD) to return 1");
    EXPECT(mallopt(12345, 1) == 1, "expected mallopt of a parameter glibc ignores to return 1");
    void *p = malloc(1000);
    EXPECT(p != NULL, "expected malloc after mallopt");
    free(p);
}

static void malloc_info_writes_xml_and_rejects_options(void)
{
    char *p = malloc(MIB);
    REQUIRE(p != NULL, "expected malloc(1 MiB)");
    char buf[4096];
    memset(buf, 0, sizeof buf);
    FILE *f = fmemopen(buf, sizeof buf - 1, "w");
    REQUIRE(f != NULL, "expected fmemopen");
    EXPECT(malloc_info(0, f) == 0, "expected malloc_info(0, f) to return 0");
    fclose(f);
    EXPECT(strncmp(buf, "<malloc version=\"1\">", 20) == 0, "expected <malloc version=\"1\"> first, got %.60s",
           buf);
    EXPECT(strstr(buf, "</malloc>") != NULL, "expected the XML closed by </malloc>, got %.200s", buf);
    /* glibc returns EINVAL itself for options it does not know (its manual says -1 and errno). */
    f = fopen("/dev/null", "w");
    int rc = malloc_info(1, f);
    EXPECT(rc == EINVAL, "expected malloc_info(1, f) to return EINVAL (%d) as glibc does, got %d", EINVAL, rc);
    fclose(f);
    malloc_stats();
    free(p);
}

static void impossible_requests_fail_without_counting_a_refusal(void)
{
    struct qvshim_pool_stats before = host_stats();
    const size_t huge[] = {size_max_v, size_max_v - 4096, (size_t)PTRDIFF_MAX + 1, (size_t)1 << 62};
    for (size_t i = 0; i < sizeof huge / sizeof huge[0]; i++) {
        errno = 0;
        void *p = malloc(huge[i]);
        EXPECT(p == NULL && errno == ENOMEM, "expected malloc(%zu) NULL with ENOMEM", huge[i]);
        errno = 0;
        p = calloc(1, huge[i]);
        EXPECT(p == NULL && errno == ENOMEM, "expected calloc(1, %zu) NULL with ENOMEM", huge[i]);
        char *q = malloc(10);
        errno = 0;
        p = realloc(q, huge[i]);
        EXPECT(p == NULL && errno == ENOMEM, "expected realloc(q, %zu) NULL with ENOMEM", huge[i]);
        free(q);
    }
    struct qvshim_pool_stats after = host_stats();
    EXPECT(after.refusals == before.refusals,
           "expected requests no machine can satisfy not to count as budget refusals, got %llu more",
           (unsigned long long)(after.refusals - before.refusals));
}

static void huge_alignment_is_refused_without_reserving_address_space(void)
{
    size_t vm_before = vm_size_bytes();
    void *p = (void *)&size_max_v;
    int rc = posix_memalign(&p, TIB, 1);
    EXPECT(rc == ENOMEM, "expected posix_memalign(1 TiB alignment, 1) to return ENOMEM (%d), got %d",
           ENOMEM, rc);
    EXPECT(p == (void *)&size_max_v, "expected *memptr unchanged after the refusal");
    if (rc == 0)
        free(p);
    errno = 0;
    p = aligned_alloc(TIB, TIB);
    EXPECT(p == NULL && errno == ENOMEM, "expected aligned_alloc(1 TiB, 1 TiB) NULL with ENOMEM");
    errno = 0;
    p = memalign(TIB / 2, 4096);
    EXPECT(p == NULL && errno == ENOMEM, "expected memalign(512 GiB, 4096) NULL with ENOMEM");
    size_t vm_after = vm_size_bytes();
    EXPECT(vm_after < vm_before + GIB,
           "expected no address space reserved by the refused alignments, VmSize grew by %zu MiB",
           (vm_after - vm_before) / MIB);
    /* A reasonable large alignment still works. */
    rc = posix_memalign(&p, 2 * MIB, 100);
    EXPECT(rc == 0, "expected posix_memalign(2 MiB alignment, 100) to succeed, got %d", rc);
    if (rc == 0)
        free(p);
}

static const struct check_case cases[] = {
    CASE(realloc_growing_is_not_a_new_allocation),
    CASE(malloc_statistics_functions_are_the_shims),
    CASE(mallinfo2_counts_live_bytes),
    CASE(mallopt_succeeds_without_effect),
    CASE(malloc_info_writes_xml_and_rejects_options),
    CASE(impossible_requests_fail_without_counting_a_refusal),
    CASE(huge_alignment_is_refused_without_reserving_address_space),
};

int main(int argc, char **argv)
{
    return RUN_CASES(cases, argc, argv);
}
