/*
 * dumpfile_raise.c - asks the shim for one dump (the dump signal) and exits; the exit path
 * finishes the dump. Used by shim-tests/guest/test_dumpfile.py.
 *
 *   dumpfile_raise                          just the dump
 *   dumpfile_raise plant-link DUMP VICTIM   first plant DUMP.<suffix>.partial -> VICTIM (a symlink)
 *   dumpfile_raise plant-file DUMP UID      first plant DUMP.<suffix>.partial, a 0666 file of UID
 *
 * The plant commands play a local attacker who guessed the temporary names the shim writes
 * beside DUMP: run with fixed_getrandom.so preloaded, the shim's first suffixes are known, and
 * something is planted at each of the first FIXED_GETRANDOM_PLANTED names. The test then checks
 * that every planted thing is untouched and the dump was written all the same. Each planted
 * path is printed after the pid ("planted PATH").
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fixed_getrandom.h"

static const char PLANTED_TEXT[] = "planted by another user\n";

int main(int argc, char **argv)
{
    static char planted[FIXED_GETRANDOM_PLANTED][4096];
    unsigned planted_count = 0;
    for (unsigned k = 0; argc == 4 && k < FIXED_GETRANDOM_PLANTED; k++) {
        char *partial = planted[planted_count++];
        snprintf(partial, sizeof planted[0], "%s.%016llx.partial", argv[2],
                 (unsigned long long)(FIXED_GETRANDOM_BASE + k));
        if (strcmp(argv[1], "plant-link") == 0) {
            if (symlink(argv[3], partial) != 0) {
                perror("symlink");
                return 2;
            }
        } else if (strcmp(argv[1], "plant-file") == 0) {
            int fd = open(partial, O_WRONLY | O_CREAT | O_EXCL, 0666);
            if (fd < 0 || write(fd, PLANTED_TEXT, strlen(PLANTED_TEXT)) < 0
                || fchmod(fd, 0666) != 0 || fchown(fd, (uid_t)atoi(argv[3]), (gid_t)atoi(argv[3])) != 0) {
                perror("plant-file");
                return 2;
            }
            close(fd);
        } else {
            fprintf(stderr, "unknown command %s\n", argv[1]);
            return 2;
        }
    }
    raise(SIGUSR2);
    printf("pid %d\n", (int)getpid());
    for (unsigned k = 0; k < planted_count; k++)
        printf("planted %s\n", planted[k]);
    return 0;
}
