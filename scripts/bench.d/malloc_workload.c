/*
 * malloc_workload.c - multi-threaded malloc workloads for scripts/bench.
 *
 * usage: malloc_workload small|mixed|prodcons THREADS OPS
 *
 *   small     each thread keeps a working set of WORKING_SET_SMALL slots and, OPS/THREADS
 *             times, frees a random slot's block (if any) and allocates a new one of
 *             16..512 bytes in its place, writing to it.
 *   mixed     the same with sizes from 16 B to 64 KiB (log-uniform, so small ones dominate
 *             as in real programs), and the malloc family mixed in: calloc, realloc of a
 *             live block, posix_memalign.
 *   prodcons  THREADS/2 producer/consumer pairs: the producer allocates 16..1024 bytes and
 *             passes the blocks, in batches, through a lock-free ring; the consumer reads and
 *             frees them, so every free is a cross-thread free. OPS blocks in all.
 *
 * The whole run is timed from outside (scripts/bench); this program prints one line:
 * the allocator it found itself running on, and a checksum so no work can be optimised out.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum {
    WORKING_SET_SMALL = 4096,
    WORKING_SET_MIXED = 1024,
    SMALL_MIN_BYTES = 16,
    SMALL_MAX_BYTES = 512,
    MIXED_MAX_LOG2 = 16, /* 64 KiB */
    PRODCONS_MAX_BYTES = 1024,
    RING_SLOTS = 4096, /* power of two */
    RING_BATCH = 256,
    MAX_THREADS = 64,
    SPINS_BEFORE_YIELD = 64,
};

struct worker {
    pthread_t thread;
    int index;
    uint64_t ops;
    uint64_t checksum;
    struct ring *ring; /* prodcons only */
};

/* A single-producer single-consumer ring of pointers. */
struct ring {
    _Alignas(64) _Atomic uint64_t head; /* next slot the producer writes */
    _Alignas(64) _Atomic uint64_t tail; /* next slot the consumer reads */
    _Alignas(64) void *slot[RING_SLOTS];
};

