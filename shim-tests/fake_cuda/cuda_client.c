/*
 * cuda_client.c - reaches the CUDA driver the way a CUDA runtime does (dlopen libcuda.so.1,
 * dlsym cuGetProcAddress_v2, every other function through it) and prints what it saw, one fact
 * per line ("key value"), for the pytest files to check. It asserts nothing itself.
 *
 *   cuda_client lookup                      where each lookup route lands
 *   cuda_client alloc KIND CHUNK_MIB [MAX]  allocate until refused, free one, allocate again
 *   cuda_client devices                     per-device figures and charges
 *   cuda_client threads THREADS ROUNDS      many threads allocating and freeing at once
 *   cuda_client steps STEP...               a script, one fact "sI value" per step:
 *       dev:N            make device N current
 *       a:KIND:MIB       allocate (value: the driver's code); f frees the last one allocated
 *       touch:MIB        map and touch anonymous memory the ledger does not count
 *       effbelow:POOL:MIB wait (20 s at most) until the pool's effective budget is below MIB MiB
 *       info             cuMemGetInfo (value: free; "tI" the total)
 *       eff:POOL:MIB     wait (20 s at most) until the pool's effective budget is MIB MiB
 *                        (value: the effective budget in bytes at the end)
 *       dump:PATH:TEXT   write the JSON dump to PATH until it contains TEXT (20 s at most;
 *                        value: 1 when it did)
 *       sleep:MS         wait MS milliseconds (the monitor looks meanwhile)
 *     then "sequence ..." (the fake driver's allocation calls and trims, in order) and
 *     "default_pool_asksN calls" (how often the default memory pool of device N was asked for)
 *     and "null_pool_calls N" (pool calls the fake driver got with a null handle).
 *
 * Link with -ldl; built with -DDIRECT_LINK and -lcuda it calls the driver's exports by name.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "qvshim.h"

typedef int CUresult;
typedef unsigned long long u64;

#define MIB (1024ULL * 1024ULL)
#define VERSION 13000
#define PER_THREAD 2ULL

typedef CUresult (*get_proc_v2_t)(const char *, void **, int, u64, int *);
typedef CUresult (*get_proc_v1_t)(const char *, void **, int, u64);

static void *driver;
static get_proc_v2_t get_proc;
static int (*pool_stats)(int, struct qvshim_pool_stats *);
static u64 (*fake_calls)(const char *);

static CUresult (*p_init)(unsigned);
static CUresult (*p_primary_ctx_retain)(void **, int);
static CUresult (*p_ctx_set_current)(void *);
static CUresult (*p_device_get_count)(int *);
static CUresult (*p_device_total_mem)(size_t *, int);
static CUresult (*p_mem_get_info)(size_t *, size_t *);
static CUresult (*p_mem_alloc)(u64 *, size_t);
static CUresult (*p_mem_alloc_pitch)(u64 *, size_t *, size_t, size_t, unsigned);
static CUresult (*p_mem_alloc_managed)(u64 *, size_t, unsigned);
static CUresult (*p_mem_alloc_async)(u64 *, size_t, void *);
static CUresult (*p_mem_alloc_async_ptsz)(u64 *, size_t, void *);
static CUresult (*p_mem_alloc_pool)(u64 *, size_t, void *, void *);
static CUresult (*p_mem_alloc_pool_ptsz)(u64 *, size_t, void *, void *);
static CUresult (*p_mem_free)(u64);
static CUresult (*p_mem_free_async)(u64, void *);
static CUresult (*p_mem_free_async_ptsz)(u64, void *);
static CUresult (*p_mem_create)(u64 *, size_t, const void *, u64);
static CUresult (*p_mem_release)(u64);
static CUresult (*p_mem_host_alloc)(void **, size_t, unsigned);
static CUresult (*p_mem_alloc_host)(void **, size_t);
static CUresult (*p_mem_free_host)(void *);
static CUresult (*p_mem_host_register)(void *, size_t, unsigned);
static CUresult (*p_mem_host_unregister)(void *);

static void die(const char *what) {
    printf("error %s\n", what);
    exit(2);
}

#ifdef DIRECT_LINK
/* Linked against libcuda: the names bind at load time, as in a program built with -lcuda. */
CUresult cuInit(unsigned);
CUresult cuDevicePrimaryCtxRetain(void **, int);
CUresult cuCtxSetCurrent(void *);
CUresult cuDeviceGetCount(int *);
CUresult cuDeviceTotalMem_v2(size_t *, int);
CUresult cuMemGetInfo_v2(size_t *, size_t *);
CUresult cuMemAlloc_v2(u64 *, size_t);
CUresult cuMemFree_v2(u64);
CUresult cuMemAllocAsync(u64 *, size_t, void *);
CUresult cuMemFreeAsync(u64, void *);
static void load(void) {
    p_init = cuInit;
    p_primary_ctx_retain = cuDevicePrimaryCtxRetain;
    p_ctx_set_current = cuCtxSetCurrent;
    p_device_get_count = cuDeviceGetCount;
    p_device_total_mem = cuDeviceTotalMem_v2;
    p_mem_get_info = cuMemGetInfo_v2;
    p_mem_alloc = cuMemAlloc_v2;
    p_mem_free = cuMemFree_v2;
    p_mem_alloc_async = cuMemAllocAsync;
    p_mem_free_async = cuMemFreeAsync;
}
#else
static void *proc(const char *name, u64 flags) {
    void *fn = NULL;
    int status = -1;
    if (get_proc(name, &fn, VERSION, flags, &status) != 0 || !fn) die(name);
    return fn;
}

