/*
 * malloc_family.c - the whole malloc family under libqvshim.so behaves as
 * glibc's does, and every block it hands out is counted in the host pool.
 *
 * Run with the default budget (6G): nothing here comes near it.
 */
#include "shimcheck.h"

#include <sys/resource.h>

#include <sys/syscall.h>
#include <time.h>

/* Read through a volatile so the compiler cannot fold the huge requests. */
static volatile size_t size_max_v = SIZE_MAX;

static size_t page_size(void)
{
    return (size_t)sysconf(_SC_PAGESIZE);
}

static int is_aligned(const void *p, size_t alignment)
{
    return ((uintptr_t)p % alignment) == 0;
}

/* How long the start-up case watches an idle program's ledger. */
#define IDLE_WATCH_MS 300

static double monotonic_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
}

/*
 * From the first line of main, a program that allocates nothing must see a
 * constant host live: the shim's own start-up (its monitor thread included)
 * must not charge the host ledger behind the program's back, or every
 * before/after comparison a user makes is off.
 */
static void live_is_constant_from_main_while_the_program_allocates_nothing(void)
{
    double start = monotonic_ms();
    uint64_t first = host_live();
    uint64_t last = first;
    while (monotonic_ms() - start < IDLE_WATCH_MS) {
        uint64_t now = host_live();
        if (now != last) {
            EXPECT(0, "expected host live to stay at %llu while main allocates nothing, it moved to %llu "
                      "%.2f ms into main (difference %lld)",
                   (unsigned long long)last, (unsigned long long)now, monotonic_ms() - start,
                   (long long)(now - last));
            last = now;
        }
    }
}

static void malloc_zero_returns_unique_non_null_blocks(void)
{
    uint64_t before = host_live();
    void *a = malloc(0);
    void *b = malloc(0);
    EXPECT(a != NULL && b != NULL, "expected malloc(0) to return non-NULL (glibc), got %p and %p", a, b);
    EXPECT(a != b, "expected two live malloc(0) blocks to differ, both are %p", a);
    EXPECT_COUNTED("malloc(0)", a, before);
    free(a);
    free(b);
    EXPECT_LIVE_BACK("freeing two malloc(0) blocks", before);
}

static void malloc_counts_usable_size_and_free_gives_it_back(void)
{
    static const size_t sizes[] = {1, 8, 24, 100, 4096, 64 * KIB, 64 * KIB + 1, MIB, 10 * MIB};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        size_t n = sizes[i];
        uint64_t before = host_live();
        void *p = malloc(n);
        REQUIRE(p != NULL, "expected malloc(%zu) to succeed, got NULL (errno %d)", n, errno);
        EXPECT(malloc_usable_size(p) >= n, "expected usable size >= %zu, got %zu", n, malloc_usable_size(p));
        memset(p, 0x5a, n);
        EXPECT_COUNTED("malloc", p, before);
        free(p);
        EXPECT_LIVE_BACK("free of a malloc block", before);
    }
}

static void free_null_does_nothing_and_keeps_errno(void)
{
    uint64_t before = host_live();
    errno = 1234;
    free(NULL);
    EXPECT(errno == 1234, "expected free(NULL) to keep errno 1234, got %d", errno);
    EXPECT_LIVE_BACK("free(NULL)", before);
}

static void free_preserves_errno(size_t n)
{
    void *p = malloc(n);
    REQUIRE(p != NULL, "expected malloc(%zu) to succeed", n);
    memset(p, 1, n);
    errno = 1234;
    free(p);
    EXPECT(errno == 1234, "expected free of a %zu-byte block to keep errno 1234, got %d", n, errno);
}

static void free_preserves_errno_for_small_block(void)
{
    free_preserves_errno(32);
}

static void free_preserves_errno_for_large_block(void)
{
    /* Large enough that jemalloc gives the pages back (madvise/munmap). */
    free_preserves_errno(64 * MIB);
}

/*
 * free's errno contract where it can really break: jemalloc gives a freed block's pages back
 * with madvise inside free (immediately when its decay is 0, which the test's row sets with
 * _RJEM_MALLOC_CONF). This program's madvise comes first in symbol lookup: it makes the real
 * call and then leaves errno changed, as any successful libc call may, so a free that does not
 * put errno back is caught. Without it, jemalloc's free never touches errno and a free that
 * forgot to save it would pass.
 */
static volatile int madvise_clobbers_errno;
static volatile unsigned long madvise_calls_clobbered;

int madvise(void *addr, size_t length, int advice)
{
    if (syscall(SYS_madvise, addr, length, advice) != 0)
        return -1;
    if (madvise_clobbers_errno) {
        madvise_calls_clobbered++;
        errno = EIO;
    }
    return 0;
}

static void free_restores_errno_that_jemalloc_changed_inside_free(void)
{
    const size_t sizes[] = {64 * MIB, 2 * MIB, 64 * KIB};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        size_t n = sizes[i];
        void *p = malloc(n);
        REQUIRE(p != NULL, "expected malloc(%zu) to succeed", n);
        memset(p, 1, n);
        madvise_calls_clobbered = 0;
        madvise_clobbers_errno = 1;
        errno = 1234;
        free(p);
        int after = errno;
        madvise_clobbers_errno = 0;
        REQUIRE(madvise_calls_clobbered > 0,
                "expected jemalloc to give the freed %zu-byte block's pages back with madvise inside "
                "free (the row sets dirty_decay_ms:0), saw no madvise call: errno was never put at risk",
                n);
        EXPECT(after == 1234,
               "expected free of a %zu-byte block to put back errno 1234 after jemalloc's madvise "
               "changed it, got %d", n, after);
    }
}

