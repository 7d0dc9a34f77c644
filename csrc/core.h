/* core.h — the whole surface of the C core that Python (cffi) sees.
 *
 * Opaque handles (guest memory, disk, virtqueue, I/O engine) plus plain structs.
 * Every function returns 0 (or a count) on success and -errno on failure; none sets errno.
 * _build.py feeds this file to cffi's cdef after dropping preprocessor lines other than
 * integer #defines, so keep it plain C: no macros with arguments, no inline code.
 */
#ifndef DP_CORE_H
#define DP_CORE_H

#include <stdint.h>
#include <stddef.h>

#define DP_MAX_MEM_REGIONS 8
#define DP_MAX_QUEUE_SIZE 1024
#define DP_SEG_MAX 254
#define DP_MAX_DISCARD_SEG 32
#define DP_SERIAL_LEN 20

/* ---- guest memory: regions and address translation (guest_mem.c) ---- */
struct dp_mem;
struct dp_mem *dp_mem_new(void);
void dp_mem_free(struct dp_mem *mem);
/* mmap fd (size + mmap_offset bytes from 0, shared) and publish the region. */
int dp_mem_map_region(struct dp_mem *mem, int fd, uint64_t guest_phys_addr, uint64_t size,
                      uint64_t user_addr, uint64_t mmap_offset);
/* Publish memory the caller owns and keeps mapped (tests, the frontend). */
int dp_mem_add_region(struct dp_mem *mem, uint64_t guest_phys_addr, uint64_t size,
                      uint64_t user_addr, void *host_addr);
int dp_mem_region_count(const struct dp_mem *mem);
/* Host address of [gpa, gpa+len) when it lies in one region, else NULL. */
void *dp_mem_gpa_to_host(const struct dp_mem *mem, uint64_t gpa, uint64_t len);
/* Same for a front-end user (virtual) address, as used for vring addresses. */
void *dp_mem_uva_to_host(const struct dp_mem *mem, uint64_t uva, uint64_t len);

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

/* ---- I/O engine: one thread + one io_uring serving one or more queues (io_engine.c) ---- */
struct dp_engine;
/* Starts the thread. cpu < 0: not pinned. On failure returns NULL and stores -errno in *err. */
struct dp_engine *dp_engine_new(const char *name, int cpu, unsigned ring_entries, int *err);
/* Stops the thread (every queue must be detached first) and frees the engine. */
void dp_engine_free(struct dp_engine *engine);
int dp_engine_thread_id(const struct dp_engine *engine);
/* Spin up to poll_ns looking for work before sleeping in io_uring_enter (0: never spin). */
void dp_engine_set_poll(struct dp_engine *engine, uint64_t poll_ns);

/* ---- virtqueue (virtqueue.c) ---- */
#define DP_VQ_F_EVENT_IDX 1
#define DP_VQ_F_INDIRECT 2

struct dp_vq_stats {
    uint64_t requests;
    uint64_t reads;
    uint64_t writes;
    uint64_t flushes;
    uint64_t discards;
    uint64_t write_zeroes;
    uint64_t get_ids;
    uint64_t unsupported;
    uint64_t errors;
    uint64_t bytes_read;
    uint64_t bytes_written;
    uint64_t kicks;
    uint64_t notifies;
    uint64_t bounced;
    uint64_t inflight;
    uint64_t broken;
    uint64_t out_of_order;       /* completions that left after a later-submitted request */
    uint64_t resubmitted;        /* in-flight requests resubmitted after a reconnect */
    uint64_t recovered_out_of_order;  /* of those, older than a request already completed */
    uint64_t delayed;            /* completions held back by emulated latency */
};

struct dp_vq;
struct dp_vq *dp_vq_new(struct dp_disk *disk, unsigned index);
void dp_vq_free(struct dp_vq *vq);
int dp_vq_set_num(struct dp_vq *vq, unsigned num);
int dp_vq_set_flags(struct dp_vq *vq, unsigned flags);
int dp_vq_set_base(struct dp_vq *vq, uint16_t last_avail_idx);
/* Ring addresses are front-end user addresses, translated through mem. */
int dp_vq_set_addr(struct dp_vq *vq, struct dp_mem *mem, uint64_t desc_user_addr,
                   uint64_t avail_user_addr, uint64_t used_user_addr);
