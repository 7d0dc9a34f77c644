/* engine.h — the engine room's own header: an I/O thread's state (engine.c) and how it serves
 * queues (queue.c). Nothing outside csrc/engine/ includes it; disks see only disk/disk.h. */
#ifndef DP_ENGINE_H
#define DP_ENGINE_H

#include <liburing.h>
#include <pthread.h>

#include "blk/blk.h"
#include "disk/disk.h"
#include "engine/dp_engine.h"
#include "vhost/virtqueue.h"

/* user_data = pointer | tag; every tagged object is at least 8-byte aligned. Disks' SQEs carry
 * a bare pointer to their struct dp_disk_cqe (tag 0). */
enum {
    TAG_DISK = 0,                /* struct dp_disk_cqe: a disk's own SQE */
    TAG_KICK = 2,                /* struct dp_vq: its kick eventfd fired */
    TAG_CTL = 3,                 /* struct dp_engine: the control eventfd fired */
    TAG_IGNORE = DP_CQE_IGNORE,  /* cancellations, timeout updates */
    TAG_MASK = DP_CQE_TAG_MASK,
};

enum { CMD_ATTACH, CMD_DETACH, CMD_SET_CALL, CMD_SET_MEM, CMD_SET_LOG, CMD_SET_RECORDER,
       CMD_SET_IOTLB, CMD_EXIT };

/* Where a request slot is (dp_req.state). */
enum { REQ_FREE, REQ_ACTIVE, REQ_PARKED, REQ_DEFERRED };

struct engine_cmd {
    int op;
    int arg;
    struct dp_vq *vq;
    void *ptr;                    /* SET_MEM: the table; SET_LOG: a struct vq_log_cfg;
                                     SET_IOTLB: a struct vq_iotlb_cfg */
    int done;
    int result;
    /* Set: nobody waits; engine_cmd_done hands the command to it instead (a posted IOTLB
     * update frees what it allocated). */
    void (*release)(struct engine_cmd *cmd);
    struct engine_cmd *next;
};

/* A disk as this engine serves it: the disk's state here, made for the first queue of the
 * disk that attaches and released after the last one detaches. */
struct engine_disk {
    struct dp_disk *disk;
    void *state;
    unsigned queues;              /* attached queues of the disk */
    int closing;                  /* no queue left: waiting for its SQEs to leave the ring */
    struct engine_disk *next;
};

/* What the engine registered with its ring (fixed.c). */
struct fixed_slot;
struct fixed_file;
struct engine_fixed {
    int buf_state;                /* 0: not tried; 1: the sparse buffer table is there; -errno */
    int file_state;               /* the same, for the file table */
    struct fixed_slot *slots;
    struct fixed_file *files;
    uint64_t registered_bytes;
    struct dp_ring_files ring_files;   /* what the disks' env points at */
};

struct dp_engine {
    struct io_uring ring;
    struct dp_vq *vqs;            /* attached queues (engine thread only) */
    unsigned npolling;            /* attached queues without a kick fd */
    struct engine_disk *disks;    /* the disks of attached queues */
    unsigned ndisk_polls;         /* of those, disks with a poll hook */
    unsigned ndisk_busy;          /* of those, disks with a busy hook (polled rings) */
    struct dp_disk_env disk_env;  /* what every disk here is lent */
    struct dp_engine_wait wait;   /* this round's sleep, for disks that time themselves */
    /* The clock, read once per batch rather than twice per request: before a queue's
     * requests are popped (their pop time), before a batch of CQEs is handled and when the
     * disks' deferred work runs (the completion time of whatever finishes then). A request's
     * service time is at that resolution, and the times a recording gets never go back. */
    uint64_t clock_ns;
    struct engine_fixed fixed;
    int exiting;
    /* the tick of queues waiting on a vIOMMU (parked requests, rings not in the IOTLB): they
     * ask again and give up on time (queue_iotlb_tick) */
    struct dp_disk_cqe tick_cqe;
    struct __kernel_timespec tick_ts;
    uint64_t tick_next;           /* when the tick is due (0: nothing waits) */
    uint64_t tick_at;             /* the timeout armed for it (0: none armed) */
    uint64_t poll_ns;             /* spin at most this long before sleeping (0: never) */
    uint64_t poll_win_ns;         /* the spin window now, adapted within [0, poll_ns] */
    uint64_t ctl_buf;
    int ctl_fd;

    pthread_t thread;
    char name[16];
    int cpu;
    unsigned entries;
    int tid;
    int init_done;
    int init_rc;

    pthread_mutex_t lock;         /* guards cmds, done flags and init state */
    pthread_cond_t cond;
    struct engine_cmd *cmds;
    struct engine_cmd **cmds_tail;
};

