/*
 * fake_cuda.c - a CUDA driver with no GPU behind it, built as libcuda.so.1 and put first on
 * LD_LIBRARY_PATH so the shim's whole CUDA path runs in CI.
 *
 * It implements the calls the shim wraps (and the few a client needs to get a context) on fake
 * addresses: device memory is a counter, never touched. Like the real driver it:
 *   - exports the versioned names (cuMemAlloc_v2, cuMemAllocAsync_ptsz, ...) and the legacy
 *     unversioned ones with their old ABI (cuMemAlloc with 32-bit sizes);
 *   - answers cuGetProcAddress(_v2) from a table of (name, version, per-thread) forms, handing
 *     out internal entry points that are NOT the exported symbols, writes symbolStatus, and has
 *     one form newer than any the shim knows (cuMemGetInfo at 14.0);
 *   - calls its own functions directly, never through the dynamic linker.
 * Environment: FAKE_CUDA_MEMORY_MIB="8192,4096" sets the devices' sizes (at most 4 devices).
 * fake_cuda_calls(name) tells a test how often an entry point was reached, and
 * fake_cuda_sequence() the order of the allocation calls and pool trims ("name:rc" each);
 * FAKE_CUDA_LOG names a file each of those calls appends "name pid" to.
 *
 * Memory pools: each device has a default pool. With FAKE_CUDA_POOL_KEEPS=1 it keeps what
 * cuMemFreeAsync gives back (as a pool whose release threshold PyTorch raised does) until
 * cuMemPoolTrimTo, and reuses it for the next asynchronous allocations; cuMemPoolGetAttribute
 * reports RESERVED_MEM_CURRENT. Each device also has one pool of its own that only
 * cuMemAllocFromPoolAsync names (handle 0x9100 + device), kept apart from the default pool. fake_cuda_device_used(device) is what the device holds, for
 * the fake NVML. cuDeviceGetUuid(_v2) names device N fa ce 0N 00 ... (and fails with
 * FAKE_CUDA_FAIL=uuid); cuDeviceTotalMem fails with FAKE_CUDA_FAIL=totalmem, and refuses a
 * null pointer as the real driver does. FAKE_CUDA_FAIL=nullpool: cuDeviceGetDefaultMemPool
 * succeeds with a null handle (a driver's bug the shim must not pass on).
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
typedef int CUdevice;
typedef void *CUcontext;
typedef void *CUstream;
typedef void *CUmemoryPool;
typedef unsigned long long CUmemGenericAllocationHandle;

#define CUDA_SUCCESS 0
#define CUDA_ERROR_INVALID_VALUE 1
#define CUDA_ERROR_OUT_OF_MEMORY 2
#define CUDA_ERROR_NOT_INITIALIZED 3
#define CUDA_ERROR_INVALID_DEVICE 101
#define CUDA_ERROR_INVALID_CONTEXT 201
#define CUDA_ERROR_NOT_FOUND 500
#define CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED 713
#define CUDA_ERROR_NOT_SUPPORTED 801

#define PER_THREAD_FLAG 2
#define STATUS_SUCCESS 0
#define STATUS_SYMBOL_NOT_FOUND 1
#define STATUS_VERSION_NOT_SUFFICIENT 2

#define MAX_DEVICES 4
#define MAX_LIVE 65536
#define ALIGN_BYTES 512ULL
#define MIB (1024ULL * 1024ULL)

/* ---- state ------------------------------------------------------------------------------- */

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int device_count;
static unsigned long long device_total[MAX_DEVICES];
static unsigned long long device_used[MAX_DEVICES];
static unsigned long long device_next[MAX_DEVICES];
static unsigned long long next_handle = 1;
static int initialized;
static __thread int current_device = -1;

/* Each device's default pool: what it keeps after asynchronous frees, and what it serves. */
static int pool_keeps;
/* Slot d is device d's default pool, slot MAX_DEVICES + d the one other pool each device has,
 * named only in cuMemAllocFromPoolAsync (handle NAMED_POOL_HANDLE_BASE + d). */
#define POOL_SLOTS (2 * MAX_DEVICES)
static unsigned long long pool_cached[POOL_SLOTS];
static unsigned long long pool_live[POOL_SLOTS];
/* The slot the next asynchronous allocation on this thread comes from, past its device. */
static __thread int named_pool_next;
#define POOL_HANDLE_BASE 0x9000
#define NAMED_POOL_HANDLE_BASE 0x9100
#define ATTR_RESERVED_MEM_CURRENT 5

