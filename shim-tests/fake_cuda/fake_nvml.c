/*
 * fake_nvml.c - libnvidia-ml.so.1 with no GPU behind it, for the shim's NVML reading.
 *
 * Devices are the fake driver's (fake_cuda.c), found by the UUID cuDeviceGetUuid gives them
 * ("GPU-face0N00-0000-..."). For its own process, nvmlDeviceGetComputeRunningProcesses reports
 * what the fake driver holds on the device plus FAKE_NVML_EXTRA_MIB ("300,0": MiB per device,
 * the driver's context and the like); another process (pid 1) is listed first with 1 TiB, which
 * the shim must not take for its own.
 *
 * Built four ways: with every form of the process list (_v3, _v2, the original), with
 * -DNO_V3, with -DNO_V3 -DNO_V2, and with none (-DNO_V1 too). FAKE_NVML_FAIL makes one step
 * fail: "init", "handle", "processes", "not_listed" (the process is absent, as in a pid
 * namespace), "not_available", "growing" (the list always has one more entry than the room
 * given). FAKE_NVML_OTHERS sets how many other processes are listed first (1 by default).
 * FAKE_NVML_LOG names a file each call appends "name pid" to (the process list's forms are
 * nvmlDeviceGetComputeRunningProcesses_v3, _v2 and the unsuffixed v1): a test sees which form
 * was used, and which process (a fork child or its parent) called.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

#define NVML_SUCCESS 0
#define NVML_ERROR_UNINITIALIZED 1
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_NOT_FOUND 6
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_ERROR_DRIVER_NOT_LOADED 9
#define NVML_ERROR_UNKNOWN 999
#define MIB (1024ULL * 1024ULL)
#define MAX_DEVICES 4
#define OTHER_PID 1
#define OTHER_USED (1024ULL * 1024ULL * MIB)

struct info_v1 { unsigned int pid; unsigned long long used; };
struct info_v2 { unsigned int pid; unsigned long long used; unsigned int gi, ci; };

static int initialized;
static int handles[MAX_DEVICES];

static int failing(const char *step) {
    const char *fail = getenv("FAKE_NVML_FAIL");
    return fail && strcmp(fail, step) == 0;
}

static void log_call(const char *name) {
    const char *path = getenv("FAKE_NVML_LOG");
    if (!path) return;
    FILE *f = fopen(path, "a");
    if (!f) return;
    fprintf(f, "%s %d\n", name, (int)getpid());
    fclose(f);
}

EXPORT int nvmlInit_v2(void) {
    log_call("nvmlInit_v2");
    if (failing("init")) return NVML_ERROR_DRIVER_NOT_LOADED;
    initialized = 1;
    return NVML_SUCCESS;
}

EXPORT int nvmlInit(void) { return nvmlInit_v2(); }

EXPORT int nvmlShutdown(void) {
    log_call("nvmlShutdown");
    initialized = 0;
    return NVML_SUCCESS;
}

EXPORT int nvmlDeviceGetHandleByUUID(const char *uuid, void **device) {
    log_call("nvmlDeviceGetHandleByUUID");
    if (!initialized) return NVML_ERROR_UNINITIALIZED;
    if (!uuid || !device) return NVML_ERROR_INVALID_ARGUMENT;
    if (failing("handle")) return NVML_ERROR_UNKNOWN;
    unsigned int a = 0, b = 0;
    /* GPU-face0N00-...: the third byte is the device. */
    if (sscanf(uuid, "GPU-%4x%2x", &a, &b) != 2 || a != 0xface || b >= MAX_DEVICES) return NVML_ERROR_NOT_FOUND;
    *device = &handles[b];
    return NVML_SUCCESS;
}

/* For scripts/gpu-check's sampler: devices by index, as many as the fake driver has. */
EXPORT int nvmlDeviceGetCount_v2(unsigned int *count) {
    log_call("nvmlDeviceGetCount_v2");
    if (!initialized) return NVML_ERROR_UNINITIALIZED;
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    *count = 2;
    return NVML_SUCCESS;
}

EXPORT int nvmlDeviceGetHandleByIndex_v2(unsigned int index, void **device) {
    log_call("nvmlDeviceGetHandleByIndex_v2");
    if (!initialized) return NVML_ERROR_UNINITIALIZED;
    if (!device || index >= MAX_DEVICES) return NVML_ERROR_INVALID_ARGUMENT;
    *device = &handles[index];
    return NVML_SUCCESS;
}

static unsigned long long driver_used(int device) {
    void *driver = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (!driver) return 0;
    unsigned long long (*used)(int) = (unsigned long long (*)(int))dlsym(driver, "fake_cuda_device_used");
    unsigned long long bytes = used ? used(device) : 0;
    dlclose(driver);
    return bytes;
}

static unsigned long long extra(int device) {
    const char *p = getenv("FAKE_NVML_EXTRA_MIB");
    for (int i = 0; p && *p; i++) {
        char *end;
        unsigned long long mib = strtoull(p, &end, 10);
        if (end == p) break;
        if (i == device) return mib * MIB;
        p = *end == ',' ? end + 1 : end;
    }
    return 0;
}


/* Other processes listed before this one: FAKE_NVML_OTHERS, 1 unless set. */
static unsigned int others(void) {
    const char *p = getenv("FAKE_NVML_OTHERS");
    return p && *p ? (unsigned int)strtoul(p, NULL, 10) : 1;
}

/* Fills records of `size` bytes: the other processes (pid 1) first, then this process (unless
 * left out). "growing" answers every call with a list one longer than the room it was given. */
__attribute__((unused)) static int processes(const char *name, void *device, unsigned int *count, void *infos, size_t size) {
    log_call(name);
    if (!initialized) return NVML_ERROR_UNINITIALIZED;
    if (!device || !count) return NVML_ERROR_INVALID_ARGUMENT;
    if (failing("processes")) return NVML_ERROR_UNKNOWN;
    if (failing("growing")) {
        *count += 1;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    int index = (int)((int *)device - handles);
    unsigned int other = others();
    unsigned int listed = failing("not_listed") ? other : other + 1;
    if (*count < listed) {
        *count = listed;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    unsigned long long own = driver_used(index) + extra(index);
    if (failing("not_available")) own = ~0ULL;
    for (unsigned int i = 0; i < listed; i++) {
        unsigned int pid = i < other ? OTHER_PID : (unsigned int)getpid();
        unsigned long long used = i < other ? OTHER_USED : own;
        char *record = (char *)infos + i * size;
        memset(record, 0xff, size); /* the MIG ids: "not in MIG mode" */
        memcpy(record, &pid, sizeof pid);
        memcpy(record + 8, &used, sizeof used);
    }
    *count = listed;
    return NVML_SUCCESS;
}

#ifndef NO_V3
EXPORT int nvmlDeviceGetComputeRunningProcesses_v3(void *device, unsigned int *count, struct info_v2 *infos) {
    return processes("nvmlDeviceGetComputeRunningProcesses_v3", device, count, infos, sizeof *infos);
}
#endif

#ifndef NO_V2
EXPORT int nvmlDeviceGetComputeRunningProcesses_v2(void *device, unsigned int *count, struct info_v2 *infos) {
    return processes("nvmlDeviceGetComputeRunningProcesses_v2", device, count, infos, sizeof *infos);
}
#endif

#ifndef NO_V1
EXPORT int nvmlDeviceGetComputeRunningProcesses(void *device, unsigned int *count, struct info_v1 *infos) {
    return processes("nvmlDeviceGetComputeRunningProcesses", device, count, infos, sizeof *infos);
}
#endif
