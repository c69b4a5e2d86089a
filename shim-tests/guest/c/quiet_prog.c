/* The "quiet and a safe log" slice's test program: each mode does one thing a host program
 * does with its descriptors or its memory, so the test can see where the shim's lines land.
 *
 *   plain                  one line on stdout, one on stderr, a few allocations
 *   close-stderr           closes fd 2, then ends normally
 *   close-stderr-read FILE closes fd 2, opens FILE read-only (it lands on number 2, as the
 *                          shim's own short reads of /proc do) and ends with it open
 *   redirect-stderr FILE   dup2()s FILE onto fd 2 (on purpose), writes one line there, ends
 *   closerange DATA        closes every descriptor from 3 up, opens DATA, writes one line
 *                          into it, keeps it open and ends (the exit line comes after)
 *   level-flap             allocates past the warn level and frees at once, many times
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* A large block: 56 MiB is 87% of the 64 MiB budget the level-flap row sets. */
#define FLAP_BLOCK_BYTES (56u << 20)
#define FLAP_ROUNDS 2000

static int plain(void) {
    for (int i = 0; i < 100; i++) {
        free(malloc(1000 + (size_t)i * 100));
    }
    printf("quiet program on stdout\n");
    fprintf(stderr, "quiet program on stderr\n");
    return 0;
}

static int close_stderr(void) {
    printf("closing stderr\n");
    fflush(stdout);
    close(2);
    return 0;
}

static int close_stderr_then_read(const char *path) {
    printf("closing stderr\n");
    fflush(stdout);
    close(2);
    /* The shim's monitor may hold number 2 for a moment (its own short reads): try again. */
    for (int attempt = 0; attempt < 1000; attempt++) {
        int fd = open(path, O_RDONLY);
        if (fd == 2)
            return 0;
        if (fd >= 0)
            close(fd);
        usleep(1000);
    }
    printf("expected the read-only file at number 2 within 1000 tries\n");
    return 1;
}

static int redirect_stderr(const char *path) {
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (fd < 0 || dup2(fd, 2) < 0) {
        perror("redirect");
        return 2;
    }
    close(fd);
    fprintf(stderr, "program line in the redirected stderr\n");
    return 0;
}

static int closerange_then_data(const char *path) {
    long top = sysconf(_SC_OPEN_MAX);
    if (top < 0 || top > 65536) {
        top = 65536;
    }
    for (int fd = 3; fd < top; fd++) {
        close(fd);
    }
    int data = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (data < 0) {
        perror("data");
        return 2;
    }
    const char line[] = "the program's own data\n";
    if (write(data, line, sizeof line - 1) != (ssize_t)(sizeof line - 1)) {
        return 2;
    }
    printf("data file is fd %d\n", data);
    return 0; /* data stays open: the shim's exit line comes after this */
}

static int level_flap(void) {
    for (int i = 0; i < FLAP_ROUNDS; i++) {
        char *p = malloc(FLAP_BLOCK_BYTES);
        if (p == NULL) {
            printf("refused at round %d\n", i);
            return 2;
        }
        p[0] = 1;
        free(p);
    }
    printf("flapped %d times\n", FLAP_ROUNDS);
    return 0;
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "";
    const char *arg = argc > 2 ? argv[2] : "";
    if (strcmp(mode, "plain") == 0) return plain();
    if (strcmp(mode, "close-stderr") == 0) return close_stderr();
    if (strcmp(mode, "close-stderr-read") == 0) return close_stderr_then_read(arg);
    if (strcmp(mode, "redirect-stderr") == 0) return redirect_stderr(arg);
    if (strcmp(mode, "closerange") == 0) return closerange_then_data(arg);
    if (strcmp(mode, "level-flap") == 0) return level_flap();
    fprintf(stderr, "usage: quiet_prog plain|close-stderr|close-stderr-read FILE|redirect-stderr FILE|closerange DATA|level-flap\n");
    return 64;
}
