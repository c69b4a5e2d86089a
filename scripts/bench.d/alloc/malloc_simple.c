/*
 * malloc_simple.c - in the manner of glibc's bench-malloc-simple: one thread allocates a
 * batch of equal-sized blocks and frees them all, over and over, for a few sizes and batch
 * lengths (short batches stay in the thread cache, long ones reach the arena).
 *
 * usage: malloc_simple [TOTAL_OPS]
 *
 * TOTAL_OPS malloc/free pairs in all, split evenly over every (size, batch) combination.
 */
#include "common.h"

static const size_t SIZES_BYTES[] = {16, 64, 256, 1024};
static const size_t BATCHES[] = {25, 400, 10000};
enum { N_SIZES = sizeof SIZES_BYTES / sizeof SIZES_BYTES[0], N_BATCHES = sizeof BATCHES / sizeof BATCHES[0] };

int main(int argc, char **argv)
{
    uint64_t total = bench_arg(argc, argv, 1, 40000000);
    static void *blocks[10000];
    uint64_t checksum = 0;
    for (size_t s = 0; s < N_SIZES; s++) {
        for (size_t b = 0; b < N_BATCHES; b++) {
            size_t batch = BATCHES[b];
            uint64_t repeats = total / (N_SIZES * N_BATCHES) / batch;
            for (uint64_t r = 0; r < repeats; r++) {
                for (size_t i = 0; i < batch; i++) {
                    char *block = malloc(SIZES_BYTES[s]);
                    if (block == NULL)
                        bench_fail("malloc_simple", "malloc");
                    block[0] = (char)i;
                    blocks[i] = block;
                }
                checksum += *(unsigned char *)blocks[batch / 2];
                for (size_t i = 0; i < batch; i++)
                    free(blocks[i]);
            }
        }
    }
    bench_report(checksum);
    return 0;
}