/* Single writer per counter (the queue's engine thread); readers load relaxed. */
#define STAT_ADD(vq, field, n) \
    __atomic_store_n(&(vq)->stats.field, (vq)->stats.field + (n), __ATOMIC_RELAXED)

/* SET_LOG's payload: what a queue logs into (log NULL: nothing). */
struct vq_log_cfg {
    struct dp_dirty_log *log;
    int log_used;
    uint64_t used_gpa;
};

/* SET_IOTLB's payload: the snapshot (the poster took a reference for each queue, which the
 * queue keeps), and what an invalidation took away: its IOVA range and the front-end user
 * addresses the old snapshot mapped it to (all: too many pieces to list, every request in
 * flight counts as using them). */
#define IOTLB_INVAL_RANGES 32
struct vq_iotlb_cfg {
    const struct dp_iotlb *iotlb;
    int update;                   /* an UPDATE of [first, last] */
    int invalidate;               /* an INVALIDATE of [first, last] */
    uint64_t first, last;
    int all;
    unsigned nremoved;
    struct iotlb_range removed[IOTLB_INVAL_RANGES];
};

/* The tick of the queues waiting on the vIOMMU: parked requests look again (asking for what
 * is not asked for already) and give up once due, missing rings are asked for again. */
#define IOTLB_RETRY_NS 50000000ull

/* engine.c: the mailbox. engine_call = engine_post + engine_wait; posting to several engines
 * before waiting lets them work at once. */
int engine_call(struct dp_engine *engine, int op, struct dp_vq *vq, int arg);
int engine_post(struct dp_engine *engine, struct engine_cmd *cmd);
int engine_wait(struct dp_engine *engine, struct engine_cmd *cmd);
void engine_cmd_done(struct dp_engine *engine, struct engine_cmd *cmd, int result);
/* The call fd has a new value or the queue starts: signal it once (engine.c). */
void engine_signal_call(struct dp_vq *vq);
/* dp_debug_kill_before_signal: called where a used index is published and its interrupt is
 * about to be sent; SIGKILLs the process at the n-th (nothing of it runs after that). */
extern unsigned engine_debug_kill_countdown;
extern unsigned engine_debug_flags;              /* DP_DEBUG_* */
void engine_debug_kill_point(void);
static inline void engine_debug_before_signal(void)
{
    if (__builtin_expect(__atomic_load_n(&engine_debug_kill_countdown, __ATOMIC_RELAXED) != 0, 0))
        engine_debug_kill_point();
}

/* queue.c: queues on the engine thread */
void queue_io_done(void *arg, struct dp_disk_io *io, int result);   /* the disks' complete */
int queue_attach(struct dp_engine *engine, struct dp_vq *vq);
void queue_begin_detach(struct dp_engine *engine, struct dp_vq *vq, struct engine_cmd *cmd);
void queue_finish_detaches(struct dp_engine *engine);
void queue_kicked(struct dp_engine *engine, struct dp_vq *vq, int res);
void queue_process_avail(struct dp_engine *engine, struct dp_vq *vq);
void queue_notify(struct dp_vq *vq);
void queue_set_mem(struct dp_engine *engine, struct dp_vq *vq, struct engine_cmd *cmd);
void queue_set_log(struct dp_vq *vq, const struct vq_log_cfg *cfg);
void queue_set_iotlb(struct dp_engine *engine, struct dp_vq *vq, struct engine_cmd *cmd);
/* Queues waiting on the vIOMMU: when the engine's tick is next due (0: none waits), and the
 * tick itself (engine.c runs it once tick_next has passed). */
uint64_t queue_iotlb_next_tick(struct dp_engine *engine, uint64_t now);
void queue_iotlb_tick(struct dp_engine *engine, uint64_t now);

/* fixed.c: guest memory and files registered with the engine's ring */
void fixed_init(struct dp_engine *engine);
void fixed_free(struct dp_engine *engine);
/* The queue's memory table registered (what was registered for it before let go of). */
void fixed_queue_set(struct dp_engine *engine, struct dp_vq *vq, const struct dp_mem *mem);
void fixed_queue_clear(struct dp_engine *engine, struct dp_vq *vq);
/* The registered buffer of the queue's table holding all of [base, base + len), or -1
 * (vq->fixed must be set). */
int fixed_lookup(const struct dp_vq *vq, const void *base, size_t len);

/* record.c: a request into the queue's record ring (vq->rec set): taken (done 0) or completed */
void queue_record(struct dp_vq *vq, const struct dp_req *req, int done, uint8_t status, uint64_t now);

#endif