static void calloc_returns_zeroed_memory_even_when_reusing_dirty_blocks(void)
{
    static const size_t sizes[] = {1, 100, 4096, 64 * KIB, MIB, 16 * MIB};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        size_t n = sizes[i];
        void *dirty = malloc(n);
        REQUIRE(dirty != NULL, "expected malloc(%zu) to succeed", n);
        memset(dirty, 0xa5, n);
        free(dirty);
        uint64_t before = host_live();
        unsigned char *p = calloc(1, n);
        REQUIRE(p != NULL, "expected calloc(1, %zu) to succeed, got NULL", n);
        size_t nonzero = n;
        for (size_t j = 0; j < n; j++)
            if (p[j] != 0) {
                nonzero = j;
                break;
            }
        EXPECT(nonzero == n, "expected calloc(1, %zu) to be all zero, byte %zu is 0x%02x", n, nonzero,
               nonzero < n ? p[nonzero] : 0);
        EXPECT_COUNTED("calloc", p, before);
        free(p);
        EXPECT_LIVE_BACK("free of a calloc block", before);
    }
    uint64_t before = host_live();
    unsigned char *arr = calloc(1000, 24);
    REQUIRE(arr != NULL, "expected calloc(1000, 24) to succeed");
    EXPECT(malloc_usable_size(arr) >= 24000, "expected calloc(1000, 24) to give >= 24000 bytes, got %zu",
           malloc_usable_size(arr));
    for (size_t j = 0; j < 24000; j++)
        if (arr[j] != 0) {
            EXPECT(0, "expected calloc(1000, 24) zeroed, byte %zu is 0x%02x", j, arr[j]);
            break;
        }
    EXPECT_COUNTED("calloc(1000, 24)", arr, before);
    free(arr);
}

static void calloc_zero_returns_non_null_block(void)
{
    uint64_t before = host_live();
    void *p = calloc(0, 0);
    void *q = calloc(0, 16);
    EXPECT(p != NULL && q != NULL, "expected calloc(0, 0) and calloc(0, 16) non-NULL (glibc), got %p %p", p, q);
    free(p);
    free(q);
    EXPECT_LIVE_BACK("freeing calloc(0, ...) blocks", before);
}

static void calloc_detects_size_overflow_with_enomem(void)
{
    const size_t max = size_max_v;
    const size_t pairs[][2] = {
        {max, 2}, {2, max}, {max / 2 + 1, 2}, {(size_t)1 << 33, (size_t)1 << 33}, {max, max},
    };
    for (size_t i = 0; i < sizeof pairs / sizeof pairs[0]; i++) {
        uint64_t before = host_live();
        errno = 0;
        void *p = calloc(pairs[i][0], pairs[i][1]);
        EXPECT(p == NULL, "expected calloc(%zu, %zu) (product overflows) to return NULL, got %p",
               pairs[i][0], pairs[i][1], p);
        EXPECT(errno == ENOMEM, "expected calloc(%zu, %zu) to set errno ENOMEM (%d), got %d",
               pairs[i][0], pairs[i][1], ENOMEM, errno);
        EXPECT_LIVE_BACK("an overflowing calloc", before);
        if (p != NULL)
            free(p);
    }
}

static void realloc_of_null_acts_as_malloc(void)
{
    uint64_t before = host_live();
    void *p = realloc(NULL, 1000);
    REQUIRE(p != NULL, "expected realloc(NULL, 1000) to allocate, got NULL");
    EXPECT(malloc_usable_size(p) >= 1000, "expected usable size >= 1000, got %zu", malloc_usable_size(p));
    memset(p, 7, 1000);
    EXPECT_COUNTED("realloc(NULL, 1000)", p, before);
    free(p);
    EXPECT_LIVE_BACK("free of realloc(NULL, 1000)", before);
}

static void realloc_to_zero_frees_block_and_returns_null(void)
{
    static const size_t sizes[] = {16, 1000, MIB};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        uint64_t before = host_live();
        void *p = malloc(sizes[i]);
        REQUIRE(p != NULL, "expected malloc(%zu) to succeed", sizes[i]);
        void *q = realloc(p, 0);
        EXPECT(q == NULL, "expected realloc(p, 0) to free p and return NULL (glibc), got %p", q);
        EXPECT_LIVE_BACK("realloc(p, 0) of a block", before);
        if (q != NULL)
            free(q);
    }
}

static void realloc_keeps_contents(const size_t pairs[][2], size_t n_pairs)
{
    for (size_t i = 0; i < n_pairs; i++) {
        size_t from = pairs[i][0], to = pairs[i][1];
        size_t kept = from < to ? from : to;
        uint64_t before = host_live();
        void *p = malloc(from);
        REQUIRE(p != NULL, "expected malloc(%zu) to succeed", from);
        fill_pattern(p, from, (unsigned)i);
        void *q = realloc(p, to);
        REQUIRE(q != NULL, "expected realloc from %zu to %zu bytes to succeed, got NULL", from, to);
        EXPECT(malloc_usable_size(q) >= to, "expected usable size >= %zu after realloc, got %zu", to,
               malloc_usable_size(q));
        size_t bad = first_pattern_mismatch(q, kept, (unsigned)i);
        EXPECT(bad == kept, "expected realloc %zu -> %zu to keep the first %zu bytes, byte %zu changed",
               from, to, kept, bad);
        memset(q, 3, to);
        EXPECT_COUNTED("realloc", q, before);
        free(q);
        EXPECT_LIVE_BACK("free of a realloc'd block", before);
    }
}

