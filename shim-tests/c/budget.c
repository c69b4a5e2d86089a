/*
 * budget.c - the budget refuses what would cross it, lets small requests run
 * on into the reserve, and the program goes on after every refusal.
 *
 * Run with QVSHIM_BUDGET=64M and the default reserve; every case checks
 * first that the shim really read that budget.
 */
#include "shimcheck.h"

#include <pthread.h>
#include <sys/wait.h>

#define EXPECTED_BUDGET_BYTES (64 * MIB)
#define OVER_BUDGET_BYTES (100 * MIB)
#define LARGE_BLOCK_BYTES MIB
#define MAX_BLOCKS 8192

static void *large_blocks[MAX_BLOCKS];
static size_t n_large;
static void *small_blocks[MAX_BLOCKS];
static size_t n_small;

static struct qvshim_pool_stats budget_stats(void)
{
    struct qvshim_pool_stats s = host_stats();
    REQUIRE(s.budget == EXPECTED_BUDGET_BYTES,
            "expected the host budget to be QVSHIM_BUDGET=64M (%zu bytes), got %llu", EXPECTED_BUDGET_BYTES,
            (unsigned long long)s.budget);
    return s;
}

/* Allocate 1 MiB blocks until the budget refuses one. */
static void fill_to_budget_with_large_blocks(void)
{
    n_large = 0;
    while (n_large < MAX_BLOCKS) {
        errno = 0;
        void *p = malloc(LARGE_BLOCK_BYTES);
        if (p == NULL) {
            EXPECT(errno == ENOMEM, "expected a refused 1 MiB malloc to set errno ENOMEM (%d), got %d", ENOMEM,
                   errno);
            return;
        }
        memset(p, 1, LARGE_BLOCK_BYTES);
        large_blocks[n_large++] = p;
    }
    REQUIRE(0, "expected 1 MiB allocations to be refused before %d of them under a 64M budget", MAX_BLOCKS);
}

/* Allocate blocks of `size` until one is refused; returns live at the refusal. */
static uint64_t fill_with_small_blocks(size_t size)
{
    while (n_small < MAX_BLOCKS) {
        errno = 0;
        void *p = malloc(size);
        if (p == NULL) {
            EXPECT(errno == ENOMEM, "expected a refused %zu-byte malloc to set errno ENOMEM (%d), got %d", size,
                   ENOMEM, errno);
            return host_live();
        }
        memset(p, 2, size);
        small_blocks[n_small++] = p;
    }
    REQUIRE(0, "expected %zu-byte allocations to be refused once budget + reserve is used up", size);
    return 0;
}

static void free_all(void)
{
    while (n_small > 0)
        free(small_blocks[--n_small]);
    while (n_large > 0)
        free(large_blocks[--n_large]);
}

static void malloc_over_budget_fails_with_enomem_and_program_goes_on(void)
{
    struct qvshim_pool_stats s0 = budget_stats();
    errno = 0;
    void *p = malloc(OVER_BUDGET_BYTES);
    EXPECT(p == NULL, "expected malloc(100 MiB) under a 64M budget to return NULL, got %p", p);
    EXPECT(errno == ENOMEM, "expected malloc(100 MiB) over budget to set errno ENOMEM (%d), got %d", ENOMEM, errno);
    struct qvshim_pool_stats s1 = host_stats();
    EXPECT(s1.live == s0.live, "expected a refused malloc to leave live at %llu, got %llu",
           (unsigned long long)s0.live, (unsigned long long)s1.live);
    EXPECT(s1.refusals == s0.refusals + 1, "expected refusals to grow by 1 (from %llu), got %llu",
           (unsigned long long)s0.refusals, (unsigned long long)s1.refusals);
    EXPECT(s1.largest_refused >= OVER_BUDGET_BYTES, "expected largest_refused >= %zu, got %llu", OVER_BUDGET_BYTES,
           (unsigned long long)s1.largest_refused);

    void *q = malloc(32 * MIB);
    REQUIRE(q != NULL, "expected malloc(32 MiB) to succeed after the refusal, got NULL");
    memset(q, 1, 32 * MIB);
    free(q);
}

static void calloc_over_budget_fails_with_enomem(void)
{
    budget_stats();
    errno = 0;
    void *p = calloc(OVER_BUDGET_BYTES / 16, 16);
    EXPECT(p == NULL, "expected calloc of 100 MiB under a 64M budget to return NULL, got %p", p);
    EXPECT(errno == ENOMEM, "expected calloc over budget to set errno ENOMEM (%d), got %d", ENOMEM, errno);
}

