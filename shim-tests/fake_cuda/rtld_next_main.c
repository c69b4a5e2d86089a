/* rtld_next_main.c - writes through libwrapwrite.so and says where its write() went. */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int wrap_write_calls(void);
const char *wrap_write_next_object(void);

int main(void) {
    static const char hello[] = "hello through write\n";
    ssize_t n = write(1, hello, strlen(hello));
    char line[256];
    int len = snprintf(line, sizeof line, "written %zd\ncalls %d\nnext_object %s\n", n, wrap_write_calls(),
                       wrap_write_next_object());
    write(1, line, (size_t)len);
    return 0;
}
