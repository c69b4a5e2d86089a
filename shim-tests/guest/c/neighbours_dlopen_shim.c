/*
 * neighbours_dlopen_shim.c - a program that is NOT run under the shim and
 * dlopens libqvshim.so (argv[1]) itself, as include/qvshim.h allows, then
 * uses the C API and the heap on both sides of the dlopen. Prints
 * "PASS dlopen_shim".
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qvshim.h"

typedef int (*version_fn)(void);
typedef int (*stats_fn)(int, struct qvshim_pool_stats *);
typedef void *(*malloc_fn)(size_t);
typedef void (*free_fn)(void *);

int main(int argc, char **argv)
{
    if (argc != 2) {
        printf("usage: %s LIBQVSHIM\n", argv[0]);
        return 2;
    }
    setvbuf(stdout, NULL, _IONBF, 0);
    /* Blocks from before the dlopen are glibc's: they must stay freeable. */
    void *before[64];
    for (int i = 0; i < 64; i++)
        before[i] = malloc((size_t)(i + 1) * 100);

    void *shim = dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL);
    if (shim == NULL) {
        printf("FAIL: expected dlopen of libqvshim.so to succeed, dlerror says: %s\n", dlerror());
        return 1;
    }
    version_fn version = (version_fn)dlsym(shim, "qvshim_api_version");
    stats_fn stats = (stats_fn)dlsym(shim, "qvshim_pool_stats");
    if (version == NULL || stats == NULL || version() != QVSHIM_API_VERSION) {
        printf("FAIL: expected qvshim_api_version() == %d and qvshim_pool_stats\n", QVSHIM_API_VERSION);
        return 1;
    }
    struct qvshim_pool_stats s;
    memset(&s, 0, sizeof s);
    s.struct_size = sizeof s;
    if (stats(QVSHIM_POOL_HOST, &s) != 0) {
        printf("FAIL: expected qvshim_pool_stats(host) to answer 0\n");
        return 1;
    }
    for (int i = 0; i < 64; i++)
        free(before[i]);
    /* The process's heap keeps working after the dlopen, in both directions. */
    for (int i = 0; i < 1000; i++) {
        void *p = malloc((size_t)(i % 50 + 1) * 64);
        p = realloc(p, (size_t)(i % 50 + 1) * 128);
        free(p);
    }
    /* The library's own malloc and free, taken from its handle, are a working pair. */
    malloc_fn shim_malloc = (malloc_fn)dlsym(shim, "malloc");
    free_fn shim_free = (free_fn)dlsym(shim, "free");
    if (shim_malloc != NULL && shim_free != NULL) {
        void *p = shim_malloc(1000);
        memset(p, 1, 1000);
        free(p);
        void *q = malloc(1000);
        shim_free(q);
    }
    printf("PASS dlopen_shim\n");
    return 0;
}
