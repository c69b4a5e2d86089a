/*
 * mstress.c - a stress mix: threads allocate objects of mostly small but sometimes large
 * sizes (up to 256 KiB), keep a working set, free at random, and pass some objects to a
 * shared exchange area where another thread picks them up and frees them; threads are
 * restarted in rounds.
 *
 * usage: mstress [THREADS] [ROUNDS] [OPS_PER_THREAD_PER_ROUND]
 */
#include "common.h"
#include <stdatomic.h>
#include <string.h>

enum { MAX_THREADS = 64, KEEP = 512, EXCHANGE = 1024 };

static _Atomic(void *) exchange[EXCHANGE];

struct task {
    uint64_t ops;
    uint64_t seed;
    uint64_t checksum;
};

static size_t pick_size(uint64_t r)
{
    if ((r & 1023) == 0)
        return 16384 + (r >> 20) % (256 * 1024 - 16384); /* rare large */
    if ((r & 31) == 0)
        return 1024 + (r >> 20) % 15360; /* some medium */
    return 8 + (r >> 20) % 505; /* mostly small */
}

static void *stress(void *argument)
{
    struct task *task = argument;
    uint64_t state = task->seed;
    void *keep[KEEP] = {0};
    for (uint64_t i = 0; i < task->ops; i++) {
        uint64_t r = bench_random(&state);
        size_t size = pick_size(r);
        unsigned char *block = malloc(size);
        if (block == NULL)
            bench_fail("mstress", "malloc");
        memset(block, (int)(r & 0xff), size < 64 ? size : 64);
        task->checksum += block[0];
        size_t slot = (r >> 8) % KEEP;
        if ((r & 7) == 0) {
            /* hand it over: whoever finds it there frees it */
            void *old = atomic_exchange(&exchange[(r >> 16) % EXCHANGE], block);
            free(old);
        } else {
            free(keep[slot]);
            keep[slot] = block;
        }
    }
    for (size_t s = 0; s < KEEP; s++)
        free(keep[s]);
    return NULL;
}

int main(int argc, char **argv)
{
    int threads = (int)bench_arg(argc, argv, 1, 2);
    uint64_t rounds = bench_arg(argc, argv, 2, 10);
    uint64_t ops = bench_arg(argc, argv, 3, 100000);
    if (threads < 1 || threads > MAX_THREADS)
        bench_fail("mstress", "THREADS in 1..64");
    struct task tasks[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    uint64_t checksum = 0;
    for (uint64_t round = 0; round < rounds; round++) {
        for (int t = 0; t < threads; t++) {
            tasks[t] = (struct task){ops, round * 131 + t + 1, 0};
            if (pthread_create(&ids[t], NULL, stress, &tasks[t]) != 0)
                bench_fail("mstress", "pthread_create");
        }
        for (int t = 0; t < threads; t++) {
            pthread_join(ids[t], NULL);
            checksum += tasks[t].checksum;
        }
    }
    for (size_t e = 0; e < EXCHANGE; e++)
        free(atomic_exchange(&exchange[e], NULL));
    bench_report(checksum);
    return 0;
}
