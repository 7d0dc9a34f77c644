/* virtqueue.h — the device side of a virtqueue: the queue object, and the one place that
 * dispatches on the ring's format (below): the split walker is virtqueue.c, the packed one
 * packed.c. The engine only calls the dispatchers. */
#ifndef DP_VIRTQUEUE_H
#define DP_VIRTQUEUE_H

#include <stdint.h>
#include <sys/uio.h>

#include "vhost/dp_vhost.h"
#include "vhost/guest_mem.h"
#include "vhost/inflight.h"
#include "vhost/iotlb.h"
#include "vhost/vring.h"
#include "vhost/vring_packed.h"

/* One popped descriptor chain, translated. Device-readable segments come first. */
struct vq_chain {
    uint16_t head;
    uint16_t nsaved;      /* packed ring, VQ_MISS: the list's descriptors kept in iov (vq_retry) */
    unsigned nseg;
    unsigned nreadable;
    int err;              /* 0, or why the buffers are unusable (-EFAULT, -E2BIG, -EINVAL,
                             -EACCES; VQ_MISS: an address the IOTLB lacks, try again later) */
    uint8_t *last_byte;   /* last byte of the chain when it is device-writable, else NULL */
};

/* Packed ring state (DP_VQ_F_PACKED): packed.c's. The ring positions are the queue's
 * last_avail_idx and used_idx (each in [0, num)), with the wrap counters here. */
struct vq_packed {
    struct pvirtq_desc *desc;     /* the descriptor ring (desc_uva) */
    struct pvirtq_event *driver;  /* driver event suppression (avail_uva): read */
    struct pvirtq_event *device;  /* device event suppression (used_uva): written */
    uint8_t avail_wrap;           /* the device's copy of the driver ring wrap counter */
    uint8_t used_wrap;            /* the device ring wrap counter */
    uint16_t device_flags;        /* what device->flags holds (0xffff: not written yet) */
    unsigned in_ring;             /* ring slots fetched whose chain has no used descriptor yet */
    uint16_t ndesc[DP_MAX_QUEUE_SIZE];   /* per buffer id: ring slots of its chain, 0: not in flight */
    uint16_t entry[DP_MAX_QUEUE_SIZE];   /* per buffer id: its head entry in the inflight region */
};

/* The engine's, opaque here. */
struct dp_blk_dev;
struct dp_engine;
struct engine_disk;
struct vq_fixed;
struct dp_req;
struct rec_ring;
struct dp_dirty_log;

struct dp_vq {
    /* ring state: touched only by the thread that serves the queue (or by the control
     * plane while the queue is stopped) */
    unsigned index;
    unsigned num;
    unsigned flags;               /* DP_VQ_F_* */
    struct dp_mem *mem;
    struct dp_iommu *iommu;       /* non-NULL: addresses are IOVAs, translated through iotlb */
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
    int logging;                  /* log != NULL: every store into guest memory is logged */

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
    int rings_ready;              /* ring areas translated (a vIOMMU may take them away) */
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
    struct vq_fixed *fixed;       /* the memory table as registered buffers (engine/fixed.c) */
    int fixed_wanted;             /* the disk takes registered buffers */
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

    /* dirty logging (dirty_log.c): set through the mailbox while the queue runs */
    struct dp_dirty_log *log;
    int log_used;                 /* VHOST_VRING_F_LOG: log used ring writes at log_used_gpa */
    uint64_t log_used_gpa;
    /* a command acknowledged once the requests it marked (in_drain) are done with guest
     * memory: a memory table without a region they use, an IOTLB without an entry they use */
    unsigned drain_left;
    void *drain_cmd;
    /* requests waiting for an IOTLB UPDATE (a miss), oldest first, and finished requests
     * waiting for the ring a vIOMMU invalidation took away (engine/queue.c) */
    struct dp_req *parked, **parked_tail;
    unsigned nparked;
    struct dp_req *deferred, **deferred_tail;
    struct vq_packed pk;          /* a packed ring's own state (cold for a split ring) */
    uint32_t started_at;          /* the position the last start took (dp_vq_started_at) */

