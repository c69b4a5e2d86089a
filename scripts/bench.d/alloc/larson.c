/*
 * larson.c - server-style churn: worker threads replace random blocks of a shared-out
 * working set, and each round's working sets move on to the next thread, so most frees
 * happen on a thread other than the one that allocated.
 *
 * usage: larson [THREADS] [ROUNDS] [OPS_PER_ROUND]
 *
 * Each of THREADS slot arrays holds SLOTS blocks of 16..1024 bytes. In a round, thread t
 * takes array (t + round) % THREADS and OPS_PER_ROUND times frees a random slot's block and
 * allocates a new one of a random size in its place. Threads are created anew each round, as a
 * server hands connections to fresh workers.
 */
#include "common.h"
#include <string.h>

enum { SLOTS = 2000, MIN_BYTES = 16, MAX_BYTES = 1024, MAX_THREADS = 64 };

struct task {
    void **slots;
    uint64_t ops;
    uint64_t seed;
    uint64_t checksum;
};

static void *churn(void *argument)
{
    struct task *task = argument;
    uint64_t state = task->seed;
    for (uint64_t i = 0; i < task->ops; i++) {
        uint64_t r = bench_random(&state);
        size_t slot = r % SLOTS;
        size_t size = MIN_BYTES + (r >> 32) % (MAX_BYTES - MIN_BYTES + 1);
        free(task->slots[slot]);
        unsigned char *block = malloc(size);
        if (block == NULL)
            bench_fail("larson", "malloc");
        block[0] = (unsigned char)r;
        block[size - 1] = (unsigned char)(r >> 8);
        task->slots[slot] = block;
        task->checksum += block[0];
    }
    return NULL;
}

int main(int argc, char **argv)
{
    int threads = (int)bench_arg(argc, argv, 1, 2);
    uint64_t rounds = bench_arg(argc, argv, 2, 40);
    uint64_t ops = bench_arg(argc, argv, 3, 100000);
    if (threads < 1 || threads > MAX_THREADS)
        bench_fail("larson", "THREADS in 1..64");
    void **arrays[MAX_THREADS];
    for (int t = 0; t < threads; t++) {
        arrays[t] = calloc(SLOTS, sizeof(void *));
        if (arrays[t] == NULL)
            bench_fail("larson", "calloc");
    }
    struct task tasks[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    uint64_t checksum = 0;
    for (uint64_t round = 0; round < rounds; round++) {
        for (int t = 0; t < threads; t++) {
            tasks[t] = (struct task){arrays[(t + round) % threads], ops, round * 977 + t + 1, 0};
            if (pthread_create(&ids[t], NULL, churn, &tasks[t]) != 0)
                bench_fail("larson", "pthread_create");
        }
        for (int t = 0; t < threads; t++) {
            pthread_join(ids[t], NULL);
            checksum += tasks[t].checksum;
        }
    }
    for (int t = 0; t < threads; t++) {
        for (size_t s = 0; s < SLOTS; s++)
            free(arrays[t][s]);
        free(arrays[t]);
    }
    bench_report(checksum);
    return 0;
}
