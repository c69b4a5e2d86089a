/*
 * traps.c - the traps of DESIGN.md that need a running program to show:
 * a signal storm while threads allocate (signal handlers must only set a
 * flag), the shim's own work left out of the ledger (its Rust allocations go
 * straight to jemalloc), and glibc internals that still work at the budget
 * (they abort on a NULL from malloc, which is what the reserve is for).
 */
#include "shimcheck.h"

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>

#define STORM_SIGNALS 100
#define STORM_THREADS 2
#define DEADLOCK_ALARM_SECONDS 30
#define BUDGET_BLOCK_BYTES (1 * MIB)
#define MAX_BUDGET_BLOCKS 4096

typedef int (*dump_fn)(int fd, int json);

static atomic_int storm_running;

static void *allocate_until_told(void *arg)
{
    unsigned seed = (unsigned)(uintptr_t)arg;
    void *slots[64] = {0};
    while (atomic_load(&storm_running)) {
        seed = seed * 1103515245u + 12345u;
        unsigned k = (seed >> 8) % 64;
        free(slots[k]);
        /* Mostly small blocks, now and then one large enough for the tracker. */
        size_t size = (seed >> 16) % 16 == 0 ? 2 * MIB : 16 + (seed >> 12) % 4000;
        slots[k] = malloc(size);
    }
    for (int k = 0; k < 64; k++)
        free(slots[k]);
    return NULL;
}

static void signal_storm_during_allocation_neither_deadlocks_nor_crashes(void)
{
    /* A deadlock ends the program with SIGALRM, which the test reports. */
    alarm(DEADLOCK_ALARM_SECONDS);
    atomic_store(&storm_running, 1);
    pthread_t threads[STORM_THREADS];
    for (int i = 0; i < STORM_THREADS; i++)
        REQUIRE(pthread_create(&threads[i], NULL, allocate_until_told, (void *)(uintptr_t)(i + 1)) == 0,
                "expected pthread_create to succeed");
    for (int i = 0; i < STORM_SIGNALS; i++) {
        EXPECT(raise(SIGUSR2) == 0, "expected raise(SIGUSR2) to succeed");
        usleep(1000);
    }
    atomic_store(&storm_running, 0);
    for (int i = 0; i < STORM_THREADS; i++)
        pthread_join(threads[i], NULL);
    alarm(0);
}

/* How long one signalled dump may take to appear before the case gives up on it. */
#define DUMP_APPEAR_MS 10000

/* Waits until the monitor has written the dump file at `path` (it appears whole, by rename). */
static int wait_for_file(const char *path)
{
    for (int waited = 0; waited < DUMP_APPEAR_MS; waited++) {
        if (access(path, F_OK) == 0)
            return 1;
        usleep(1000);
    }
    return 0;
}

/* QVSHIM_DUMP_FILE must name a plain file (the row sets it): each signalled dump is waited for
 * before the next signal, so the 20 signals give 20 dumps instead of merging into a few, and live
 * is compared only after the monitor has written every one. */
static void shim_own_work_leaves_the_ledger_alone(void)
{
    dump_fn dump = (dump_fn)dlsym(RTLD_DEFAULT, "qvshim_dump");
    REQUIRE(dump != NULL, "expected qvshim_dump to be exported by the shim");
    const char *path = getenv("QVSHIM_DUMP_FILE");
    REQUIRE(path != NULL && strchr(path, '%') == NULL,
            "expected QVSHIM_DUMP_FILE to name one plain file (the test row sets it), got %s",
            path ? path : "nothing");
    FILE *sink = fopen("/dev/null", "w");
    REQUIRE(sink != NULL, "expected /dev/null to open");
    int fd = fileno(sink);
    uint64_t before = host_live();
    int signalled = 0;
    for (int i = 0; i < 20; i++) {
        EXPECT(dump(fd, i % 2) == 0, "expected qvshim_dump to return 0");
        unlink(path);
        raise(SIGUSR2);
        if (wait_for_file(path))
            signalled++;
    }
    EXPECT(signalled == 20, "expected the monitor to write a dump for each of 20 signals, saw %d",
           signalled);
    EXPECT_LIVE_BACK("20 dumps written by the caller and 20 by the monitor", before);
    fclose(sink);
}

static void dump_requested_just_before_exit(void)
{
    /* The monitor starts writing while main returns: the exit path must finish that dump (or
     * write it itself), never leave an empty or half-written file. The test reads the file. */
    EXPECT(raise(SIGUSR2) == 0, "expected raise(SIGUSR2) to succeed");
}

static void *small_allocation(void *arg)
{
    (void)arg;
    void *p = malloc(100);
    free(p);
    return p;
}