static void realloc_growing_keeps_contents(void)
{
    static const size_t pairs[][2] = {
        {16, 32}, {100, 5000}, {4000, 70 * KIB}, {70 * KIB, MIB}, {MIB, 8 * MIB}, {1, 64 * MIB},
    };
    realloc_keeps_contents(pairs, sizeof pairs / sizeof pairs[0]);
}

static void realloc_shrinking_keeps_contents(void)
{
    static const size_t pairs[][2] = {
        {32, 16}, {5000, 100}, {70 * KIB, 4000}, {MIB, 70 * KIB}, {8 * MIB, MIB}, {64 * MIB, 1},
    };
    realloc_keeps_contents(pairs, sizeof pairs / sizeof pairs[0]);
}

static void failed_realloc_leaves_old_block_intact(void)
{
    const size_t huge[] = {size_max_v / 2, size_max_v, size_max_v - 4096};
    for (size_t i = 0; i < sizeof huge / sizeof huge[0]; i++) {
        void *p = malloc(4096);
        REQUIRE(p != NULL, "expected malloc(4096) to succeed");
        fill_pattern(p, 4096, 11);
        size_t usable = malloc_usable_size(p);
        uint64_t before = host_live();
        errno = 0;
        void *q = realloc(p, huge[i]);
        EXPECT(q == NULL, "expected realloc(p, %zu) to fail with NULL, got %p", huge[i], q);
        EXPECT(errno == ENOMEM, "expected failed realloc to set errno ENOMEM (%d), got %d", ENOMEM, errno);
        if (q != NULL)
            continue;
        EXPECT(first_pattern_mismatch(p, 4096, 11) == 4096, "expected the old block's contents unchanged");
        EXPECT(malloc_usable_size(p) == usable, "expected the old block's usable size %zu unchanged, got %zu",
               usable, malloc_usable_size(p));
        EXPECT_LIVE_BACK("a failed realloc", before);
        free(p);
    }
}

static void reallocarray_detects_overflow_with_enomem(void)
{
    void *p = malloc(64);
    REQUIRE(p != NULL, "expected malloc(64) to succeed");
    fill_pattern(p, 64, 5);
    uint64_t before = host_live();
    errno = 0;
    void *q = reallocarray(p, size_max_v / 2, 3);
    EXPECT(q == NULL, "expected reallocarray(p, SIZE_MAX/2, 3) to return NULL, got %p", q);
    EXPECT(errno == ENOMEM, "expected reallocarray overflow to set errno ENOMEM (%d), got %d", ENOMEM, errno);
    EXPECT(first_pattern_mismatch(p, 64, 5) == 64, "expected the old block intact after reallocarray overflow");
    EXPECT_LIVE_BACK("an overflowing reallocarray", before);

    void *r = reallocarray(p, 100, 10);
    REQUIRE(r != NULL, "expected reallocarray(p, 100, 10) to succeed, got NULL");
    EXPECT(malloc_usable_size(r) >= 1000, "expected usable size >= 1000, got %zu", malloc_usable_size(r));
    EXPECT(first_pattern_mismatch(r, 64, 5) == 64, "expected reallocarray to keep the first 64 bytes");
    free(r);
}

static void posix_memalign_rejects_bad_alignment_with_einval(void)
{
    /* Zero, not a multiple of sizeof(void *), or not a power of two. */
    const size_t bad[] = {0, 1, 2, 4, 3, 12, 24, 48, 1000, 4097, size_max_v, size_max_v / 2};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        void *sentinel = (void *)&bad[i];
        void *p = sentinel;
        uint64_t before = host_live();
        int rc = posix_memalign(&p, bad[i], 64);
        EXPECT(rc == EINVAL, "expected posix_memalign(alignment %zu) to return EINVAL (%d), got %d", bad[i],
               EINVAL, rc);
        EXPECT(p == sentinel, "expected posix_memalign to leave *memptr unchanged on error, got %p", p);
        EXPECT_LIVE_BACK("a rejected posix_memalign", before);
        if (rc == 0)
            free(p);
    }
}

static void posix_memalign_honours_alignment_from_16_bytes_to_1mib(void)
{
    for (size_t a = sizeof(void *); a <= MIB; a *= 2) {
        const size_t sizes[] = {1, 100, a, 3 * a + 1};
        for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
            uint64_t before = host_live();
            void *p = NULL;
            int rc = posix_memalign(&p, a, sizes[i]);
            REQUIRE(rc == 0 && p != NULL, "expected posix_memalign(%zu, %zu) to succeed, got rc %d", a, sizes[i], rc);
            EXPECT(is_aligned(p, a), "expected posix_memalign block %p aligned to %zu", p, a);
            EXPECT(malloc_usable_size(p) >= sizes[i], "expected usable size >= %zu, got %zu", sizes[i],
                   malloc_usable_size(p));
            memset(p, 1, sizes[i]);
            EXPECT_COUNTED("posix_memalign", p, before);
            free(p);
            EXPECT_LIVE_BACK("free of a posix_memalign block", before);
        }
    }
}

