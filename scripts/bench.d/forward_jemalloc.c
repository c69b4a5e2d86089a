/*
 * forward_jemalloc.c - a preload that forwards malloc and free to the very jemalloc build
 * libqvshim.so links (tikv-jemalloc-sys, prefixed _rjem_), for `scripts/bench --breakdown`.
 *
 * It splits the shim's cost on the small-allocation workload into parts. Built four ways:
 *   (no flag)         malloc -> _rjem_malloc, free -> _rjem_free: the bare jemalloc build;
 *   -DSIZE_ON_MALLOC  malloc also asks nallocx for the size class first, as the shim does;
 *   -DSIZE_ON_FREE    free looks the usable size up and frees with sdallocx, as the shim does;
 *   both flags        the jemalloc calls of the shim's hot path with no ledger at all.
 * What is left between "both" and libqvshim.so is the ledger, errno handling and call overhead.
 *
 * Only the functions the malloc_workload "small" mode calls are covered properly; the rest of
 * the family forwards plainly so the process itself (and the loader) stays consistent.
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

/* Keeps the nallocx result alive without changing what malloc does. */
volatile size_t forward_size_sink;

void *malloc(size_t size)
{
#ifdef SIZE_ON_MALLOC
    size_t usable = _rjem_nallocx(size ? size : 1, 0);
    if (usable == 0)
        return NULL;
    forward_size_sink = usable;
#endif
    return _rjem_malloc(size);
}

void free(void *p)
{
    if (p == NULL)
        return;
#ifdef SIZE_ON_FREE
    _rjem_sdallocx(p, _rjem_malloc_usable_size(p), 0);
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
