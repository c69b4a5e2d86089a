/*
 * fixed_getrandom.c - an LD_PRELOAD object for shim-tests/guest/test_dumpfile.py: makes the
 * temporary names the shim writes beside a dump file guessable, so that a test can plant
 * something at them, as an attacker who guessed them would.
 *
 * It interposes syscall(2). An 8-byte getrandom with GRND_NONBLOCK (how the shim draws a
 * temporary name's suffix) gets FIXED_GETRANDOM_BASE + k on the k-th such call: the shim's
 * first attempts land on names the planting program made beforehand, later ones on free names.
 * Every other call goes to the kernel unchanged, through the syscall instruction itself: no
 * dlsym, which could allocate inside the shim's own allocator.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <string.h>
#include <sys/random.h>
#include <sys/syscall.h>

#include "fixed_getrandom.h"

static long raw_syscall(long n, long a, long b, long c, long d, long e, long f)
{
    long ret;
#if defined(__x86_64__)
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    register long r9 __asm__("r9") = f;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
#elif defined(__aarch64__)
    register long x8 __asm__("x8") = n;
    register long x0 __asm__("x0") = a;
    register long x1 __asm__("x1") = b;
    register long x2 __asm__("x2") = c;
    register long x3 __asm__("x3") = d;
    register long x4 __asm__("x4") = e;
    register long x5 __asm__("x5") = f;
    __asm__ volatile("svc 0"
                     : "+r"(x0)
                     : "r"(x8), "r"(x1), "r"(x2), "r"(x3), "r"(x4), "r"(x5)
                     : "memory");
    ret = x0;
#else
#error "fixed_getrandom.c knows the system call instruction of x86_64 and aarch64 only"
#endif
    if (ret < 0 && ret > -4096) {
        errno = (int)-ret;
        return -1;
    }
    return ret;
}

static uint64_t drawn;

long syscall(long n, ...)
{
    va_list ap;
    long a[6];
    va_start(ap, n);
    for (int i = 0; i < 6; i++)
        a[i] = va_arg(ap, long);
    va_end(ap);
    if (n == SYS_getrandom && a[1] == (long)sizeof(uint64_t) && a[2] == GRND_NONBLOCK) {
        uint64_t value = FIXED_GETRANDOM_BASE + __atomic_fetch_add(&drawn, 1, __ATOMIC_RELAXED);
        memcpy((void *)a[0], &value, sizeof value);
        return (long)sizeof value;
    }
    return raw_syscall(n, a[0], a[1], a[2], a[3], a[4], a[5]);
}
