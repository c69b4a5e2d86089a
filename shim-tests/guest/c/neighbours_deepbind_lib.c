/*
 * neighbours_deepbind_lib.c - a library the test opens with RTLD_DEEPBIND. Its
 * own references to malloc and free are what the loader binds for it, so a
 * deep-bound copy would take glibc's while the program takes the shim's.
 */
#include <stdlib.h>
#include <string.h>

void *neighbours_lib_alloc(size_t n)
{
    void *p = malloc(n);
    if (p != NULL)
        memset(p, 0x5a, n);
    return p;
}

void *neighbours_lib_grow(void *p, size_t n)
{
    return realloc(p, n);
}

void neighbours_lib_free(void *p)
{
    free(p);
}
