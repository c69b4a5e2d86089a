/*
 * threads.c - the ledger stays exact when blocks cross threads and threads
 * exit: host live returns to the byte where it started.
 *
 * glibc keeps a thread's stack, and the TLS vector it calloc'ed for it, in a
 * stack cache after the thread exits. So every case first runs one warm-up
 * round with the same number of threads and the same small stack size; the
 * later rounds reuse those cached stacks and allocate nothing behind our
 * back. The starting value is read after the warm-up.
 */
#include "shimcheck.h"

#include <pthread.h>

#define N_THREADS 8
#define BLOCKS_PER_THREAD 400
#define ROUNDS 5
#define THREAD_STACK_BYTES (256 * KIB)

static void *blocks[N_THREADS][BLOCKS_PER_THREAD];
static size_t usable_sum[N_THREADS];
static pthread_barrier_t barrier;
static uint64_t live_with_all_blocks;

/* Sizes from 16 bytes to 256 KiB, different for every thread and block. */
static size_t block_size(int thread, int i)
{
    return (size_t)16 << ((thread + i) % 15);
}

static void allocate_own_blocks(int t)
{
    usable_sum[t] = 0;
    for (int i = 0; i < BLOCKS_PER_THREAD; i++) {
        size_t n = block_size(t, i);
        void *p = malloc(n);
        REQUIRE(p != NULL, "expected malloc(%zu) in thread %d to succeed", n, t);
        memset(p, t, n);
        blocks[t][i] = p;
        usable_sum[t] += malloc_usable_size(p);
    }
}

static void free_blocks_of(int owner)
{
    for (int i = 0; i < BLOCKS_PER_THREAD; i++) {
        free(blocks[owner][i]);
        blocks[owner][i] = NULL;
    }
}

/* Allocate, wait for everyone, let thread 0 read live, free the next thread's blocks. */
static void *swap_and_free_worker(void *arg)
{
    int t = (int)(intptr_t)arg;
    allocate_own_blocks(t);
    pthread_barrier_wait(&barrier);
    if (t == 0)
        live_with_all_blocks = host_live();
    pthread_barrier_wait(&barrier);
    free_blocks_of((t + 1) % N_THREADS);
    return NULL;
}

static void *allocate_and_exit_worker(void *arg)
{
    allocate_own_blocks((int)(intptr_t)arg);
    return NULL;
}

static void *allocate_free_own_and_exit_worker(void *arg)
{
    int t = (int)(intptr_t)arg;
    allocate_own_blocks(t);
    free_blocks_of(t);
    return NULL;
}

static void run_threads(void *(*worker)(void *), int n)
{
    pthread_t tids[N_THREADS];
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, THREAD_STACK_BYTES);
    for (int t = 0; t < n; t++)
        REQUIRE(pthread_create(&tids[t], &attr, worker, (void *)(intptr_t)t) == 0,
                "expected pthread_create to succeed");
    for (int t = 0; t < n; t++)
        pthread_join(tids[t], NULL);
    pthread_attr_destroy(&attr);
}

static void warm_up_thread_stacks(void)
{
    run_threads(allocate_free_own_and_exit_worker, N_THREADS);
}

static void blocks_freed_by_other_threads_return_live_to_start(void)
{
    pthread_barrier_init(&barrier, NULL, N_THREADS);
    warm_up_thread_stacks();
    uint64_t start = host_live();
    for (int round = 0; round < ROUNDS; round++) {
        run_threads(swap_and_free_worker, N_THREADS);
        size_t total = 0;
        for (int t = 0; t < N_THREADS; t++)
            total += usable_sum[t];
        EXPECT(live_with_all_blocks >= start + total,
               "expected live >= start %llu + %zu bytes of live blocks in round %d, got %llu",
               (unsigned long long)start, total, round, (unsigned long long)live_with_all_blocks);
        uint64_t now = host_live();
        EXPECT(now == start, "expected live back at %llu after round %d (threads freed each other's blocks "
                             "and exited), got %llu (difference %lld)",
               (unsigned long long)start, round, (unsigned long long)now, (long long)(now - start));
    }
    pthread_barrier_destroy(&barrier);
}

