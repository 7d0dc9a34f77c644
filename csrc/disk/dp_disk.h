/* dp_disk.h — public (cffi): backing disks (null, file) and the latency layer that stacks on any
 * of them. Python opens and measures the backing store; C only sees the result. */
#ifndef DP_DISK_PUBLIC_H
#define DP_DISK_PUBLIC_H

#include <stdint.h>

/* Ranges in one DISCARD / WRITE_ZEROES request, at most. */
#define DP_MAX_DISCARD_SEG 32

/* What a disk can do (dp_disk_info.flags); the virtio-blk device offers features from these. */
#define DP_DISK_F_READ_ONLY 1        /* no writes, discards or write-zeroes */
#define DP_DISK_F_FLUSH 2            /* takes FLUSH: writes it completed are durable after one */
#define DP_DISK_F_DISCARD 4
#define DP_DISK_F_WRITE_ZEROES 8

struct dp_disk_info {
    uint64_t size_bytes;
    uint32_t block_size;         /* logical block size */
    uint32_t dio_align;          /* buffers must be aligned to this (an O_DIRECT fd; 0: any) */
    uint32_t flags;              /* DP_DISK_F_* */
};

struct dp_disk;
/* No I/O at all: reads return zeroes, everything else succeeds at once (the data path alone).
 * On failure these return NULL and store -errno in *err. */
struct dp_disk *dp_null_disk_new(const struct dp_disk_info *info, int *err);
/* A regular file or block device, read and written through the serving engine's io_uring. The
 * fd stays the caller's; it is O_DIRECT exactly when info->dio_align is not 0. */
struct dp_disk *dp_file_disk_new(int fd, const struct dp_disk_info *info, int *err);
/* What a file disk asks each engine that serves it to register with its io_uring (before
 * any queue of it starts; default both): guest memory as fixed buffers (a read or write of one
 * buffer inside them goes out as READ_FIXED / WRITE_FIXED, which skips pinning its pages per
 * request), and the file as a fixed file. Where the kernel refuses, requests go out as before.
 * -EINVAL for a disk that is not a file disk. */
#define DP_FILE_FIXED_BUFFERS 1
#define DP_FILE_FIXED_FILE 2
int dp_file_disk_set_fixed(struct dp_disk *disk, unsigned what);
/* Reads and writes through a ring made with IORING_SETUP_IOPOLL on each engine (before any
 * queue starts): completions are polled from the device rather than signalled by interrupt.
 * Only for an O_DIRECT file on a device with poll queues (the caller checks the device; on one
 * without them the kernel completes by interrupt and the I/O thread spins for nothing).
 * -EINVAL for a disk that is not an O_DIRECT file disk. */
int dp_file_disk_set_iopoll(struct dp_disk *disk, int on);
/* 0: no polled ring asked for (or none made yet); 1: an engine runs one; -errno: the kernel
 * refused to make one (reads and writes then go on the engine's ring, interrupt-driven). */
int dp_file_disk_iopoll_state(const struct dp_disk *disk);
/* Frees the disk (and, for a stacking disk, the disk under it). No queue may still use it. */
void dp_disk_free(struct dp_disk *disk);
void dp_disk_get_info(const struct dp_disk *disk, struct dp_disk_info *out);

/* ---- emulated device latency: a disk that stacks on another (delay.c) ---- */
#define DP_LATENCY_POINTS 1025
struct dp_latency_params {
    uint32_t npoints;                         /* 0: no emulated latency */
    uint64_t quantile_ns[DP_LATENCY_POINTS];  /* inverse CDF at u = i / (npoints - 1) */
    uint64_t iops;                            /* each queue's share of an IOPS cap (0: none) */
    uint64_t bw;                              /* each queue's share of a bytes/s cap (0: none) */
};
/* A disk that completes each request of inner no earlier than a latency drawn per request,
 * and no earlier than its queue's share of the caps allows. The latency counts from the pop
 * when inner answers at once (the null disk), else from inner's completion (after the real
 * I/O). It owns inner from here on. NULL and -errno in *err on failure (-EINVAL: a table that
 * is not an inverse CDF). */
struct dp_disk *dp_delay_disk_new(struct dp_disk *inner, const struct dp_latency_params *params,
                                  int *err);
/* New parameters for a delay disk, before any queue of it starts. */
int dp_delay_disk_set_params(struct dp_disk *disk, const struct dp_latency_params *params);
/* Draw n samples the way the queues do (for tests and for `dataplane latency` previews). */
void dp_latency_sample(const struct dp_latency_params *params, uint64_t seed, uint64_t *out,
                       unsigned n);

#endif