static void posix_memalign_returns_enomem_code_for_impossible_size(void)
{
    void *sentinel = (void *)&size_max_v;
    void *p = sentinel;
    /* The error is the return value; errno keeps what the program had (a value neither 0 nor
     * ENOMEM, so that a call that clears or sets it is seen). */
    errno = EILSEQ;
    int rc = posix_memalign(&p, 64, size_max_v / 2);
    int after = errno;
    EXPECT(rc == ENOMEM, "expected posix_memalign(64, SIZE_MAX/2) to return ENOMEM (%d) as its value, got %d",
           ENOMEM, rc);
    EXPECT(p == sentinel, "expected *memptr unchanged after a failed posix_memalign, got %p", p);
    EXPECT(after == EILSEQ, "expected a failed posix_memalign to leave errno at EILSEQ (%d), got %d", EILSEQ,
           after);
}

static void aligned_alloc_honours_alignment(void)
{
    for (size_t a = 1; a <= MIB; a *= 2) {
        const size_t sizes[] = {a, 4 * a, 100};
        for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
            uint64_t before = host_live();
            void *p = aligned_alloc(a, sizes[i]);
            REQUIRE(p != NULL, "expected aligned_alloc(%zu, %zu) to succeed, got NULL", a, sizes[i]);
            EXPECT(is_aligned(p, a), "expected aligned_alloc block %p aligned to %zu", p, a);
            EXPECT(malloc_usable_size(p) >= sizes[i], "expected usable size >= %zu", sizes[i]);
            memset(p, 2, sizes[i]);
            EXPECT_COUNTED("aligned_alloc", p, before);
            free(p);
            EXPECT_LIVE_BACK("free of an aligned_alloc block", before);
        }
    }
}

static void aligned_alloc_rejects_non_power_of_two_alignment_with_einval(void)
{
    /* glibc 2.38 and C17: an unsupported alignment is an error. */
    const size_t bad[] = {0, 3, 24, 48, 1000, 4097, size_max_v};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        uint64_t before = host_live();
        errno = 0;
        void *p = aligned_alloc(bad[i], 4096);
        EXPECT(p == NULL, "expected aligned_alloc(%zu, 4096) to return NULL, got %p", bad[i], p);
        EXPECT(errno == EINVAL, "expected aligned_alloc(%zu, 4096) to set errno EINVAL (%d), got %d", bad[i],
               EINVAL, errno);
        EXPECT_LIVE_BACK("a rejected aligned_alloc", before);
        if (p != NULL)
            free(p);
    }
}

static void memalign_honours_alignment(void)
{
    for (size_t a = 1; a <= MIB; a *= 2) {
        uint64_t before = host_live();
        void *p = memalign(a, 100);
        REQUIRE(p != NULL, "expected memalign(%zu, 100) to succeed, got NULL", a);
        EXPECT(is_aligned(p, a), "expected memalign block %p aligned to %zu", p, a);
        memset(p, 3, 100);
        EXPECT_COUNTED("memalign", p, before);
        free(p);
        EXPECT_LIVE_BACK("free of a memalign block", before);
    }
}

static void memalign_rounds_non_power_of_two_alignment_up(void)
{
    /* glibc rounds an alignment that is not a power of two up to the next one. */
    const size_t rows[][2] = {{3, 4}, {24, 32}, {48, 64}, {1000, 1024}, {4097, 8192}};
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        void *p = memalign(rows[i][0], 100);
        REQUIRE(p != NULL, "expected memalign(%zu, 100) to succeed (glibc rounds the alignment up), got NULL",
                rows[i][0]);
        EXPECT(is_aligned(p, rows[i][1]), "expected memalign(%zu, 100) aligned to %zu, got %p", rows[i][0],
               rows[i][1], p);
        free(p);
    }
}

static void memalign_rejects_huge_alignment_with_einval(void)
{
    const size_t bad[] = {size_max_v / 2 + 2, size_max_v};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        errno = 0;
        void *p = memalign(bad[i], 16);
        EXPECT(p == NULL, "expected memalign(%zu, 16) to return NULL, got %p", bad[i], p);
        EXPECT(errno == EINVAL, "expected memalign(%zu, 16) to set errno EINVAL (%d), got %d", bad[i], EINVAL,
               errno);
    }
}

/* glibc's boundary: alignments up to SIZE_MAX / 2 + 1 (the largest power of two) are valid and
 * fail for want of memory; only larger ones are EINVAL. */
static void memalign_of_the_largest_power_of_two_is_enomem_not_einval(void)
{
    const size_t edge[] = {size_max_v / 2 + 1, size_max_v / 2, size_max_v / 2 - 1};
    for (size_t i = 0; i < sizeof edge / sizeof edge[0]; i++) {
        uint64_t before = host_live();
        errno = 0;
        void *p = memalign(edge[i], 16);
        EXPECT(p == NULL, "expected memalign(%zu, 16) to return NULL, got %p", edge[i], p);
        EXPECT(errno == ENOMEM, "expected memalign(%zu, 16) to set errno ENOMEM (%d) as glibc does, got %d",
               edge[i], ENOMEM, errno);
        EXPECT_LIVE_BACK("a memalign no machine can satisfy", before);
    }
}

static void valloc_returns_page_aligned_blocks(void)
{
    const size_t sizes[] = {1, 100, 4096, 5000, MIB};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        uint64_t before = host_live();
        void *p = valloc(sizes[i]);
        REQUIRE(p != NULL, "expected valloc(%zu) to succeed, got NULL", sizes[i]);
        EXPECT(is_aligned(p, page_size()), "expected valloc(%zu) page aligned, got %p", sizes[i], p);
        memset(p, 4, sizes[i]);
        EXPECT_COUNTED("valloc", p, before);
        free(p);
        EXPECT_LIVE_BACK("free of a valloc block", before);
    }
}

