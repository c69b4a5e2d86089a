/*
 * fake_cuda_global.c - the fake driver of fake_cuda.c as a libcuda linked without -Bsymbolic:
 * its cuGetProcAddress(_v2) hands out the addresses of its own exported functions as the
 * dynamic linker resolves them, through the global scope. A library preloaded before it that
 * exports the same name (libqvshim.so, another interposer) is then what the driver hands out.
 *
 * Built with one of:
 *   -DANSWER_EXPORTS        the export's address taken in C: without -Bsymbolic it is a
 *                           relocation against the symbol, filled with its first definition;
 *   -DANSWER_DLSYM_DEFAULT  dlsym(RTLD_DEFAULT, export name), and the driver's own function
 *                           when the global scope has none (the driver is dlopened RTLD_LOCAL).
 * Forms with no export of their own (cuMemGetInfo at 14.0) are handed out as fake_cuda.c does.
 */
#define _GNU_SOURCE
#include <dlfcn.h>

/* fake_cuda.c's own lookups keep their code under other names; this file exports the two. */
#define cuGetProcAddress fake_symbolic_cuGetProcAddress
#define cuGetProcAddress_v2 fake_symbolic_cuGetProcAddress_v2
#include "fake_cuda.c"
#undef cuGetProcAddress
#undef cuGetProcAddress_v2

#if !defined(ANSWER_EXPORTS) && !defined(ANSWER_DLSYM_DEFAULT)
#error "build with -DANSWER_EXPORTS or -DANSWER_DLSYM_DEFAULT"
#endif

EXPORT CUresult cuGetProcAddress(const char *s, void **pfn, int v, unsigned long long f);
EXPORT CUresult cuGetProcAddress_v2(const char *s, void **pfn, int v, unsigned long long f, int *status);

/* The internal entry the table picks, and the export that has the same behaviour. */
struct exported {
    void *entry;
    const char *name;
    void *address;
};

#define EXPORTED(entry, name) {(void *)(entry), #name, (void *)(name)}
static const struct exported exported[] = {
    EXPORTED(impl_get_proc_address, cuGetProcAddress),
    EXPORTED(impl_get_proc_address_v2, cuGetProcAddress_v2),
    EXPORTED(impl_init, cuInit),
    EXPORTED(impl_driver_get_version, cuDriverGetVersion),
    EXPORTED(impl_device_get_count, cuDeviceGetCount),
    EXPORTED(impl_device_get, cuDeviceGet),
    EXPORTED(impl_primary_ctx_retain, cuDevicePrimaryCtxRetain),
    EXPORTED(impl_ctx_set_current, cuCtxSetCurrent),
    EXPORTED(impl_ctx_get_device, cuCtxGetDevice),
    EXPORTED(impl_device_total_mem_v2, cuDeviceTotalMem_v2),
    EXPORTED(impl_mem_get_info_v2, cuMemGetInfo_v2),
    EXPORTED(impl_mem_alloc_v1, cuMemAlloc),
    EXPORTED(impl_mem_alloc_v2, cuMemAlloc_v2),
    EXPORTED(impl_mem_alloc_pitch_v2, cuMemAllocPitch_v2),
    EXPORTED(impl_mem_alloc_managed, cuMemAllocManaged),
    EXPORTED(impl_mem_alloc_async, cuMemAllocAsync),
    EXPORTED(impl_mem_alloc_async_ptsz, cuMemAllocAsync_ptsz),
    EXPORTED(impl_mem_alloc_from_pool_async, cuMemAllocFromPoolAsync),
    EXPORTED(impl_mem_alloc_from_pool_async_ptsz, cuMemAllocFromPoolAsync_ptsz),
    EXPORTED(impl_mem_free_v1, cuMemFree),
    EXPORTED(impl_mem_free_v2, cuMemFree_v2),
    EXPORTED(impl_mem_free_async, cuMemFreeAsync),
    EXPORTED(impl_mem_free_async_ptsz, cuMemFreeAsync_ptsz),
    EXPORTED(impl_mem_create, cuMemCreate),
    EXPORTED(impl_mem_release, cuMemRelease),
    EXPORTED(impl_mem_host_alloc, cuMemHostAlloc),
    EXPORTED(impl_mem_alloc_host_v2, cuMemAllocHost_v2),
    EXPORTED(impl_mem_free_host, cuMemFreeHost),
    EXPORTED(impl_mem_host_register_v2, cuMemHostRegister_v2),
    EXPORTED(impl_mem_host_unregister, cuMemHostUnregister),
};

/* What this driver hands out for the entry the table picked. */
static void *through_global_scope(void *entry) {
    for (size_t i = 0; i < sizeof exported / sizeof exported[0]; i++) {
        if (exported[i].entry != entry) continue;
#ifdef ANSWER_EXPORTS
        return exported[i].address;
#else
        void *found = dlsym(RTLD_DEFAULT, exported[i].name);
        return found ? found : entry;
#endif
    }
    return entry;
}

EXPORT CUresult cuGetProcAddress(const char *s, void **pfn, int v, unsigned long long f) {
    CUresult rc = impl_get_proc_address(s, pfn, v, f);
    if (rc == CUDA_SUCCESS) *pfn = through_global_scope(*pfn);
    return rc;
}

EXPORT CUresult cuGetProcAddress_v2(const char *s, void **pfn, int v, unsigned long long f, int *status) {
    CUresult rc = impl_get_proc_address_v2(s, pfn, v, f, status);
    if (rc == CUDA_SUCCESS) *pfn = through_global_scope(*pfn);
    return rc;
}