enum live_kind { LIVE_DEVICE, LIVE_HANDLE, LIVE_HOST, LIVE_REGISTERED, LIVE_ASYNC };
struct live {
    unsigned long long key;
    unsigned long long bytes;
    int device;
    int kind;
    int pool; /* the pool slot of an asynchronous allocation */
    int in_use;
};
static struct live live[MAX_LIVE];

static void set_up_devices(void) {
    const char *keeps = getenv("FAKE_CUDA_POOL_KEEPS");
    pool_keeps = keeps && strcmp(keeps, "1") == 0;
    const char *sizes = getenv("FAKE_CUDA_MEMORY_MIB");
    if (!sizes || !*sizes) sizes = "8192,4096";
    device_count = 0;
    for (const char *p = sizes; *p && device_count < MAX_DEVICES;) {
        char *end;
        unsigned long long mib = strtoull(p, &end, 10);
        if (end == p) break;
        device_total[device_count] = mib * MIB;
        device_next[device_count] = (0x100ULL + device_count) << 36; /* distinct, aligned */
        device_count++;
        p = *end == ',' ? end + 1 : end;
    }
}

/* ---- call counters ----------------------------------------------------------------------- */

#define MAX_COUNTERS 64
static struct { const char *name; unsigned long long calls; } counters[MAX_COUNTERS];

/* With FAKE_CUDA_LOG set, each counted call appends "name pid" to that file: a test sees which
 * process (a fork child or its parent) reached the driver. */
static void log_call(const char *name) {
    const char *path = getenv("FAKE_CUDA_LOG");
    if (!path) return;
    FILE *f = fopen(path, "a");
    if (!f) return;
    fprintf(f, "%s %d\n", name, (int)getpid());
    fclose(f);
}

/* A fork child may have been forked while another thread held the lock. */
static void reset_lock_in_child(void) { pthread_mutex_init(&lock, NULL); }

__attribute__((constructor)) static void register_fork_handler(void) {
    pthread_atfork(NULL, NULL, reset_lock_in_child);
}

static void count(const char *name) {
    log_call(name);
    pthread_mutex_lock(&lock);
    for (int i = 0; i < MAX_COUNTERS; i++) {
        if (!counters[i].name) counters[i].name = name;
        if (strcmp(counters[i].name, name) == 0) {
            counters[i].calls++;
            break;
        }
    }
    pthread_mutex_unlock(&lock);
}

__attribute__((visibility("default"))) unsigned long long fake_cuda_calls(const char *name) {
    unsigned long long n = 0;
    pthread_mutex_lock(&lock);
    for (int i = 0; i < MAX_COUNTERS && counters[i].name; i++)
        if (strcmp(counters[i].name, name) == 0) n = counters[i].calls;
    pthread_mutex_unlock(&lock);
    return n;
}

#define SEQUENCE_BYTES 8192
static char sequence[SEQUENCE_BYTES];

/* Appends "name:rc " to the sequence (under lock). */
static void note(const char *name, CUresult rc) {
    size_t used = strlen(sequence);
    if (used + 64 < SEQUENCE_BYTES) snprintf(sequence + used, SEQUENCE_BYTES - used, "%s:%d ", name, rc);
}

__attribute__((visibility("default"))) const char *fake_cuda_sequence(void) { return sequence; }

__attribute__((visibility("default"))) unsigned long long fake_cuda_device_used(int device) {
    unsigned long long used = 0;
    pthread_mutex_lock(&lock);
    if (device >= 0 && device < device_count) used = device_used[device];
    pthread_mutex_unlock(&lock);
    return used;
}

/* ---- bookkeeping of live allocations (under lock) ---------------------------------------- */

static int remember(unsigned long long key, unsigned long long bytes, int device, int kind, int pool) {
    for (int i = 0; i < MAX_LIVE; i++) {
        if (!live[i].in_use) {
            live[i] = (struct live){key, bytes, device, kind, pool, 1};
            return 1;
        }
    }
    return 0;
}

static struct live *find(unsigned long long key, int kind) {
    for (int i = 0; i < MAX_LIVE; i++)
        if (live[i].in_use && live[i].key == key && live[i].kind == kind) return &live[i];
    return NULL;
}

