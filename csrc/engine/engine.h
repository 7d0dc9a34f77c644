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

enum { CMD_ATTACH, CMD_DETACH, CMD_SET_CALL, CMD_SET_RECORDER, CMD_EXIT };

struct engine_cmd {
    int op;
    int arg;
    struct dp_vq *vq;
    int done;
    int result;
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

struct dp_engine {
    struct io_uring ring;
    struct dp_vq *vqs;            /* attached queues (engine thread only) */
    unsigned npolling;            /* attached queues without a kick fd */
    struct engine_disk *disks;    /* the disks of attached queues */
    unsigned ndisk_polls;         /* of those, disks with a poll hook */
    struct dp_disk_env disk_env;  /* what every disk here is lent */
    struct dp_engine_wait wait;   /* this round's sleep, for disks that time themselves */
    int exiting;
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

/* engine.c: the mailbox */
int engine_call(struct dp_engine *engine, int op, struct dp_vq *vq, int arg);
void engine_cmd_done(struct dp_engine *engine, struct engine_cmd *cmd, int result);

/* queue.c: queues on the engine thread */
void queue_io_done(void *arg, struct dp_disk_io *io, int result);   /* the disks' complete */
int queue_attach(struct dp_engine *engine, struct dp_vq *vq);
void queue_begin_detach(struct dp_engine *engine, struct dp_vq *vq, struct engine_cmd *cmd);
void queue_finish_detaches(struct dp_engine *engine);
void queue_kicked(struct dp_engine *engine, struct dp_vq *vq, int res);
void queue_process_avail(struct dp_engine *engine, struct dp_vq *vq);
void queue_notify(struct dp_vq *vq);

/* record.c: a request into the queue's record ring (vq->rec set): taken (done 0) or completed */
void queue_record(struct dp_vq *vq, const struct dp_req *req, int done, uint8_t status, uint64_t now);

#endif
