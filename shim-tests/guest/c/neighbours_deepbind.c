/*
 * neighbours_deepbind.c - opens argv[1] with RTLD_DEEPBIND and passes heap
 * blocks across it both ways: the library's blocks freed by the program, the
 * program's blocks grown and freed by the library. Prints "PASS deepbind".
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef void *(*alloc_fn)(size_t);
typedef void *(*grow_fn)(void *, size_t);
typedef void (*free_fn)(void *);

int main(int argc, char **argv)
{
    if (argc != 2) {
        printf("usage: %s LIBRARY\n", argv[0]);
        return 2;
    }
    setvbuf(stdout, NULL, _IONBF, 0);
    void *lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
    if (lib == NULL) {
        printf("FAIL: expected dlopen(RTLD_DEEPBIND) to open %s, dlerror says %s\n", argv[1], dlerror());
        return 1;
    }
    alloc_fn lib_alloc = (alloc_fn)dlsym(lib, "neighbours_lib_alloc");
    grow_fn lib_grow = (grow_fn)dlsym(lib, "neighbours_lib_grow");
    free_fn lib_free = (free_fn)dlsym(lib, "neighbours_lib_free");
    if (lib_alloc == NULL || lib_grow == NULL || lib_free == NULL) {
        printf("FAIL: expected the library's three functions, dlerror says %s\n", dlerror());
        return 1;
    }
    const size_t sizes[] = {24, 1000, 70000, 4 << 20};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        /* The library's block, freed by the program. */
        unsigned char *p = lib_alloc(sizes[i]);
        if (p == NULL || p[sizes[i] - 1] != 0x5a) {
            printf("FAIL: expected the library to allocate %zu bytes\n", sizes[i]);
            return 1;
        }
        p = realloc(p, sizes[i] * 2);
        free(p);
        /* The program's block, grown and freed by the library. */
        unsigned char *q = malloc(sizes[i]);
        memset(q, 0xa5, sizes[i]);
        q = lib_grow(q, sizes[i] * 3);
        if (q == NULL || q[sizes[i] - 1] != 0xa5) {
            printf("FAIL: expected the library to grow the program's %zu-byte block\n", sizes[i]);
            return 1;
        }
        lib_free(q);
    }
    printf("PASS deepbind\n");
    return 0;
}
