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
/* Spin up to poll_ns looking for work before sleeping in io_uring_enter (0: never spin); the
 * window adapts between 0 and poll_ns to how long the thread's sleeps last. */
void dp_engine_set_poll(struct dp_engine *engine, uint64_t poll_ns);
/* The spin window now, in ns. */
uint64_t dp_engine_poll_window(const struct dp_engine *engine);

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

/* ---- a split ring a frontend set up and hands over to a driver thread (dp_load, dp_replay:
 * the thread plays the guest on it), with guest memory the thread owns during the run for its
 * requests (see dp_load_arena_size, dp_replay_arena_size). Host pointers into the frontend's
 * memory; the thread hands its indices back at the end. ---- */
struct dp_ring_handover {
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
    uint64_t arena_host;
    uint64_t arena_gpa;
    uint64_t arena_len;
};

/* ==== trace replay (replay.c): trace records issued in order, one thread per queue ====
 * Python reads the trace, maps each record to a queue, fits and aligns it to the target and
 * feeds each queue's thread arrays of records; the thread issues them in feed order, on the
 * trace's schedule (timed) or as fast as iodepth allows (afap), through a split virtqueue (as
 * the guest, like dp_load) or through its own io_uring on a file opened O_DIRECT (the
 * bare-metal baseline), with the same scheduling code either way. */
#define DP_REPLAY_VRING 0
#define DP_REPLAY_URING 1
#define DP_REPLAY_TIMED 0
#define DP_REPLAY_AFAP 1
/* record ops: dataplane.replay.Op */
#define DP_REPLAY_OP_READ 0
#define DP_REPLAY_OP_WRITE 1
#define DP_REPLAY_OP_FLUSH 2
#define DP_REPLAY_OP_TRIM 3
#define DP_REPLAY_OPS 4
/* largest data buffer of a request slot, most requests in flight per queue */
#define DP_REPLAY_MAX_BUF 16777216
#define DP_REPLAY_MAX_IODEPTH 4096
/* bytes per slot outside its data: header, status, discard range, indirect table */
#define DP_REPLAY_SLOT_META 128
/* "DPRP": with stamping on, write buffers carry a stamp every 4 KiB */
#define DP_REPLAY_STAMP_MAGIC 1347571780
/* per-second histograms handed out with each row: read clat, write clat, issue lag */
#define DP_REPLAY_SERIES_HISTS 3

/* One record, laid out as dataplane.replay.RECORD_DTYPE (32 bytes). time_ns: when it is due,
 * from the replay's start (already divided by the speed factor; negative means 0); offset and
 * length: bytes, fitted and aligned to the target; stream: not used here. */
struct dp_replay_rec {
    int64_t time_ns;
    uint64_t offset;
    uint32_t length;
    uint32_t stream;
    uint8_t op;
    uint8_t pad[7];
};

/* Per-record timings (CLOCK_MONOTONIC ns), kept when the caller passes a log: entry i is the
 * queue's i-th record. tag: for a write, the stamp it wrote (queue << 48 | record + 1); for a
 * read, the stamp found at its first byte when it names the read's offset, else 0. */
struct dp_replay_log_entry {
    uint64_t sched_ns;           /* due (timed) or issuable (afap) */
    uint64_t submit_ns;          /* made the device's: avail->idx published / SQE submitted */
    uint64_t complete_ns;
    uint64_t tag;
    int32_t status;              /* virtio-blk status, or -errno from io_uring */
    uint32_t op;
};

struct dp_replay_params {
    int kind;                    /* DP_REPLAY_VRING or DP_REPLAY_URING */
    struct dp_ring_handover ring;   /* DP_REPLAY_VRING */
    /* DP_REPLAY_URING: the target, opened O_DIRECT; the thread allocates its own buffers */
    int fd;
    /* the run */
    uint32_t queue;
    int mode;                    /* DP_REPLAY_TIMED or DP_REPLAY_AFAP */
    uint32_t iodepth;            /* requests in flight at most */
    uint32_t buf_size;           /* data buffer per slot, a multiple of 4096: the longest record */
    uint64_t capacity;           /* bytes of the target: records must end inside it */
    uint32_t feed_records;       /* records the feed holds (rounded up to a power of two; 0: 65536) */
    uint64_t spin_ns;            /* timed: spin rather than sleep when the next record is this close */
    uint64_t poll_ns;            /* spin on completions this long before sleeping */
    uint64_t timeout_ns;         /* no completion for this long with requests in flight: -ETIMEDOUT */
    int stamp;                   /* stamp write buffers; reads report the stamp they find */
    int cpu;                     /* pin the thread (< 0: not pinned) */
    struct dp_replay_log_entry *log;   /* optional, log_len entries, owned by the caller */
    uint64_t log_len;
};

struct dp_replay_counters {
    uint64_t records;            /* taken from the feed and issued */
    uint64_t completed;
    uint64_t kicks;
    uint64_t interrupts;         /* wake-ups by the completion fd */
    uint64_t bad_used;           /* used elements with a bad id or length (backend bug) */
    uint64_t hazard_waits;       /* records held back until an overlapping request completed */
    uint64_t full_waits;         /* timed: records due while iodepth requests were in flight */
    uint64_t feed_waits;         /* the feed ran dry before its end (the reader fell behind) */
    uint64_t late_ios;           /* timed: issued more than 1 ms after their time */
    uint64_t series_dropped;     /* per-second rows lost because nobody took them in time */
    int32_t error;               /* -errno that ended the run early, 0 otherwise */
    uint64_t start_ns;           /* trace time 0 (CLOCK_MONOTONIC) */
    uint64_t runtime_ns;         /* start to the last completion */
    uint64_t usr_ns;
    uint64_t sys_ns;
    uint64_t ctx;
    uint64_t depth_level[7];     /* fio's distributions, as in dp_load_stats */
    uint64_t submit_level[7];
    uint64_t complete_level[7];
    uint16_t avail_idx;          /* ring indices at the end, for the frontend to resume */
    uint16_t last_used_idx;
};

