/*
 * common.h - what the allocator workloads of scripts/bench-alloc share: a cheap random
 * generator, a failure exit, and the one line each program prints (which allocator it ran
 * on, and a checksum so that no work can be optimised away).
 *
 * These programs are written for qvshim in the style of the classic allocator benchmarks
 * (cfrac, larson, xmalloc, cache-scratch, mstress, glibc's bench-malloc-simple and
 * bench-malloc-thread); they are not copies of them.
 */
#ifndef QVSHIM_BENCH_COMMON_H
#define QVSHIM_BENCH_COMMON_H
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

static inline uint64_t bench_random(uint64_t *state)
{
    /* xorshift64*: deterministic, a few cycles, enough to scatter sizes and slots */
    uint64_t x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static inline void bench_fail(const char *program, const char *what)
{
    fprintf(stderr, "%s: %s failed\n", program, what);
    exit(1);
}

static inline const char *bench_allocator(void)
{
    if (dlsym(RTLD_DEFAULT, "qvshim_extent_prototype") != NULL)
        return "qvshim-extent";
    if (dlsym(RTLD_DEFAULT, "qvshim_bench_forwarder") != NULL)
        return "jemalloc-same-build";
    if (dlsym(RTLD_DEFAULT, "qvshim_pool_stats") != NULL)
        return "qvshim";
    if (dlsym(RTLD_DEFAULT, "mallctl") != NULL)
        return "jemalloc";
    return "glibc";
}

static inline void bench_report(uint64_t checksum)
{
    printf("allocator=%s checksum=%llu\n", bench_allocator(), (unsigned long long)checksum);
}

static inline uint64_t bench_arg(int argc, char **argv, int index, uint64_t fallback)
{
    return argc > index ? strtoull(argv[index], NULL, 10) : fallback;
}

#endif