    /* vIOMMU: the snapshot, the cache in front of it, the misses of the last walk, the pages
     * asked for and not answered yet (iotlb.c) */
    const struct dp_iotlb *iotlb;
    uint32_t iotlb_gen;
    unsigned nmiss;               /* the misses of the last walk, in order */
    struct iotlb_miss miss[IOTLB_MISS_BATCH];
    struct iotlb_asked asked[IOTLB_ASKED_SLOTS];
    struct iotlb_slot cache[IOTLB_CACHE_SLOTS];
};

/* Hidden: called directly inside the module, never through the PLT (only dp_* functions are
 * the module's surface). */
#define DP_HIDDEN __attribute__((visibility("hidden")))

/* ---- the split ring (virtqueue.c, inflight.c) ---- */
DP_HIDDEN int vq_split_pop(struct dp_vq *vq, struct vq_chain *chain, struct iovec *iov, unsigned max_iov);
DP_HIDDEN void vq_split_push_used(struct dp_vq *vq, uint16_t head, uint32_t len);
DP_HIDDEN int vq_split_need_notify(struct dp_vq *vq);
DP_HIDDEN int vq_split_enable_notify(struct dp_vq *vq);
DP_HIDDEN int vq_split_has_avail(struct dp_vq *vq);
DP_HIDDEN int vq_split_read_chain(struct dp_vq *vq, uint16_t head, struct vq_chain *chain, struct iovec *iov,
                        unsigned max_iov);
DP_HIDDEN int vq_split_map_rings(struct dp_vq *vq);
/* One ring area through vq_map_area; a miss is asked for at once, and *rc becomes VQ_MISS
 * (unless an area already failed: -EFAULT, which wins). */
DP_HIDDEN void *vq_map_ring_area(struct dp_vq *vq, uint64_t addr, uint64_t len, unsigned perm, int *rc);
DP_HIDDEN int vq_split_inflight_recover(struct dp_vq *vq);
DP_HIDDEN void vq_split_inflight_drop(struct dp_vq *vq, uint16_t head);

/* ---- the packed ring (packed.c); a chain's head is its buffer id ---- */
DP_HIDDEN int vq_packed_pop(struct dp_vq *vq, struct vq_chain *chain, struct iovec *iov, unsigned max_iov);
DP_HIDDEN void vq_packed_push_used(struct dp_vq *vq, uint16_t id, uint32_t len);
DP_HIDDEN int vq_packed_need_notify(struct dp_vq *vq);
DP_HIDDEN int vq_packed_enable_notify(struct dp_vq *vq);
DP_HIDDEN int vq_packed_has_avail(struct dp_vq *vq);
/* The chain of a buffer in flight, rebuilt from the inflight region (the ring slots it came
 * from may hold used descriptors by now). */
DP_HIDDEN int vq_packed_read_saved(struct dp_vq *vq, uint16_t id, struct vq_chain *chain, struct iovec *iov,
                         unsigned max_iov);
DP_HIDDEN int vq_packed_map_rings(struct dp_vq *vq);
/* At start: per-id state cleared, the inflight region set up from the ring position, or (one
 * from a previous back end) recovered: the ring position and the ids to resubmit come from it. */
DP_HIDDEN int vq_packed_prepare(struct dp_vq *vq);
DP_HIDDEN void vq_packed_inflight_drop(struct dp_vq *vq, uint16_t id);

/* ---- what the engine calls: the ring format is chosen here, once per call ---- */

/* The split ring's code stays the straight line (measured: bench/ab_micro.py). */
static inline int vq_is_packed(const struct dp_vq *vq)
{
    return __builtin_expect((vq->flags & DP_VQ_F_PACKED) != 0, 0);
}

/* Pop one chain into iov. Returns 1 when a chain was consumed (check chain->err),
 * 0 when the ring is empty, -EIO when the ring itself is broken. */
