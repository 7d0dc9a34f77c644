/* dp_disk.h — public (cffi): backing disks and emulated device latency. */
#ifndef DP_DISK_PUBLIC_H
#define DP_DISK_PUBLIC_H

#include <stdint.h>

#define DP_SEG_MAX 254
#define DP_MAX_DISCARD_SEG 32
#define DP_SERIAL_LEN 20

/* ---- backing disk (backend_file.c, backend_null.c) ---- */
struct dp_disk_params {
    int fd;                      /* -1 for the null disk */
    int null_disk;
    int read_only;
    int direct;                  /* fd was opened O_DIRECT: buffers must be aligned */
    uint64_t size_bytes;
    uint32_t logical_block_size;
    uint32_t dio_align;          /* memory alignment O_DIRECT needs (0: none) */
    uint32_t max_discard_sectors;
    uint32_t max_write_zeroes_sectors;
    uint32_t max_discard_seg;
    uint32_t max_write_zeroes_seg;
    char serial[20];
};
struct dp_disk;
struct dp_disk *dp_disk_new(const struct dp_disk_params *params);
void dp_disk_free(struct dp_disk *disk);
/* Writeback cache enabled (1) or write-through (0, every write is FUA). */
void dp_disk_set_writeback(struct dp_disk *disk, int writeback);
int dp_disk_get_writeback(const struct dp_disk *disk);

/* ---- emulated device latency (backend_file.c / backend_null.c completions) ---- */
#define DP_LATENCY_POINTS 1025
struct dp_latency_params {
    uint32_t npoints;                         /* 0: no emulated latency */
    uint64_t quantile_ns[DP_LATENCY_POINTS];  /* inverse CDF at u = i / (npoints - 1) */
    uint64_t iops;                            /* each queue's share of an IOPS cap (0: none) */
    uint64_t bw;                              /* each queue's share of a bytes/s cap (0: none) */
};
/* Set before queues start. Null disks complete after the sampled delay; file disks after the
 * real I/O plus the sampled delay. Delays are io_uring timeouts on the queue's own ring. */
int dp_disk_set_latency(struct dp_disk *disk, const struct dp_latency_params *params);
/* Draw n samples the way the queues do (for tests and for `dataplane latency` previews). */
void dp_latency_sample(const struct dp_latency_params *params, uint64_t seed, uint64_t *out,
                       unsigned n);

#endif
