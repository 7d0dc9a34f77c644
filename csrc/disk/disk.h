/* disk.h — the interface between an I/O engine and the disks it serves: an ops table
 * (struct dp_disk_ops), the request a disk executes (struct dp_disk_io), and what the engine
 * lends a disk (struct dp_disk_env).
 *
 * The engine calls a disk only through its ops. A disk reaches back only through what it was
 * handed: env->complete for a finished request, and the CQE handlers (struct dp_disk_cqe) it
 * puts in the user_data of the SQEs it queues on env->ring. It never sees the engine itself, so
 * the same disk serves any engine, and a disk can stack on another by handing it an env of its
 * own (delay.c). Everything here runs on the engine's thread.
 */
#ifndef DP_DISK_H
#define DP_DISK_H

#include <liburing.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "disk/dp_disk.h"

#ifndef container_of
#define container_of(ptr, type, member) ((type *)(void *)((char *)(ptr) - offsetof(type, member)))
#endif

/* What a request asks of a disk. */
enum dp_disk_op {
    DP_DISK_READ,
    DP_DISK_WRITE,
    DP_DISK_FLUSH,
    DP_DISK_DISCARD,
    DP_DISK_WRITE_ZEROES,
};

/* dp_disk_io.flags */
#define DP_IO_F_FUA 1        /* in: a write that must be durable when it completes */
#define DP_IO_F_BOUNCED 2    /* out: it went through an aligned copy of the guest's buffers */
#define DP_IO_F_DELAYED 4    /* out: a latency layer held its completion back */
#define DP_IO_F_POLLED 8     /* out: it went through a polled (IOPOLL) ring */
#define DP_IO_F_FIXED 16     /* out: READ_FIXED / WRITE_FIXED on a registered buffer */

/* A disk's SQE carries (uintptr_t)&cqe as user_data; the engine calls cqe->done with the CQE's
 * res. Pointers to it are 8-byte aligned: the engine keeps user_data with nonzero low 3 bits
 * (DP_CQE_TAG_MASK) for its own SQEs, and DP_CQE_IGNORE is for an SQE whose completion nobody
 * needs (a timeout update, a cancellation). */
struct dp_disk_cqe {
    void (*done)(struct dp_disk_cqe *cqe, int res);
};
#define DP_CQE_TAG_MASK 7
#define DP_CQE_IGNORE 4

struct dp_disk_io;

/* One range of a DISCARD / WRITE_ZEROES request. */
struct dp_disk_range {
    uint64_t offset;
    uint64_t len;
    int unmap;                   /* WRITE_ZEROES may deallocate (virtio's UNMAP flag) */
    int disk_op;                 /* the disk's own operation for it (file: a fallocate mode) */
    struct dp_disk_io *io;
    struct dp_disk_cqe cqe;
};

/* One request. The submitter fills the first part and the disk only reads it; the rest is
 * scratch for the disks while they hold the request. */
struct dp_disk_io {
    unsigned op;                 /* enum dp_disk_op */
    unsigned flags;              /* DP_IO_F_* */
    uint64_t offset;             /* bytes */
    uint64_t nbytes;             /* READ / WRITE: the length of iov */
    struct iovec *iov;           /* READ / WRITE: guest memory, zero copy */
    unsigned iovcnt;
    unsigned nranges;            /* DISCARD / WRITE_ZEROES: ranges[0 .. nranges) */
    uint64_t start_ns;           /* when the request was taken from the ring (CLOCK_MONOTONIC) */
    /* READ / WRITE of one iovec: the engine ring's registered buffer that holds all of it
     * (READ_FIXED / WRITE_FIXED), or -1. Set only for a disk with DISK_RING_FIXED_BUFFERS. */
    int buf_index;

    /* the disk that does the I/O (file, rbd): its state, CQE handler and progress */
    void *io_state;
    struct dp_disk_cqe cqe;
    struct iovec *xfer_iov;      /* what is submitted: iov, or the bounce buffer */
    unsigned xfer_cnt;
    struct iovec bounce_iov;
    void *bounce;                /* aligned copy when O_DIRECT cannot take the guest's buffers */
    struct iovec *xfer_copy;     /* what is left to transfer after a short one: iov stays intact */
    uint64_t done;               /* bytes transferred so far (short transfers resubmit) */
    unsigned pending;            /* sub-operations in flight */
    unsigned disk_flags;         /* the disk's own marks while it holds the request */
    int result;                  /* what to complete with once pending reaches zero */
    struct dp_disk_io *link;     /* a disk's own list of them (rbd: done in librbd, not yet reaped) */

    /* a latency layer above it (delay.c) */
    uint64_t delay_ns;           /* the sampled latency */
    uint64_t due_ns;             /* the queue's cap slot, then when to complete */
    int held_result;

    struct dp_disk_range ranges[DP_MAX_DISCARD_SEG];
};

/* The engine's wait of this round: it began at slept_ns (0: the engine did not sleep) and
 * returned at woke_ns (what a timer-driven disk measures its wake-up lateness against). */