static void glibc_internals_still_work_at_the_budget(void)
{
    static void *blocks[MAX_BUDGET_BLOCKS];
    int n = 0;
    while (n < MAX_BUDGET_BLOCKS && (blocks[n] = malloc(BUDGET_BLOCK_BYTES)) != NULL)
        n++;
    REQUIRE(n < MAX_BUDGET_BLOCKS, "expected the budget to refuse a 1 MiB block before %d of them",
            MAX_BUDGET_BLOCKS);
    EXPECT(errno == ENOMEM, "expected the refusal to set ENOMEM, got %d", errno);

    /* Thread creation allocates its TLS blocks with calloc. */
    pthread_t thread;
    int rc = pthread_create(&thread, NULL, small_allocation, NULL);
    EXPECT(rc == 0, "expected pthread_create to work at the budget, got %d", rc);
    if (rc == 0)
        pthread_join(thread, NULL);

    /* A failed dlopen builds its error message with malloc. */
    void *missing = dlopen("libqvshim-no-such-library.so", RTLD_NOW);
    EXPECT(missing == NULL, "expected dlopen of a missing library to fail");
    const char *message = dlerror();
    EXPECT(message != NULL && strstr(message, "no-such-library") != NULL,
           "expected dlerror to name the missing library, got %s", message ? message : "(null)");

    /* stdio's buffers and strdup are plain small allocations too. */
    char *copy = strdup("still works");
    EXPECT(copy != NULL && strcmp(copy, "still works") == 0, "expected strdup to work at the budget");
    free(copy);

    for (int i = 0; i < n; i++)
        free(blocks[i]);
    void *again = malloc(BUDGET_BLOCK_BYTES);
    EXPECT(again != NULL, "expected a 1 MiB block to fit again after freeing");
    free(again);
}

static pthread_key_t exit_key;

/* Runs at thread exit, after the shim's own thread-exit destructor may already have run. */
static void free_at_thread_exit(void *p)
{
    free(p);
    free(malloc(5000));
}

static void *allocate_then_exit(void *arg)
{
    (void)arg;
    pthread_setspecific(exit_key, malloc(777));
    void *blocks[100];
    for (int i = 0; i < 100; i++)
        blocks[i] = malloc(16 + (size_t)i * 97);
    for (int i = 0; i < 100; i++)
        free(blocks[i]);
    return NULL;
}

static void frees_in_thread_exit_destructors_are_counted(void)
{
    REQUIRE(pthread_key_create(&exit_key, free_at_thread_exit) == 0, "expected a pthread key");
    uint64_t before = 0;
    /* glibc keeps a little memory for each thread it has run (cached stacks' TLS vectors):
     * the first rounds fill those caches; the last must come back to the byte. */
    for (int round = 0; round < 3; round++) {
        before = host_live();
        pthread_t threads[4];
        for (int i = 0; i < 4; i++)
            REQUIRE(pthread_create(&threads[i], NULL, allocate_then_exit, NULL) == 0,
                    "expected pthread_create to succeed");
        for (int i = 0; i < 4; i++)
            pthread_join(threads[i], NULL);
    }
    EXPECT_LIVE_BACK("threads whose key destructors freed memory at exit", before);
}

static pthread_key_t realloc_key;

/* Runs after the shim's own thread-exit destructor (its key was made first): a realloc that
 * shrinks a block, settled by a thread that has given its credit slot back. */
static void realloc_at_thread_exit(void *p)
{
    free(p);
    void *r = malloc(64 * KIB);
    void *shrunk = r != NULL ? realloc(r, 100) : NULL;
    free(shrunk != NULL ? shrunk : r);
}

static void *set_realloc_key_then_exit(void *arg)
{
    (void)arg;
    pthread_setspecific(realloc_key, malloc(777));
    free(malloc(100));
    return NULL;
}

static void a_realloc_in_a_thread_exit_destructor_keeps_live_exact(void)
{
    REQUIRE(pthread_key_create(&realloc_key, realloc_at_thread_exit) == 0, "expected a pthread key");
    uint64_t before = 0;
    /* The first round fills glibc's caches for a thread (see above); the second is measured. */
    for (int round = 0; round < 2; round++) {
        before = host_live();
        pthread_t thread;
        REQUIRE(pthread_create(&thread, NULL, set_realloc_key_then_exit, NULL) == 0,
                "expected pthread_create to succeed");
        pthread_join(thread, NULL);
    }
    EXPECT_LIVE_BACK("a thread whose key destructor shrank a block with realloc and freed it", before);
    struct qvshim_pool_stats s = host_stats();
    EXPECT(s.peak < 64 * MIB && s.level == QVSHIM_LEVEL_NORMAL,
           "expected the peak under 64 MiB and the level normal after 64 KiB blocks, got peak %llu, level %d",
           (unsigned long long)s.peak, s.level);
}

static const struct check_case cases[] = {
    CASE(signal_storm_during_allocation_neither_deadlocks_nor_crashes),
    CASE(shim_own_work_leaves_the_ledger_alone),
    CASE(dump_requested_just_before_exit),
    CASE(glibc_internals_still_work_at_the_budget),
    CASE(frees_in_thread_exit_destructors_are_counted),
    CASE(a_realloc_in_a_thread_exit_destructor_keeps_live_exact),
};

int main(int argc, char **argv)
{
    return RUN_CASES(cases, argc, argv);
}
