/*
 * malloc_thread.c - in the manner of glibc's bench-malloc-thread: each thread keeps a
 * working set of slots and replaces a random slot's block with a new one, sizes drawn from a
 * distribution that falls off with size (most under 256 bytes, a tail to 32 KiB).
 *
 * usage: malloc_thread [THREADS] [OPS_PER_THREAD]
 */
#include "common.h"

enum { MAX_THREADS = 64, SLOTS = 1024, MAX_BYTES = 32768 };

struct task {
    uint64_t ops;
    uint64_t seed;
    uint64_t checksum;
};

static size_t pick_size(uint64_t r)
{
    /* a size class chosen with probability falling as 1/size: 2^(4 + k) with k geometric */
    unsigned k = 0;
    uint64_t bits = r >> 16;
    while ((bits & 1) && k < 11) {
        k++;
        bits >>= 1;
    }
    size_t top = (size_t)16 << k;
    size_t size = top / 2 + (r & 0xffff) % (top / 2 + 1);
    return size > MAX_BYTES ? MAX_BYTES : (size ? size : 1);
}

static void *work(void *argument)
{
    struct task *task = argument;
    uint64_t state = task->seed;
    void *slots[SLOTS] = {0};
    for (uint64_t i = 0; i < task->ops; i++) {
        uint64_t r = bench_random(&state);
        size_t slot = (r >> 48) % SLOTS;
        free(slots[slot]);
        size_t size = pick_size(r);
        char *block = malloc(size);
        if (block == NULL)
            bench_fail("malloc_thread", "malloc");
        block[0] = (char)r;
        task->checksum += (unsigned char)block[0];
        slots[slot] = block;
    }
    for (size_t s = 0; s < SLOTS; s++)
        free(slots[s]);
    return NULL;
}

int main(int argc, char **argv)
{
    int threads = (int)bench_arg(argc, argv, 1, 2);
    uint64_t ops = bench_arg(argc, argv, 2, 5000000);
    if (threads < 1 || threads > MAX_THREADS)
        bench_fail("malloc_thread", "THREADS in 1..64");
    struct task tasks[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    for (int t = 0; t < threads; t++) {
        tasks[t] = (struct task){ops, (uint64_t)t * 104729 + 1, 0};
        if (pthread_create(&ids[t], NULL, work, &tasks[t]) != 0)
            bench_fail("malloc_thread", "pthread_create");
    }
    uint64_t checksum = 0;
    for (int t = 0; t < threads; t++) {
        pthread_join(ids[t], NULL);
        checksum += tasks[t].checksum;
    }
    bench_report(checksum);
    return 0;
}
