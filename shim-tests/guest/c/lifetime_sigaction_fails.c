/*
 * A library preloaded before the shim whose sigaction refuses any new action for SIGUSR2
 * (EPERM), as a seccomp filter or a sandbox might: the shim must say, even with logging off,
 * that QVSHIM_DUMP_SIGNAL's handler could not be installed. Built as a shared object by
 * test_lifetime.py.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <signal.h>
#include <stddef.h>

typedef int (*sigaction_fn)(int, const struct sigaction *, struct sigaction *);

int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    static sigaction_fn real;
    if (real == NULL)
        real = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    if (act != NULL && sig == SIGUSR2) {
        errno = EPERM;
        return -1;
    }
    return real(sig, act, old);
}