static void realloc_over_budget_fails_and_keeps_the_old_block(void)
{
    budget_stats();
    void *p = malloc(MIB);
    REQUIRE(p != NULL, "expected malloc(1 MiB) to succeed");
    fill_pattern(p, MIB, 3);
    uint64_t before = host_live();
    errno = 0;
    void *q = realloc(p, OVER_BUDGET_BYTES);
    EXPECT(q == NULL, "expected realloc to 100 MiB under a 64M budget to return NULL, got %p", q);
    EXPECT(errno == ENOMEM, "expected realloc over budget to set errno ENOMEM (%d), got %d", ENOMEM, errno);
    if (q == NULL) {
        EXPECT(first_pattern_mismatch(p, MIB, 3) == MIB, "expected the old block's contents intact");
        EXPECT_LIVE_BACK("a refused realloc", before);
        free(p);
    } else {
        free(q);
    }
}

static void posix_memalign_over_budget_returns_enomem_code(void)
{
    budget_stats();
    void *sentinel = (void *)&n_large;
    void *p = sentinel;
    errno = 0;
    int rc = posix_memalign(&p, 64, OVER_BUDGET_BYTES);
    EXPECT(rc == ENOMEM, "expected posix_memalign(64, 100 MiB) under a 64M budget to return ENOMEM (%d), got %d",
           ENOMEM, rc);
    EXPECT(p == sentinel, "expected *memptr unchanged after a refused posix_memalign, got %p", p);
    if (rc == 0)
        free(p);
}

/* Up to 64 KiB of alignment a refusal is of the request's size; past it, of the span jemalloc
 * would reserve (size + alignment). The largest refusal says which: 128 MiB asked for at 64 KiB
 * alignment, a span just past budget + reserve (64M + 64M), is a refusal of 128 MiB. */
static void a_refusal_up_to_64kib_alignment_is_of_the_size_asked_for(void)
{
    struct qvshim_pool_stats s0 = budget_stats();
    const size_t size = 128 * MIB;
    REQUIRE(s0.reserve == 64 * MIB, "expected the default reserve 64M, got %llu", (unsigned long long)s0.reserve);
    void *p = NULL;
    int rc = posix_memalign(&p, 64 * KIB, size);
    struct qvshim_pool_stats s = host_stats();
    EXPECT(rc == ENOMEM, "expected posix_memalign(64 KiB, 128 MiB) under a 64M budget to return ENOMEM (%d), got %d",
           ENOMEM, rc);
    EXPECT(s.largest_refused == size, "expected the largest refusal to be the 128 MiB asked for (%zu), got %llu",
           size, (unsigned long long)s.largest_refused);
    if (rc == 0)
        free(p);
    /* malloc's own alignment: a plain request past budget + reserve is a refusal of its size. */
    void *q = malloc(2 * size);
    s = host_stats();
    EXPECT(q == NULL, "expected malloc(256 MiB) under a 64M budget to be refused, got %p", q);
    EXPECT(s.largest_refused == 2 * size, "expected the largest refusal to be the 256 MiB asked for (%zu), got %llu",
           2 * size, (unsigned long long)s.largest_refused);
    free(q);
}

static void aligned_allocators_over_budget_fail_with_enomem(void)
{
    budget_stats();
    const char *names[] = {"aligned_alloc", "memalign", "valloc", "pvalloc"};
    for (int i = 0; i < 4; i++) {
        errno = 0;
        void *p = NULL;
        switch (i) {
        case 0: p = aligned_alloc(4096, OVER_BUDGET_BYTES); break;
        case 1: p = memalign(4096, OVER_BUDGET_BYTES); break;
        case 2: p = valloc(OVER_BUDGET_BYTES); break;
        case 3: p = pvalloc(OVER_BUDGET_BYTES); break;
        }
        EXPECT(p == NULL, "expected %s of 100 MiB under a 64M budget to return NULL, got %p", names[i], p);
        EXPECT(errno == ENOMEM, "expected %s over budget to set errno ENOMEM (%d), got %d", names[i], ENOMEM,
               errno);
        if (p != NULL)
            free(p);
    }
}

