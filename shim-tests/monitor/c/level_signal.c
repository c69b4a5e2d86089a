/*
 * Crosses the warn level of the host pool, then reports whether QVSHIM_SIGNAL (SIGUSR1 in the
 * tests) arrived. "handler": installs a SIGUSR1 handler first. "none": installs nothing; the
 * shim must not raise a signal whose default action would kill the process.
 * Prints one line: "received SIGUSR1", "no signal" or "survived"; exit 0 unless something failed.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "qvshim.h"

static volatile sig_atomic_t received;

static void on_usr1(int sig) {
    (void)sig;
    received = 1;
}

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

int main(int argc, char **argv) {
    int with_handler = argc > 1 && strcmp(argv[1], "handler") == 0;
    if (with_handler) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_usr1;
        sigaction(SIGUSR1, &sa, NULL);
    }
    struct qvshim_pool_stats st = {.struct_size = sizeof st};
    if (qvshim_pool_stats(QVSHIM_POOL_HOST, &st) != 0) {
        fprintf(stderr, "qvshim_pool_stats failed\n");
        return 2;
    }
    /* 75% of the budget in 1 MiB blocks: past warn (70%), short of critical. */
    size_t blocks = (size_t)(st.budget / (1 << 20)) * 75 / 100;
    char **held = calloc(blocks, sizeof *held);
    for (size_t i = 0; i < blocks; i++) {
        held[i] = malloc(1 << 20);
        if (!held[i]) {
            fprintf(stderr, "malloc refused at block %zu\n", i);
            return 2;
        }
    }
    if (qvshim_level(QVSHIM_POOL_HOST) < QVSHIM_LEVEL_WARN) {
        fprintf(stderr, "level did not reach warn\n");
        return 2;
    }
    for (int waited = 0; waited < 3000 && !received; waited += 10)
        sleep_ms(10);
    if (with_handler) {
        puts(received ? "received SIGUSR1" : "no signal");
        return received ? 0 : 1;
    }
    puts("survived");
    for (size_t i = 0; i < blocks; i++)
        free(held[i]);
    free(held);
    return 0;
}