static void load(void) {
    driver = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!driver) die("dlopen libcuda.so.1");
    get_proc = (get_proc_v2_t)dlsym(driver, "cuGetProcAddress_v2");
    if (!get_proc) die("dlsym cuGetProcAddress_v2");
    p_init = proc("cuInit", 0);
    p_primary_ctx_retain = proc("cuDevicePrimaryCtxRetain", 0);
    p_ctx_set_current = proc("cuCtxSetCurrent", 0);
    p_device_get_count = proc("cuDeviceGetCount", 0);
    p_device_total_mem = proc("cuDeviceTotalMem", 0);
    p_mem_get_info = proc("cuMemGetInfo", 0);
    p_mem_alloc = proc("cuMemAlloc", 0);
    p_mem_alloc_pitch = proc("cuMemAllocPitch", 0);
    p_mem_alloc_managed = proc("cuMemAllocManaged", 0);
    p_mem_alloc_async = proc("cuMemAllocAsync", 0);
    p_mem_alloc_async_ptsz = proc("cuMemAllocAsync", PER_THREAD);
    p_mem_alloc_pool = proc("cuMemAllocFromPoolAsync", 0);
    p_mem_alloc_pool_ptsz = proc("cuMemAllocFromPoolAsync", PER_THREAD);
    p_mem_free = proc("cuMemFree", 0);
    p_mem_free_async = proc("cuMemFreeAsync", 0);
    p_mem_free_async_ptsz = proc("cuMemFreeAsync", PER_THREAD);
    p_mem_create = proc("cuMemCreate", 0);
    p_mem_release = proc("cuMemRelease", 0);
    p_mem_host_alloc = proc("cuMemHostAlloc", 0);
    p_mem_alloc_host = proc("cuMemAllocHost", 0);
    p_mem_free_host = proc("cuMemFreeHost", 0);
    p_mem_host_register = proc("cuMemHostRegister", 0);
    p_mem_host_unregister = proc("cuMemHostUnregister", 0);
}
#endif

static void use_device(int device) {
    void *ctx;
    if (p_primary_ctx_retain(&ctx, device) != 0) die("cuDevicePrimaryCtxRetain");
    p_ctx_set_current(ctx);
}

static void start(void) {
    load();
    pool_stats = (int (*)(int, struct qvshim_pool_stats *))dlsym(RTLD_DEFAULT, "qvshim_pool_stats");
    if (driver) fake_calls = (u64(*)(const char *))dlsym(driver, "fake_cuda_calls");
    if (p_init(0) != 0) die("cuInit");
    use_device(0);
}