static void blocks_of_exited_threads_stay_counted_until_freed(void)
{
    warm_up_thread_stacks();
    uint64_t start = host_live();
    for (int round = 0; round < ROUNDS; round++) {
        run_threads(allocate_and_exit_worker, N_THREADS);
        size_t total = 0;
        for (int t = 0; t < N_THREADS; t++)
            total += usable_sum[t];
        uint64_t held = host_live();
        EXPECT(held >= start + total,
               "expected blocks of exited threads to stay counted: live >= %llu, got %llu in round %d",
               (unsigned long long)(start + total), (unsigned long long)held, round);
        for (int t = 0; t < N_THREADS; t++)
            free_blocks_of(t);
        EXPECT_LIVE_BACK("the main thread freed the blocks of exited threads", start);
    }
}

static void many_short_lived_threads_leave_live_unchanged(void)
{
    warm_up_thread_stacks();
    uint64_t start = host_live();
    for (int round = 0; round < 25; round++)
        run_threads(allocate_free_own_and_exit_worker, N_THREADS);
    EXPECT_LIVE_BACK("200 threads that each allocated, freed and exited", start);
}

/* A block large enough for the large-allocation table (1 MiB and up), allocated by the main
 * thread for the worker below to free. */
#define FOREIGN_LARGE_BLOCK_BYTES (2 * MIB)
static void *foreign_large_block;

/* The blocks of thread 0 (allocated by the main thread) and one large block, freed by a thread
 * that has not allocated yet, which then allocates and frees blocks of its own. */
static void *free_foreign_then_own_worker(void *arg)
{
    (void)arg;
    free(foreign_large_block);
    foreign_large_block = NULL;
    free_blocks_of(0);
    allocate_free_own_and_exit_worker((void *)(intptr_t)1);
    return NULL;
}

static void a_thread_that_frees_before_it_allocates_keeps_live_exact(void)
{
    warm_up_thread_stacks();
    uint64_t start = host_live();
    for (int round = 0; round < ROUNDS; round++) {
        allocate_own_blocks(0);
        foreign_large_block = malloc(FOREIGN_LARGE_BLOCK_BYTES);
        REQUIRE(foreign_large_block != NULL, "expected malloc(2 MiB) to succeed");
        memset(foreign_large_block, 3, FOREIGN_LARGE_BLOCK_BYTES);
        uint64_t held = usable_sum[0] + malloc_usable_size(foreign_large_block);
        EXPECT(host_live() >= start + held, "expected live >= %llu with the main thread's blocks, got %llu",
               (unsigned long long)(start + held), (unsigned long long)host_live());
        run_threads(free_foreign_then_own_worker, 1);
        EXPECT_LIVE_BACK("a new thread freed the main thread's blocks, then allocated and freed its own", start);
    }
}

static void *first_free_then_malloc_worker(void *arg)
{
    void **slot = arg;
    free(slot[0]);
    slot[1] = malloc(8);
    return NULL;
}

/* jemalloc sends the frees of a thread that has not allocated yet back to the arena, not into
 * a thread cache, so the first new thread's first malloc does not hand it the block another
 * thread allocated that it has just freed (nor, with it, a cache line the other thread's
 * blocks share: cache-scratch's passive false sharing, 4.6x slower when the shim changed it).
 * Only the process's first new thread is checked: later ones may be handed the same block
 * from the arena under bare jemalloc as well. */
static void a_new_thread_does_not_get_back_the_foreign_block_it_freed_first(void)
{
    void *pair[2] = {malloc(8), NULL};
    void *neighbour = malloc(8);
    REQUIRE(pair[0] != NULL && neighbour != NULL, "expected malloc(8) to succeed");
    pthread_t tid;
    REQUIRE(pthread_create(&tid, NULL, first_free_then_malloc_worker, pair) == 0,
            "expected pthread_create to succeed");
    pthread_join(tid, NULL);
    EXPECT(pair[1] != NULL && pair[1] != pair[0],
           "expected the new thread's malloc(8) to return a block of its own, as under bare jemalloc; "
           "got %p, the main thread's block it had just freed", pair[0]);
    free(pair[1]);
    free(neighbour);
}

static const struct check_case cases[] = {
    CASE(a_thread_that_frees_before_it_allocates_keeps_live_exact),
    CASE(a_new_thread_does_not_get_back_the_foreign_block_it_freed_first),
    CASE(blocks_freed_by_other_threads_return_live_to_start),
    CASE(blocks_of_exited_threads_stay_counted_until_freed),
    CASE(many_short_lived_threads_leave_live_unchanged),
};

int main(int argc, char **argv)
{
    return RUN_CASES(cases, argc, argv);
}
