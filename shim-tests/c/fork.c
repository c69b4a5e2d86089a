/*
 * fork.c - a forked child allocates and frees under the shim without
 * deadlocking, its ledger is its own, and a program exec'd from it runs
 * under the shim again.
 */
#include "shimcheck.h"

#include <pthread.h>
#include <signal.h>
#include <sys/wait.h>

/* A child that is not done by then is stuck on a lock it inherited. */
#define CHILD_DEADLINE_SECONDS 20
#define FORKS_UNDER_LOAD 40

static const char *self_path;

static int child_exit_code(pid_t pid, const char *what)
{
    int status = 0;
    REQUIRE(waitpid(pid, &status, 0) == pid, "expected waitpid to reap the %s", what);
    if (WIFSIGNALED(status)) {
        EXPECT(0, "expected the %s to exit normally, it died of signal %d%s", what, WTERMSIG(status),
               WTERMSIG(status) == SIGALRM ? " (deadline hit: deadlock after fork)" : "");
        return -1;
    }
    return WEXITSTATUS(status);
}

/* In a child: allocate and free a spread of sizes, checking the child's own ledger. */
static int child_allocates_and_frees(void)
{
    /* The shim restarts its monitor thread in the child; let that settle
     * (malloc_family's start-up case reports allocation behind our back). */
    EXPECT(wait_for_quiet_ledger(), "expected the child's host live to settle within %d ms",
           QUIET_LEDGER_GIVE_UP_MS);
    for (size_t n = 16; n <= 16 * MIB; n *= 4) {
        uint64_t before = host_live();
        void *p = malloc(n);
        EXPECT(p != NULL, "expected malloc(%zu) in the child to succeed", n);
        if (p == NULL)
            continue;
        memset(p, 9, n);
        EXPECT_COUNTED("malloc in the forked child", p, before);
        free(p);
        EXPECT_LIVE_BACK("free in the forked child", before);
    }
    return check_failures == 0 ? 0 : 1;
}

static void child_can_allocate_and_free(void)
{
    void *parent_block = malloc(MIB);
    REQUIRE(parent_block != NULL, "expected malloc(1 MiB) in the parent to succeed");
    memset(parent_block, 1, MIB);
    uint64_t parent_live = host_live();
    pid_t pid = fork();
    REQUIRE(pid >= 0, "expected fork to succeed");
    if (pid == 0) {
        alarm(CHILD_DEADLINE_SECONDS);
        int rc = child_allocates_and_frees();
        /* The inherited block is the child's copy; freeing it is legal. */
        uint64_t before = host_live();
        free(parent_block);
        EXPECT(host_live() < before, "expected freeing the inherited block to lower the child's live (was %llu)",
               (unsigned long long)before);
        _exit(rc != 0 || check_failures != 0 ? 1 : 0);
    }
    int rc = child_exit_code(pid, "forked child");
    EXPECT(rc == 0, "expected the forked child's allocation checks to pass (exit 0), got exit %d", rc);
    EXPECT_LIVE_BACK("a child that allocated and freed (the parent's ledger must not change)", parent_live);
    free(parent_block);
}

static void child_allocations_do_not_touch_the_parent_ledger(void)
{
    int to_parent[2], to_child[2];
    REQUIRE(pipe(to_parent) == 0 && pipe(to_child) == 0, "expected pipe to succeed");
    uint64_t parent_live = host_live();
    pid_t pid = fork();
    REQUIRE(pid >= 0, "expected fork to succeed");
    if (pid == 0) {
        alarm(CHILD_DEADLINE_SECONDS);
        void *keep = malloc(32 * MIB);
        if (keep != NULL)
            memset(keep, 1, 32 * MIB);
        char c = keep != NULL ? 'y' : 'n';
        if (write(to_parent[1], &c, 1) != 1)
            _exit(3);
        if (read(to_child[0], &c, 1) != 1)
            _exit(4);
        _exit(keep != NULL ? 0 : 2);
    }
    char c = 0;
    REQUIRE(read(to_parent[0], &c, 1) == 1, "expected the child to report its allocation");
    EXPECT(c == 'y', "expected the child's malloc(32 MiB) to succeed");
    EXPECT_LIVE_BACK("the child allocated 32 MiB (it is still alive)", parent_live);
    REQUIRE(write(to_child[1], &c, 1) == 1, "expected to release the child");
    int rc = child_exit_code(pid, "child holding 32 MiB");
    EXPECT(rc == 0, "expected the child to exit 0, got %d", rc);
    EXPECT_LIVE_BACK("the child holding 32 MiB exited", parent_live);
}

static volatile int stop_churn;

static void *churn_worker(void *arg)
{
    (void)arg;
    size_t n = 16;
    while (!stop_churn) {
        void *p = malloc(n);
        if (p != NULL)
            memset(p, 1, n < 256 ? n : 256);
        free(p);
        n = n >= 512 * KIB ? 16 : n * 2 + 8;
    }
    return NULL;
}

static void fork_while_another_thread_allocates_does_not_deadlock(void)
{
    pthread_t churn;
    REQUIRE(pthread_create(&churn, NULL, churn_worker, NULL) == 0, "expected pthread_create to succeed");
    for (int i = 0; i < FORKS_UNDER_LOAD; i++) {
        pid_t pid = fork();
        REQUIRE(pid >= 0, "expected fork to succeed");
        if (pid == 0) {
            alarm(CHILD_DEADLINE_SECONDS);
            for (int j = 0; j < 1000; j++) {
                void *p = malloc((size_t)(j % 64 + 1) * 1024);
                if (p == NULL)
                    _exit(2);
                free(p);
            }
            _exit(child_allocates_and_frees());
        }
        int rc = child_exit_code(pid, "child forked while another thread allocated");
        EXPECT(rc == 0, "expected child %d (forked during malloc churn) to allocate and exit 0, got %d", i, rc);
        if (rc != 0)
            break;
    }
    stop_churn = 1;
    pthread_join(churn, NULL);
}

static void fork_then_exec_runs_the_new_program_under_the_shim(void)
{
    pid_t pid = fork();
    REQUIRE(pid >= 0, "expected fork to succeed");
    if (pid == 0) {
        execl(self_path, self_path, "_exec_target", (char *)NULL);
        _exit(127);
    }
    int rc = child_exit_code(pid, "exec'd program");
    EXPECT(rc == 0, "expected the exec'd program to find the shim and pass its checks (exit 0), got %d%s", rc,
           rc == 127 ? " (exec failed)" : "");
}

/* Runs in the exec'd image: the shim must be loaded again and counting. */
static void _exec_target(void)
{
    REQUIRE(lookup_pool_stats() != NULL, "expected libqvshim.so preloaded in the exec'd program");
    uint64_t before = host_live();
    void *p = malloc(MIB);
    REQUIRE(p != NULL, "expected malloc(1 MiB) in the exec'd program to succeed");
    EXPECT_COUNTED("malloc in the exec'd program", p, before);
    free(p);
    EXPECT_LIVE_BACK("free in the exec'd program", before);
}

static const struct check_case cases[] = {
    CASE(child_can_allocate_and_free),
    CASE(child_allocations_do_not_touch_the_parent_ledger),
    CASE(fork_while_another_thread_allocates_does_not_deadlock),
    CASE(fork_then_exec_runs_the_new_program_under_the_shim),
    CASE(_exec_target),
};

int main(int argc, char **argv)
{
    self_path = "/proc/self/exe";
    return RUN_CASES(cases, argc, argv);
}