/* Live bytes of a pool, or -1 without the shim. */
static long long live(int pool) {
    struct qvshim_pool_stats s = {.struct_size = sizeof s};
    if (!pool_stats || pool_stats(pool, &s) != 0) return -1;
    return (long long)s.live;
}

static void print_pool(const char *prefix, int pool) {
    struct qvshim_pool_stats s = {.struct_size = sizeof s};
    if (!pool_stats || pool_stats(pool, &s) != 0) {
        printf("%s_shim 0\n", prefix);
        return;
    }
    printf("%s_live %llu\n%s_budget %llu\n%s_refusals %llu\n%s_allocs %llu\n%s_frees %llu\n%s_level %d\n",
           prefix, (u64)s.live, prefix, (u64)s.budget, prefix, (u64)s.refusals, prefix, (u64)s.allocs, prefix,
           (u64)s.frees, prefix, s.level);
}

/* ---- lookup ---------------------------------------------------------------------------------- */

static void where(const char *route, const char *name, int version, u64 flags, CUresult rc, int status,
                  void *fn) {
    Dl_info info;
    const char *place = "null";
    const char *symbol = "-";
    if (fn && dladdr(fn, &info) && info.dli_fname) {
        if (strstr(info.dli_fname, "libqvshim")) {
            place = "shim";
            symbol = info.dli_sname ? info.dli_sname : "?";
        } else if (strstr(info.dli_fname, "libcuda")) {
            place = "driver";
        } else if (strstr(info.dli_fname, "libc.so")) {
            place = "libc";
        } else {
            place = "other";
        }
    }
    printf("lookup %s %s %d %llu rc=%d status=%d at=%s:%s\n", route, name, version, flags, rc, status, place,
           symbol);
}

static void lookup_proc(const char *name, int version, u64 flags) {
    void *fn = (void *)1;
    int status = -1;
    CUresult rc = get_proc(name, &fn, version, flags, &status);
    where("proc_v2", name, version, flags, rc, status, fn);
}

static void lookup_dlsym(void *handle, const char *route, const char *name) {
    dlerror();
    void *fn = dlsym(handle, name);
    const char *error = dlerror();
    where(route, name, 0, 0, 0, fn ? 0 : (error ? 1 : 0), fn);
}

static void run_lookup(void) {
    start();
    static const char *wrapped_exports[] = {"cuGetProcAddress", "cuGetProcAddress_v2", "cuMemAlloc_v2",
                                            "cuMemAllocAsync_ptsz", "cuMemFree_v2", "cuMemCreate",
                                            "cuMemGetInfo_v2", "cuMemHostAlloc"};
    for (size_t i = 0; i < sizeof wrapped_exports / sizeof *wrapped_exports; i++)
        lookup_dlsym(driver, "dlsym", wrapped_exports[i]);
    lookup_dlsym(driver, "dlsym", "cuMemAlloc");
    lookup_dlsym(driver, "dlsym", "cuInit");
    lookup_dlsym(driver, "dlsym", "cuNoSuchFunction");
    lookup_dlsym(RTLD_DEFAULT, "dlsym_default", "printf");

    /* The driver's own addresses for names the shim leaves alone. */
    void *(*own)(const char *) = (void *(*)(const char *))dlsym(driver, "fake_cuda_own");
    printf("own cuInit %d\n", own && dlsym(driver, "cuInit") == own("cuInit"));
    printf("own cuMemAlloc %d\n", own && dlsym(driver, "cuMemAlloc") == own("cuMemAlloc"));

    lookup_proc("cuGetProcAddress", 13000, 0);
    lookup_proc("cuGetProcAddress", 11030, 0);
    lookup_proc("cuMemAlloc", 13000, 0);
    lookup_proc("cuMemAlloc", 12000, PER_THREAD);
    lookup_proc("cuMemAlloc", 3000, 0);
    lookup_proc("cuMemAllocAsync", 12080, 0);
    lookup_proc("cuMemAllocAsync", 12080, PER_THREAD);
    lookup_proc("cuMemAllocAsync", 11000, 0);
    lookup_proc("cuMemAllocFromPoolAsync", 12000, PER_THREAD);
    lookup_proc("cuMemFreeAsync", 13000, PER_THREAD);
    lookup_proc("cuMemGetInfo", 13000, 0);
    lookup_proc("cuMemGetInfo", 14000, 0);
    lookup_proc("cuMemHostRegister", 5000, 0);
    lookup_proc("cuMemHostRegister", 13000, 0);
    lookup_proc("cuInit", 13000, 0);
    lookup_proc("cuNoSuchThing", 13000, 0);

    /* The v1 lookup, got through v2 as a CUDA 11 runtime would get it by dlsym. */
    void *v1 = NULL;
    get_proc("cuGetProcAddress", &v1, 11030, 0, NULL);
    void *fn = NULL;
    CUresult rc = ((get_proc_v1_t)v1)("cuMemFree", &fn, 12000, 0);
    where("proc_v1", "cuMemFree", 12000, 0, rc, -1, fn);

    /* What each handed-out pointer reaches in the driver. */
    u64 p = 0;
    CUresult (*ptsz)(u64 *, size_t, void *) = NULL;
    get_proc("cuMemAllocAsync", (void **)&ptsz, 12080, PER_THREAD, NULL);
    rc = ptsz(&p, 1 * MIB, NULL);
    printf("call cuMemAllocAsync_ptsz rc=%d driver_ptsz=%llu driver_default=%llu live=%lld\n", rc,
           fake_calls("cuMemAllocAsync_ptsz"), fake_calls("cuMemAllocAsync"), live(1));
    p_mem_free_async_ptsz(p, NULL);
    size_t free_bytes = 0, total = 0;
    CUresult (*v3)(size_t *, size_t *, unsigned) = NULL;
    get_proc("cuMemGetInfo", (void **)&v3, 14000, 0, NULL);
    rc = v3(&free_bytes, &total, 0);
    printf("call cuMemGetInfo_v3 rc=%d driver_v3=%llu total=%zu\n", rc, fake_calls("cuMemGetInfo_v3"), total);
}

