/*
 * shimcheck.h - the small harness every C test program shares.
 *
 * A test program holds a table of cases; `prog NAME` runs one case and
 * prints "PASS NAME" (exit 0) or one "FAIL file:line: expected ..., got ..."
 * line per broken expectation (exit 1). `prog --list` prints the case
 * names so pytest can check that its table covers every case. Names that
 * start with '_' are helpers (an exec target, say) and are not listed.
 *
 * Nothing here allocates once main() has started a case: stdout is made
 * unbuffered before anything is printed, and qvshim_pool_stats is looked up
 * before the case runs, so the ledger sees only the case's own allocations.
 */
#ifndef SHIMCHECK_H
#define SHIMCHECK_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <dlfcn.h>
#include <errno.h>
#include <malloc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "qvshim.h"

#define KIB ((size_t)1024)
#define MIB (1024 * KIB)
#define GIB (1024 * MIB)

/* Largest request the shim may serve past the budget from its reserve. */
#define RESERVE_ELIGIBLE_MAX_BYTES (64 * KIB)

static int check_failures;

#define EXPECT(cond, ...)                                                      \
    do {                                                                       \
        if (!(cond)) {                                                         \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);                        \
            printf(__VA_ARGS__);                                               \
            printf("\n");                                                      \
            check_failures++;                                                  \
        }                                                                      \
    } while (0)

/* Stop the case at once: what follows would only repeat the same failure. */
#define REQUIRE(cond, ...)                                                     \
    do {                                                                       \
        if (!(cond)) {                                                         \
            EXPECT(cond, __VA_ARGS__);                                         \
            exit(1);                                                           \
        }                                                                      \
    } while (0)

typedef int (*pool_stats_fn)(int pool, struct qvshim_pool_stats *out);

static pool_stats_fn shim_pool_stats_fn;

static inline pool_stats_fn lookup_pool_stats(void)
{
    if (shim_pool_stats_fn == NULL)
        shim_pool_stats_fn = (pool_stats_fn)dlsym(RTLD_DEFAULT, "qvshim_pool_stats");
    return shim_pool_stats_fn;
}

static inline struct qvshim_pool_stats host_stats(void)
{
    struct qvshim_pool_stats s;
    memset(&s, 0, sizeof s);
    s.struct_size = sizeof s;
    pool_stats_fn f = lookup_pool_stats();
    REQUIRE(f != NULL, "expected qvshim_pool_stats to be found with dlsym(RTLD_DEFAULT), "
                       "got NULL: libqvshim.so is not preloaded");
    int rc = f(QVSHIM_POOL_HOST, &s);
    REQUIRE(rc == 0, "expected qvshim_pool_stats(0, &s) to return 0, got %d", rc);
    return s;
}

static inline uint64_t host_live(void)
{
    return host_stats().live;
}

/* The block must be the shim's: host live grew by at least its usable size. */
#define EXPECT_COUNTED(what, p, live_before)                                   \
    do {                                                                       \
        uint64_t live_now_ = host_live();                                      \
        size_t usable_ = malloc_usable_size(p);                                \
        EXPECT(live_now_ >= (live_before) + usable_,                           \
               "expected %s to add at least its usable size %zu to host live " \
               "(was %llu), got live %llu",                                    \
               what, usable_, (unsigned long long)(live_before),               \
               (unsigned long long)live_now_);                                 \
    } while (0)

/* After the frees, host live must be back exactly where it started. */
#define EXPECT_LIVE_BACK(what, live_before)                                    \
    do {                                                                       \
        uint64_t live_now_ = host_live();                                      \
        EXPECT(live_now_ == (live_before),                                     \
               "expected host live back at %llu after %s, got %llu "           \
               "(difference %lld)",                                            \
               (unsigned long long)(live_before), what,                        \
               (unsigned long long)live_now_,                                  \
               (long long)(live_now_ - (live_before)));                        \
    } while (0)

