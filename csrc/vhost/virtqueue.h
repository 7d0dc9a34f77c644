/* virtqueue.h — the device side of a split virtqueue: the queue object and the ring walker. */
#ifndef DP_VIRTQUEUE_H
#define DP_VIRTQUEUE_H

#include <stdint.h>
#include <sys/uio.h>

#include "vhost/dp_vhost.h"
#include "vhost/guest_mem.h"
#include "vhost/inflight.h"
#include "vhost/vring.h"

/* One popped descriptor chain, translated. Device-readable segments come first. */
struct vq_chain {
    uint16_t head;
    unsigned nseg;
    unsigned nreadable;
    int err;              /* 0, or why the buffers are unusable (-EFAULT, -E2BIG, -EINVAL) */
    uint8_t *last_byte;   /* last byte of the chain when it is device-writable, else NULL */
};

/* The engine's, opaque here. */
struct dp_blk_dev;
struct dp_engine;
struct engine_disk;
struct dp_req;
struct rec_ring;

struct dp_vq {
    /* ring state: touched only by the thread that serves the queue (or by the control
     * plane while the queue is stopped) */
    unsigned index;
    unsigned num;
    unsigned flags;               /* DP_VQ_F_* */
    struct dp_mem *mem;
    uint64_t desc_uva, avail_uva, used_uva;
    int addr_set;
    struct vring_desc *desc;
    struct vring_avail *avail;
    struct vring_used *used;
    uint16_t last_avail_idx;
    uint16_t shadow_avail_idx;
    uint16_t used_idx;
    uint16_t signalled_used;
    int signalled_used_valid;
    int broken;

    int kick_fd;
    int call_fd;
    int err_fd;

    /* serving state: the engine's (engine/queue.c); this room never reads it */
    struct dp_blk_dev *dev;       /* the virtio-blk device the queue serves */
    struct dp_engine *engine;     /* non-NULL while attached */
    struct dp_vq *next;           /* engine's list of attached queues */
    int stopping;
    int starved;                  /* ran out of request slots: pop again on a completion */
    void *detach_cmd;             /* the DETACH waiting for in-flight requests to drain */
    int kick_armed;
    int need_pop;
    int need_notify;
    uint64_t kick_buf;
    struct rec_ring *rec;         /* recording: the queue's record ring, or NULL */
    struct rec_ring *rec_next;    /* the ring to swap in (on the engine thread) */

    /* inflight tracking (NULL when the front end did not negotiate INFLIGHT_SHMFD) */
    struct inflight_region *inflight;
    uint64_t inflight_counter;
    int inflight_restored;        /* region came from a previous back end: recover at start */
    uint16_t *resubmit;           /* heads to resubmit at the next start, by counter */
    unsigned nresubmit;
    unsigned recovered_out_of_order;

    /* the queue's disk on its engine (set up at attach; cold on the ring's hot lines) */
    struct engine_disk *disk;     /* dev's disk as that engine serves it */
    void *disk_queue;             /* the disk's state for this queue */
    int disk_queue_open;
    uint64_t submit_seq;
    uint64_t max_completed_seq;

    struct dp_req *reqs;
    unsigned nreqs;
    struct dp_req *free_reqs;
    struct iovec *iov_pool;

    struct dp_vq_stats stats;
    struct dp_hist latency;       /* pop to completion, ns (engine thread writes) */
};

/* Pop one chain into iov. Returns 1 when a chain was consumed (check chain->err),
 * 0 when the ring is empty, -EIO when the ring itself is broken. */
int vq_pop(struct dp_vq *vq, struct vq_chain *chain, struct iovec *iov, unsigned max_iov);
void vq_push_used(struct dp_vq *vq, uint16_t head, uint32_t len);
int vq_need_notify(struct dp_vq *vq);
int vq_enable_notify(struct dp_vq *vq);
int vq_has_avail(struct dp_vq *vq);
/* Walk the chain starting at head (the inflight resubmission path). */
int vq_read_chain(struct dp_vq *vq, uint16_t head, struct vq_chain *chain, struct iovec *iov,
                  unsigned max_iov);
/* Reconcile the inflight region with the used ring and list the heads to resubmit (inflight.c). */
int vq_inflight_recover(struct dp_vq *vq);
/* A head consumed without a used element (the ring broke on it) is no longer in flight. */
void vq_inflight_drop(struct dp_vq *vq, uint16_t head);
/* Translate the ring addresses through vq->mem (after SET_VRING_ADDR or a new table). */
int vq_map_rings(struct dp_vq *vq);
/* Mark the ring broken (NEEDS_RESET) and tell the front end through the error fd. */
void vq_set_broken(struct dp_vq *vq);

#endif
