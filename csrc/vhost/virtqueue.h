/* virtqueue.h — split virtqueue layout and the device-side ring walker. */
#ifndef DP_VIRTQUEUE_H
#define DP_VIRTQUEUE_H

#include <stdint.h>
#include <sys/uio.h>

#include "core.h"
#include "vhost/guest_mem.h"

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
#define VRING_USED_F_NO_NOTIFY 1
#define VRING_AVAIL_F_NO_INTERRUPT 1

struct vring_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct vring_avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[];   /* num entries, then used_event */
};

struct vring_used_elem {
    uint32_t id;
    uint32_t len;
};

struct vring_used {
    uint16_t flags;
    uint16_t idx;
    struct vring_used_elem ring[];   /* num entries, then avail_event */
};

/* Barriers. Each names what it orders; the driver side has the matching one. */
/* Read avail->idx before the ring entries and descriptors it publishes
 * (pairs with the driver's write barrier between filling descriptors and bumping idx). */
#define virtio_load_acquire_u16(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
/* Make used ring entries visible before the idx that publishes them
 * (pairs with the driver's read barrier after reading used->idx). */
#define virtio_store_release_u16(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
/* Order a store (used->idx, avail_event) before a later load (used_event, avail->idx):
 * pairs with the driver's full barrier between its own store and load, so neither side
 * can miss the other's update and skip a notification that was needed. */
#define virtio_store_mb() __atomic_thread_fence(__ATOMIC_SEQ_CST)

/* One popped descriptor chain, translated. Device-readable segments come first. */
struct vq_chain {
    uint16_t head;
    unsigned nseg;
    unsigned nreadable;
    int err;              /* 0, or why the buffers are unusable (-EFAULT, -E2BIG, -EINVAL) */
    uint8_t *last_byte;   /* last byte of the chain when it is device-writable, else NULL */
};

/* Inflight tracking region of one split queue (vhost-user spec, "Inflight I/O tracking").
 * It lives in a memfd the front end keeps across back-end restarts. */
struct inflight_desc {
    uint8_t inflight;
    uint8_t padding[5];
    uint16_t next;
    uint64_t counter;
};

struct inflight_region {
    uint64_t features;
    uint16_t version;
    uint16_t desc_num;
    uint16_t last_batch_head;
    uint16_t used_idx;
    struct inflight_desc desc[];
};

/* Keep the inflight bookkeeping in program order: only a process kill interrupts it, and
 * the memory (a shared memfd) outlives the process, so ordering the compiler's stores is
 * what makes the region consistent at any instruction boundary. */
#define inflight_order() __atomic_signal_fence(__ATOMIC_SEQ_CST)

struct dp_engine;
struct dp_req;

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

    /* serving state (engine/engine.c) */
    struct dp_disk *disk;
    struct dp_engine *engine;     /* non-NULL while attached */
    struct dp_vq *next;           /* engine's list of attached queues */
    int stopping;
    int starved;                  /* ran out of request slots: pop again on a completion */
    void *detach_cmd;             /* the DETACH waiting for in-flight requests to drain */
    int kick_armed;
    int need_pop;
    int need_notify;
    uint64_t kick_buf;

    /* inflight tracking (NULL when the front end did not negotiate INFLIGHT_SHMFD) */
    struct inflight_region *inflight;
    uint64_t inflight_counter;
    int inflight_restored;        /* region came from a previous back end: recover at start */
    uint16_t *resubmit;           /* heads to resubmit at the next start, by counter */
    unsigned nresubmit;
    unsigned recovered_out_of_order;

    /* emulated latency (see dp_disk_set_latency): per-queue sampler and throughput budget */
    uint64_t rng;
    uint64_t budget_ns;           /* when the queue's share of the iops/bw cap is next free */
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
/* Reconcile the inflight region with the used ring and list the heads to resubmit. */
int vq_inflight_recover(struct dp_vq *vq);
/* Translate the ring addresses through vq->mem (after SET_VRING_ADDR or a new table). */
int vq_map_rings(struct dp_vq *vq);
/* Mark the ring broken (NEEDS_RESET) and tell the front end through the error fd. */
void vq_set_broken(struct dp_vq *vq);

#endif
