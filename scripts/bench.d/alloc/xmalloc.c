/*
 * xmalloc.c - producers allocate, consumers free: blocks handed between threads in
 * batches through one mutex-protected queue, as in a pipeline of worker pools.
 *
 * usage: xmalloc [PAIRS] [BLOCKS_PER_PRODUCER]
 *
 * PAIRS producer threads each allocate BLOCKS_PER_PRODUCER blocks of 8..256 bytes (a few
 * larger, up to 4 KiB), fill a batch of BATCH and push it; PAIRS consumer threads pop
 * batches, read each block and free it. Every free is a cross-thread free.
 */
#include "common.h"
#include <string.h>

enum { BATCH = 100, MAX_PAIRS = 32, MAX_QUEUED = 64 };

struct batch {
    struct batch *next;
    void *block[BATCH];
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t changed = PTHREAD_COND_INITIALIZER;
static struct batch *queue;
static int queued;
static int producers_left;

static uint64_t blocks_per_producer;

static void *produce(void *argument)
{
    uint64_t state = (uintptr_t)argument * 7919 + 1;
    for (uint64_t done = 0; done < blocks_per_producer; done += BATCH) {
        struct batch *b = malloc(sizeof *b);
        if (b == NULL)
            bench_fail("xmalloc", "malloc");
        for (int i = 0; i < BATCH; i++) {
            uint64_t r = bench_random(&state);
            size_t size = (r & 63) == 0 ? 256 + (r >> 40) % 3841 : 8 + (r >> 40) % 249;
            unsigned char *block = malloc(size);
            if (block == NULL)
                bench_fail("xmalloc", "malloc");
            block[0] = (unsigned char)size;
            b->block[i] = block;
        }
        pthread_mutex_lock(&lock);
        while (queued >= MAX_QUEUED)
            pthread_cond_wait(&changed, &lock);
        b->next = queue;
        queue = b;
        queued++;
        pthread_cond_broadcast(&changed);
        pthread_mutex_unlock(&lock);
    }
    pthread_mutex_lock(&lock);
    producers_left--;
    pthread_cond_broadcast(&changed);
    pthread_mutex_unlock(&lock);
    return NULL;
}

static void *consume(void *argument)
{
    uint64_t *checksum = argument;
    for (;;) {
        pthread_mutex_lock(&lock);
        while (queue == NULL && producers_left > 0)
            pthread_cond_wait(&changed, &lock);
        struct batch *b = queue;
        if (b == NULL) {
            pthread_mutex_unlock(&lock);
            return NULL;
        }
        queue = b->next;
        queued--;
        pthread_cond_broadcast(&changed);
        pthread_mutex_unlock(&lock);
        for (int i = 0; i < BATCH; i++) {
            *checksum += *(unsigned char *)b->block[i];
            free(b->block[i]);
        }
        free(b);
    }
}

int main(int argc, char **argv)
{
    int pairs = (int)bench_arg(argc, argv, 1, 1);
    blocks_per_producer = bench_arg(argc, argv, 2, 3000000);
    if (pairs < 1 || pairs > MAX_PAIRS)
        bench_fail("xmalloc", "PAIRS in 1..32");
    producers_left = pairs;
    pthread_t producers[MAX_PAIRS], consumers[MAX_PAIRS];
    uint64_t sums[MAX_PAIRS] = {0};
    for (int p = 0; p < pairs; p++) {
        if (pthread_create(&producers[p], NULL, produce, (void *)(uintptr_t)(p + 1)) != 0 ||
            pthread_create(&consumers[p], NULL, consume, &sums[p]) != 0)
            bench_fail("xmalloc", "pthread_create");
    }
    uint64_t checksum = 0;
    for (int p = 0; p < pairs; p++) {
        pthread_join(producers[p], NULL);
        pthread_join(consumers[p], NULL);
        checksum += sums[p];
    }
    bench_report(checksum);
    return 0;
}
