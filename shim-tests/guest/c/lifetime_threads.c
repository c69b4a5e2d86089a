/*
 * How a process ends when its threads end, for test_lifetime.py. Each case prints its state
 * lines with write(2) (no stdio buffer to lose) and is run with and without the shim; the two
 * runs must end the same way.
 *
 *   main_exits_worker_allocates  main pthread_exit()s, then a worker that mallocs returns
 *   main_exits_worker_quiet      the same with a worker that never allocates and ends
 *                                QUIET_WORKER_MS after main (so no thread's end is near it)
 *   signal_main_blocked          "ready" with main blocked in pause()
 *   signal_main_gone             "ready" from a worker after main pthread_exit()ed
 *   signal_all_gone              the worker says "leaving" and returns: no thread of the program
 *                                is left
 *   signal_pending_at_last_exit  the worker blocks SIGTERM/SIGINT/SIGHUP/SIGQUIT, says "ready",
 *                                waits until one is pending, then returns
 *   fork_child_thread_returns    a worker forks; in the child the forking thread returns
 *   fork_child_main_exits        main forks; in the child main pthread_exit()s
 *
 * Every process that ends through exit() prints "atexit ran". The fork cases' parent prints
 * "child exited N", "child killed by N" or "child still running" (after CHILD_WAIT_MS).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* How long a fork case's parent waits for its child before calling it hung. */
#define CHILD_WAIT_MS 20000
/* How long signal_pending_at_last_exit waits for the test's signal. */
#define PENDING_WAIT_MS 30000
#define STEP_MS 5
/* Longer than the shim's quick looks after a thread's end (about 200 ms). */
#define QUIET_WORKER_MS 500

static pthread_t main_thread;
static const char *mode;

static void say(const char *line) {
    size_t n = strlen(line);
    while (n > 0) {
        ssize_t w = write(1, line, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return;
        line += w;
        n -= (size_t)w;
    }
}

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static void at_exit(void) { say("atexit ran\n"); }

static void join_main(void) {
    int rc = pthread_join(main_thread, NULL);
    if (rc != 0) {
        fprintf(stderr, "pthread_join(main) failed: %s\n", strerror(rc));
        _exit(3);
    }
}

static sigset_t the_four(void) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    sigaddset(&set, SIGQUIT);
    return set;
}

static void wait_child(pid_t child) {
    char line[64];
    for (long waited = 0; waited < CHILD_WAIT_MS; waited += STEP_MS) {
        int status = 0;
        pid_t got = waitpid(child, &status, WNOHANG);
        if (got == child) {
            if (WIFEXITED(status))
                snprintf(line, sizeof line, "child exited %d\n", WEXITSTATUS(status));
            else
                snprintf(line, sizeof line, "child killed by %d\n", WTERMSIG(status));
            say(line);
            return;
        }
        sleep_ms(STEP_MS);
    }
    say("child still running\n");
    kill(child, SIGKILL);
    waitpid(child, NULL, 0);
}

static pid_t forked;

static void *worker(void *arg) {
    (void)arg;
    if (strcmp(mode, "main_exits_worker_allocates") == 0) {
        join_main();
        free(malloc(4096));
        say("worker leaving\n");
    } else if (strcmp(mode, "main_exits_worker_quiet") == 0) {
        join_main();
        sleep_ms(QUIET_WORKER_MS);
        say("worker leaving\n");
    } else if (strcmp(mode, "signal_main_gone") == 0) {
        join_main();
        say("ready\n");
        for (;;)
            pause();
    } else if (strcmp(mode, "signal_all_gone") == 0) {
        join_main();
        say("leaving\n");
    } else if (strcmp(mode, "signal_pending_at_last_exit") == 0) {
        join_main();
        sigset_t four = the_four();
        pthread_sigmask(SIG_BLOCK, &four, NULL);
        say("ready\n");
        for (long waited = 0; waited < PENDING_WAIT_MS; waited += STEP_MS) {
            sigset_t pending;
            sigpending(&pending);
            if (sigismember(&pending, SIGTERM) || sigismember(&pending, SIGINT) ||
                sigismember(&pending, SIGHUP) || sigismember(&pending, SIGQUIT))
                break;
            sleep_ms(STEP_MS);
        }
        say("leaving\n");
    } else if (strcmp(mode, "fork_child_thread_returns") == 0) {
        forked = fork();
        if (forked < 0) {
            perror("fork");
            _exit(3);
        }
        /* Parent and child alike: this thread returns. In the child it is the only thread. */
    }
    return NULL;
}

static void start_worker(pthread_t *t) {
    int rc = pthread_create(t, NULL, worker, NULL);
    if (rc != 0) {
        fprintf(stderr, "pthread_create failed: %s\n", strerror(rc));
        exit(3);
    }
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s CASE\n", argv[0]);
        return 2;
    }
    mode = argv[1];
    main_thread = pthread_self();
    atexit(at_exit);
    pthread_t t;
    if (strcmp(mode, "signal_main_blocked") == 0) {
        say("ready\n");
        for (;;)
            pause();
    }
    if (strcmp(mode, "fork_child_thread_returns") == 0) {
        start_worker(&t);
        pthread_join(t, NULL);
        wait_child(forked);
        return 0;
    }
    if (strcmp(mode, "fork_child_main_exits") == 0) {
        pid_t child = fork();
        if (child < 0) {
            perror("fork");
            return 3;
        }
        if (child == 0)
            pthread_exit(NULL);
        wait_child(child);
        return 0;
    }
    if (strncmp(mode, "main_exits_", 11) == 0 || strncmp(mode, "signal_", 7) == 0) {
        start_worker(&t);
        say("main leaving\n");
        pthread_exit(NULL);
    }
    fprintf(stderr, "unknown case %s\n", mode);
    return 2;
}