/* ---- alloc ----------------------------------------------------------------------------------- */

struct fake_prop {
    int type, handle_types, location_type, location_id;
    void *win32;
    unsigned char flags[8];
};

static int kind_is_host(const char *kind) {
    return strcmp(kind, "host_alloc") == 0 || strcmp(kind, "alloc_host") == 0 ||
           strcmp(kind, "host_register") == 0;
}

static CUresult allocate(const char *kind, size_t bytes, u64 *key) {
    if (strcmp(kind, "alloc") == 0) return p_mem_alloc(key, bytes);
    if (strcmp(kind, "pitch") == 0) {
        size_t pitch = 0, height = 256, width = bytes / height - 100;
        return p_mem_alloc_pitch(key, &pitch, width, height, 4);
    }
    if (strcmp(kind, "managed") == 0) return p_mem_alloc_managed(key, bytes, 1);
    if (strcmp(kind, "async") == 0) return p_mem_alloc_async(key, bytes, NULL);
    if (strcmp(kind, "async_ptsz") == 0) return p_mem_alloc_async_ptsz(key, bytes, NULL);
    if (strcmp(kind, "pool_async") == 0) return p_mem_alloc_pool(key, bytes, (void *)8, NULL);
    if (strcmp(kind, "pool_async_ptsz") == 0) return p_mem_alloc_pool_ptsz(key, bytes, (void *)8, NULL);
    /* The fake's own pool of device 0 other than its default one. */
    if (strcmp(kind, "named_async") == 0) return p_mem_alloc_pool(key, bytes, (void *)0x9100, NULL);
    if (strcmp(kind, "create") == 0) {
        struct fake_prop prop = {.type = 1, .location_type = 1, .location_id = 0};
        return p_mem_create(key, bytes, &prop, 0);
    }
    if (strcmp(kind, "host_alloc") == 0) return p_mem_host_alloc((void **)key, bytes, 0);
    if (strcmp(kind, "alloc_host") == 0) return p_mem_alloc_host((void **)key, bytes);
    if (strcmp(kind, "host_register") == 0) {
        void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) die("mmap");
        CUresult rc = p_mem_host_register(p, bytes, 0);
        if (rc != 0) munmap(p, bytes);
        *key = (u64)(uintptr_t)p;
        return rc;
    }
    die("unknown kind");
    return -1;
}