static void pvalloc_rounds_size_up_to_whole_pages(void)
{
    const size_t page = page_size();
    const size_t sizes[] = {1, 100, page, page + 1, 10000};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        size_t rounded = (sizes[i] + page - 1) / page * page;
        uint64_t before = host_live();
        void *p = pvalloc(sizes[i]);
        REQUIRE(p != NULL, "expected pvalloc(%zu) to succeed, got NULL", sizes[i]);
        EXPECT(is_aligned(p, page), "expected pvalloc(%zu) page aligned, got %p", sizes[i], p);
        EXPECT(malloc_usable_size(p) >= rounded, "expected pvalloc(%zu) to give >= %zu bytes, got %zu", sizes[i],
               rounded, malloc_usable_size(p));
        memset(p, 5, rounded);
        EXPECT_COUNTED("pvalloc", p, before);
        free(p);
        EXPECT_LIVE_BACK("free of a pvalloc block", before);
    }
}

static void pvalloc_of_zero_gives_one_page(void)
{
    void *p = pvalloc(0);
    REQUIRE(p != NULL, "expected pvalloc(0) to return a page, got NULL");
    EXPECT(is_aligned(p, page_size()), "expected pvalloc(0) page aligned, got %p", p);
    EXPECT(malloc_usable_size(p) >= page_size(), "expected pvalloc(0) to give a whole page (%zu), got %zu",
           page_size(), malloc_usable_size(p));
    free(p);
}

static void pvalloc_overflow_returns_enomem(void)
{
    errno = 0;
    void *p = pvalloc(size_max_v - 100);
    EXPECT(p == NULL, "expected pvalloc(SIZE_MAX - 100) to return NULL, got %p", p);
    EXPECT(errno == ENOMEM, "expected pvalloc(SIZE_MAX - 100) to set errno ENOMEM (%d), got %d", ENOMEM, errno);
}

static void malloc_usable_size_of_null_is_zero(void)
{
    size_t n = malloc_usable_size(NULL);
    EXPECT(n == 0, "expected malloc_usable_size(NULL) == 0, got %zu", n);
}

static void malloc_usable_size_covers_the_request(void)
{
    for (size_t n = 1; n <= 4 * MIB; n = n * 3 + 1) {
        void *p = malloc(n);
        REQUIRE(p != NULL, "expected malloc(%zu) to succeed", n);
        size_t usable = malloc_usable_size(p);
        EXPECT(usable >= n, "expected malloc_usable_size >= %zu, got %zu", n, usable);
        memset(p, 6, usable);
        free(p);
    }
}

static void cfree_is_exported_by_the_shim_and_frees(void)
{
    void (*cfree_fn)(void *) = (void (*)(void *))dlsym(RTLD_DEFAULT, "cfree");
    REQUIRE(cfree_fn != NULL, "expected dlsym(RTLD_DEFAULT, \"cfree\") to find the shim's cfree, got NULL");
    EXPECT(same_file(defining_file((void *)cfree_fn), shim_path()),
           "expected cfree to be defined by %s, got %s", shim_path(), defining_file((void *)cfree_fn));
    uint64_t before = host_live();
    void *p = malloc(1000);
    REQUIRE(p != NULL, "expected malloc(1000) to succeed");
    cfree_fn(p);
    EXPECT_LIVE_BACK("cfree of a malloc block", before);
}

static const char *const libc_alias_names[] = {
    "__libc_malloc", "__libc_calloc", "__libc_realloc", "__libc_free",
    "__libc_memalign", "__libc_valloc", "__libc_pvalloc",
};

static void libc_aliases_are_defined_by_the_shim(void)
{
    const char *path = shim_path();
    void *handle = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    REQUIRE(handle != NULL, "expected dlopen(%s, RTLD_NOLOAD) to find the loaded shim, got NULL: %s", path,
            dlerror());
    for (size_t i = 0; i < sizeof libc_alias_names / sizeof libc_alias_names[0]; i++) {
        void *sym = dlsym(handle, libc_alias_names[i]);
        EXPECT(sym != NULL, "expected %s in libqvshim.so, dlsym found nothing", libc_alias_names[i]);
        if (sym != NULL)
            EXPECT(same_file(defining_file(sym), path), "expected %s to be defined by %s, got it from %s",
                   libc_alias_names[i], path, defining_file(sym));
    }
    dlclose(handle);
}