/* Point a stopped queue at a new memory table; re-translates its ring addresses. */
int dp_vq_set_mem(struct dp_vq *vq, struct dp_mem *mem);
/* kick_fd < 0: the front end does not kick, the engine polls the ring. */
int dp_vq_set_kick_fd(struct dp_vq *vq, int kick_fd);
/* call_fd < 0: no interrupts. Safe while the queue runs (swapped on its engine thread). */
int dp_vq_set_call_fd(struct dp_vq *vq, int call_fd);
int dp_vq_set_err_fd(struct dp_vq *vq, int err_fd);
/* Attach to an engine and start serving the ring. */
int dp_vq_start(struct dp_vq *vq, struct dp_engine *engine);
/* Stop popping, wait for in-flight requests, detach. Returns last_avail_idx or -errno. */
int dp_vq_stop(struct dp_vq *vq);
int dp_vq_running(const struct dp_vq *vq);
int dp_vq_broken(const struct dp_vq *vq);
uint16_t dp_vq_last_avail_idx(const struct dp_vq *vq);
void dp_vq_get_stats(const struct dp_vq *vq, struct dp_vq_stats *out);

/* Ring primitives, exposed for unit tests on a fake guest memory (queue not running). */
struct dp_seg {
    uint64_t host_addr;
    uint32_t len;
    uint32_t writable;
};
/* Pops one chain: returns the number of segments (>= 0) and stores the head index,
 * -EAGAIN when the ring is empty, -EIO when the ring is broken (queue marked broken),
 * -EFAULT / -EINVAL for a chain whose buffers are bad (head still stored, consumed). */
int dp_vq_pop_chain(struct dp_vq *vq, uint16_t *head, struct dp_seg *segs, unsigned max_segs);
void dp_vq_push_used(struct dp_vq *vq, uint16_t head, uint32_t len);
/* Would the driver want an interrupt for what was pushed since the last notification? */
int dp_vq_need_notify(struct dp_vq *vq);
/* Re-enable kicks after draining; returns 1 if new buffers arrived meanwhile. */
int dp_vq_enable_notify(struct dp_vq *vq);

/* ---- inflight tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD, split rings) ---- */
/* Bytes of one queue's region in the shared inflight buffer (64-byte aligned). */
uint64_t dp_inflight_queue_size(uint16_t queue_size);
/* Give a stopped queue its region (host address, NULL to turn tracking off). When the region
 * comes from a previous back end (restored != 0), the next dp_vq_start reconciles it with
 * the used ring and resubmits what was in flight, in the order it was popped. */
int dp_vq_set_inflight(struct dp_vq *vq, void *region, int restored);
/* Map / unmap the shared inflight buffer a front end hands over. NULL on failure. */
void *dp_map_shared(int fd, uint64_t size, uint64_t offset);
void dp_unmap_shared(void *addr, uint64_t size);

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

/* Observed service time (pop to completion) of a queue's requests, in nanoseconds. */
struct dp_hist;
void dp_vq_get_latency(const struct dp_vq *vq, struct dp_hist *out);

/* ==== driver side: load generator and latency histograms (driver.c, stats.c) ==== */

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

/* rw modes (fio's names) */
#define DP_RW_READ 0
#define DP_RW_WRITE 1
#define DP_RW_RANDREAD 2
#define DP_RW_RANDWRITE 3
#define DP_RW_RANDRW 4
#define DP_RW_RW 5

#define DP_DIR_READ 0
#define DP_DIR_WRITE 1

/* verify map entries, one per bs-sized block of the queue's region */
#define DP_VERIFY_NEVER 0
#define DP_VERIFY_UNKNOWN 2147483647
#define DP_LOAD_SAMPLES 4096
#define DP_LOAD_VERIFY_REPORTS 16
/* Bytes per request slot outside its data buffer: header, status, indirect table. */
#define DP_LOAD_SLOT_META 128