/* The path of the loaded libqvshim.so, from the address of its API. */
static inline const char *shim_path(void)
{
    Dl_info info;
    void *api = (void *)lookup_pool_stats();
    REQUIRE(api != NULL, "expected libqvshim.so to be loaded, qvshim_pool_stats not found");
    REQUIRE(dladdr(api, &info) != 0 && info.dli_fname != NULL,
            "expected dladdr to name the library holding qvshim_pool_stats");
    return info.dli_fname;
}

static inline int same_file(const char *a, const char *b)
{
    struct stat sa, sb;
    if (stat(a, &sa) != 0 || stat(b, &sb) != 0)
        return 0;
    return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

/* Name of the file that defines the symbol at addr, or "(unknown)". */
static inline const char *defining_file(void *addr)
{
    Dl_info info;
    if (addr == NULL || dladdr(addr, &info) == 0 || info.dli_fname == NULL)
        return "(unknown)";
    return info.dli_fname;
}

/* Fill a block with a pattern that depends on the position, and check it. */
static inline void fill_pattern(void *p, size_t n, unsigned seed)
{
    unsigned char *b = (unsigned char *)p;
    for (size_t i = 0; i < n; i++)
        b[i] = (unsigned char)(i * 31u + seed);
}

static inline size_t first_pattern_mismatch(const void *p, size_t n, unsigned seed)
{
    const unsigned char *b = (const unsigned char *)p;
    for (size_t i = 0; i < n; i++)
        if (b[i] != (unsigned char)(i * 31u + seed))
            return i;
    return n;
}

struct check_case {
    const char *name;
    void (*run)(void);
    int measures_start_up; /* runs at once, without waiting for a quiet ledger */
};

/* How long host live must stay unchanged before a case starts, and the most
 * we wait for that. See wait_for_quiet_ledger. */
#define QUIET_LEDGER_MS 50
#define QUIET_LEDGER_GIVE_UP_MS 5000

/*
 * The shim's start-up may still be allocating on its own thread when main
 * runs (test_start_up in malloc_family.c reports that as a failure of its
 * own). Every other case waits until host live has not moved for
 * QUIET_LEDGER_MS, so its exact before/after comparisons measure the case
 * alone. Returns 0 when the ledger never settled.
 */
static inline int wait_for_quiet_ledger(void)
{
    uint64_t last = host_live();
    int quiet_ms = 0;
    for (int waited_ms = 0; waited_ms < QUIET_LEDGER_GIVE_UP_MS; waited_ms++) {
        usleep(1000);
        uint64_t now = host_live();
        if (now == last) {
            if (++quiet_ms >= QUIET_LEDGER_MS)
                return 1;
        } else {
            last = now;
            quiet_ms = 0;
        }
    }
    return 0;
}

static inline int run_check_cases(const struct check_case *cases, size_t n_cases, int argc, char **argv)
{
    setvbuf(stdout, NULL, _IONBF, 0);
    setvbuf(stderr, NULL, _IONBF, 0);
    if (argc != 2) {
        printf("usage: %s CASE | --list\n", argv[0]);
        return 2;
    }
    if (strcmp(argv[1], "--list") == 0) {
        for (size_t i = 0; i < n_cases; i++)
            if (cases[i].name[0] != '_')
                printf("%s\n", cases[i].name);
        return 0;
    }
    for (size_t i = 0; i < n_cases; i++) {
        if (strcmp(argv[1], cases[i].name) == 0) {
            (void)lookup_pool_stats();
            if (!cases[i].measures_start_up && lookup_pool_stats() != NULL)
                EXPECT(wait_for_quiet_ledger(),
                       "expected host live to stay unchanged for %d ms within %d ms of start "
                       "while the program allocates nothing",
                       QUIET_LEDGER_MS, QUIET_LEDGER_GIVE_UP_MS);
            cases[i].run();
            if (check_failures == 0) {
                printf("PASS %s\n", cases[i].name);
                return 0;
            }
            return 1;
        }
    }
    printf("unknown case %s\n", argv[1]);
    return 2;
}

#define CASE(fn) { #fn, fn, 0 }
#define START_UP_CASE(fn) { #fn, fn, 1 }
#define RUN_CASES(cases, argc, argv)                                           \
    run_check_cases(cases, sizeof(cases) / sizeof((cases)[0]), argc, argv)

#endif /* SHIMCHECK_H */