static uint64_t next_random(uint64_t *state)
{
    /* xorshift64*: cheap, deterministic, good enough to scatter sizes and slots */
    uint64_t x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static void fail(const char *what)
{
    fprintf(stderr, "malloc_workload: %s failed\n", what);
    exit(1);
}

/* Write the first and last byte: the block is really used, but the cost stays the allocator's. */
static void touch(unsigned char *block, size_t size, uint64_t value)
{
    block[0] = (unsigned char)value;
    block[size - 1] = (unsigned char)(value >> 8);
}

static void *run_small(void *arg)
{
    struct worker *w = arg;
    uint64_t rng = 0x9E3779B97F4A7C15ULL * (uint64_t)(w->index + 1);
    unsigned char *slot[WORKING_SET_SMALL] = {0};
    for (uint64_t i = 0; i < w->ops; i++) {
        uint64_t r = next_random(&rng);
        size_t k = r % WORKING_SET_SMALL;
        if (slot[k] != NULL) {
            w->checksum += slot[k][0];
            free(slot[k]);
        }
        size_t size = SMALL_MIN_BYTES + (r >> 32) % (SMALL_MAX_BYTES - SMALL_MIN_BYTES + 1);
        slot[k] = malloc(size);
        if (slot[k] == NULL)
            fail("malloc");
        touch(slot[k], size, r);
    }
    for (size_t k = 0; k < WORKING_SET_SMALL; k++)
        free(slot[k]);
    return NULL;
}

static size_t mixed_size(uint64_t r)
{
    unsigned log2 = 4 + (unsigned)(r % (MIXED_MAX_LOG2 - 4 + 1)); /* 16 B .. 64 KiB */
    size_t low = (size_t)1 << (log2 - 1);
    return low + (size_t)((r >> 16) % low) + 1;
}

static void *run_mixed(void *arg)
{
    struct worker *w = arg;
    uint64_t rng = 0xD1B54A32D192ED03ULL * (uint64_t)(w->index + 1);
    unsigned char *slot[WORKING_SET_MIXED] = {0};
    size_t sizes[WORKING_SET_MIXED] = {0};
    for (uint64_t i = 0; i < w->ops; i++) {
        uint64_t r = next_random(&rng);
        size_t k = r % WORKING_SET_MIXED;
        size_t size = mixed_size(r >> 12);
        unsigned kind = (unsigned)((r >> 56) % 16);
        if (kind == 0 && slot[k] != NULL) {
            unsigned char *grown = realloc(slot[k], size);
            if (grown == NULL)
                fail("realloc");
            slot[k] = grown;
        } else {
            if (slot[k] != NULL) {
                w->checksum += slot[k][sizes[k] - 1];
                free(slot[k]);
            }
            if (kind == 1) {
                slot[k] = calloc(1, size);
            } else if (kind == 2) {
                void *aligned = NULL;
                slot[k] = posix_memalign(&aligned, 64, size) == 0 ? aligned : NULL;
            } else {
                slot[k] = malloc(size);
            }
            if (slot[k] == NULL)
                fail("allocation");
        }
        sizes[k] = size;
        touch(slot[k], size, r);
    }
    for (size_t k = 0; k < WORKING_SET_MIXED; k++)
        free(slot[k]);
    return NULL;
}

/* Spin briefly (the other side usually answers within a few hundred cycles when both
 * threads are on a core), then yield so a descheduled partner can run on a busy machine. */
static void wait_a_little(unsigned *spins)
{
    if (++*spins < SPINS_BEFORE_YIELD) {
        __builtin_ia32_pause();
    } else {
        *spins = 0;
        sched_yield();
    }
}

/*
 * Blocks cross the ring in batches of RING_BATCH: the index is published once per batch, so
 * the two threads meet on the ring's cache lines rarely and the time goes to malloc and free,
 * not to the handshake (one pointer at a time, the result swung 3x with the threads' pacing).
 */
static void *run_producer(void *arg)
{
    struct worker *w = arg;
    struct ring *ring = w->ring;
    uint64_t rng = 0xA0761D6478BD642FULL * (uint64_t)(w->index + 1);
    uint64_t head = 0;
    for (uint64_t done = 0; done < w->ops;) {
        uint64_t batch = w->ops - done < RING_BATCH ? w->ops - done : RING_BATCH;
        unsigned spins = 0;
        while (head + batch - atomic_load_explicit(&ring->tail, memory_order_acquire) > RING_SLOTS)
            wait_a_little(&spins);
        for (uint64_t k = 0; k < batch; k++) {
            uint64_t r = next_random(&rng);
            size_t size = SMALL_MIN_BYTES + r % (PRODCONS_MAX_BYTES - SMALL_MIN_BYTES + 1);
            unsigned char *block = malloc(size);
            if (block == NULL)
                fail("malloc");
            touch(block, size, r);
            ring->slot[(head + k) % RING_SLOTS] = block;
        }
        head += batch;
        done += batch;
        atomic_store_explicit(&ring->head, head, memory_order_release);
    }
    return NULL;
}

static void *run_consumer(void *arg)
{
    struct worker *w = arg;
    struct ring *ring = w->ring;
    uint64_t tail = 0;
    while (tail < w->ops) {
        uint64_t head;
        unsigned spins = 0;
        while ((head = atomic_load_explicit(&ring->head, memory_order_acquire)) == tail)
            wait_a_little(&spins);
        for (; tail < head; tail++) {
            unsigned char *block = ring->slot[tail % RING_SLOTS];
            w->checksum += block[0];
            free(block);
        }
        atomic_store_explicit(&ring->tail, tail, memory_order_release);
    }
    return NULL;
}

static const char *allocator_name(void)
{
    if (dlsym(RTLD_DEFAULT, "qvshim_pool_stats") != NULL)
        return "qvshim";
    /* scripts/bench.d/forward_jemalloc.c exports the prefixed build's own symbols */
    if (dlsym(RTLD_DEFAULT, "_rjem_malloc") != NULL)
        return "forward";
    if (dlsym(RTLD_DEFAULT, "mallctl") != NULL)
        return "jemalloc";
    return "glibc";
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s small|mixed|prodcons THREADS OPS\n", argv[0]);
        return 2;
    }
    const char *workload = argv[1];
    int threads = atoi(argv[2]);
    uint64_t ops = strtoull(argv[3], NULL, 10);
    if (threads < 1 || threads > MAX_THREADS || ops == 0) {
        fprintf(stderr, "malloc_workload: THREADS must be 1..%d and OPS positive\n", MAX_THREADS);
        return 2;
    }

    struct worker workers[MAX_THREADS];
    memset(workers, 0, sizeof workers);
    struct ring *rings = NULL;
    int is_prodcons = strcmp(workload, "prodcons") == 0;
    void *(*body)(void *) = NULL;
    if (strcmp(workload, "small") == 0) {
        body = run_small;
    } else if (strcmp(workload, "mixed") == 0) {
        body = run_mixed;
    } else if (is_prodcons) {
        if (threads % 2 != 0) {
            fprintf(stderr, "malloc_workload: prodcons needs an even THREADS\n");
            return 2;
        }
        rings = aligned_alloc(64, sizeof(struct ring) * (size_t)(threads / 2));
        if (rings == NULL)
            fail("aligned_alloc");
        memset(rings, 0, sizeof(struct ring) * (size_t)(threads / 2));
    } else {
        fprintf(stderr, "malloc_workload: unknown workload '%s'\n", workload);
        return 2;
    }

    for (int t = 0; t < threads; t++) {
        struct worker *w = &workers[t];
        w->index = t;
        if (is_prodcons) {
            int pair = t / 2;
            w->ring = &rings[pair];
            w->ops = ops / (uint64_t)(threads / 2);
            body = t % 2 == 0 ? run_producer : run_consumer;
        } else {
            w->ops = ops / (uint64_t)threads;
        }
        if (pthread_create(&w->thread, NULL, body, w) != 0)
            fail("pthread_create");
    }
    uint64_t checksum = 0;
    for (int t = 0; t < threads; t++) {
        pthread_join(workers[t].thread, NULL);
        checksum += workers[t].checksum;
    }
    free(rings);
    printf("allocator=%s checksum=%llu\n", allocator_name(), (unsigned long long)checksum);
    return 0;
}