static void libc_aliases_allocate_through_the_ledger(void)
{
    void *handle = dlopen(shim_path(), RTLD_NOW | RTLD_NOLOAD);
    REQUIRE(handle != NULL, "expected dlopen(RTLD_NOLOAD) to find the loaded shim");
    void *(*l_malloc)(size_t) = (void *(*)(size_t))dlsym(handle, "__libc_malloc");
    void *(*l_calloc)(size_t, size_t) = (void *(*)(size_t, size_t))dlsym(handle, "__libc_calloc");
    void *(*l_realloc)(void *, size_t) = (void *(*)(void *, size_t))dlsym(handle, "__libc_realloc");
    void (*l_free)(void *) = (void (*)(void *))dlsym(handle, "__libc_free");
    void *(*l_memalign)(size_t, size_t) = (void *(*)(size_t, size_t))dlsym(handle, "__libc_memalign");
    void *(*l_valloc)(size_t) = (void *(*)(size_t))dlsym(handle, "__libc_valloc");
    void *(*l_pvalloc)(size_t) = (void *(*)(size_t))dlsym(handle, "__libc_pvalloc");
    REQUIRE(l_malloc && l_calloc && l_realloc && l_free && l_memalign && l_valloc && l_pvalloc,
            "expected all seven __libc_* aliases to resolve");

    uint64_t before = host_live();
    void *p = l_malloc(1000);
    REQUIRE(p != NULL, "expected __libc_malloc(1000) to succeed");
    EXPECT_COUNTED("__libc_malloc", p, before);
    fill_pattern(p, 1000, 9);
    p = l_realloc(p, 100000);
    REQUIRE(p != NULL, "expected __libc_realloc to 100000 bytes to succeed");
    EXPECT(first_pattern_mismatch(p, 1000, 9) == 1000, "expected __libc_realloc to keep the contents");
    EXPECT_COUNTED("__libc_realloc", p, before);
    l_free(p);
    EXPECT_LIVE_BACK("__libc_free of a __libc_realloc block", before);

    unsigned char *z = l_calloc(100, 10);
    REQUIRE(z != NULL, "expected __libc_calloc(100, 10) to succeed");
    for (size_t i = 0; i < 1000; i++)
        if (z[i] != 0) {
            EXPECT(0, "expected __libc_calloc memory zeroed, byte %zu is 0x%02x", i, z[i]);
            break;
        }
    EXPECT_COUNTED("__libc_calloc", z, before);
    l_free(z);

    void *m = l_memalign(4096, 100);
    REQUIRE(m != NULL, "expected __libc_memalign(4096, 100) to succeed");
    EXPECT(is_aligned(m, 4096), "expected __libc_memalign block aligned to 4096, got %p", m);
    EXPECT_COUNTED("__libc_memalign", m, before);
    l_free(m);

    void *v = l_valloc(100);
    REQUIRE(v != NULL, "expected __libc_valloc(100) to succeed");
    EXPECT(is_aligned(v, page_size()), "expected __libc_valloc block page aligned, got %p", v);
    EXPECT_COUNTED("__libc_valloc", v, before);
    free(v);

    void *pv = l_pvalloc(100);
    REQUIRE(pv != NULL, "expected __libc_pvalloc(100) to succeed");
    EXPECT(is_aligned(pv, page_size()), "expected __libc_pvalloc block page aligned, got %p", pv);
    EXPECT(malloc_usable_size(pv) >= page_size(), "expected __libc_pvalloc(100) to give a page, got %zu",
           malloc_usable_size(pv));
    EXPECT_COUNTED("__libc_pvalloc", pv, before);
    free(pv);
    EXPECT_LIVE_BACK("freeing every __libc_* block", before);
    dlclose(handle);
}

static void libc_internal_allocations_come_from_the_shim(void)
{
    /* glibc allocates for strdup, asprintf and realpath through malloc;
     * freeing those with our free must work and give the bytes back. */
    uint64_t before = host_live();
    char *s = strdup("a string duplicated by glibc through malloc");
    REQUIRE(s != NULL, "expected strdup to succeed");
    EXPECT_COUNTED("strdup", s, before);
    free(s);
    char *f = NULL;
    int n = asprintf(&f, "%s-%d", "formatted", 12345);
    REQUIRE(n > 0 && f != NULL, "expected asprintf to succeed");
    EXPECT_COUNTED("asprintf", f, before);
    free(f);
    char *r = realpath("/", NULL);
    REQUIRE(r != NULL, "expected realpath(\"/\", NULL) to succeed");
    EXPECT_COUNTED("realpath", r, before);
    free(r);
    EXPECT_LIVE_BACK("freeing blocks that glibc allocated", before);
}

static void malloc_of_impossible_size_returns_null_with_enomem(void)
{
    const size_t huge[] = {size_max_v, size_max_v / 2, size_max_v - 4096, (size_t)1 << 62};
    for (size_t i = 0; i < sizeof huge / sizeof huge[0]; i++) {
        uint64_t before = host_live();
        errno = 0;
        void *p = malloc(huge[i]);
        EXPECT(p == NULL, "expected malloc(%zu) to return NULL, got %p", huge[i], p);
        EXPECT(errno == ENOMEM, "expected malloc(%zu) to set errno ENOMEM (%d), got %d", huge[i], ENOMEM, errno);
        EXPECT_LIVE_BACK("a failed malloc", before);
    }
}

static void malloc_trim_returns_and_malloc_still_works(void)
{
    void *keep = malloc(MIB);
    REQUIRE(keep != NULL, "expected malloc(1 MiB) to succeed");
    int rc0 = malloc_trim(0);
    int rc1 = malloc_trim(MIB);
    EXPECT(rc0 == 0 || rc0 == 1, "expected malloc_trim(0) to return 0 or 1, got %d", rc0);
    EXPECT(rc1 == 0 || rc1 == 1, "expected malloc_trim(1 MiB) to return 0 or 1, got %d", rc1);
    free(keep);
    void *p = malloc(4 * MIB);
    EXPECT(p != NULL, "expected malloc to work after malloc_trim");
    free(p);
}

static long resident_kib(void)
{
    long size = 0, resident = -1;
    FILE *f = fopen("/proc/self/statm", "r");
    if (f != NULL) {
        if (fscanf(f, "%ld %ld", &size, &resident) != 2)
            resident = -1;
        fclose(f);
    }
    return resident < 0 ? -1 : resident * (sysconf(_SC_PAGESIZE) / 1024);
}

/* jemalloc keeps freed pages for a while (its decay); malloc_trim must give them back now, as
 * glibc's gives back what it can. 64 MiB in 256 KiB blocks, written and freed: after malloc_trim
 * the process is back within 16 MiB of where it started. */