struct dp_engine_wait {
    uint64_t slept_ns;
    uint64_t woke_ns;
};

/* The ring's table of fixed files, which the engine keeps for the disks on it: get gives a
 * slot for fd (name it in an SQE with IOSQE_FIXED_FILE), or -errno where the kernel refuses
 * (then use fd); put gives it back, once nothing of the disk is left on the ring. */
struct dp_ring_files {
    int (*get)(void *arg, int fd);
    void (*put)(void *arg, int slot);
    void *arg;
};

/* What an engine lends a disk for as long as the disk's per-engine state lives. */
struct dp_disk_env {
    struct io_uring *ring;       /* the engine's ring: queue SQEs on it (never submit-and-wait) */
    /* The one way a request ends: result 0 or -errno (-EOPNOTSUPP, -EIO, ...), exactly once
     * per submitted io, from submit itself or later. */
    void (*complete)(void *arg, struct dp_disk_io *io, int result);
    void *arg;
    const struct dp_engine_wait *wait;
    const struct dp_ring_files *files;   /* NULL: no fixed files (a stacking disk passes it on) */
};

struct dp_disk;

struct dp_disk_ops {
    const char *name;
    /* Per (engine, disk) state, made when the first queue of the disk attaches to an engine;
     * env stays valid until close returns 0. Open queues nothing on the ring (what a disk
     * needs there it arms in submit or before_wait), so a state no queue used closes at once. */
    int (*open)(struct dp_disk *disk, const struct dp_disk_env *env, void **state);
    /* After the last queue of the disk on that engine detached (nothing of it in flight): undo
     * open. -EBUSY while SQEs of the disk are still on the ring (it has asked for their
     * cancellation): the engine calls again after its next reap. */
    int (*close)(void *state);
    /* Optional per-queue state, for what a disk keeps per queue rather than per engine. */
    int (*queue_open)(void *state, unsigned queue, void **qstate);
    void (*queue_close)(void *state, void *qstate);
    /* Start a request; it ends with env->complete. */
    void (*submit)(void *state, void *qstate, struct dp_disk_io *io);
    /* Optional: run deferred work that is due at now; returns the requests it completed. The
     * engine calls it after every reap, and while it spins before sleeping. */
    unsigned (*poll)(void *state, uint64_t now);
    /* Optional: the engine is about to sleep; queue on env->ring what must wake it. */
    void (*before_wait)(void *state);
    /* Optional: nonzero while the disk has requests that only its poll hook completes (a
     * polled ring of its own): the engine does not sleep then, it keeps calling poll. */
    int (*busy)(void *state);
    void (*free)(struct dp_disk *disk);
};

/* dp_disk.ring_flags: what the disk does with the engine's ring */
#define DISK_RING_FIXED_BUFFERS 1   /* reads and writes take io->buf_index: register guest memory */

/* Every disk begins with this. */
struct dp_disk {
    const struct dp_disk_ops *ops;
    struct dp_disk_info info;
    unsigned ring_flags;         /* DISK_RING_* (a stacking disk takes the one below's) */
};

/* The next free SQE of ring, submitting what is queued when the SQ ring is full. Never NULL. */
static inline struct io_uring_sqe *disk_get_sqe(struct io_uring *ring)
{
    struct io_uring_sqe *sqe;
    while (!(sqe = io_uring_get_sqe(ring)))
        io_uring_submit(ring);
    return sqe;
}

static inline void disk_set_cqe(struct io_uring_sqe *sqe, struct dp_disk_cqe *cqe)
{
    io_uring_sqe_set_data64(sqe, (uintptr_t)cqe);
}

/* One absolute timeout (CLOCK_MONOTONIC ns) on ring, completing to cqe: armed for due, or
 * moved earlier when the one armed (*armed_at, 0: none) is due later; *armed_at becomes due.
 * The kernel reads *ts when the SQE is submitted (by the engine, before its wait). A timeout
 * that fired meanwhile makes the update fail (-ENOENT, ignored): its completion is on the
 * way, and its handler clears *armed_at. */
static inline void disk_arm_timeout(struct io_uring *ring, struct __kernel_timespec *ts,
                                    struct dp_disk_cqe *cqe, uint64_t *armed_at, uint64_t due)
{
    if (*armed_at && *armed_at <= due)
        return;
    ts->tv_sec = (long long)(due / 1000000000u);
    ts->tv_nsec = (long long)(due % 1000000000u);
    struct io_uring_sqe *sqe = disk_get_sqe(ring);
    if (*armed_at) {
        io_uring_prep_timeout_update(sqe, ts, (uintptr_t)cqe, IORING_TIMEOUT_ABS);
        io_uring_sqe_set_data64(sqe, DP_CQE_IGNORE);
    } else {
        io_uring_prep_timeout(sqe, ts, 0, IORING_TIMEOUT_ABS);
        disk_set_cqe(sqe, cqe);
    }
    *armed_at = due;
}

static inline void disk_complete(const struct dp_disk_env *env, struct dp_disk_io *io, int result)
{
    env->complete(env->arg, io, result);
}

#endif