static inline int vq_pop(struct dp_vq *vq, struct vq_chain *chain, struct iovec *iov,
                         unsigned max_iov)
{
    if (vq_is_packed(vq))
        return vq_packed_pop(vq, chain, iov, max_iov);
    return vq_split_pop(vq, chain, iov, max_iov);
}

static inline void vq_push_used(struct dp_vq *vq, uint16_t head, uint32_t len)
{
    if (vq_is_packed(vq))
        vq_packed_push_used(vq, head, len);
    else
        vq_split_push_used(vq, head, len);
}

static inline int vq_need_notify(struct dp_vq *vq)
{
    return vq_is_packed(vq) ? vq_packed_need_notify(vq) : vq_split_need_notify(vq);
}

/* Re-enable kicks after draining; returns 1 if new buffers arrived meanwhile. */
static inline int vq_enable_notify(struct dp_vq *vq)
{
    return vq_is_packed(vq) ? vq_packed_enable_notify(vq) : vq_split_enable_notify(vq);
}

static inline int vq_has_avail(struct dp_vq *vq)
{
    return vq_is_packed(vq) ? vq_packed_has_avail(vq) : vq_split_has_avail(vq);
}

/* The chain of a head being resubmitted after a restart (split: walked from the descriptor
 * table again; packed: rebuilt from the inflight region). */
static inline int vq_read_chain(struct dp_vq *vq, uint16_t head, struct vq_chain *chain,
                                struct iovec *iov, unsigned max_iov)
{
    if (vq_is_packed(vq))
        return vq_packed_read_saved(vq, head, chain, iov, max_iov);
    return vq_split_read_chain(vq, head, chain, iov, max_iov);
}

/* Translate the ring addresses through vq->mem (after SET_VRING_ADDR or a new table). */
static inline int vq_map_rings(struct dp_vq *vq)
{
    return vq_is_packed(vq) ? vq_packed_map_rings(vq) : vq_split_map_rings(vq);
}

/* Before a start (control plane, rings mapped): reconcile an inflight region a previous back
 * end left (split) or set up the packed ring's state. */
static inline int vq_start_prepare(struct dp_vq *vq)
{
    if (vq_is_packed(vq))
        return vq_packed_prepare(vq);
    if (!vq->inflight_restored)
        return 0;
    int rc = vq_split_inflight_recover(vq);
    if (rc < 0)
        return rc;
    vq->inflight_restored = 0;
    __atomic_store_n(&vq->stats.recovered_out_of_order, vq->recovered_out_of_order,
                     __ATOMIC_RELAXED);
    return 0;
}

/* On the engine thread, when the queue attaches: where the ring stands. */
static inline void vq_attach_ring(struct dp_vq *vq)
{
    if (!vq_is_packed(vq)) {
        vq->used_idx = __atomic_load_n(&vq->used->idx, __ATOMIC_ACQUIRE);
        vq->shadow_avail_idx = vq->last_avail_idx;
    }
    vq->signalled_used_valid = 0;
}

/* A head consumed without a used element (the ring broke on it) is no longer in flight. */
static inline void vq_inflight_drop(struct dp_vq *vq, uint16_t head)
{
    if (vq_is_packed(vq))
        vq_packed_inflight_drop(vq, head);
    else
        vq_split_inflight_drop(vq, head);
}

/* Mark the ring broken (NEEDS_RESET) and tell the front end through the error fd. */
void vq_set_broken(struct dp_vq *vq);

/* ---- the address gates: every guest address either walker uses goes through one of these
 * three (a vIOMMU hooks in here, once, for both ring formats; see iotlb.h) ---- */

/* Behind a vIOMMU, the common case inline: [addr, addr + len) inside the cache slot of its
 * first page, with the permission. The host address, or NULL (then vq_iova_map decides). */
