/*
 * cfrac.c - fraction-heavy bignum arithmetic, every intermediate a fresh heap block.
 *
 * usage: cfrac [TERMS] [REPEATS]
 *
 * Expands sqrt(N) as a continued fraction for a multi-limb N and builds the convergents
 * h(k) = a(k) h(k-1) + h(k-2) and k(k) likewise, with the periodic quantities m, d, a of the
 * expansion kept as bignums too. Like factoring by continued fractions, the program spends
 * its time in small bignum operations that each allocate their result and free an operand:
 * many small blocks of slowly growing sizes, short lives, one thread.
 */
#include "common.h"
#include <string.h>

typedef struct {
    size_t used;     /* limbs in use; 0 means zero */
    uint32_t limb[]; /* least significant first */
} big;

static big *big_new(size_t limbs)
{
    big *b = malloc(sizeof(big) + (limbs ? limbs : 1) * sizeof(uint32_t));
    if (b == NULL)
        bench_fail("cfrac", "malloc");
    b->used = 0;
    return b;
}

static void big_trim(big *b)
{
    while (b->used > 0 && b->limb[b->used - 1] == 0)
        b->used--;
}

static big *big_small(uint32_t v)
{
    big *b = big_new(1);
    b->limb[0] = v;
    b->used = v ? 1 : 0;
    return b;
}

static big *big_add(const big *a, const big *b)
{
    size_t n = a->used > b->used ? a->used : b->used;
    big *r = big_new(n + 1);
    uint64_t carry = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t s = carry + (i < a->used ? a->limb[i] : 0) + (i < b->used ? b->limb[i] : 0);
        r->limb[i] = (uint32_t)s;
        carry = s >> 32;
    }
    r->limb[n] = (uint32_t)carry;
    r->used = n + 1;
    big_trim(r);
    return r;
}

/* a - b, a >= b */
static big *big_sub(const big *a, const big *b)
{
    big *r = big_new(a->used);
    int64_t borrow = 0;
    for (size_t i = 0; i < a->used; i++) {
        int64_t d = (int64_t)a->limb[i] - (i < b->used ? b->limb[i] : 0) - borrow;
        borrow = d < 0;
        r->limb[i] = (uint32_t)(d + (borrow ? ((int64_t)1 << 32) : 0));
    }
    r->used = a->used;
    big_trim(r);
    return r;
}

static big *big_mul(const big *a, const big *b)
{
    big *r = big_new(a->used + b->used);
    memset(r->limb, 0, (a->used + b->used) * sizeof(uint32_t));
    for (size_t i = 0; i < a->used; i++) {
        uint64_t carry = 0;
        for (size_t j = 0; j < b->used; j++) {
            uint64_t t = (uint64_t)a->limb[i] * b->limb[j] + r->limb[i + j] + carry;
            r->limb[i + j] = (uint32_t)t;
            carry = t >> 32;
        }
        r->limb[i + b->used] = (uint32_t)carry;
    }
    r->used = a->used + b->used;
    big_trim(r);
    return r;
}

static int big_cmp(const big *a, const big *b)
{
    if (a->used != b->used)
        return a->used < b->used ? -1 : 1;
    for (size_t i = a->used; i-- > 0;)
        if (a->limb[i] != b->limb[i])
            return a->limb[i] < b->limb[i] ? -1 : 1;
    return 0;
}

static big *big_mul_small(const big *a, uint32_t v)
{
    big *s = big_small(v);
    big *r = big_mul(a, s);
    free(s);
    return r;
}

static big *big_from64(uint64_t v)
{
    big *b = big_new(2);
    b->limb[0] = (uint32_t)v;
    b->limb[1] = (uint32_t)(v >> 32);
    b->used = 2;
    big_trim(b);
    return b;
}

static uint64_t isqrt64(uint64_t n)
{
    uint64_t r = 0;
    for (uint64_t bit = 1ULL << 62; bit; bit >>= 2) {
        if (n >= r + bit) {
            n -= r + bit;
            r = (r >> 1) + bit;
        } else {
            r >>= 1;
        }
    }
    return r;
}

int main(int argc, char **argv)
{
    uint64_t terms = bench_arg(argc, argv, 1, 150);
    uint64_t repeats = bench_arg(argc, argv, 2, 8000);
    uint64_t checksum = 0;
    for (uint64_t rep = 0; rep < repeats; rep++) {
        /* a non-square N below 2^62: the expansion's m, d, a fit in 64 bits, the
         * convergents h/k and the residues h^2 - N k^2 grow as bignums */
        uint64_t n = 0x2c6ef372fe94f82bULL + 2 * rep;
        uint64_t a0 = isqrt64(n);
        if (a0 * a0 == n)
            n++;
        uint64_t m = 0, d = 1, a = a0;
        big *nb = big_from64(n);
        big *h_prev = big_small(1), *h = big_from64(a0);
        big *k_prev = big_small(0), *k = big_small(1);
        for (uint64_t t = 0; t < terms; t++) {
            m = d * a - m;
            d = (n - m * m) / d;
            a = (a0 + m) / d;
            uint32_t an = (uint32_t)(a & 0xffffffffu);
            big *t1 = big_mul_small(h, an ? an : 1);
            big *h2 = big_add(t1, h_prev);
            free(t1);
            free(h_prev);
            h_prev = h;
            h = h2;
            t1 = big_mul_small(k, an ? an : 1);
            big *k2 = big_add(t1, k_prev);
            free(t1);
            free(k_prev);
            k_prev = k;
            k = k2;
            /* the residue the factoring method looks at: |h^2 - N k^2| */
            big *hh = big_mul(h, h);
            big *kk = big_mul(k, k);
            big *nkk = big_mul(nb, kk);
            big *res = big_cmp(hh, nkk) >= 0 ? big_sub(hh, nkk) : big_sub(nkk, hh);
            checksum += (res->used ? res->limb[0] : 0) + h->used;
            free(hh);
            free(kk);
            free(nkk);
            free(res);
        }
        free(nb); free(h_prev); free(h); free(k_prev); free(k);
    }
    bench_report(checksum);
    return 0;
}
