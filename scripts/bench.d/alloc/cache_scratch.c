/*
 * cache_scratch.c - passive false sharing: the main thread allocates one small object per
 * worker, back to back (so they share cache lines); each worker frees its object and then
 * repeatedly allocates an object of the same size, writes it many times and frees it. An
 * allocator that hands the freed neighbour's memory back to another thread makes the workers
 * fight over one cache line.
 *
 * usage: cache_scratch [THREADS] [ITERATIONS] [OBJECT_BYTES] [WRITES]
 */
#include "common.h"

enum { MAX_THREADS = 64 };

struct task {
    char *first;
    uint64_t iterations;
    size_t bytes;
    uint64_t writes;
    uint64_t checksum;
};

static void *scratch(void *argument)
{
    struct task *task = argument;
    free(task->first);
    for (uint64_t i = 0; i < task->iterations; i++) {
        volatile char *object = malloc(task->bytes);
        if (object == NULL)
            bench_fail("cache_scratch", "malloc");
        for (uint64_t w = 0; w < task->writes; w++)
            for (size_t b = 0; b < task->bytes; b++)
                object[b] = (char)(object[b] + 1);
        task->checksum += (unsigned char)object[0];
        free((void *)object);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    int threads = (int)bench_arg(argc, argv, 1, 2);
    uint64_t iterations = bench_arg(argc, argv, 2, 1000000);
    size_t bytes = (size_t)bench_arg(argc, argv, 3, 8);
    uint64_t writes = bench_arg(argc, argv, 4, 10);
    if (threads < 1 || threads > MAX_THREADS || bytes == 0)
        bench_fail("cache_scratch", "THREADS in 1..64 and OBJECT_BYTES > 0");
    struct task tasks[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    for (int t = 0; t < threads; t++) {
        char *first = malloc(bytes);
        if (first == NULL)
            bench_fail("cache_scratch", "malloc");
        first[0] = 0;
        tasks[t] = (struct task){first, iterations / threads, bytes, writes, 0};
    }
    for (int t = 0; t < threads; t++)
        if (pthread_create(&ids[t], NULL, scratch, &tasks[t]) != 0)
            bench_fail("cache_scratch", "pthread_create");
    uint64_t checksum = 0;
    for (int t = 0; t < threads; t++) {
        pthread_join(ids[t], NULL);
        checksum += tasks[t].checksum;
    }
    bench_report(checksum);
    return 0;
}
