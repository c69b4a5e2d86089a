/*
 * pool_workload.c - allocations that reach the pool itself, for scripts/bench-tree.
 *
 * usage: pool_workload THREADS OPS
 *
 * Each thread, OPS/THREADS times, allocates a block of 256 KiB (past what a thread's credit
 * covers, so every allocation charges the pool and every free gives back to it: in tree scope,
 * the shared ledger), writes its first and last byte, and frees it. The whole run is timed from
 * outside; this prints a checksum so no work can be optimised out.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

enum { BLOCK_BYTES = 256 << 10, MAX_THREADS = 64 };

static uint64_t ops_per_thread;

static void *work(void *arg)
{
    uint64_t sum = 0;
    for (uint64_t i = 0; i < ops_per_thread; i++) {
        volatile char *p = malloc(BLOCK_BYTES);
        if (!p)
            abort();
        p[0] = (char)i;
        p[BLOCK_BYTES - 1] = (char)i;
        sum += (uint64_t)p[0] + (uint64_t)p[BLOCK_BYTES - 1];
        free((void *)p);
    }
    *(uint64_t *)arg = sum;
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s THREADS OPS\n", argv[0]);
        return 2;
    }
    int threads = atoi(argv[1]);
    if (threads < 1 || threads > MAX_THREADS)
        return 2;
    ops_per_thread = strtoull(argv[2], NULL, 10) / (uint64_t)threads;
    pthread_t t[MAX_THREADS];
    uint64_t sums[MAX_THREADS] = {0};
    for (int i = 0; i < threads; i++)
        pthread_create(&t[i], NULL, work, &sums[i]);
    uint64_t total = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(t[i], NULL);
        total += sums[i];
    }
    printf("checksum %llu\n", (unsigned long long)total);
    return 0;
}
