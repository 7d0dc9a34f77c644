/* dp_replay.h — public (cffi): trace replay threads (replay.c). */
#ifndef DP_REPLAY_PUBLIC_H
#define DP_REPLAY_PUBLIC_H

#include <stdint.h>
#include "driver/dp_driver.h"

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

#endif
