/*
 * Exercises the C API of include/qvshim.h against the loaded shim and prints one "ok ..." line
 * per check, or "FAIL ..." and exit 1. Argument: a path the JSON dump is written to.
 */
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "qvshim.h"

#define CHECK(cond, what)                                 \
    do {                                                  \
        if (!(cond)) {                                    \
            printf("FAIL %s (line %d)\n", what, __LINE__); \
            return 1;                                     \
        }                                                 \
        printf("ok %s\n", what);                          \
    } while (0)

struct seen {
    atomic_int calls;
    atomic_int last_pool, last_old, last_new;
    atomic_long thread;
};

static void on_level(int pool, int old_level, int new_level, void *ctx) {
    struct seen *s = ctx;
    atomic_store(&s->last_pool, pool);
    atomic_store(&s->last_old, old_level);
    atomic_store(&s->last_new, new_level);
    atomic_store(&s->thread, (long)syscall(SYS_gettid));
    atomic_fetch_add(&s->calls, 1);
}

static void noop(int pool, int old_level, int new_level, void *ctx) {
    (void)pool, (void)old_level, (void)new_level, (void)ctx;
}

static int wait_calls(struct seen *s, int n) {
    for (int waited = 0; waited < 3000; waited += 5) {
        if (atomic_load(&s->calls) >= n)
            return 1;
        struct timespec ts = {0, 5000000};
        nanosleep(&ts, NULL);
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2)
        return 2;
    static struct seen seen;
    CHECK(qvshim_api_version() == QVSHIM_API_VERSION, "api version");
    CHECK(qvshim_on_level_change(NULL, NULL) == -1, "NULL callback refused");
    int id = qvshim_on_level_change(on_level, &seen);
    CHECK(id >= 0, "callback registered");

    CHECK(qvshim_set_budget(QVSHIM_POOL_HOST, 64u << 20) == 0, "set budget 64 MiB");
    struct qvshim_pool_stats st = {.struct_size = sizeof st};
    CHECK(qvshim_pool_stats(QVSHIM_POOL_HOST, &st) == 0 && st.budget == (64u << 20),
          "pool stats show the new budget");
    void *big = malloc(50u << 20); /* 78% of 64 MiB: warn */
    CHECK(big != NULL, "50 MiB allocated");
    CHECK(wait_calls(&seen, 1), "callback called after the rise");
    CHECK(atomic_load(&seen.last_pool) == 0 && atomic_load(&seen.last_old) == 0 &&
              atomic_load(&seen.last_new) == QVSHIM_LEVEL_WARN,
          "callback got pool 0, normal -> warn");
    CHECK(atomic_load(&seen.thread) != (long)syscall(SYS_gettid),
          "callback ran on another thread (the monitor)");
    free(big);
    CHECK(wait_calls(&seen, 2), "callback called after the fall");
    CHECK(atomic_load(&seen.last_new) == QVSHIM_LEVEL_NORMAL, "callback got warn -> normal");

    CHECK(qvshim_remove_level_callback(id) == 0, "callback removed");
    CHECK(qvshim_remove_level_callback(id) == -1, "second removal refused");
    CHECK(qvshim_remove_level_callback(999) == -1, "unknown id refused");
    int before = atomic_load(&seen.calls);
    big = malloc(50u << 20);
    struct timespec ts = {0, 300000000};
    nanosleep(&ts, NULL);
    free(big);
    nanosleep(&ts, NULL);
    CHECK(atomic_load(&seen.calls) == before, "removed callback not called again");

    int ids[64], n = 0;
    for (; n < 64; n++) {
        ids[n] = qvshim_on_level_change(noop, NULL);
        if (ids[n] < 0)
            break;
    }
    CHECK(n == QVSHIM_MAX_LEVEL_CALLBACKS, "the callback table fills and then refuses");
    for (int i = 0; i < n; i++)
        qvshim_remove_level_callback(ids[i]);
    /* Two left registered: the dump below counts them. */
    CHECK(qvshim_on_level_change(noop, NULL) >= 0 && qvshim_on_level_change(noop, NULL) >= 0,
          "two callbacks registered for the dump");

    CHECK(qvshim_pool_count() == 1, "one pool (host) without a GPU");
    CHECK(qvshim_level(QVSHIM_POOL_HOST) == QVSHIM_LEVEL_NORMAL, "level of the host");
    CHECK(qvshim_level(99) == -1 && qvshim_level(-1) == -1, "level of an unknown pool");
    struct qvshim_pool_stats none = {.struct_size = sizeof none};
    CHECK(qvshim_pool_stats(99, &none) == -1 && qvshim_pool_stats(0, NULL) == -1,
          "stats of an unknown pool or into NULL");
    CHECK(qvshim_set_budget(99, 1) == -1, "budget of an unknown pool");
    /* Blocks under jemalloc's oversize threshold (8 MiB), which stay dirty after free. */
    static char *touched[64];
    for (int i = 0; i < 64; i++) {
        touched[i] = malloc(256u << 10);
        memset(touched[i], 1, 256u << 10);
    }
    for (int i = 0; i < 64; i++)
        free(touched[i]);
    CHECK(qvshim_purge() > 0, "a purge returns freed dirty pages to the kernel");

    int fd = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    CHECK(fd >= 0 && qvshim_dump(fd, 1) == 0, "JSON dump written");
    close(fd);
    CHECK(qvshim_dump(-1, 0) == -1, "dump to a bad fd fails");
    return 0;
}
