/*
 * naive_dlsym.c - the control for the RTLD_NEXT test: a dlsym hook written the common way, one
 * that calls the real dlsym instead of jumping to it. glibc then sees this library as the caller,
 * so RTLD_NEXT from any other library resolves relative to the wrong object. With it preloaded,
 * rtld_next_main must fail; that the same program passes under libqvshim.so is what counts.
 */
#define _GNU_SOURCE
#include <dlfcn.h>

void *dlsym(void *handle, const char *symbol) {
    static void *(*real)(void *, const char *);
    if (!real) real = (void *(*)(void *, const char *))dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.34");
    if (!real) real = (void *(*)(void *, const char *))dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.2.5");
    return real(handle, symbol);
}