static CUresult release(const char *kind, u64 key) {
    if (strcmp(kind, "async") == 0 || strcmp(kind, "pool_async") == 0 || strcmp(kind, "named_async") == 0)
        return p_mem_free_async(key, NULL);
    if (strcmp(kind, "async_ptsz") == 0 || strcmp(kind, "pool_async_ptsz") == 0)
        return p_mem_free_async_ptsz(key, NULL);
    if (strcmp(kind, "create") == 0) return p_mem_release(key);
    if (strcmp(kind, "host_alloc") == 0 || strcmp(kind, "alloc_host") == 0)
        return p_mem_free_host((void *)(uintptr_t)key);
    if (strcmp(kind, "host_register") == 0) return p_mem_host_unregister((void *)(uintptr_t)key);
    return p_mem_free(key);
}

static void run_alloc(const char *kind, size_t chunk, int max) {
    start();
    int pool = kind_is_host(kind) ? QVSHIM_POOL_HOST : QVSHIM_POOL_GPU(0);
    long long before = live(pool);
    u64 keys[64];
    int granted = 0;
    CUresult rc = 0;
    if (max > 64) max = 64;
    while (granted < max) {
        rc = allocate(kind, chunk, &keys[granted]);
        if (rc != 0) break;
        granted++;
    }
    printf("granted %d\nrefused_rc %d\n", granted, rc);
    printf("held_at_refusal %lld\n", live(pool) - before);
    print_pool("pool", pool);
    size_t free_bytes = 0, total = 0;
    printf("info_rc %d\n", p_mem_get_info(&free_bytes, &total));
    printf("info_free %zu\ninfo_total %zu\n", free_bytes, total);
    if (granted == 0) return;
    printf("free_rc %d\n", release(kind, keys[--granted]));
    printf("held_after_free %lld\n", live(pool) - before);
    p_mem_get_info(&free_bytes, &total);
    printf("info_free_after_free %zu\n", free_bytes);
    rc = allocate(kind, chunk, &keys[granted]);
    printf("again_rc %d\n", rc);
    if (rc == 0) granted++;
    printf("held_again %lld\n", live(pool) - before);
    while (granted > 0) release(kind, keys[--granted]);
    printf("held_end %lld\n", live(pool) - before);
    printf("unknown_free_rc %d\n", release(kind, 0xdead0000ULL));
    printf("held_after_unknown_free %lld\n", live(pool) - before);
}

/* ---- registering memory the ledger already counts --------------------------------------------- */

/* malloc'ed memory pinned with cuMemHostRegister is counted once, by malloc; a part of it too. */
static void run_register_malloc(size_t bytes) {
    start();
    long long before = live(QVSHIM_POOL_HOST);
    char *p = malloc(bytes);
    if (p == NULL) die("malloc");
    p[0] = p[bytes - 1] = 1;
    long long block = live(QVSHIM_POOL_HOST) - before;
    printf("block %lld\n", block);
    printf("register_rc %d\n", p_mem_host_register(p, bytes, 0));
    printf("after_register %lld\n", live(QVSHIM_POOL_HOST) - before);
    printf("unregister_rc %d\n", p_mem_host_unregister(p));
    printf("part_register_rc %d\n", p_mem_host_register(p + bytes / 4, bytes / 2, 0));
    printf("after_part_register %lld\n", live(QVSHIM_POOL_HOST) - before);
    printf("part_unregister_rc %d\n", p_mem_host_unregister(p + bytes / 4));
    printf("after_unregister %lld\n", live(QVSHIM_POOL_HOST) - before);
    free(p);
    printf("after_free %lld\n", live(QVSHIM_POOL_HOST) - before);
}

/* ---- devices --------------------------------------------------------------------------------- */