/* Takes `bytes` of fake device memory on `device`; the address through *out. */
static CUresult device_take(int device, unsigned long long bytes, int kind, unsigned long long *out) {
    if (bytes == 0) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = CUDA_SUCCESS;
    unsigned long long key;
    int slot = device + (named_pool_next ? MAX_DEVICES : 0);
    named_pool_next = 0;
    pthread_mutex_lock(&lock);
    if (device < 0 || device >= device_count) {
        rc = CUDA_ERROR_INVALID_DEVICE;
    } else if (kind == LIVE_ASYNC && pool_cached[slot] >= bytes) {
        /* Served from what the pool keeps: the device holds no more. */
        key = device_next[device];
        device_next[device] += (bytes + ALIGN_BYTES - 1) / ALIGN_BYTES * ALIGN_BYTES;
        if (remember(key, bytes, device, kind, slot)) {
            pool_cached[slot] -= bytes;
            pool_live[slot] += bytes;
            *out = key;
        } else {
            rc = CUDA_ERROR_OUT_OF_MEMORY;
        }
    } else if (device_used[device] + bytes > device_total[device]) {
        rc = CUDA_ERROR_OUT_OF_MEMORY;
    } else {
        if (kind == LIVE_HANDLE) {
            key = next_handle++;
        } else {
            key = device_next[device];
            device_next[device] += (bytes + ALIGN_BYTES - 1) / ALIGN_BYTES * ALIGN_BYTES;
        }
        if (remember(key, bytes, device, kind, slot)) {
            device_used[device] += bytes;
            if (kind == LIVE_ASYNC) pool_live[slot] += bytes;
            *out = key;
        } else {
            rc = CUDA_ERROR_OUT_OF_MEMORY;
        }
    }
    pthread_mutex_unlock(&lock);
    return rc;
}

static CUresult device_give(unsigned long long key, int kind) {
    CUresult rc = CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&lock);
    struct live *l = find(key, kind);
    if (!l && kind == LIVE_DEVICE) l = find(key, LIVE_ASYNC); /* cuMemFree of an async pointer */
    if (!l && kind == LIVE_ASYNC) l = find(key, LIVE_DEVICE); /* cuMemFreeAsync of cuMemAlloc's */
    if (l) {
        if (l->kind == LIVE_ASYNC) {
            pool_live[l->pool] -= l->bytes;
            if (pool_keeps) pool_cached[l->pool] += l->bytes;
            else device_used[l->device] -= l->bytes;
        } else {
            device_used[l->device] -= l->bytes;
        }
        l->in_use = 0;
        rc = CUDA_SUCCESS;
    }
    pthread_mutex_unlock(&lock);
    return rc;
}

static CUresult need_context(void) {
    if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
    return current_device < 0 ? CUDA_ERROR_INVALID_CONTEXT : CUDA_SUCCESS;
}

/* ---- the implementations (static: reached only through the exports and the proc table) --- */

static CUresult impl_init(unsigned int flags) {
    (void)flags;
    count("cuInit");
    pthread_mutex_lock(&lock);
    if (!initialized) set_up_devices();
    initialized = 1;
    pthread_mutex_unlock(&lock);
    return CUDA_SUCCESS;
}

static CUresult impl_driver_get_version(int *version) {
    if (!version) return CUDA_ERROR_INVALID_VALUE;
    *version = 13000;
    return CUDA_SUCCESS;
}

static CUresult impl_device_get_count(int *n) {
    if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
    *n = device_count;
    return CUDA_SUCCESS;
}

static CUresult impl_device_get(CUdevice *device, int ordinal) {
    if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (ordinal < 0 || ordinal >= device_count) return CUDA_ERROR_INVALID_DEVICE;
    *device = ordinal;
    return CUDA_SUCCESS;
}

static CUresult impl_primary_ctx_retain(CUcontext *ctx, CUdevice device) {
    if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (device < 0 || device >= device_count) return CUDA_ERROR_INVALID_DEVICE;
    *ctx = (CUcontext)(uintptr_t)(device + 1);
    return CUDA_SUCCESS;
}

static CUresult impl_ctx_set_current(CUcontext ctx) {
    current_device = (int)(uintptr_t)ctx - 1;
    return CUDA_SUCCESS;
}

static CUresult impl_ctx_get_device(CUdevice *device) {
    CUresult rc = need_context();
    if (rc != CUDA_SUCCESS) return rc;
    *device = current_device;
    return CUDA_SUCCESS;
}

/* Whether FAKE_CUDA_FAIL names `what`: the one failure the fake plays this run. */
static int failing(const char *what) {
    const char *fail = getenv("FAKE_CUDA_FAIL");
    return fail && strcmp(fail, what) == 0;
}

static CUresult impl_device_total_mem_v2(size_t *bytes, CUdevice device) {
    count("cuDeviceTotalMem_v2");
    if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (failing("totalmem")) return CUDA_ERROR_NOT_SUPPORTED;
    if (!bytes) return CUDA_ERROR_INVALID_VALUE;
    if (device < 0 || device >= device_count) return CUDA_ERROR_INVALID_DEVICE;
    *bytes = device_total[device];
    return CUDA_SUCCESS;
}

