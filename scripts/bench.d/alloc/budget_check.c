/*
 * budget_check.c - what a budget does to a process, for comparing builds of qvshim side by
 * side (scripts/bench-budget). Not a test: it prints measurements.
 *
 * usage: budget_check refusal|storm|freed
 *
 *   refusal  one thread allocates and touches 1 MiB blocks until malloc returns NULL; prints
 *            the MiB it got, errno, and whether a 64-byte malloc still succeeds afterwards.
 *   storm    two threads allocate and touch blocks of 64 KiB..4 MiB until each sees NULL;
 *            prints the peak RSS above the RSS at start (VmHWM - VmRSS before), in MiB.
 *   freed    allocates 256 MiB in 4 KiB..1 MiB blocks, frees everything, and prints what the
 *            library counts (the host pool's live bytes) right after and 2 s later.
 *
 * Every line is key=value; the library's host pool is read through include/qvshim.h's API.
 */
#include "common.h"
#include <errno.h>
#include <string.h>
#include <unistd.h>

struct pool_stats {
    uint32_t struct_size;
    int32_t pool, level, device;
    uint64_t budget, effective_budget, reserve, reserve_in_use, live, peak, allocs, frees, refusals,
        largest_refused, purges, level_changes, notifications;
};

enum { MIB = 1 << 20, MAX_BLOCKS = 1 << 16 };

static uint64_t counted(void)
{
    int (*stats)(int, struct pool_stats *) = (int (*)(int, struct pool_stats *))dlsym(RTLD_DEFAULT, "qvshim_pool_stats");
    struct pool_stats s = {.struct_size = sizeof s};
    if (stats == NULL || stats(0, &s) != 0)
        return 0;
    return s.live;
}

static uint64_t status_kib(const char *key)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    uint64_t value = 0;
    size_t n = strlen(key);
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, key, n) == 0)
            value = strtoull(line + n, NULL, 10);
    if (f)
        fclose(f);
    return value;
}

static void *grab_until_refused(void *argument)
{
    uint64_t state = (uintptr_t)argument;
    static __thread void *blocks[MAX_BLOCKS];
    size_t n = 0;
    for (; n < MAX_BLOCKS; n++) {
        size_t size = (64 << 10) + bench_random(&state) % (4 * MIB - (64 << 10));
        char *p = malloc(size);
        if (p == NULL)
            break;
        memset(p, 1, size);
        blocks[n] = p;
    }
    for (size_t i = 0; i < n; i++)
        free(blocks[i]);
    return NULL;
}

int main(int argc, char **argv)
{
    const char *what = argc > 1 ? argv[1] : "";
    if (strcmp(what, "refusal") == 0) {
        static void *blocks[MAX_BLOCKS];
        size_t n = 0;
        errno = 0;
        for (; n < MAX_BLOCKS; n++) {
            char *p = malloc(MIB);
            if (p == NULL)
                break;
            memset(p, 1, MIB);
            blocks[n] = p;
        }
        int seen = errno;
        void *small = malloc(64);
        printf("allocator=%s refused_after_mib=%zu errno=%s small_after_refusal=%s\n", bench_allocator(), n,
               seen == ENOMEM ? "ENOMEM" : "other", small ? "ok" : "NULL");
        free(small);
        for (size_t i = 0; i < n; i++)
            free(blocks[i]);
        return 0;
    }
    if (strcmp(what, "storm") == 0) {
        uint64_t before = status_kib("VmRSS:");
        pthread_t a, b;
        pthread_create(&a, NULL, grab_until_refused, (void *)1);
        pthread_create(&b, NULL, grab_until_refused, (void *)2);
        pthread_join(a, NULL);
        pthread_join(b, NULL);
        uint64_t peak = status_kib("VmHWM:");
        printf("allocator=%s storm_peak_above_start_mib=%llu\n", bench_allocator(),
               (unsigned long long)((peak - before) >> 10));
        return 0;
    }
    if (strcmp(what, "freed") == 0) {
        static void *blocks[MAX_BLOCKS];
        uint64_t state = 7, total = 0;
        size_t n = 0;
        uint64_t at_start = counted();
        while (total < 256ull * MIB && n < MAX_BLOCKS) {
            size_t size = 4096 + bench_random(&state) % MIB;
            char *p = malloc(size);
            if (p == NULL)
                break;
            memset(p, 1, size);
            blocks[n++] = p;
            total += size;
        }
        uint64_t full = counted();
        for (size_t i = 0; i < n; i++)
            free(blocks[i]);
        uint64_t right_after = counted();
        sleep(2);
        printf("allocator=%s counted_at_start_mib=%.1f counted_with_256mib_live_mib=%.1f "
               "counted_after_free_mib=%.1f counted_2s_later_mib=%.1f rss_2s_later_mib=%.1f\n",
               bench_allocator(), at_start / (double)MIB, full / (double)MIB, right_after / (double)MIB,
               counted() / (double)MIB, status_kib("VmRSS:") / 1024.0);
        return 0;
    }
    fprintf(stderr, "usage: budget_check refusal|storm|freed\n");
    return 2;
}
