/*
 * cuda_self_client.c - takes one allocation form of the CUDA driver by one lookup route,
 * allocates CHUNK_MIB at a time until refused (at most MAX times), frees everything, and prints
 * what it saw, one fact a line ("key value"). It asserts nothing itself.
 *
 *   cuda_self_client ROUTE FORM CHUNK_MIB MAX
 *   ROUTE: dlsym (dlsym on the driver's handle), proc_v1 (cuGetProcAddress), proc_v2
 *          (cuGetProcAddress_v2), direct (built with -DDIRECT_LINK: linked against libcuda)
 *   FORM:  alloc (cuMemAlloc_v2 / cuMemFree_v2), async_ptsz (cuMemAllocAsync_ptsz /
 *          cuMemFreeAsync_ptsz, the per-thread forms)
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qvshim.h"

typedef int CUresult;
typedef unsigned long long u64;

#define MIB (1024ULL * 1024ULL)
#define VERSION 13000
#define PER_THREAD 2ULL
#define MAX_CHUNKS 64

typedef CUresult (*alloc_t)(u64 *, size_t, void *);
typedef CUresult (*free_t)(u64, void *);

static void *driver;
static CUresult (*p_init)(unsigned);
static CUresult (*p_primary_ctx_retain)(void **, int);
static CUresult (*p_ctx_set_current)(void *);
static void *p_alloc;
static void *p_free;

static void die(const char *what) {
    printf("error %s\n", what);
    exit(2);
}

#ifdef DIRECT_LINK
CUresult cuInit(unsigned);
CUresult cuDevicePrimaryCtxRetain(void **, int);
CUresult cuCtxSetCurrent(void *);
CUresult cuMemAlloc_v2(u64 *, size_t);
CUresult cuMemFree_v2(u64);
CUresult cuMemAllocAsync_ptsz(u64 *, size_t, void *);
CUresult cuMemFreeAsync_ptsz(u64, void *);

static void load(const char *route, const char *form) {
    if (strcmp(route, "direct") != 0) die("this build knows only the direct route");
    driver = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    p_init = cuInit;
    p_primary_ctx_retain = cuDevicePrimaryCtxRetain;
    p_ctx_set_current = cuCtxSetCurrent;
    int ptsz = strcmp(form, "async_ptsz") == 0;
    p_alloc = ptsz ? (void *)cuMemAllocAsync_ptsz : (void *)cuMemAlloc_v2;
    p_free = ptsz ? (void *)cuMemFreeAsync_ptsz : (void *)cuMemFree_v2;
}
#else
static void *by_route(const char *route, const char *export_name, const char *base, u64 flags) {
    void *fn = NULL;
    if (strcmp(route, "dlsym") == 0) return dlsym(driver, export_name);
    if (strcmp(route, "proc_v1") == 0) {
        CUresult (*proc)(const char *, void **, int, u64) =
            (CUresult(*)(const char *, void **, int, u64))dlsym(driver, "cuGetProcAddress");
        if (!proc) die("dlsym cuGetProcAddress");
        CUresult rc = proc(base, &fn, VERSION, flags);
        printf("proc_rc_%s %d\n", export_name, rc);
        return fn;
    }
    if (strcmp(route, "proc_v2") == 0) {
        CUresult (*proc)(const char *, void **, int, u64, int *) =
            (CUresult(*)(const char *, void **, int, u64, int *))dlsym(driver, "cuGetProcAddress_v2");
        if (!proc) die("dlsym cuGetProcAddress_v2");
        int status = -1;
        CUresult rc = proc(base, &fn, VERSION, flags, &status);
        printf("proc_rc_%s %d\n", export_name, rc);
        return fn;
    }
    die("unknown route");
    return NULL;
}

static void load(const char *route, const char *form) {
    driver = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!driver) die("dlopen libcuda.so.1");
    p_init = (CUresult(*)(unsigned))dlsym(driver, "cuInit");
    p_primary_ctx_retain = (CUresult(*)(void **, int))dlsym(driver, "cuDevicePrimaryCtxRetain");
    p_ctx_set_current = (CUresult(*)(void *))dlsym(driver, "cuCtxSetCurrent");
    if (strcmp(form, "async_ptsz") == 0) {
        p_alloc = by_route(route, "cuMemAllocAsync_ptsz", "cuMemAllocAsync", PER_THREAD);
        p_free = by_route(route, "cuMemFreeAsync_ptsz", "cuMemFreeAsync", PER_THREAD);
    } else {
        p_alloc = by_route(route, "cuMemAlloc_v2", "cuMemAlloc", 0);
        p_free = by_route(route, "cuMemFree_v2", "cuMemFree", 0);
    }
}
#endif

/* Where a function pointer lies: "shim", "other", "driver" or "elsewhere". */
static const char *where(void *fn) {
    Dl_info info;
    if (!fn || !dladdr(fn, &info) || !info.dli_fname) return "null";
    if (strstr(info.dli_fname, "libqvshim")) return "shim";
    if (strstr(info.dli_fname, "cuda_self_other")) return "other";
    if (strstr(info.dli_fname, "libcuda")) return "driver";
    return "elsewhere";
}