static CUresult impl_mem_get_info_v2(size_t *free_bytes, size_t *total_bytes) {
    count("cuMemGetInfo_v2");
    CUresult rc = need_context();
    if (rc != CUDA_SUCCESS) return rc;
    pthread_mutex_lock(&lock);
    *free_bytes = device_total[current_device] - device_used[current_device];
    *total_bytes = device_total[current_device];
    pthread_mutex_unlock(&lock);
    return CUDA_SUCCESS;
}

/* A form newer than the shim knows: same figures, one more argument. */
static CUresult impl_mem_get_info_v3(size_t *free_bytes, size_t *total_bytes, unsigned flags) {
    (void)flags;
    count("cuMemGetInfo_v3");
    return impl_mem_get_info_v2(free_bytes, total_bytes);
}

static CUresult device_alloc_kind(const char *name, CUdeviceptr *dptr, size_t bytes, int kind) {
    count(name);
    CUresult rc = need_context();
    if (rc == CUDA_SUCCESS && !dptr) rc = CUDA_ERROR_INVALID_VALUE;
    if (rc == CUDA_SUCCESS) rc = device_take(current_device, bytes, kind, dptr);
    pthread_mutex_lock(&lock);
    note(name, rc);
    pthread_mutex_unlock(&lock);
    return rc;
}

static CUresult device_alloc(const char *name, CUdeviceptr *dptr, size_t bytes) {
    return device_alloc_kind(name, dptr, bytes, LIVE_DEVICE);
}

static CUresult impl_mem_alloc_v1(unsigned int *dptr, unsigned int bytes) {
    (void)dptr; (void)bytes;
    count("cuMemAlloc");
    return CUDA_ERROR_NOT_SUPPORTED; /* the 32-bit ABI has no place in a 64-bit process */
}

static CUresult impl_mem_alloc_v2(CUdeviceptr *dptr, size_t bytes) {
    return device_alloc("cuMemAlloc_v2", dptr, bytes);
}

static CUresult impl_mem_alloc_pitch_v2(CUdeviceptr *dptr, size_t *pitch, size_t width, size_t height,
                                        unsigned int element) {
    (void)element;
    if (!pitch) return CUDA_ERROR_INVALID_VALUE;
    size_t rounded = (width + ALIGN_BYTES - 1) / ALIGN_BYTES * ALIGN_BYTES;
    CUresult rc = device_alloc("cuMemAllocPitch_v2", dptr, rounded * height);
    if (rc == CUDA_SUCCESS) *pitch = rounded;
    return rc;
}

static CUresult impl_mem_alloc_managed(CUdeviceptr *dptr, size_t bytes, unsigned int flags) {
    (void)flags;
    return device_alloc("cuMemAllocManaged", dptr, bytes);
}

static CUresult impl_mem_alloc_async(CUdeviceptr *dptr, size_t bytes, CUstream s) {
    (void)s;
    return device_alloc_kind("cuMemAllocAsync", dptr, bytes, LIVE_ASYNC);
}

static CUresult impl_mem_alloc_async_ptsz(CUdeviceptr *dptr, size_t bytes, CUstream s) {
    (void)s;
    return device_alloc_kind("cuMemAllocAsync_ptsz", dptr, bytes, LIVE_ASYNC);
}

static int pool_slot(void *pool);

static CUresult impl_mem_alloc_from_pool_async(CUdeviceptr *dptr, size_t bytes, CUmemoryPool p, CUstream s) {
    (void)s;
    named_pool_next = pool_slot(p) >= MAX_DEVICES;
    return device_alloc_kind("cuMemAllocFromPoolAsync", dptr, bytes, LIVE_ASYNC);
}

static CUresult impl_mem_alloc_from_pool_async_ptsz(CUdeviceptr *dptr, size_t bytes, CUmemoryPool p,
                                                    CUstream s) {
    (void)s;
    named_pool_next = pool_slot(p) >= MAX_DEVICES;
    return device_alloc_kind("cuMemAllocFromPoolAsync_ptsz", dptr, bytes, LIVE_ASYNC);
}

static CUresult impl_mem_free_v1(unsigned int dptr) {
    (void)dptr;
    count("cuMemFree");
    return CUDA_ERROR_NOT_SUPPORTED;
}

