/* dp_driver.h — public (cffi): the guest side in C. A ring (split or packed) the frontend
 * hands over to a driver thread, and the load generator that runs on it. Trace replay is
 * dp_replay.h. */
#ifndef DP_DRIVER_PUBLIC_H
#define DP_DRIVER_PUBLIC_H

#include <stdint.h>
#include "util/dp_hist.h"

/* ==== driver side: the load generator (load.c) ==== */

/* ---- a ring a frontend set up and hands over to a driver thread (dp_load, dp_replay: the
 * thread plays the guest on it), with guest memory the thread owns during the run for its
 * requests (see dp_load_arena_size, dp_replay_arena_size). Host pointers into the frontend's
 * memory; the thread hands its indices back at the end. A packed ring (packed != 0): desc is
 * its descriptor ring, avail the driver event area, used the device event area; its indices
 * are positions with the wrap counter in bit 15. ---- */
struct dp_ring_handover {
    uint64_t desc_host;
    uint64_t avail_host;
    uint64_t used_host;
    uint32_t num;                /* ring size: a power of two (split), up to 32768 (packed) */
    uint16_t avail_idx;          /* where the frontend left its avail index */
    uint16_t last_used_idx;      /* and its used index */
    int kick_fd;
    int call_fd;
    int event_idx;               /* VIRTIO_RING_F_EVENT_IDX negotiated */
    int indirect;                /* one indirect descriptor per request (needs INDIRECT_DESC) */
    int packed;                  /* VIRTIO_F_RING_PACKED negotiated: a packed ring */
    uint64_t arena_host;
    uint64_t arena_gpa;
    uint64_t arena_len;
};

/* ---- the front end's vhost-user socket, shared by Python and driver threads (vu_socket.c):
 * one lock for a message and its reply, whoever sends it. The fd stays the caller's. ---- */
struct dp_vu_socket;
struct dp_vu_socket *dp_vu_socket_new(int fd);
void dp_vu_socket_free(struct dp_vu_socket *s);
void dp_vu_socket_lock(struct dp_vu_socket *s);
void dp_vu_socket_unlock(struct dp_vu_socket *s);
/* One IOTLB_MSG (NEED_REPLY set, as QEMU sends it) and its acknowledgement, under the lock:
 * 0, -EIO when the back end answered failure, -EPROTO for a reply that is not the ack,
 * -ETIMEDOUT after timeout_ms (<= 0: 10 s), -errno. type: 2 UPDATE, 3 INVALIDATE. */
int dp_vu_iotlb_msg(struct dp_vu_socket *s, uint64_t iova, uint64_t size, uint64_t uaddr,
                    unsigned perm, unsigned type, int timeout_ms);

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
    /* vIOMMU, map per request (like a guest in strict IOMMU mode): ring.arena_gpa is the
     * arena's IOVA, and each request's slot (its data buffer and the page after it with
     * header, status and indirect table: the arena laid out by dp_load_arena_size_iommu) is
     * mapped with an UPDATE before it is published and unmapped with an INVALIDATE once it
     * completed, both on iommu_socket. NULL: addresses as given (a static mapping, if any, is
     * the frontend's business). */
    struct dp_vu_socket *iommu_socket;
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
    uint16_t avail_idx;          /* ring indices at the end, for the frontend to resume (packed: */
    uint16_t last_used_idx;      /* positions, wrap counter in bit 15) */
    uint32_t nsamples;
    uint64_t sample_ns;
    uint64_t sample_ios[2][DP_LOAD_SAMPLES];   /* cumulative counted I/Os at each interval */
};

struct dp_load;
/* Bytes of guest memory a job needs for its buffers (4 KiB aligned). */
uint64_t dp_load_arena_size(uint32_t bs, uint32_t iodepth);
/* The same for a job that maps each request (iommu_socket): a page per slot more. */
uint64_t dp_load_arena_size_iommu(uint32_t bs, uint32_t iodepth);
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

/* ==== the front end's side of the dirty log (log_harvest.c) ==== */
/* Read and clear a dirty log while the device may be marking it, as QEMU does: an atomic
 * exchange per 64-bit word (bitmap 8-byte aligned, words = its size / 8), the words that
 * were read into out. Returns the number of bits found set. */
uint64_t dp_log_harvest(void *bitmap, uint64_t words, uint64_t *out);

#endif
