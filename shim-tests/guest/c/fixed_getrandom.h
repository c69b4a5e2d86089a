/* What fixed_getrandom.c hands out, for the program that plants at the names it makes. */
#ifndef FIXED_GETRANDOM_H
#define FIXED_GETRANDOM_H

/* The k-th suffix drawn is FIXED_GETRANDOM_BASE + k. */
#define FIXED_GETRANDOM_BASE 0x5a5a5a5a5a5a5a00ULL
/* How many of the first names the planting program takes. */
#define FIXED_GETRANDOM_PLANTED 4

#endif