static CUresult impl_mem_free_v2(CUdeviceptr dptr) {
    count("cuMemFree_v2");
    return device_give(dptr, LIVE_DEVICE);
}

static CUresult impl_mem_free_async(CUdeviceptr dptr, CUstream s) {
    (void)s;
    count("cuMemFreeAsync");
    return device_give(dptr, LIVE_ASYNC);
}

static CUresult impl_mem_free_async_ptsz(CUdeviceptr dptr, CUstream s) {
    (void)s;
    count("cuMemFreeAsync_ptsz");
    return device_give(dptr, LIVE_ASYNC);
}

/* CUmemAllocationProp: type, requestedHandleTypes, location { type, id }, ... */
struct fake_prop {
    int type;
    int handle_types;
    int location_type;
    int location_id;
};

static CUresult impl_mem_create(CUmemGenericAllocationHandle *handle, size_t bytes, const void *prop,
                                unsigned long long flags) {
    (void)flags;
    count("cuMemCreate");
    if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (!handle || !prop) return CUDA_ERROR_INVALID_VALUE;
    const struct fake_prop *p = prop;
    if (p->location_type != 1) return CUDA_ERROR_NOT_SUPPORTED;
    return device_take(p->location_id, bytes, LIVE_HANDLE, handle);
}

static CUresult impl_mem_release(CUmemGenericAllocationHandle handle) {
    count("cuMemRelease");
    return device_give(handle, LIVE_HANDLE);
}

static CUresult host_take(const char *name, void **pp, size_t bytes) {
    count(name);
    if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (!pp || bytes == 0) return CUDA_ERROR_INVALID_VALUE;
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
    pthread_mutex_lock(&lock);
    int ok = remember((uintptr_t)p, bytes, -1, LIVE_HOST, -1);
    pthread_mutex_unlock(&lock);
    if (!ok) {
        munmap(p, bytes);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    *pp = p;
    return CUDA_SUCCESS;
}

static CUresult impl_mem_host_alloc(void **pp, size_t bytes, unsigned int flags) {
    (void)flags;
    return host_take("cuMemHostAlloc", pp, bytes);
}

static CUresult impl_mem_alloc_host_v2(void **pp, size_t bytes) {
    return host_take("cuMemAllocHost_v2", pp, bytes);
}

static CUresult impl_mem_free_host(void *p) {
    count("cuMemFreeHost");
    pthread_mutex_lock(&lock);
    struct live *l = find((uintptr_t)p, LIVE_HOST);
    unsigned long long bytes = l ? l->bytes : 0;
    if (l) l->in_use = 0;
    pthread_mutex_unlock(&lock);
    if (!l) return CUDA_ERROR_INVALID_VALUE;
    munmap(p, bytes);
    return CUDA_SUCCESS;
}

static CUresult impl_mem_host_register_v2(void *p, size_t bytes, unsigned int flags) {
    (void)flags;
    count("cuMemHostRegister_v2");
    if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (!p || bytes == 0) return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&lock);
    int ok = remember((uintptr_t)p, bytes, -1, LIVE_REGISTERED, -1);
    pthread_mutex_unlock(&lock);
    return ok ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}

static CUresult impl_mem_host_unregister(void *p) {
    count("cuMemHostUnregister");
    pthread_mutex_lock(&lock);
    struct live *l = find((uintptr_t)p, LIVE_REGISTERED);
    if (l) l->in_use = 0;
    pthread_mutex_unlock(&lock);
    return l ? CUDA_SUCCESS : CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED;
}

/* ---- memory pools and UUIDs ------------------------------------------------------------- */

/* A pool handle's slot, or -1 for a handle that is no pool (any other is taken for the default
 * pool by cuMemAllocFromPoolAsync, as the fake always did). */
static int pool_slot(void *pool) {
    intptr_t d = (intptr_t)pool - POOL_HANDLE_BASE;
    if (d >= 0 && d < device_count) return (int)d;
    d = (intptr_t)pool - NAMED_POOL_HANDLE_BASE;
    return d >= 0 && d < device_count ? MAX_DEVICES + (int)d : -1;
}

static CUresult impl_device_get_default_mem_pool(void **pool, CUdevice device) {
    count("cuDeviceGetDefaultMemPool");
    if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (!pool) return CUDA_ERROR_INVALID_VALUE;
    if (device < 0 || device >= device_count) return CUDA_ERROR_INVALID_DEVICE;
    /* Per device as well, so a test can tell which devices were asked about. */
    static const char *const per_device[] = {"cuDeviceGetDefaultMemPool:0", "cuDeviceGetDefaultMemPool:1",
                                             "cuDeviceGetDefaultMemPool:2", "cuDeviceGetDefaultMemPool:3"};
    if (device < (int)(sizeof per_device / sizeof per_device[0])) count(per_device[device]);
    if (failing("nullpool")) {
        *pool = NULL;
        return CUDA_SUCCESS;
    }
    *pool = (void *)(intptr_t)(POOL_HANDLE_BASE + device);
    return CUDA_SUCCESS;
}

