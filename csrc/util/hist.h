/* hist.h — log-linear latency histogram (fio's bucket scheme) for the load generator.
 *
 * Values are nanoseconds. Values below 128 get a bucket each; above, every power of two is
 * split into 64 buckets, so a bucket's midpoint is within 1/128 of any value in it and its
 * lower bound within 1/64 (fio's FIO_IO_U_PLAT_BITS=6, 29 groups: exact up to ~17 s, larger
 * values land in the last bucket). Histograms add bucket by bucket, so per-thread ones merge.
 */
#ifndef DP_STATS_H
#define DP_STATS_H

#include <stdint.h>

#include "util/dp_hist.h"

static inline unsigned hist_index(uint64_t value)
{
    if (value < 2 * DP_HIST_VAL)
        return (unsigned)value;
    unsigned msb = 63u - (unsigned)__builtin_clzll(value);
    unsigned error_bits = msb - DP_HIST_BITS;
    unsigned index = ((error_bits + 1) << DP_HIST_BITS) +
                     (unsigned)((value >> error_bits) & (DP_HIST_VAL - 1));
    return index < DP_HIST_NR - 1 ? index : DP_HIST_NR - 1;
}

/* One sample; the hot-path version of dp_hist_add (a thread owns its histograms). */
static inline void hist_add(struct dp_hist *h, uint64_t value)
{
    h->bucket[hist_index(value)]++;
    if (value < h->min || h->n == 0)
        h->min = value;
    if (value > h->max)
        h->max = value;
    h->n++;
    h->sum += value;
    h->sumsq += (double)value * (double)value;
}

#endif
