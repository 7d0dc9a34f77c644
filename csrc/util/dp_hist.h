/* dp_hist.h — public (cffi): the log-linear latency histogram both sides record into
 * (hist.c; the per-sample path is hist_add() in hist.h). */
#ifndef DP_HIST_H
#define DP_HIST_H

#include <stdint.h>

/* Log-linear histogram in nanoseconds, fio's scheme (FIO_IO_U_PLAT_BITS=6, 29 groups):
 * percentiles within 1/64 relative error. Histograms merge by adding buckets. */
#define DP_HIST_BITS 6
#define DP_HIST_VAL 64
#define DP_HIST_GROUPS 29
#define DP_HIST_NR 1856

struct dp_hist {
    uint64_t n;
    uint64_t min;
    uint64_t max;
    uint64_t sum;
    double sumsq;
    uint64_t bucket[DP_HIST_NR];
};
void dp_hist_reset(struct dp_hist *h);
void dp_hist_add(struct dp_hist *h, uint64_t value);
void dp_hist_merge(struct dp_hist *dst, const struct dp_hist *src);
unsigned dp_hist_index(uint64_t value);
/* Smallest value in a bucket, and the value fio reports for it (the middle). */
uint64_t dp_hist_bucket_low(unsigned index);
uint64_t dp_hist_bucket_value(unsigned index);
/* fio's rule: the first bucket where the running count reaches pct% of n. */
uint64_t dp_hist_percentile(const struct dp_hist *h, double pct);

#endif