static CUresult impl_mem_pool_get_attribute(void *pool, int attribute, void *value) {
    count("cuMemPoolGetAttribute");
    if (!pool) count("cuMemPoolGetAttribute(NULL)");
    int slot = pool_slot(pool);
    if (slot < 0 || !value) return CUDA_ERROR_INVALID_VALUE;
    if (attribute != ATTR_RESERVED_MEM_CURRENT) return CUDA_ERROR_NOT_SUPPORTED;
    pthread_mutex_lock(&lock);
    *(unsigned long long *)value = pool_live[slot] + pool_cached[slot];
    pthread_mutex_unlock(&lock);
    return CUDA_SUCCESS;
}

static CUresult impl_mem_pool_trim_to(void *pool, size_t keep) {
    count("cuMemPoolTrimTo");
    if (!pool) count("cuMemPoolTrimTo(NULL)");
    int slot = pool_slot(pool);
    if (slot < 0) return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&lock);
    unsigned long long reserved = pool_live[slot] + pool_cached[slot];
    if (reserved > keep) {
        unsigned long long give = reserved - keep;
        if (give > pool_cached[slot]) give = pool_cached[slot];
        pool_cached[slot] -= give;
        device_used[slot % MAX_DEVICES] -= give;
    }
    note("cuMemPoolTrimTo", CUDA_SUCCESS);
    pthread_mutex_unlock(&lock);
    return CUDA_SUCCESS;
}

static CUresult impl_device_get_uuid(unsigned char *uuid, CUdevice device) {
    count("cuDeviceGetUuid");
    if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (failing("uuid")) return CUDA_ERROR_NOT_SUPPORTED;
    if (!uuid) return CUDA_ERROR_INVALID_VALUE;
    if (device < 0 || device >= device_count) return CUDA_ERROR_INVALID_DEVICE;
    memset(uuid, 0, 16);
    uuid[0] = 0xfa;
    uuid[1] = 0xce;
    uuid[2] = (unsigned char)device;
    return CUDA_SUCCESS;
}

/* ---- cuGetProcAddress ---------------------------------------------------------------------- */

static CUresult impl_get_proc_address_v2(const char *symbol, void **pfn, int version, unsigned long long flags,
                                         int *status);
static CUresult impl_get_proc_address(const char *symbol, void **pfn, int version, unsigned long long flags);

struct form {
    const char *name;
    int since;      /* CUDA version that introduced this form */
    int per_thread; /* the _ptsz/_ptds form */
    void *entry;
};