static void malloc_trim_gives_freed_pages_back(void)
{
    enum { BLOCKS = 256, BLOCK_BYTES = 256 * 1024, SLACK_KIB = 16 * 1024 };
    static void *blocks[BLOCKS];
    long start = resident_kib();
    REQUIRE(start > 0, "expected to read /proc/self/statm");
    for (int i = 0; i < BLOCKS; i++) {
        blocks[i] = malloc(BLOCK_BYTES);
        REQUIRE(blocks[i] != NULL, "expected a 256 KiB block");
        memset(blocks[i], 0x5a, BLOCK_BYTES);
    }
    long written = resident_kib();
    for (int i = 0; i < BLOCKS; i++)
        free(blocks[i]);
    malloc_trim(0);
    long trimmed = resident_kib();
    EXPECT(trimmed <= start + SLACK_KIB,
           "expected malloc_trim(0) to bring the resident size back within %d KiB of %ld KiB, got %ld KiB "
           "(%ld KiB with the 64 MiB written)", SLACK_KIB, start, trimmed, written);
}

/* malloc_stats writes glibc's summary to stderr, with jemalloc's figures: the bytes in use
 * include a 1 MiB block the program holds. */
static void malloc_stats_reports_the_heap_on_stderr(void)
{
    char *keep = malloc(MIB);
    REQUIRE(keep != NULL, "expected malloc(1 MiB) to succeed");
    memset(keep, 1, MIB);
    FILE *capture = tmpfile();
    REQUIRE(capture != NULL, "expected a temporary file");
    fflush(stderr);
    int saved = dup(STDERR_FILENO);
    REQUIRE(saved >= 0 && dup2(fileno(capture), STDERR_FILENO) >= 0, "expected to redirect stderr");
    malloc_stats();
    dup2(saved, STDERR_FILENO);
    close(saved);
    static char text[4096];
    rewind(capture);
    size_t got = fread(text, 1, sizeof text - 1, capture);
    text[got] = '\0';
    fclose(capture);
    const char *in_use = strstr(text, "in use bytes");
    unsigned long long bytes = 0;
    EXPECT(strstr(text, "Arena 0:") != NULL, "expected malloc_stats to write \"Arena 0:\" to stderr, got \"%s\"", text);
    EXPECT(in_use != NULL && sscanf(in_use, "in use bytes = %llu", &bytes) == 1 && bytes >= MIB,
           "expected malloc_stats to report at least %d bytes in use, got \"%s\"", MIB, text);
    free(keep);
}

/* One thread: the peak is exactly the highest live figure (no credit counted into it). */
static void peak_of_a_single_thread_is_exact(void)
{
    struct qvshim_pool_stats before = host_stats();
    void *p = malloc(10 * MIB);
    REQUIRE(p != NULL, "expected a 10 MiB block");
    uint64_t highest = host_live();
    free(p);
    struct qvshim_pool_stats after = host_stats();
    uint64_t want = highest > before.peak ? highest : before.peak;
    EXPECT(after.peak == want, "expected the peak to be exactly %llu (the highest live), got %llu",
           (unsigned long long)want, (unsigned long long)after.peak);
}

/* An aligned request makes jemalloc reserve about size + alignment. Past the largest address
 * space any machine has (2^57 bytes) that span is ENOMEM whatever the budget, and not counted
 * as a refusal by it; at exactly 2^57 it is the budget that refuses it, and counts it. */
static void aligned_spans_past_the_address_space_are_enomem_not_budget_refusals(void)
{
    const struct {
        size_t align, size;
        uint64_t counted;
    } rows[] = {
        {(size_t)1 << 56, (size_t)1 << 57, 0}, /* span 2^57 + 2^56 */
        {(size_t)1 << 56, (size_t)1 << 56, 1}, /* span exactly 2^57 */
    };
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        uint64_t refusals = host_stats().refusals;
        void *p = NULL;
        int rc = posix_memalign(&p, rows[i].align, rows[i].size);
        uint64_t counted = host_stats().refusals - refusals;
        EXPECT(rc == ENOMEM, "expected posix_memalign(%zu, %zu) to return ENOMEM (%d), got %d", rows[i].align,
               rows[i].size, ENOMEM, rc);
        EXPECT(counted == rows[i].counted,
               "expected posix_memalign(%zu, %zu), a span of %zu + %zu bytes, to count %llu refusals by the budget, "
               "got %llu",
               rows[i].align, rows[i].size, rows[i].size, rows[i].align, (unsigned long long)rows[i].counted,
               (unsigned long long)counted);
        if (rc == 0)
            free(p);
    }
}

/* This process's mapped address space (VmSize), in bytes; 0 when /proc cannot say. */
static size_t mapped_bytes(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    if (f == NULL)
        return 0;
    char line[256];
    size_t kib = 0;
    while (fgets(line, sizeof line, f) != NULL)
        if (sscanf(line, "VmSize: %zu kB", &kib) == 1)
            break;
    fclose(f);
    return kib * KIB;
}

#define ADDRESS_LIMIT_BLOCKS 4096
#define ADDRESS_LIMIT_BLOCK_BYTES (128 * KIB)
static void *address_limit_blocks[ADDRESS_LIMIT_BLOCKS];