static void large_allocations_reach_the_budget_but_never_cross_it(void)
{
    struct qvshim_pool_stats s0 = budget_stats();
    fill_to_budget_with_large_blocks();
    struct qvshim_pool_stats s1 = host_stats();
    EXPECT(s1.live <= s1.effective_budget, "expected live %llu <= effective budget %llu with only 1 MiB blocks",
           (unsigned long long)s1.live, (unsigned long long)s1.effective_budget);
    EXPECT(s1.live + LARGE_BLOCK_BYTES > s1.effective_budget,
           "expected 1 MiB blocks to be served up to the budget (%llu), refused at live %llu",
           (unsigned long long)s1.effective_budget, (unsigned long long)s1.live);
    EXPECT(s1.reserve_in_use == 0, "expected no reserve in use for large blocks, got %llu",
           (unsigned long long)s1.reserve_in_use);
    free_all();
    EXPECT_LIVE_BACK("freeing every large block", s0.live);
}

static void small_allocations_run_into_the_reserve_until_budget_plus_reserve(void)
{
    struct qvshim_pool_stats s0 = budget_stats();
    fill_to_budget_with_large_blocks();
    uint64_t at_budget = host_live();
    uint64_t refused_at = fill_with_small_blocks(RESERVE_ELIGIBLE_MAX_BYTES);
    struct qvshim_pool_stats s = host_stats();
    uint64_t limit = s.effective_budget + s.reserve;
    EXPECT(s.reserve == 64 * MIB, "expected the default reserve 64M (%zu), got %llu", 64 * MIB,
           (unsigned long long)s.reserve);
    EXPECT(refused_at > s.effective_budget,
           "expected 64 KiB allocations to pass the budget %llu into the reserve, refused at live %llu "
           "(%zu small blocks after the large ones stopped at %llu)",
           (unsigned long long)s.effective_budget, (unsigned long long)refused_at, n_small,
           (unsigned long long)at_budget);
    EXPECT(refused_at <= limit, "expected live never above budget + reserve %llu, got %llu",
           (unsigned long long)limit, (unsigned long long)refused_at);
    EXPECT(refused_at + RESERVE_ELIGIBLE_MAX_BYTES > limit,
           "expected the reserve usable up to budget + reserve %llu, 64 KiB refused at live %llu",
           (unsigned long long)limit, (unsigned long long)refused_at);
    EXPECT(s.reserve_in_use == s.live - s.effective_budget,
           "expected reserve_in_use to be live - effective budget = %llu, got %llu",
           (unsigned long long)(s.live - s.effective_budget), (unsigned long long)s.reserve_in_use);

    errno = 0;
    void *again = malloc(RESERVE_ELIGIBLE_MAX_BYTES);
    EXPECT(again == NULL, "expected 64 KiB still refused with the reserve used up, got %p", again);
    if (again != NULL)
        free(again);

    /* Closer still: 4 KiB blocks until one is refused. A 16-byte request aligned to 4 KiB is a
     * 4 KiB block: it must be refused as well, however many bytes below 4 KiB are left. */
    uint64_t tight = fill_with_small_blocks(4 * KIB);
    errno = 0;
    void *page = aligned_alloc(4 * KIB, 16);
    EXPECT(page == NULL, "expected aligned_alloc(4096, 16), a 4 KiB block, refused with %lld bytes left below "
                         "budget + reserve, got %p (live now %llu)",
           (long long)(limit - tight), page, (unsigned long long)host_live());
    if (page != NULL)
        free(page);

    free_all();
    struct qvshim_pool_stats s2 = host_stats();
    EXPECT(s2.live == s0.live, "expected live back at %llu after freeing everything, got %llu",
           (unsigned long long)s0.live, (unsigned long long)s2.live);
    EXPECT(s2.reserve_in_use == 0, "expected reserve_in_use 0 after freeing everything, got %llu",
           (unsigned long long)s2.reserve_in_use);

    void *p = malloc(32 * MIB);
    EXPECT(p != NULL, "expected malloc(32 MiB) to work again after freeing, got NULL (errno %d)", errno);
    if (p != NULL) {
        memset(p, 1, 32 * MIB);
        free(p);
    }
    fill_to_budget_with_large_blocks();
    EXPECT(n_large >= 32, "expected at least 32 MiB of 1 MiB blocks after freeing, got %zu blocks", n_large);
    free_all();
}

/* Past the budget only requests of at most 64 KiB use the reserve, with one exception: after a
 * refusal, one larger request (at most half the reserve) may, so that an error handler's one
 * large step can run (tracemalloc's table); the next only after the level fell back to normal. */
