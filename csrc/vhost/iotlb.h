/* iotlb.h — the vIOMMU's device IOTLB (VIRTIO_F_IOMMU_PLATFORM): the snapshot a queue
 * translates IOVAs through, the per-queue cache in front of it, and the one set of address
 * functions both ring walkers call for every guest address they use (a ring area, an indirect
 * table, a buffer, the status byte). Without a vIOMMU those are the guest-memory lookups they
 * always were; with one, an address is an IOVA: IOVA -> front-end user address (the IOTLB
 * entry) -> host address (the memory region holding it), and the access is checked against
 * the entry's permission. The gates themselves (vq_map_buffer, vq_map_piece, vq_map_area) are
 * at the end of virtqueue.h.
 *
 * A snapshot is immutable once published (like a memory table): the control plane builds a
 * new one per IOTLB_MSG and hands it to every queue through its mailbox (engine/queue.c). The
 * cache is the queue thread's own, tagged with a generation that changes with the snapshot or
 * the memory table, so a stale slot is never used. */
#ifndef DP_IOTLB_H
#define DP_IOTLB_H

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <sys/uio.h>

#include "vhost/dp_vhost.h"
#include "vhost/guest_mem.h"

/* A translation the IOTLB has no entry for: the request waits for an UPDATE (vq->miss[] says
 * what to ask for). Only ever in vq_chain.err and the returns below; a request that gives up
 * waiting reports -EFAULT. A walk goes on past a miss to the buffers it still can find, so
 * that one round of answers brings all of them: a request needs all its pages at once, and an
 * invalidation between two rounds would take the first ones away again. */
#define VQ_MISS (-ENOENT)
#define IOTLB_MISS_BATCH 8

struct iotlb_miss {
    uint64_t iova;
    uint32_t perm;
    uint32_t pad;
};

struct iotlb_entry {
    uint64_t iova;
    uint64_t last;                /* inclusive: an entry may reach 2^64 - 1 */
    uint64_t uaddr;               /* the front end's user address of iova */
    uint32_t perm;                /* DP_IOTLB_PERM_* */
    uint32_t pad;
};

/* Sorted by iova, no two overlapping. Counted references: the control plane's, and one per
 * queue translating through it (a queue drops its own when it moves to the next). */
struct dp_iotlb {
    unsigned refs;
    unsigned n;
    unsigned cap;
    struct iotlb_entry e[];
};

/* Another reference (NULL: none to take). */
static inline const struct dp_iotlb *iotlb_get(const struct dp_iotlb *t)
{
    if (t)
        __atomic_add_fetch(&((struct dp_iotlb *)t)->refs, 1, __ATOMIC_RELAXED);
    return t;
}

/* Drop one (dp_iotlb_free: the last one frees). */
void iotlb_put(const struct dp_iotlb *t);

/* One resolved translation: [first, last] of an entry, clipped to the memory region its
 * user addresses lie in, so host = iova + delta over the whole range. (The guest-physical
 * address, which the dirty log marks, is the region's: the walkers log by host address.) */
struct iotlb_slot {
    uint64_t first;
    uint64_t last;
    uintptr_t delta;
    uint32_t gen;                 /* valid only while it equals the queue's iotlb_gen */
    uint32_t perm;
};

#define IOTLB_CACHE_SLOTS 64      /* direct-mapped by 4 KiB page */
/* Pages asked for and not answered yet (a small hash set, by page): not asked again until an
 * UPDATE covers them, or after IOTLB_ASK_AGAIN_NS (QEMU refuses a page the guest has not
 * mapped: no answer comes; the guest may map it later). A page asked twice while QEMU is
 * slow to read the channel would have the second miss reach it after the request completed
 * and the guest unmapped the page, which QEMU reports to the guest as a DMA fault. */
#define IOTLB_ASKED_SLOTS 1024
#define IOTLB_ASKED_PROBE 8
#define IOTLB_ASK_AGAIN_NS 1000000000ull

struct iotlb_asked {
    uint64_t page;
    uint64_t at_ns;               /* 0: free */
    uint32_t perm;
    uint32_t pad;
};

/* A device's link to its vIOMMU (the front end): the back-end channel misses go out on, how
 * long a request waits for an answer, and the debug switch. Shared by the device's queues
 * and its control plane; only the channel is locked, and only while a miss is written. */
struct dp_iommu {
    pthread_mutex_t lock;
    int fd;                       /* SET_BACKEND_REQ_FD's socket, -1 until then */
    int broken;                   /* a write was cut short: the channel's framing is lost */
    uint64_t timeout_ns;
    unsigned flags;               /* DP_IOMMU_F_* */
    uint64_t misses_sent;
    uint64_t misses_dropped;
};

struct dp_vq;

/* A range of front-end user addresses, inclusive. */
struct iotlb_range {
    uint64_t first;
    uint64_t last;
};

/* The user addresses t maps [first, last] to, one range per entry it overlaps (out gets at
 * most max; the return is how many there are). */
unsigned iotlb_removed(const struct dp_iotlb *t, uint64_t first, uint64_t last,
                       struct iotlb_range *out, unsigned max);

/* Translate [iova, iova + len) for an access needing perm (R, W or both) into at most max_iov
 * iovecs (pieces contiguous in host memory are merged). Returns the count, VQ_MISS (with the
 * queue's miss recorded), -EACCES (an entry lacks the permission), -EFAULT (wraps, or an entry
 * points outside guest memory), -E2BIG. */
int vq_iova_map(struct dp_vq *vq, uint64_t iova, uint64_t len, unsigned perm, struct iovec *iov,
                unsigned max_iov);
/* The same for one piece contiguous in host memory (NULL, and the reason in *err). */
void *vq_iova_map_contig(struct dp_vq *vq, uint64_t iova, uint64_t len, unsigned perm, int *err);
/* Ask the front end for the misses the queue's last walk recorded, each page unless it is
 * asked for already (less than IOTLB_ASK_AGAIN_NS ago, no UPDATE of it since). Any thread
 * that owns the queue (its engine, or the control plane while stopped). */
void vq_iotlb_report_miss(struct dp_vq *vq);
/* An UPDATE covered [first, last]: what was asked for there is answered. */
void vq_iotlb_answered(struct dp_vq *vq, uint64_t first, uint64_t last);
/* Send one miss on the channel (non-blocking: a full channel drops it, counted). */
int iommu_send_miss(struct dp_iommu *iommu, uint64_t iova, unsigned perm);
/* The queue's snapshot or memory table changed: every cache slot and every remembered miss
 * is stale. */
void vq_iotlb_changed(struct dp_vq *vq);

#endif
