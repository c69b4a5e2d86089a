/*
 * The dump signal and QVSHIM_SIGNAL from the program's side, for test_lifetime.py.
 *
 *   lifetime_signals plain SIG    prints "signal SIG default|ignored|handled", then "ready"
 *   lifetime_signals handle SIG   installs its own handler for SIG first (after the library's
 *                                 load), then the same
 *
 * Then it reads stdin until EOF (the test closes it when it is done) and exits 0. In "handle"
 * mode, each time its handler ran it prints "app handler ran".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static volatile sig_atomic_t handled;

static void on_signal(int sig) {
    (void)sig;
    handled = 1;
}

static void say(const char *line) {
    if (write(1, line, strlen(line)) < 0) {
        /* Nothing to do: the test sees the line missing. */
    }
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s plain|handle SIGNAL\n", argv[0]);
        return 2;
    }
    int sig = atoi(argv[2]);
    int handle = strcmp(argv[1], "handle") == 0;
    if (handle) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_signal;
        sigemptyset(&sa.sa_mask);
        /* No SA_RESTART: the read below returns and the line is printed at once. */
        if (sigaction(sig, &sa, NULL) != 0) {
            perror("sigaction");
            return 2;
        }
    }
    struct sigaction now;
    sigaction(sig, NULL, &now);
    char line[64];
    snprintf(line, sizeof line, "signal %d %s\n", sig,
             now.sa_handler == SIG_IGN   ? "ignored"
             : now.sa_handler == SIG_DFL ? "default"
                                         : "handled");
    say(line);
    say("ready\n");
    char buf[64];
    for (;;) {
        ssize_t n = read(0, buf, sizeof buf);
        if (handled) {
            handled = 0;
            say("app handler ran\n");
        }
        if (n == 0 || (n < 0 && errno != EINTR))
            break;
    }
    return 0;
}