/* When jemalloc itself fails (the kernel refuses it address space: RLIMIT_AS at what the
 * process maps now), the shim, which charged the request before asking, gives the charge back:
 * live stays exactly the blocks the program holds. Requests over 64 KiB are charged on the
 * slow path, which knows the call failed, also when the thread's credit would cover them (here
 * the failed request's charge, given back, makes the credit cover the next one's 160 KiB). */
static void a_request_jemalloc_itself_fails_leaves_live_exact(void)
{
    struct rlimit old;
    REQUIRE(getrlimit(RLIMIT_AS, &old) == 0, "expected getrlimit(RLIMIT_AS) to work");
    size_t vm = mapped_bytes();
    REQUIRE(vm > 0, "expected VmSize in /proc/self/status");
    uint64_t before = host_live();
    struct rlimit tight = {vm, old.rlim_max};
    REQUIRE(setrlimit(RLIMIT_AS, &tight) == 0, "expected setrlimit(RLIMIT_AS, %zu) to work", vm);
    size_t n = 0, held = 0;
    while (n < ADDRESS_LIMIT_BLOCKS) {
        void *p = malloc(ADDRESS_LIMIT_BLOCK_BYTES);
        if (p == NULL)
            break;
        held += malloc_usable_size(p);
        address_limit_blocks[n++] = p;
    }
    int exhausted = n < ADDRESS_LIMIT_BLOCKS;
    uint64_t at_failure = host_live();
    size_t held_at_failure = held;
    /* The failed request's charge came back as the thread's credit, which now covers 160 KiB. */
    void *larger = exhausted ? malloc(160 * KIB) : NULL;
    if (larger != NULL)
        held += malloc_usable_size(larger);
    uint64_t after = host_live();
    setrlimit(RLIMIT_AS, &old);
    EXPECT(exhausted, "expected %d blocks of 128 KiB to exhaust the address space left under RLIMIT_AS %zu",
           ADDRESS_LIMIT_BLOCKS, vm);
    EXPECT(at_failure == before + held_at_failure || !exhausted,
           "expected live %llu + %zu bytes held when jemalloc failed a 128 KiB request, got %llu",
           (unsigned long long)before, held_at_failure, (unsigned long long)at_failure);
    EXPECT(larger == NULL, "expected the 160 KiB request to fail too, with no address space left, got %p", larger);
    EXPECT(after == before + held, "expected live %llu + %zu bytes held after jemalloc failed a 160 KiB request, "
                                   "got %llu (difference %lld)",
           (unsigned long long)before, held, (unsigned long long)after,
           (long long)(after - before - held));
    free(larger);
    for (size_t i = 0; i < n; i++)
        free(address_limit_blocks[i]);
    EXPECT_LIVE_BACK("freeing the blocks held under the address-space limit", before);
}

static const struct check_case cases[] = {
    START_UP_CASE(live_is_constant_from_main_while_the_program_allocates_nothing),
    CASE(malloc_zero_returns_unique_non_null_blocks),
    CASE(a_request_jemalloc_itself_fails_leaves_live_exact),
    CASE(aligned_spans_past_the_address_space_are_enomem_not_budget_refusals),
    CASE(malloc_counts_usable_size_and_free_gives_it_back),
    CASE(free_null_does_nothing_and_keeps_errno),
    CASE(free_preserves_errno_for_small_block),
    CASE(free_preserves_errno_for_large_block),
    CASE(calloc_returns_zeroed_memory_even_when_reusing_dirty_blocks),
    CASE(calloc_zero_returns_non_null_block),
    CASE(calloc_detects_size_overflow_with_enomem),
    CASE(realloc_of_null_acts_as_malloc),
    CASE(realloc_to_zero_frees_block_and_returns_null),
    CASE(realloc_growing_keeps_contents),
    CASE(realloc_shrinking_keeps_contents),
    CASE(failed_realloc_leaves_old_block_intact),
    CASE(reallocarray_detects_overflow_with_enomem),
    CASE(posix_memalign_rejects_bad_alignment_with_einval),
    CASE(posix_memalign_honours_alignment_from_16_bytes_to_1mib),
    CASE(posix_memalign_returns_enomem_code_for_impossible_size),
    CASE(aligned_alloc_honours_alignment),
    CASE(aligned_alloc_rejects_non_power_of_two_alignment_with_einval),
    CASE(memalign_honours_alignment),
    CASE(memalign_rounds_non_power_of_two_alignment_up),
    CASE(memalign_rejects_huge_alignment_with_einval),
    CASE(memalign_of_the_largest_power_of_two_is_enomem_not_einval),
    CASE(valloc_returns_page_aligned_blocks),
    CASE(pvalloc_rounds_size_up_to_whole_pages),
    CASE(pvalloc_of_zero_gives_one_page),
    CASE(pvalloc_overflow_returns_enomem),
    CASE(malloc_usable_size_of_null_is_zero),
    CASE(malloc_usable_size_covers_the_request),
    CASE(cfree_is_exported_by_the_shim_and_frees),
    CASE(libc_aliases_are_defined_by_the_shim),
    CASE(libc_aliases_allocate_through_the_ledger),
    CASE(libc_internal_allocations_come_from_the_shim),
    CASE(malloc_of_impossible_size_returns_null_with_enomem),
    CASE(malloc_trim_returns_and_malloc_still_works),
    CASE(malloc_trim_gives_freed_pages_back),
    CASE(malloc_stats_reports_the_heap_on_stderr),
    CASE(free_restores_errno_that_jemalloc_changed_inside_free),
    CASE(peak_of_a_single_thread_is_exact),
};

int main(int argc, char **argv)
{
    return RUN_CASES(cases, argc, argv);
}
