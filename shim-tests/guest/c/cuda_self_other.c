/*
 * cuda_self_other.c - a second CUDA interposer, shaped like HAMi-core: it exports cuMemAlloc_v2,
 * cuMemFree_v2, cuMemAllocAsync_ptsz, cuMemFreeAsync_ptsz, cuGetProcAddress and
 * cuGetProcAddress_v2, hooks dlsym (any handle but RTLD_NEXT gets its hook for those names) and
 * swaps its hooks into what cuGetProcAddress hands out, by name. It counts every call to a hook.
 *
 * Its real functions are the next definition after it (dlsym(RTLD_NEXT)), else the driver's own
 * export through the driver's handle: preloaded before libqvshim.so it calls the shim's exports,
 * after it the driver. Built with -DREAL_THROUGH_GLOBAL_SCOPE it takes them with
 * dlsym(RTLD_DEFAULT) instead: preloaded after the shim, that is the shim's export again, so
 * every call comes back into the shim from below. other_cuda_calls(name) says how often the hook
 * `name` ran.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <string.h>

typedef int CUresult;
typedef unsigned long long u64;
typedef void *(*dlsym_t)(void *, const char *);

#define EXPORT __attribute__((visibility("default")))
#define CUDA_ERROR_NOT_FOUND 500
#define PER_THREAD_FLAG 2ULL

enum hook { ALLOC, FREE, ALLOC_PTSZ, FREE_PTSZ, PROC, PROC_V2, HOOKS };
static const char *const names[HOOKS] = {"cuMemAlloc_v2",        "cuMemFree_v2",     "cuMemAllocAsync_ptsz",
                                         "cuMemFreeAsync_ptsz",  "cuGetProcAddress", "cuGetProcAddress_v2"};
static unsigned long long calls[HOOKS];
static void *real[HOOKS];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static dlsym_t glibc_dlsym(void) {
    static dlsym_t found;
    if (!found) found = (dlsym_t)dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.34");
    if (!found) found = (dlsym_t)dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.2.5");
    return found;
}

/* The next definition of hook `h`, or the driver's own; counts the call. */
static void *next(enum hook h) {
    pthread_mutex_lock(&lock);
    calls[h]++;
    if (!real[h]) {
#ifdef REAL_THROUGH_GLOBAL_SCOPE
        real[h] = glibc_dlsym()(RTLD_DEFAULT, names[h]);
#else
        real[h] = glibc_dlsym()(RTLD_NEXT, names[h]);
#endif
        if (!real[h]) {
            void *driver = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
            if (driver) real[h] = glibc_dlsym()(driver, names[h]);
        }
    }
    void *fn = real[h];
    pthread_mutex_unlock(&lock);
    return fn;
}

EXPORT u64 other_cuda_calls(const char *name) {
    for (int h = 0; h < HOOKS; h++)
        if (strcmp(names[h], name) == 0) return calls[h];
    return 0;
}

EXPORT CUresult cuMemAlloc_v2(u64 *p, size_t bytes) {
    CUresult (*fn)(u64 *, size_t) = (CUresult(*)(u64 *, size_t))next(ALLOC);
    return fn ? fn(p, bytes) : CUDA_ERROR_NOT_FOUND;
}

EXPORT CUresult cuMemFree_v2(u64 p) {
    CUresult (*fn)(u64) = (CUresult(*)(u64))next(FREE);
    return fn ? fn(p) : CUDA_ERROR_NOT_FOUND;
}

EXPORT CUresult cuMemAllocAsync_ptsz(u64 *p, size_t bytes, void *stream) {
    CUresult (*fn)(u64 *, size_t, void *) = (CUresult(*)(u64 *, size_t, void *))next(ALLOC_PTSZ);
    return fn ? fn(p, bytes, stream) : CUDA_ERROR_NOT_FOUND;
}

EXPORT CUresult cuMemFreeAsync_ptsz(u64 p, void *stream) {
    CUresult (*fn)(u64, void *) = (CUresult(*)(u64, void *))next(FREE_PTSZ);
    return fn ? fn(p, stream) : CUDA_ERROR_NOT_FOUND;
}

/* Swaps in the hook for the forms this library wraps, by the name and flags asked for. */
static void hook_handed_out(const char *symbol, void **pfn, int version, u64 flags) {
    int ptsz = (flags & PER_THREAD_FLAG) != 0;
    if (strcmp(symbol, "cuMemAlloc") == 0 && version >= 3020) *pfn = (void *)cuMemAlloc_v2;
    else if (strcmp(symbol, "cuMemFree") == 0 && version >= 3020) *pfn = (void *)cuMemFree_v2;
    else if (strcmp(symbol, "cuMemAllocAsync") == 0 && ptsz) *pfn = (void *)cuMemAllocAsync_ptsz;
    else if (strcmp(symbol, "cuMemFreeAsync") == 0 && ptsz) *pfn = (void *)cuMemFreeAsync_ptsz;
}

EXPORT CUresult cuGetProcAddress(const char *symbol, void **pfn, int version, u64 flags) {
    CUresult (*fn)(const char *, void **, int, u64) = (CUresult(*)(const char *, void **, int, u64))next(PROC);
    if (!fn) return CUDA_ERROR_NOT_FOUND;
    CUresult rc = fn(symbol, pfn, version, flags);
    if (rc == 0 && symbol && pfn) hook_handed_out(symbol, pfn, version, flags);
    return rc;
}

EXPORT CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version, u64 flags, int *status) {
    CUresult (*fn)(const char *, void **, int, u64, int *) =
        (CUresult(*)(const char *, void **, int, u64, int *))next(PROC_V2);
    if (!fn) return CUDA_ERROR_NOT_FOUND;
    CUresult rc = fn(symbol, pfn, version, flags, status);
    if (rc == 0 && symbol && pfn) hook_handed_out(symbol, pfn, version, flags);
    return rc;
}

/* HAMi-core's dlsym: its hooks for its names from any handle but RTLD_NEXT, glibc's otherwise
 * (a call, not a jump: RTLD_NEXT from other libraries then means "after this one"). */
EXPORT void *dlsym(void *handle, const char *symbol) {
    if (handle != RTLD_NEXT) {
        if (strcmp(symbol, "cuMemAlloc_v2") == 0) return (void *)cuMemAlloc_v2;
        if (strcmp(symbol, "cuMemFree_v2") == 0) return (void *)cuMemFree_v2;
        if (strcmp(symbol, "cuMemAllocAsync_ptsz") == 0) return (void *)cuMemAllocAsync_ptsz;
        if (strcmp(symbol, "cuMemFreeAsync_ptsz") == 0) return (void *)cuMemFreeAsync_ptsz;
        if (strcmp(symbol, "cuGetProcAddress") == 0) return (void *)cuGetProcAddress;
        if (strcmp(symbol, "cuGetProcAddress_v2") == 0) return (void *)cuGetProcAddress_v2;
    }
    dlsym_t real_dlsym = glibc_dlsym();
    return real_dlsym ? real_dlsym(handle, symbol) : NULL;
}
