/*
 * A library whose constructor installs a SIGUSR2 handler before the shim's constructor runs
 * (preloaded after the shim: constructors of preloaded libraries run last-loaded first). The
 * shim must leave the handler alone and say so. The handler writes "early handler ran".
 * Built as a shared object by test_lifetime.py.
 */
#include <signal.h>
#include <string.h>
#include <unistd.h>

static void on_usr2(int sig) {
    (void)sig;
    static const char line[] = "early handler ran\n";
    if (write(1, line, sizeof line - 1) < 0) {
        /* Nothing to do: the test sees the line missing. */
    }
}

__attribute__((constructor)) static void install(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr2;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGUSR2, &sa, NULL);
}
