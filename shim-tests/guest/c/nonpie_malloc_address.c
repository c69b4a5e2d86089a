/*
 * nonpie_malloc_address.c - built without PIE (-no-pie -fno-pie) and taking malloc's address, as
 * Debian's /usr/bin/python3 does: the program's symbol table then lists malloc as undefined with
 * the address of its PLT entry, and a global lookup of "malloc" answers with that entry.
 *
 * usage: nonpie_malloc_address MIB EXPECT   (EXPECT: "refused" or "granted")
 * Asks malloc for MIB MiB through the taken address; prints "PASS nonpie" when the answer is the
 * expected one.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Where the address goes; volatile keeps the call through it. */
void *(*volatile taken_malloc)(size_t);

int main(int argc, char **argv)
{
    if (argc != 3)
        return 2;
    /* Taken in code: without PIE that is an absolute reference to malloc, which the linker meets
     * with the canonical PLT entry (a static initializer would be a dynamic relocation instead). */
    taken_malloc = malloc;
    size_t bytes = (size_t)strtoul(argv[1], NULL, 10) << 20;
    int want_refused = strcmp(argv[2], "refused") == 0;
    void *p = taken_malloc(bytes);
    if ((p == NULL) != want_refused) {
        printf("FAIL: expected %s MiB to be %s, got %s\n", argv[1], argv[2], p ? "granted" : "refused");
        return 1;
    }
    free(p);
    printf("PASS nonpie\n");
    return 0;
}