#define FORM(name, since, ptsz, fn) {name, since, ptsz, (void *)(fn)}
static const struct form forms[] = {
    FORM("cuGetProcAddress", 11030, 0, impl_get_proc_address),
    FORM("cuGetProcAddress", 12000, 0, impl_get_proc_address_v2),
    FORM("cuInit", 2000, 0, impl_init),
    FORM("cuDriverGetVersion", 2020, 0, impl_driver_get_version),
    FORM("cuDeviceGetCount", 2000, 0, impl_device_get_count),
    FORM("cuDeviceGet", 2000, 0, impl_device_get),
    FORM("cuDevicePrimaryCtxRetain", 7000, 0, impl_primary_ctx_retain),
    FORM("cuCtxSetCurrent", 4000, 0, impl_ctx_set_current),
    FORM("cuCtxGetDevice", 2000, 0, impl_ctx_get_device),
    FORM("cuDeviceTotalMem", 3020, 0, impl_device_total_mem_v2),
    FORM("cuMemGetInfo", 3020, 0, impl_mem_get_info_v2),
    FORM("cuMemGetInfo", 14000, 0, impl_mem_get_info_v3),
    FORM("cuMemAlloc", 2000, 0, impl_mem_alloc_v1),
    FORM("cuMemAlloc", 3020, 0, impl_mem_alloc_v2),
    FORM("cuMemAllocPitch", 3020, 0, impl_mem_alloc_pitch_v2),
    FORM("cuMemAllocManaged", 6000, 0, impl_mem_alloc_managed),
    FORM("cuMemAllocAsync", 11020, 0, impl_mem_alloc_async),
    FORM("cuMemAllocAsync", 11020, 1, impl_mem_alloc_async_ptsz),
    FORM("cuMemAllocFromPoolAsync", 11020, 0, impl_mem_alloc_from_pool_async),
    FORM("cuMemAllocFromPoolAsync", 11020, 1, impl_mem_alloc_from_pool_async_ptsz),
    FORM("cuMemFree", 2000, 0, impl_mem_free_v1),
    FORM("cuMemFree", 3020, 0, impl_mem_free_v2),
    FORM("cuMemFreeAsync", 11020, 0, impl_mem_free_async),
    FORM("cuMemFreeAsync", 11020, 1, impl_mem_free_async_ptsz),
    FORM("cuMemCreate", 10020, 0, impl_mem_create),
    FORM("cuMemRelease", 10020, 0, impl_mem_release),
    FORM("cuMemHostAlloc", 2020, 0, impl_mem_host_alloc),
    FORM("cuMemAllocHost", 3020, 0, impl_mem_alloc_host_v2),
    FORM("cuMemFreeHost", 2000, 0, impl_mem_free_host),
    FORM("cuMemHostRegister", 6050, 0, impl_mem_host_register_v2),
    FORM("cuMemHostUnregister", 4000, 0, impl_mem_host_unregister),
    FORM("cuDeviceGetDefaultMemPool", 11020, 0, impl_device_get_default_mem_pool),
    FORM("cuMemPoolGetAttribute", 11020, 0, impl_mem_pool_get_attribute),
    FORM("cuMemPoolTrimTo", 11020, 0, impl_mem_pool_trim_to),
    FORM("cuDeviceGetUuid", 9020, 0, impl_device_get_uuid),
};

/* The newest form of `symbol` not newer than `version`; a per-thread form when asked for and
 * one exists, the default form otherwise. */
static CUresult lookup(const char *symbol, void **pfn, int version, unsigned long long flags, int *status) {
    const struct form *best = NULL;
    int known = 0;
    int want_per_thread = (flags & PER_THREAD_FLAG) != 0;
    if (pfn) *pfn = NULL;
    if (!symbol || !pfn) return CUDA_ERROR_INVALID_VALUE;
    for (size_t i = 0; i < sizeof forms / sizeof forms[0]; i++) {
        const struct form *f = &forms[i];
        if (strcmp(f->name, symbol) != 0) continue;
        known = 1;
        if (f->since > version) continue;
        if (f->per_thread && !want_per_thread) continue;
        if (!best || f->since > best->since || (f->since == best->since && f->per_thread)) best = f;
    }
    if (!best) {
        if (status) *status = known ? STATUS_VERSION_NOT_SUFFICIENT : STATUS_SYMBOL_NOT_FOUND;
        return CUDA_ERROR_NOT_FOUND;
    }
    *pfn = best->entry;
    if (status) *status = STATUS_SUCCESS;
    return CUDA_SUCCESS;
}

static CUresult impl_get_proc_address_v2(const char *symbol, void **pfn, int version, unsigned long long flags,
                                         int *status) {
    count("cuGetProcAddress_v2");
    return lookup(symbol, pfn, version, flags, status);
}

static CUresult impl_get_proc_address(const char *symbol, void **pfn, int version, unsigned long long flags) {
    count("cuGetProcAddress");
    return lookup(symbol, pfn, version, flags, NULL);
}

/* ---- the exports --------------------------------------------------------------------------- */

#define EXPORT __attribute__((visibility("default")))

