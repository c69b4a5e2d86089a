/*
 * qvshim.h - the stable C API exported by libqvshim.so.
 *
 * Every function here is safe to call from any thread once the library is
 * loaded (preloaded or dlopen'ed). None of them allocates through the
 * caller's malloc. Look them up with dlsym(RTLD_DEFAULT, "qvshim_...") when
 * the library may be absent; a NULL result means the shim is not loaded.
 *
 * Pools: pool 0 is host memory (malloc family, pinned host memory); pool
 * 1 + N is CUDA device N, present once the process touched that device.
 */
#ifndef QVSHIM_H
#define QVSHIM_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define QVSHIM_API_VERSION 1

#define QVSHIM_POOL_HOST 0
#define QVSHIM_POOL_GPU(device) (1 + (device))
#define QVSHIM_MAX_POOLS 17 /* host + 16 GPUs */

/* Budget value meaning "no budget" (QVSHIM_BUDGET=off). */
#define QVSHIM_UNLIMITED UINT64_MAX
/* The smallest budget qvshim_set_budget (and QVSHIM_BUDGET) accepts: 16 MiB. */
#define QVSHIM_MIN_BUDGET (16ull << 20)

enum qvshim_level {
    QVSHIM_LEVEL_NORMAL = 0,
    QVSHIM_LEVEL_WARN = 1,
    QVSHIM_LEVEL_CRITICAL = 2,
};

struct qvshim_pool_stats {
    uint32_t struct_size;      /* set by the caller to sizeof(struct qvshim_pool_stats) */
    int32_t pool;              /* 0 host, 1 + N GPU N */
    int32_t level;             /* enum qvshim_level */
    int32_t device;            /* -1 for host, the CUDA ordinal for a GPU pool */
    uint64_t budget;           /* configured budget in bytes, QVSHIM_UNLIMITED when off */
    uint64_t effective_budget; /* what allocations are checked against now */
    uint64_t reserve;          /* reserve size past the budget for small allocations */
    uint64_t reserve_in_use;   /* bytes counted past the effective budget */
    uint64_t live;             /* bytes live now (usable size) */
    uint64_t peak;             /* high-water mark of live, see docs/CONFIGURATION.md */
    uint64_t allocs;           /* successful allocations */
    uint64_t frees;            /* frees of counted allocations */
    uint64_t refusals;         /* allocations refused by the budget */
    uint64_t largest_refused;  /* size in bytes of the largest refused request */
    uint64_t purges;           /* purges done because of this pool */
    uint64_t level_changes;    /* level transitions, both directions */
    uint64_t notifications;    /* runtime notifications sent for this pool */
};

/* QVSHIM_API_VERSION of the loaded library. */
int qvshim_api_version(void);

/* Number of pools in use: 1 (host) + the highest GPU pool index seen. */
int qvshim_pool_count(void);

/* Fill *out for one pool. Returns 0, or -1 for an unknown pool or a NULL/short out. */
int qvshim_pool_stats(int pool, struct qvshim_pool_stats *out);

/* The level of one pool (enum qvshim_level), or -1 for an unknown pool. */
int qvshim_level(int pool);

/* Set a pool's budget in bytes at run time (QVSHIM_UNLIMITED turns it off).
 * Returns 0, or -1 (nothing changed) for a pool that does not exist (a GPU
 * pool exists once the process touched that device) or a budget below
 * QVSHIM_MIN_BUDGET. */
int qvshim_set_budget(int pool, uint64_t bytes);

/* Purge jemalloc's dirty and muzzy pages now. Returns the bytes of resident
 * memory returned (resident before minus after; 0 when nothing came back). */
uint64_t qvshim_purge(void);

/* Called on the shim's monitor thread (never inside an allocation) after a
 * pool's level changed. The callback must not block for long. */
typedef void (*qvshim_level_callback)(int pool, int old_level, int new_level, void *ctx);

/* Callbacks registered at most at once. */
#define QVSHIM_MAX_LEVEL_CALLBACKS 16

/* Register a level callback. Returns an id >= 0, or -1 when the table is full. */
int qvshim_on_level_change(qvshim_level_callback cb, void *ctx);

/* Remove a registered callback. Returns 0, or -1 for an unknown id. */
int qvshim_remove_level_callback(int id);

/* Write the diagnostic dump to fd now, as text (json = 0) or one JSON object
 * (json = 1). Returns 0, or -1 when the write failed. */
/* The dump is built on the calling thread: call it from a thread, never from a
 * signal handler (the dump signal, QVSHIM_DUMP_SIGNAL, is the async-safe way).
 * See docs/DUMP.md for the fields and docs/C_API.md for every function. */
int qvshim_dump(int fd, int json);

#ifdef __cplusplus
}
#endif

#endif /* QVSHIM_H */
