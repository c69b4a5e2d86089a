/*
 * wrap_write.c - libwrapwrite.so, a library that wraps libc's write() the usual way: its own
 * write() forwards to dlsym(RTLD_NEXT, "write"). RTLD_NEXT means "the next definition after
 * this library"; if a dlsym hook made the lookup look as if it came from elsewhere, it could
 * return this very function, and write() would call itself until the stack ran out. A second
 * entry is caught and reported instead (exit 3).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static ssize_t (*next_write)(int, const void *, size_t);
static __thread int depth;
static int calls;

ssize_t write(int fd, const void *buf, size_t n) {
    if (!next_write) next_write = (ssize_t(*)(int, const void *, size_t))dlsym(RTLD_NEXT, "write");
    if (depth > 0 || !next_write) {
        static const char msg[] = "wrap_write: RTLD_NEXT did not lead past this library\n";
        syscall(SYS_write, 2, msg, sizeof msg - 1);
        _exit(3);
    }
    depth++;
    calls++;
    ssize_t written = next_write(fd, buf, n);
    depth--;
    return written;
}

int wrap_write_calls(void) { return calls; }

/* The file name of the object RTLD_NEXT led to. */
const char *wrap_write_next_object(void) {
    Dl_info info;
    if (!next_write || !dladdr((void *)next_write, &info) || !info.dli_fname) return "?";
    const char *slash = strrchr(info.dli_fname, '/');
    return slash ? slash + 1 : info.dli_fname;
}
