/* hist.c — the histogram's exported side: reset, merge, bucket bounds and fio's percentile
 * rule, for Python and for tests. The per-sample path is hist_add() in hist.h. */
#include <string.h>

#include "util/hist.h"

void dp_hist_reset(struct dp_hist *h)
{
    memset(h, 0, sizeof(*h));
}

void dp_hist_add(struct dp_hist *h, uint64_t value)
{
    hist_add(h, value);
}

void dp_hist_merge(struct dp_hist *dst, const struct dp_hist *src)
{
    if (src->n == 0)
        return;
    if (dst->n == 0 || src->min < dst->min)
        dst->min = src->min;
    if (src->max > dst->max)
        dst->max = src->max;
    dst->n += src->n;
    dst->sum += src->sum;
    dst->sumsq += src->sumsq;
    for (unsigned i = 0; i < DP_HIST_NR; i++)
        dst->bucket[i] += src->bucket[i];
}

unsigned dp_hist_index(uint64_t value)
{
    return hist_index(value);
}

uint64_t dp_hist_bucket_low(unsigned index)
{
    if (index >= DP_HIST_NR)
        index = DP_HIST_NR - 1;
    if (index < 2 * DP_HIST_VAL)
        return index;
    unsigned error_bits = (index >> DP_HIST_BITS) - 1;
    return (1ull << (error_bits + DP_HIST_BITS)) +
           ((uint64_t)(index & (DP_HIST_VAL - 1)) << error_bits);
}

/* fio's plat_idx_to_val(): the middle of the bucket, which is what fio prints. */
uint64_t dp_hist_bucket_value(unsigned index)
{
    if (index >= DP_HIST_NR)
        index = DP_HIST_NR - 1;
    if (index < 2 * DP_HIST_VAL)
        return index;
    unsigned error_bits = (index >> DP_HIST_BITS) - 1;
    return dp_hist_bucket_low(index) + ((1ull << error_bits) >> 1);
}

/* fio's calc_clat_percentiles(): the first bucket at which the running count reaches
 * pct% of the samples. */
uint64_t dp_hist_percentile(const struct dp_hist *h, double pct)
{
    if (h->n == 0)
        return 0;
    double want = pct / 100.0 * (double)h->n;
    uint64_t sum = 0;
    for (unsigned i = 0; i < DP_HIST_NR; i++) {
        sum += h->bucket[i];
        if (sum > 0 && (double)sum >= want)
            return dp_hist_bucket_value(i);
    }
    return dp_hist_bucket_value(DP_HIST_NR - 1);
}
