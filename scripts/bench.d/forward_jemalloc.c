/*
 * forward_jemalloc.c - a preload that forwards malloc and free to the very jemalloc build
 * libqvshim.so links (tikv-jemalloc-sys, prefixed _rjem_), for `scripts/bench --breakdown`.
 *
 * It prices, on the small-allocation workload, what a counting allocator asks of jemalloc
 * before any ledger work, so the rest of the shim's cost can be read off by difference:
 *   (no flag)          malloc -> _rjem_malloc, free -> _rjem_free: the bare jemalloc build;
 *   -DSIZE_LOOKUPS     nallocx before each malloc, malloc_usable_size + sdallocx on free
 *                      (how the first core commit, e549528, sized blocks);
 *   -DTHREAD_COUNTERS  jemalloc's per-thread "thread.allocatedp"/"thread.deallocatedp"
 *                      counters read around each call (how bad38df sizes them).
 *
 * Only malloc and free are instrumented; the rest of the family forwards plainly so the
 * process (and the loader) stays consistent.
 */
#include <stddef.h>

void *_rjem_malloc(size_t size);
void *_rjem_calloc(size_t count, size_t size);
void *_rjem_realloc(void *p, size_t size);
void *_rjem_aligned_alloc(size_t align, size_t size);
void *_rjem_memalign(size_t align, size_t size);
int _rjem_posix_memalign(void **out, size_t align, size_t size);
void _rjem_free(void *p);
void _rjem_sdallocx(void *p, size_t size, int flags);
size_t _rjem_nallocx(size_t size, int flags);
size_t _rjem_malloc_usable_size(void *p);
int _rjem_mallctl(const char *name, void *oldp, size_t *oldlenp, void *newp, size_t newlen);

/* Keeps the sizes alive without changing what malloc does. */
volatile size_t forward_size_sink;

#ifdef THREAD_COUNTERS
static __thread __attribute__((tls_model("initial-exec"))) unsigned long long *allocated_counter;
static __thread __attribute__((tls_model("initial-exec"))) unsigned long long *deallocated_counter;

static void find_thread_counters(void)
{
    size_t length = sizeof allocated_counter;
    _rjem_mallctl("thread.allocatedp", &allocated_counter, &length, NULL, 0);
    length = sizeof deallocated_counter;
    _rjem_mallctl("thread.deallocatedp", &deallocated_counter, &length, NULL, 0);
}
#endif

/* How scripts/bench.d/alloc/common.h tells this forwarder from the allocators it stands beside. */
const int qvshim_bench_forwarder = 1;

void *malloc(size_t size)
{
#ifdef SIZE_LOOKUPS
    size_t usable = _rjem_nallocx(size ? size : 1, 0);
    if (usable == 0)
        return NULL;
    forward_size_sink = usable;
#endif
#ifdef THREAD_COUNTERS
    if (allocated_counter == NULL)
        find_thread_counters();
    unsigned long long before = *allocated_counter;
    void *p = _rjem_malloc(size);
    forward_size_sink = (size_t)(*allocated_counter - before);
    return p;
#else
    return _rjem_malloc(size);
#endif
}

void free(void *p)
{
    if (p == NULL)
        return;
#if defined(SIZE_LOOKUPS)
    _rjem_sdallocx(p, _rjem_malloc_usable_size(p), 0);
#elif defined(THREAD_COUNTERS)
    if (deallocated_counter == NULL)
        find_thread_counters();
    unsigned long long before = *deallocated_counter;
    _rjem_free(p);
    forward_size_sink = (size_t)(*deallocated_counter - before);
#else
    _rjem_free(p);
#endif
}

void *calloc(size_t count, size_t size) { return _rjem_calloc(count, size); }
void *realloc(void *p, size_t size) { return _rjem_realloc(p, size); }
void *aligned_alloc(size_t align, size_t size) { return _rjem_aligned_alloc(align, size); }
void *memalign(size_t align, size_t size) { return _rjem_memalign(align, size); }
int posix_memalign(void **out, size_t align, size_t size) { return _rjem_posix_memalign(out, align, size); }
size_t malloc_usable_size(void *p) { return p ? _rjem_malloc_usable_size(p) : 0; }