static void allocations_over_64kib_use_the_reserve_only_once_after_a_refusal(void)
{
    budget_stats();
    fill_to_budget_with_large_blocks();
    /* Step into the reserve with one small block at a time. */
    while (host_live() <= host_stats().effective_budget) {
        void *p = malloc(RESERVE_ELIGIBLE_MAX_BYTES);
        REQUIRE(p != NULL, "expected 64 KiB to be served until live passes the budget, got NULL at live %llu",
                (unsigned long long)host_live());
        REQUIRE(n_small < MAX_BLOCKS, "expected live to pass the budget within %d small blocks", MAX_BLOCKS);
        small_blocks[n_small++] = p;
    }
    void *granted = malloc(MIB);
    EXPECT(granted != NULL, "expected the one large request after a refusal to be served from the reserve, "
                            "got NULL (errno %d)", errno);
    const size_t too_big[] = {RESERVE_ELIGIBLE_MAX_BYTES + 1, 128 * KIB, MIB};
    for (size_t i = 0; i < sizeof too_big / sizeof too_big[0]; i++) {
        errno = 0;
        void *p = malloc(too_big[i]);
        EXPECT(p == NULL, "expected malloc(%zu) past the budget to be refused (the one large request the "
                          "reserve grants after a refusal is used), got %p", too_big[i], p);
        EXPECT(errno == ENOMEM, "expected errno ENOMEM (%d) for malloc(%zu) past the budget, got %d", ENOMEM,
               too_big[i], errno);
        if (p != NULL)
            free(p);
    }
    void *small = malloc(RESERVE_ELIGIBLE_MAX_BYTES);
    EXPECT(small != NULL, "expected malloc(64 KiB) past the budget to be served from the reserve, got NULL");
    if (small != NULL)
        free(small);
    free(granted);
    free_all();
}

/* Run with QVSHIM_RESERVE=16M: an aligned request is checked by the span jemalloc reserves for
 * it (size + alignment) against budget + reserve. A span of exactly budget + reserve fits
 * (64 MiB alignment + 16 MiB = 80 MiB), and the 16 MiB block is then within the budget. */
static void an_aligned_span_of_exactly_budget_plus_reserve_is_served(void)
{
    struct qvshim_pool_stats s = budget_stats();
    REQUIRE(s.reserve == 16 * MIB, "expected QVSHIM_RESERVE=16M (%zu bytes), got %llu", 16 * MIB,
            (unsigned long long)s.reserve);
    REQUIRE(s.effective_budget == s.budget, "expected the whole 64 MiB budget in effect, got %llu",
            (unsigned long long)s.effective_budget);
    void *p = NULL;
    int rc = posix_memalign(&p, 64 * MIB, 16 * MIB);
    EXPECT(rc == 0 && p != NULL, "expected posix_memalign(64 MiB, 16 MiB), a span of exactly budget + reserve, "
                                 "to be served, got rc %d", rc);
    if (rc == 0) {
        memset(p, 1, 16 * MIB);
        free(p);
    }
    rc = posix_memalign(&p, 64 * MIB, 16 * MIB + 4096);
    EXPECT(rc == ENOMEM, "expected posix_memalign(64 MiB, 16 MiB + 4 KiB), a span past budget + reserve, to "
                         "return ENOMEM (%d), got %d", ENOMEM, rc);
    if (rc == 0)
        free(p);
}

#define CREDIT_THREADS 240
#define CREDIT_THREAD_BLOCKS 24

/* Allocates and frees 24 blocks of 8 KiB: the thread ends holding credit (up to 192 KiB). */
static void *allocate_free_and_exit(void *arg)
{
    (void)arg;
    void *blocks[CREDIT_THREAD_BLOCKS];
    for (int i = 0; i < CREDIT_THREAD_BLOCKS; i++)
        blocks[i] = malloc(8 * KIB);
    for (int i = 0; i < CREDIT_THREAD_BLOCKS; i++)
        free(blocks[i]);
    return NULL;
}

/* A thread's unused credit is budget set aside for it; when the thread exits it must come back,
 * or 240 threads would strand up to 45 MiB of a 64 MiB budget. */
static void credit_of_exited_threads_comes_back_to_the_budget(void)
{
    budget_stats();
    for (int round = 0; round < CREDIT_THREADS / 8; round++) {
        pthread_t threads[8];
        for (int i = 0; i < 8; i++)
            REQUIRE(pthread_create(&threads[i], NULL, allocate_free_and_exit, NULL) == 0,
                    "expected pthread_create to succeed");
        for (int i = 0; i < 8; i++)
            pthread_join(threads[i], NULL);
    }
    errno = 0;
    void *p = malloc(48 * MIB);
    EXPECT(p != NULL, "expected malloc(48 MiB) under a 64M budget to be served after %d threads that allocated, "
                      "freed and exited, got NULL (errno %d, live %llu)",
           CREDIT_THREADS, errno, (unsigned long long)host_live());
    free(p);
}