static CUresult allocate(int ptsz, u64 *key, size_t bytes) {
    if (ptsz) return ((alloc_t)p_alloc)(key, bytes, NULL);
    return ((CUresult(*)(u64 *, size_t))p_alloc)(key, bytes);
}

static CUresult release(int ptsz, u64 key) {
    if (ptsz) return ((free_t)p_free)(key, NULL);
    return ((CUresult(*)(u64))p_free)(key);
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc != 5) die("usage: cuda_self_client ROUTE FORM CHUNK_MIB MAX");
    const char *route = argv[1], *form = argv[2];
    size_t chunk = (size_t)strtoull(argv[3], NULL, 10) * MIB;
    int max = atoi(argv[4]);
    if (max > MAX_CHUNKS) max = MAX_CHUNKS;
    int ptsz = strcmp(form, "async_ptsz") == 0;

    load(route, form);
    if (!p_init || !p_primary_ctx_retain || !p_ctx_set_current) die("the context calls");
    if (!p_alloc || !p_free) die("the allocation form");
    printf("alloc_at %s\nfree_at %s\n", where(p_alloc), where(p_free));
    void *ctx = NULL;
    if (p_init(0) != 0) die("cuInit");
    if (p_primary_ctx_retain(&ctx, 0) != 0) die("cuDevicePrimaryCtxRetain");
    p_ctx_set_current(ctx);

    u64 keys[MAX_CHUNKS];
    int granted = 0;
    CUresult rc = 0;
    while (granted < max) {
        rc = allocate(ptsz, &keys[granted], chunk);
        if (rc != 0) break;
        granted++;
    }
    printf("granted %d\nrefused_rc %d\n", granted, rc);
    int (*pool_stats)(int, struct qvshim_pool_stats *) =
        (int (*)(int, struct qvshim_pool_stats *))dlsym(RTLD_DEFAULT, "qvshim_pool_stats");
    struct qvshim_pool_stats s = {.struct_size = sizeof s};
    if (pool_stats && pool_stats(QVSHIM_POOL_GPU(0), &s) == 0) printf("pool_live %llu\n", (u64)s.live);
    int freed_ok = 1;
    while (granted > 0)
        if (release(ptsz, keys[--granted]) != 0) freed_ok = 0;
    printf("freed_ok %d\n", freed_ok);
    if (pool_stats && pool_stats(QVSHIM_POOL_GPU(0), &s) == 0) printf("pool_live_end %llu\n", (u64)s.live);

    const char *alloc_name = ptsz ? "cuMemAllocAsync_ptsz" : "cuMemAlloc_v2";
    u64 (*driver_calls)(const char *) = driver ? (u64(*)(const char *))dlsym(driver, "fake_cuda_calls") : NULL;
    u64 (*other_calls)(const char *) = (u64(*)(const char *))dlsym(RTLD_DEFAULT, "other_cuda_calls");
    printf("driver_calls %llu\n", driver_calls ? driver_calls(alloc_name) : 0ULL);
    printf("other_calls %llu\n", other_calls ? other_calls(alloc_name) : 0ULL);
    printf("done 1\n");
    return 0;
}