static inline void *vq_iova_cached(const struct dp_vq *vq, uint64_t addr, uint64_t len,
                                   unsigned perm)
{
    const struct iotlb_slot *s = &vq->cache[(addr >> 12) & (IOTLB_CACHE_SLOTS - 1)];
    if (s->gen == vq->iotlb_gen && len && addr - s->first <= s->last - s->first &&
        len - 1 <= s->last - addr && (s->perm & perm) == perm)
        return (void *)(uintptr_t)(addr + s->delta);
    return NULL;
}

/* A buffer a descriptor names (a guest-physical address, or an IOVA), into iovecs: the count,
 * or guest_mem_translate's / vq_iova_map's error. */
static inline int vq_map_buffer(struct dp_vq *vq, uint64_t addr, uint64_t len, int writable,
                                struct iovec *iov, unsigned max_iov)
{
    if (__builtin_expect(vq->iommu != NULL, 0)) {
        unsigned perm = writable ? DP_IOTLB_PERM_WO : DP_IOTLB_PERM_RO;
        void *host = max_iov ? vq_iova_cached(vq, addr, len, perm) : NULL;
        if (host) {
            iov[0].iov_base = host;
            iov[0].iov_len = len;
            return 1;
        }
        return vq_iova_map(vq, addr, len, perm, iov, max_iov);
    }
    return guest_mem_translate(vq->mem, addr, len, iov, max_iov);
}

/* An indirect table (perm R) or the status byte (W): one piece of host memory, or NULL and
 * why in *err (-EFAULT, or VQ_MISS / -EACCES behind a vIOMMU). */
static inline void *vq_map_piece(struct dp_vq *vq, uint64_t addr, uint64_t len, unsigned perm,
                                 int *err)
{
    if (__builtin_expect(vq->iommu != NULL, 0)) {
        void *host = vq_iova_cached(vq, addr, len, perm);
        if (host) {
            *err = 0;
            return host;
        }
        return vq_iova_map_contig(vq, addr, len, perm, err);
    }
    void *p = dp_mem_gpa_to_host(vq->mem, addr, len);
    *err = p ? 0 : -EFAULT;
    return p;
}

/* A ring area, as SET_VRING_ADDR names it (a front-end user address, or an IOVA). */
static inline void *vq_map_area(struct dp_vq *vq, uint64_t addr, uint64_t len, unsigned perm,
                                int *err)
{
    if (vq->iommu)
        return vq_iova_map_contig(vq, addr, len, perm, err);
    void *p = dp_mem_uva_to_host(vq->mem, addr, len);
    *err = p ? 0 : -EFAULT;
    return p;
}

/* ---- a request that missed in the IOTLB, walked again ---- */

DP_HIDDEN int vq_packed_retry(struct dp_vq *vq, uint16_t id, uint16_t nsaved, struct vq_chain *chain,
                              struct iovec *iov, unsigned max_iov);

/* Walk a chain that stopped at a miss (chain->err VQ_MISS) again, through the queue's IOTLB
 * as it is now: a split chain from its head in the descriptor table, a packed list from the
 * descriptors vq_pop left in iov (nsaved of them; a packed ring may have written used
 * descriptors over its slots since). Returns 1 (check chain->err: VQ_MISS again keeps the
 * list in iov), or -EIO when the ring is broken. The rings must be mapped. */
static inline int vq_retry(struct dp_vq *vq, uint16_t head, uint16_t nsaved, struct vq_chain *chain,
                           struct iovec *iov, unsigned max_iov)
{
    if (vq_is_packed(vq))
        return vq_packed_retry(vq, head, nsaved, chain, iov, max_iov);
    return vq_split_read_chain(vq, head, chain, iov, max_iov);
}

/* Do [first, last] (IOVAs) and one of the queue's ring areas overlap? */
int vq_rings_overlap(const struct dp_vq *vq, uint64_t first, uint64_t last);
/* Forget the rings' host addresses (the IOTLB lost them): translated again before next use. */
void vq_unmap_rings(struct dp_vq *vq);

#endif