static pthread_barrier_t fork_barrier;

/* As allocate_free_and_exit, then waits (holding its credit) until the main thread has forked. */
static void *allocate_free_and_wait_for_fork(void *arg)
{
    allocate_free_and_exit(arg);
    pthread_barrier_wait(&fork_barrier);
    pthread_barrier_wait(&fork_barrier);
    return NULL;
}

/* In a fork child only the forking thread lives on: the credit the other threads held when it
 * forked must come back to the child's budget, or 240 of them would strand up to 45 MiB of 64. */
static void a_fork_child_gets_the_credit_of_the_threads_it_did_not_inherit(void)
{
    budget_stats();
    pthread_t threads[CREDIT_THREADS];
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 64 * KIB);
    REQUIRE(pthread_barrier_init(&fork_barrier, NULL, CREDIT_THREADS + 1) == 0, "expected a barrier");
    for (int i = 0; i < CREDIT_THREADS; i++)
        REQUIRE(pthread_create(&threads[i], &attr, allocate_free_and_wait_for_fork, NULL) == 0,
                "expected pthread_create to succeed");
    pthread_barrier_wait(&fork_barrier);
    fflush(stdout);
    pid_t child = fork();
    REQUIRE(child >= 0, "expected fork to succeed");
    if (child == 0) {
        void *p = malloc(48 * MIB);
        if (p == NULL)
            printf("FAIL %s:%d: expected malloc(48 MiB) under a 64M budget in the fork child of a process with "
                   "%d threads holding credit to be served, got NULL (live %llu)\n",
                   __FILE__, __LINE__, CREDIT_THREADS, (unsigned long long)host_live());
        fflush(stdout);
        _exit(p == NULL ? 1 : 0);
    }
    int status = 0;
    waitpid(child, &status, 0);
    pthread_barrier_wait(&fork_barrier);
    for (int i = 0; i < CREDIT_THREADS; i++)
        pthread_join(threads[i], NULL);
    pthread_barrier_destroy(&fork_barrier);
    pthread_attr_destroy(&attr);
    EXPECT(WIFEXITED(status) && WEXITSTATUS(status) == 0, "expected the fork child to exit 0, got status %d",
           status);
}

/* The one larger request the reserve serves after a refusal may be up to half the reserve:
 * 32 MiB of the default 64, exactly, is served. */
static void the_reserve_grant_after_a_refusal_reaches_exactly_half_the_reserve(void)
{
    struct qvshim_pool_stats s0 = budget_stats();
    REQUIRE(s0.reserve == 64 * MIB, "expected the default reserve 64M, got %llu", (unsigned long long)s0.reserve);
    fill_to_budget_with_large_blocks();
    errno = 0;
    void *half = malloc(32 * MIB);
    EXPECT(half != NULL, "expected malloc(32 MiB), half the reserve, to be served from the reserve after a refusal, "
                         "got NULL (errno %d, live %llu)", errno, (unsigned long long)host_live());
    free(half);
    free_all();
}

static const struct check_case cases[] = {
    CASE(malloc_over_budget_fails_with_enomem_and_program_goes_on),
    CASE(calloc_over_budget_fails_with_enomem),
    CASE(realloc_over_budget_fails_and_keeps_the_old_block),
    CASE(posix_memalign_over_budget_returns_enomem_code),
    CASE(aligned_allocators_over_budget_fail_with_enomem),
    CASE(a_refusal_up_to_64kib_alignment_is_of_the_size_asked_for),
    CASE(large_allocations_reach_the_budget_but_never_cross_it),
    CASE(small_allocations_run_into_the_reserve_until_budget_plus_reserve),
    CASE(allocations_over_64kib_use_the_reserve_only_once_after_a_refusal),
    CASE(an_aligned_span_of_exactly_budget_plus_reserve_is_served),
    CASE(credit_of_exited_threads_comes_back_to_the_budget),
    CASE(a_fork_child_gets_the_credit_of_the_threads_it_did_not_inherit),
    CASE(the_reserve_grant_after_a_refusal_reaches_exactly_half_the_reserve),
};

int main(int argc, char **argv)
{
    return RUN_CASES(cases, argc, argv);
}