EXPORT CUresult cuInit(unsigned int flags) { return impl_init(flags); }
EXPORT CUresult cuDriverGetVersion(int *v) { return impl_driver_get_version(v); }
EXPORT CUresult cuDeviceGetCount(int *n) { return impl_device_get_count(n); }
EXPORT CUresult cuDeviceGet(CUdevice *d, int ordinal) { return impl_device_get(d, ordinal); }
EXPORT CUresult cuDevicePrimaryCtxRetain(CUcontext *c, CUdevice d) { return impl_primary_ctx_retain(c, d); }
EXPORT CUresult cuCtxSetCurrent(CUcontext c) { return impl_ctx_set_current(c); }
EXPORT CUresult cuCtxGetDevice(CUdevice *d) { return impl_ctx_get_device(d); }
EXPORT CUresult cuDeviceTotalMem_v2(size_t *b, CUdevice d) { return impl_device_total_mem_v2(b, d); }
EXPORT CUresult cuMemGetInfo_v2(size_t *f, size_t *t) { return impl_mem_get_info_v2(f, t); }
EXPORT CUresult cuMemAlloc(unsigned int *p, unsigned int b) { return impl_mem_alloc_v1(p, b); }
EXPORT CUresult cuMemAlloc_v2(CUdeviceptr *p, size_t b) { return impl_mem_alloc_v2(p, b); }
EXPORT CUresult cuMemAllocPitch_v2(CUdeviceptr *p, size_t *pitch, size_t w, size_t h, unsigned int e) {
    return impl_mem_alloc_pitch_v2(p, pitch, w, h, e);
}
EXPORT CUresult cuMemAllocManaged(CUdeviceptr *p, size_t b, unsigned int f) { return impl_mem_alloc_managed(p, b, f); }
EXPORT CUresult cuMemAllocAsync(CUdeviceptr *p, size_t b, CUstream s) { return impl_mem_alloc_async(p, b, s); }
EXPORT CUresult cuMemAllocAsync_ptsz(CUdeviceptr *p, size_t b, CUstream s) {
    return impl_mem_alloc_async_ptsz(p, b, s);
}
EXPORT CUresult cuMemAllocFromPoolAsync(CUdeviceptr *p, size_t b, CUmemoryPool m, CUstream s) {
    return impl_mem_alloc_from_pool_async(p, b, m, s);
}
EXPORT CUresult cuMemAllocFromPoolAsync_ptsz(CUdeviceptr *p, size_t b, CUmemoryPool m, CUstream s) {
    return impl_mem_alloc_from_pool_async_ptsz(p, b, m, s);
}
EXPORT CUresult cuMemFree(unsigned int p) { return impl_mem_free_v1(p); }
EXPORT CUresult cuMemFree_v2(CUdeviceptr p) { return impl_mem_free_v2(p); }
EXPORT CUresult cuMemFreeAsync(CUdeviceptr p, CUstream s) { return impl_mem_free_async(p, s); }
EXPORT CUresult cuMemFreeAsync_ptsz(CUdeviceptr p, CUstream s) { return impl_mem_free_async_ptsz(p, s); }
EXPORT CUresult cuMemCreate(CUmemGenericAllocationHandle *h, size_t b, const void *prop, unsigned long long f) {
    return impl_mem_create(h, b, prop, f);
}
EXPORT CUresult cuMemRelease(CUmemGenericAllocationHandle h) { return impl_mem_release(h); }
EXPORT CUresult cuMemHostAlloc(void **pp, size_t b, unsigned int f) { return impl_mem_host_alloc(pp, b, f); }
EXPORT CUresult cuMemAllocHost_v2(void **pp, size_t b) { return impl_mem_alloc_host_v2(pp, b); }
EXPORT CUresult cuMemFreeHost(void *p) { return impl_mem_free_host(p); }
EXPORT CUresult cuMemHostRegister_v2(void *p, size_t b, unsigned int f) { return impl_mem_host_register_v2(p, b, f); }
EXPORT CUresult cuMemHostUnregister(void *p) { return impl_mem_host_unregister(p); }
EXPORT CUresult cuDeviceGetDefaultMemPool(void **p, CUdevice d) { return impl_device_get_default_mem_pool(p, d); }
EXPORT CUresult cuMemPoolGetAttribute(void *p, int a, void *v) { return impl_mem_pool_get_attribute(p, a, v); }
EXPORT CUresult cuMemPoolTrimTo(void *p, size_t keep) { return impl_mem_pool_trim_to(p, keep); }
EXPORT CUresult cuDeviceGetUuid(unsigned char *u, CUdevice d) { return impl_device_get_uuid(u, d); }
EXPORT CUresult cuDeviceGetUuid_v2(unsigned char *u, CUdevice d) { return impl_device_get_uuid(u, d); }
EXPORT CUresult cuGetProcAddress(const char *s, void **pfn, int v, unsigned long long f) {
    return impl_get_proc_address(s, pfn, v, f);
}
EXPORT CUresult cuGetProcAddress_v2(const char *s, void **pfn, int v, unsigned long long f, int *status) {
    return impl_get_proc_address_v2(s, pfn, v, f, status);
}

/* The address of the fake's own export `name`, taken inside the fake: what dlsym must return
 * for every name the shim does not wrap. */
EXPORT void *fake_cuda_own(const char *name) {
    if (strcmp(name, "cuInit") == 0) return (void *)cuInit;
    if (strcmp(name, "cuMemAlloc") == 0) return (void *)cuMemAlloc;
    if (strcmp(name, "cuCtxGetDevice") == 0) return (void *)cuCtxGetDevice;
    return NULL;
}