struct dp_load_params {
    /* the split ring the frontend set up and hands over (host pointers into its memory) */
    uint64_t desc_host;
    uint64_t avail_host;
    uint64_t used_host;
    uint32_t num;                /* ring size, a power of two */
    uint16_t avail_idx;          /* where the frontend left its avail index */
    uint16_t last_used_idx;      /* and its used index */
    int kick_fd;
    int call_fd;
    int event_idx;               /* VIRTIO_RING_F_EVENT_IDX negotiated */
    int indirect;                /* one indirect descriptor per request (needs INDIRECT_DESC) */
    /* guest memory the driver owns during the run (see dp_load_arena_size) */
    uint64_t arena_host;
    uint64_t arena_gpa;
    uint64_t arena_len;
    /* the job */
    uint32_t queue;
    int rw;                      /* DP_RW_* */
    uint32_t rwmixread;          /* percent of reads for randrw / rw */
    uint32_t bs;                 /* bytes, a multiple of 512 */
    uint32_t iodepth;
    uint64_t offset;             /* region [offset, offset + size), bs-aligned */
    uint64_t size;
    uint64_t runtime_ns;         /* 0: no time limit (then number_ios must be set) */
    uint64_t ramp_ns;            /* not counted; only with a time limit */
    uint64_t number_ios;         /* 0: no limit; else exactly this many counted I/Os */
    uint64_t rate_iops;          /* 0: closed loop; else open loop at this rate */
    uint64_t seed;
    uint64_t poll_ns;            /* spin on the used ring this long before sleeping */
    uint64_t timeout_ns;         /* no completion for this long: give up (-ETIMEDOUT) */
    uint64_t sample_ns;          /* interval of the per-direction I/O count samples */
    int cpu;                     /* pin the thread (< 0: not pinned) */
    /* verify: map owned by the caller, so that state survives across runs */
    int verify;
    uint32_t *verify_map;        /* size / bs entries: DP_VERIFY_*, or a generation */
    uint64_t verify_run_id;
    uint32_t verify_generation;  /* last generation used; the run continues from it */
};

struct dp_load_dir_stats {
    uint64_t ios;                /* completed I/Os issued after the ramp */
    uint64_t bytes;
    uint64_t short_ios;          /* reads the device reported fewer bytes for */
    uint64_t err_ioerr;
    uint64_t err_unsupp;
    uint64_t err_other;          /* any other status, or none written */
    struct dp_hist slat;         /* scheduled (open loop) or prepared -> published */
    struct dp_hist clat;         /* published -> completion seen */
    struct dp_hist lat;          /* slat + clat: scheduled or prepared -> completion seen */
};

struct dp_load_stats {
    struct dp_load_dir_stats dir[2];
    uint64_t issued;             /* all requests published, ramp included */
    uint64_t completed;
    uint64_t kicks;
    uint64_t interrupts;         /* wake-ups by the call eventfd */
    uint64_t bad_used;           /* used elements with a bad id or length (backend bug) */
    uint64_t late_ios;           /* open loop: published more than one interval late */
    uint64_t verify_checked;     /* sectors compared */
    uint64_t verify_failures;    /* sectors that did not hold what was written */
    uint64_t verify_fail_offset[DP_LOAD_VERIFY_REPORTS];   /* first failures, byte offsets */
    uint32_t verify_generation;
    int32_t error;               /* -errno that ended the run early, 0 otherwise */
    uint64_t runtime_ns;         /* measured period: end of ramp to last completion */
    uint64_t ramp_ns;
    uint64_t usr_ns;             /* thread CPU time during the measured period */
    uint64_t sys_ns;
    uint64_t ctx;                /* context switches (voluntary + involuntary) */
    /* fio's distributions: requests by depth in flight once added (1, 2, 4, .. 32, >=64),
     * publishes and reaps by batch size (0, 1-4, 5-8, .. 33-64, >64) */
    uint64_t depth_level[7];
    uint64_t submit_level[7];
    uint64_t complete_level[7];
    uint16_t avail_idx;          /* ring indices at the end, for the frontend to resume */
    uint16_t last_used_idx;
    uint32_t nsamples;
    uint64_t sample_ns;
    uint64_t sample_ios[2][DP_LOAD_SAMPLES];   /* cumulative counted I/Os at each interval */
};

struct dp_load;
/* Bytes of guest memory a job needs for its buffers (4 KiB aligned). */
uint64_t dp_load_arena_size(uint32_t bs, uint32_t iodepth);
/* Validates params and starts thread dp-load<queue>. On failure returns NULL, *err = -errno. */
struct dp_load *dp_load_start(const struct dp_load_params *params, int *err);
/* Ask the thread to stop issuing; it drains what is in flight. */
void dp_load_stop(struct dp_load *load);
/* Wait up to timeout_ms (< 0: forever): 1 when the thread finished, 0 on timeout. */
int dp_load_wait(struct dp_load *load, int timeout_ms);
/* Counted I/Os so far per direction (relaxed reads while it runs). */
void dp_load_progress(const struct dp_load *load, uint64_t *reads, uint64_t *writes);
/* After dp_load_wait returned 1: the results. */
int dp_load_get_stats(const struct dp_load *load, struct dp_load_stats *out);
/* Stops, joins and frees. */
void dp_load_free(struct dp_load *load);
int dp_load_thread_id(const struct dp_load *load);

#endif