/* One second of one queue: I/Os and bytes by completion time, with DP_REPLAY_SERIES_HISTS
 * histograms alongside (completion latency by completion time, issue lag by submit time). */
struct dp_replay_second {
    uint64_t second;             /* since the start */
    uint64_t ios[DP_REPLAY_OPS];
    uint64_t bytes[DP_REPLAY_OPS];
};

struct dp_replay;
struct dp_load_dir_stats;
/* Guest memory a vring replay needs for its buffers (4 KiB aligned). */
uint64_t dp_replay_arena_size(uint32_t buf_size, uint32_t iodepth);
/* Validates params and starts thread dp-replay<queue>, which waits for dp_replay_begin.
 * On failure returns NULL and stores -errno in *err. */
struct dp_replay *dp_replay_new(const struct dp_replay_params *params, int *err);
/* Go: trace time 0 is start_ns (CLOCK_MONOTONIC; give every queue the same). */
int dp_replay_begin(struct dp_replay *r, uint64_t start_ns);
/* Copy up to n records into the feed, waiting up to timeout_ms (< 0: forever) for room.
 * Returns the number copied (0 on timeout), -EINVAL for a record the thread cannot issue
 * (nothing copied), -EPIPE once the thread has ended. */
int dp_replay_feed(struct dp_replay *r, const struct dp_replay_rec *recs, uint32_t n, int timeout_ms);
/* No more records: the thread ends when the feed is empty and nothing is in flight. */
void dp_replay_feed_end(struct dp_replay *r);
/* Stop issuing; what is in flight drains. */
void dp_replay_stop(struct dp_replay *r);
/* Wait up to timeout_ms (< 0: forever): 1 when the thread finished, 0 on timeout. */
int dp_replay_wait(struct dp_replay *r, int timeout_ms);
/* Completed requests so far (relaxed read while it runs). */
uint64_t dp_replay_completed(const struct dp_replay *r);
/* Take the oldest finished second: 1 and the row (hists: DP_REPLAY_SERIES_HISTS of them,
 * or NULL), or 0 when none is ready. Seconds before dp_replay_series_horizon() are final. */
int dp_replay_take_second(struct dp_replay *r, struct dp_replay_second *row, struct dp_hist *hists);
/* The second the thread is filling now (UINT64_MAX once it has ended). */
uint64_t dp_replay_series_horizon(const struct dp_replay *r);
/* After dp_replay_wait returned 1: the counters, and one op's fio-style stats (slat is the
 * issue lag: submit time minus due time). */
int dp_replay_get_counters(const struct dp_replay *r, struct dp_replay_counters *out);
int dp_replay_get_op(const struct dp_replay *r, unsigned op, struct dp_load_dir_stats *out);
int dp_replay_thread_id(const struct dp_replay *r);
/* Stops, joins and frees (close the fd after). */
void dp_replay_free(struct dp_replay *r);
/* ==== end of trace replay ==== */

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
    struct dp_ring_handover ring;
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

/* ==== benchmark hooks (bench_hooks.c) — for tests/bench only, not part of the data path ====
 * A fake guest (one memory region, a split ring of num entries, read requests of data_len
 * bytes, direct or indirect chains) and loops that run a hot-path function n times in C. */
struct dp_bench_result {
    uint64_t iterations;
    uint64_t ns;                 /* wall time of the whole loop (CLOCK_MONOTONIC) */
    uint64_t checksum;           /* folds each iteration's output, so nothing is optimised away */
};
struct dp_bench_ring;
/* num: a power of two (4 .. DP_MAX_QUEUE_SIZE); data_len: a multiple of 512, at most 1 MiB.
 * On failure returns NULL and stores -errno in *err. */
struct dp_bench_ring *dp_bench_ring_new(unsigned num, int indirect, uint32_t data_len, int *err);
void dp_bench_ring_free(struct dp_bench_ring *ring);
/* Requests in the ring: num with indirect chains, num / 3 with direct ones. */
unsigned dp_bench_ring_requests(const struct dp_bench_ring *ring);
/* vq_pop n times (the driver re-publishes each head). */
int dp_bench_pop(struct dp_bench_ring *ring, uint64_t n, struct dp_bench_result *out);
/* blk_req_parse n times over the ring's requests. */
int dp_bench_parse(struct dp_bench_ring *ring, uint64_t n, struct dp_bench_result *out);
/* vq_push_used n times, vq_need_notify once per batch used elements (batch 0: never). */
int dp_bench_push_used(struct dp_bench_ring *ring, uint64_t n, unsigned batch,
                       struct dp_bench_result *out);
/* pop + parse + status + push used (+ notify decision per batch) for n requests. */
int dp_bench_request(struct dp_bench_ring *ring, uint64_t n, unsigned batch,
                     struct dp_bench_result *out);
/* ==== end of benchmark hooks ==== */

#endif