static void run_devices(void) {
    start();
    int count = 0;
    p_device_get_count(&count);
    printf("devices %d\n", count);
    for (int d = 0; d < count; d++) {
        size_t total_mem = 0, free_bytes = 0, total = 0;
        p_device_total_mem(&total_mem, d);
        use_device(d);
        p_mem_get_info(&free_bytes, &total);
        printf("device%d_total_mem %zu\ndevice%d_info_total %zu\ndevice%d_info_free %zu\n", d, total_mem, d,
               total, d, free_bytes);
    }
    u64 p = 0, handle = 0;
    use_device(1);
    printf("alloc_on_1_rc %d\n", p_mem_alloc(&p, 1024 * MIB));
    use_device(0);
    struct fake_prop prop = {.type = 1, .location_type = 1, .location_id = 1};
    printf("create_on_1_rc %d\n", p_mem_create(&handle, 512 * MIB, &prop, 0));
    printf("pool1_live %lld\npool2_live %lld\n", live(1), live(2));
    p_mem_free(p);
    p_mem_release(handle);
    printf("pool1_live_end %lld\npool2_live_end %lld\n", live(1), live(2));
}

/* ---- threads --------------------------------------------------------------------------------- */

static int rounds;

static void *worker(void *arg) {
    unsigned seed = (unsigned)(uintptr_t)arg;
    use_device(0);
    for (int i = 0; i < rounds; i++) {
        size_t bytes = (size_t)(rand_r(&seed) % 4096 + 1) * 512;
        u64 key = 0;
        switch (i % 3) {
        case 0:
            if (p_mem_alloc(&key, bytes) == 0) p_mem_free(key);
            break;
        case 1:
            if (p_mem_alloc_async_ptsz(&key, bytes, NULL) == 0) p_mem_free_async_ptsz(key, NULL);
            break;
        default: {
            struct fake_prop prop = {.type = 1, .location_type = 1, .location_id = 0};
            if (p_mem_create(&key, bytes, &prop, 0) == 0) p_mem_release(key);
        }
        }
    }
    return NULL;
}

static void run_threads(int threads, int n) {
    start();
    rounds = n;
    pthread_t tids[64];
    if (threads > 64) threads = 64;
    for (int i = 0; i < threads; i++) pthread_create(&tids[i], NULL, worker, (void *)(uintptr_t)(i + 1));
    for (int i = 0; i < threads; i++) pthread_join(tids[i], NULL);
    print_pool("pool", 1);
}

/* ---- steps ---------------------------------------------------------------------------------- */

#define STEP_DEADLINE_MS 20000
#define STEP_POLL_MS 10

static unsigned long long effective_budget(int pool) {
    struct qvshim_pool_stats s = {.struct_size = sizeof s};
    if (!pool_stats || pool_stats(pool, &s) != 0) return 0;
    return s.effective_budget;
}

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Writes the JSON dump to `path`; 1 when it contains `text`. */
static int dump_contains(const char *path, const char *text) {
    int (*dump)(int, int) = (int (*)(int, int))dlsym(RTLD_DEFAULT, "qvshim_dump");
    if (!dump) return 0;
    FILE *f = fopen(path, "w+");
    if (!f) die("dump file");
    dump(fileno(f), 1);
    fflush(f);
    rewind(f);
    static char buffer[1 << 20];
    size_t n = fread(buffer, 1, sizeof buffer - 1, f);
    buffer[n] = 0;
    fclose(f);
    return strstr(buffer, text) != NULL;
}

