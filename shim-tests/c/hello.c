/*
 * hello.c - a well-behaved host program for the configuration tests.
 *
 * It writes one known line to stdout and one to stderr (so the tests can
 * tell the shim's start-up lines, which come before it, from anything the
 * shim prints at exit), then the host pool's budget and reserve as the
 * shim parsed them, and exits 0. The shim must leave all of that intact.
 */
#include "shimcheck.h"

int main(void)
{
    setvbuf(stdout, NULL, _IONBF, 0);
    setvbuf(stderr, NULL, _IONBF, 0);
    fputs("hello from the test program\n", stdout);
    fputs("hello from the test program\n", stderr);
    char *buf = malloc(4096);
    if (buf == NULL)
        return 3;
    memset(buf, 1, 4096);
    free(buf);
    if (lookup_pool_stats() == NULL) {
        fputs("shim=absent\n", stdout);
        return 0;
    }
    struct qvshim_pool_stats s = host_stats();
    printf("budget=%llu reserve=%llu\n", (unsigned long long)s.budget, (unsigned long long)s.reserve);
    return 0;
}
