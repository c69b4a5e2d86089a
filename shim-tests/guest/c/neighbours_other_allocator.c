/*
 * neighbours_other_allocator.c - run with another allocator preloaded before
 * the shim. Uses the functions such an allocator may leave to the next
 * library (reallocarray, the __libc_* names, mallinfo2) on blocks from the
 * process's malloc. Prints "PASS other_allocator".
 */
#define _GNU_SOURCE
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern void *__libc_malloc(size_t);
extern void __libc_free(void *);

int main(void)
{
    setvbuf(stdout, NULL, _IONBF, 0);
    for (int i = 1; i < 200; i++) {
        char *p = malloc((size_t)i * 40);
        memset(p, 7, (size_t)i * 40);
        p = reallocarray(p, (size_t)i, 400);
        if (p == NULL || p[(size_t)i * 40 - 1] != 7) {
            printf("FAIL: expected reallocarray to keep the block's contents\n");
            return 1;
        }
        free(p);
        void *q = __libc_malloc((size_t)i * 16);
        __libc_free(q);
    }
    struct mallinfo2 info = mallinfo2();
    (void)info;
    printf("PASS other_allocator\n");
    return 0;
}