static void run_steps(int count, char **steps) {
    start();
    u64 keys[64];
    const char *kinds[64];
    int held = 0;
    for (int i = 0; i < count; i++) {
        char step[512];
        snprintf(step, sizeof step, "%s", steps[i]);
        char *op = strtok(step, ":");
        char *arg1 = strtok(NULL, ":");
        char *arg2 = strtok(NULL, "");
        if (!op) die("empty step");
        if (strcmp(op, "dev") == 0 && arg1) {
            use_device(atoi(arg1));
            printf("s%d 0\n", i);
        } else if (strcmp(op, "a") == 0 && arg1 && arg2 && held < 64) {
            CUresult rc = allocate(arg1, (size_t)strtoull(arg2, NULL, 10) * MIB, &keys[held]);
            printf("s%d %d\n", i, rc);
            if (rc == 0) kinds[held++] = steps[i] + 2;
        } else if (strcmp(op, "f") == 0 && held > 0) {
            held--;
            char kind[64];
            snprintf(kind, sizeof kind, "%s", kinds[held]);
            char *colon = strchr(kind, ':');
            if (colon) *colon = 0;
            printf("s%d %d\n", i, release(kind, keys[held]));
        } else if (strcmp(op, "touch") == 0 && arg1) {
            /* Anonymous memory the ledger does not count: the host's unseen anonymous memory. */
            size_t bytes = (size_t)strtoull(arg1, NULL, 10) * MIB;
            char *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (p == MAP_FAILED) die("mmap");
            memset(p, 1, bytes);
            printf("s%d 0\n", i);
        } else if (strcmp(op, "effbelow") == 0 && arg1 && arg2) {
            int pool = atoi(arg1);
            unsigned long long below = strtoull(arg2, NULL, 10) * MIB;
            for (int waited = 0; effective_budget(pool) >= below && waited < STEP_DEADLINE_MS; waited += STEP_POLL_MS)
                sleep_ms(STEP_POLL_MS);
            printf("s%d %llu\n", i, effective_budget(pool));
        } else if (strcmp(op, "info") == 0) {
            size_t free_bytes = 0, total = 0;
            CUresult rc = p_mem_get_info(&free_bytes, &total);
            printf("s%d %zu\nt%d %zu\ninfo_rc%d %d\n", i, free_bytes, i, total, i, rc);
        } else if (strcmp(op, "eff") == 0 && arg1 && arg2) {
            int pool = atoi(arg1);
            unsigned long long want = strtoull(arg2, NULL, 10) * MIB;
            for (int waited = 0; effective_budget(pool) != want && waited < STEP_DEADLINE_MS; waited += STEP_POLL_MS)
                sleep_ms(STEP_POLL_MS);
            printf("s%d %llu\n", i, effective_budget(pool));
        } else if (strcmp(op, "sleep") == 0 && arg1) {
            sleep_ms(atoi(arg1));
            printf("s%d 0\n", i);
        } else if (strcmp(op, "dump") == 0 && arg1 && arg2) {
            int found = 0;
            for (int waited = 0; !(found = dump_contains(arg1, arg2)) && waited < STEP_DEADLINE_MS;
                 waited += STEP_POLL_MS * 10)
                sleep_ms(STEP_POLL_MS * 10);
            printf("s%d %d\n", i, found);
        } else {
            die("bad step");
        }
    }
    const char *(*sequence)(void) = driver ? (const char *(*)(void))dlsym(driver, "fake_cuda_sequence") : NULL;
    printf("sequence %s\n", sequence ? sequence() : "");
    if (fake_calls)
        printf("default_pool_asks0 %llu\ndefault_pool_asks1 %llu\nnull_pool_calls %llu\n",
               (unsigned long long)fake_calls("cuDeviceGetDefaultMemPool:0"),
               (unsigned long long)fake_calls("cuDeviceGetDefaultMemPool:1"),
               (unsigned long long)(fake_calls("cuMemPoolGetAttribute(NULL)") +
                                    fake_calls("cuMemPoolTrimTo(NULL)")));
    print_pool("pool", 1);
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc >= 2 && strcmp(argv[1], "lookup") == 0) run_lookup();
    else if (argc >= 4 && strcmp(argv[1], "alloc") == 0)
        run_alloc(argv[2], (size_t)strtoull(argv[3], NULL, 10) * MIB, argc >= 5 ? atoi(argv[4]) : 64);
    else if (argc >= 2 && strcmp(argv[1], "devices") == 0) run_devices();
    else if (argc >= 3 && strcmp(argv[1], "register_malloc") == 0)
        run_register_malloc((size_t)strtoull(argv[2], NULL, 10) * MIB);
    else if (argc >= 4 && strcmp(argv[1], "threads") == 0) run_threads(atoi(argv[2]), atoi(argv[3]));
    else if (argc >= 2 && strcmp(argv[1], "steps") == 0) run_steps(argc - 2, argv + 2);
    else die("usage: cuda_client lookup | alloc KIND CHUNK_MIB [MAX] | devices | threads N ROUNDS | "
             "register_malloc MIB | steps STEP...");
    return 0;
}
