/* virtqueue.c — the device side of a split virtqueue: walk descriptor chains (direct and
 * indirect), publish used elements, and decide about notifications (EVENT_IDX); and the queue
 * object's configuration, whatever its ring format (the packed walker is packed.c).
 *
 * Everything read from the ring is guest-controlled. Indices are bounded before use, each
 * descriptor is copied once before it is looked at, and a chain may not visit more
 * descriptors than its table holds, which is how loops are caught.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "virtqueue.h"
#include "vhost/dirty_log.h"

static uint16_t *used_event_ptr(struct dp_vq *vq)
{
    return &vq->avail->ring[vq->num];
}

static uint16_t *avail_event_ptr(struct dp_vq *vq)
{
    return (uint16_t *)&vq->used->ring[vq->num];
}

void vq_set_broken(struct dp_vq *vq)
{
    if (vq->broken)
        return;
    vq->broken = 1;
    __atomic_store_n(&vq->stats.broken, 1, __ATOMIC_RELAXED);
    if (vq->err_fd >= 0) {
        uint64_t one = 1;
        ssize_t rc = write(vq->err_fd, &one, sizeof(one));
        (void)rc;   /* nothing more to do if the front end closed its end */
    }
}

/* Refresh the shadow avail index; a jump of more than the ring size breaks the ring. */
static int vq_avail_count(struct dp_vq *vq)
{
    uint16_t n = (uint16_t)(vq->shadow_avail_idx - vq->last_avail_idx);
    if (n)
        return n;
    vq->shadow_avail_idx = virtio_load_acquire_u16(&vq->avail->idx);
    n = (uint16_t)(vq->shadow_avail_idx - vq->last_avail_idx);
    if (n > vq->num) {
        vq_set_broken(vq);
        return -EIO;
    }
    return n;
}

int vq_split_has_avail(struct dp_vq *vq)
{
    return !vq->broken && vq_avail_count(vq) > 0;
}

int vq_split_read_chain(struct dp_vq *vq, uint16_t head, struct vq_chain *chain, struct iovec *iov,
                        unsigned max_iov)
{
    *chain = (struct vq_chain){ .head = head };
    if (head >= vq->num)
        return -EIO;
    const struct vring_desc *table = vq->desc;
    unsigned table_len = vq->num, i = head, visited = 0;
    int in_indirect = 0, seen_writable = 0;
    struct vring_desc last = { 0 };

    for (;;) {
        if (visited++ >= table_len)
            return -EIO;   /* longer than its table: a loop */
        struct vring_desc d;
        memcpy(&d, &table[i], sizeof(d));   /* read once: the guest may rewrite it */

        if (d.flags & VRING_DESC_F_INDIRECT) {
            if (in_indirect || !(vq->flags & DP_VQ_F_INDIRECT) || (d.flags & VRING_DESC_F_NEXT) ||
                d.len == 0 || d.len % sizeof(struct vring_desc))
                return -EIO;
            int err;
            table = vq_map_piece(vq, d.addr, d.len, DP_IOTLB_PERM_RO, &err);
            if (!table) {
                if (err != VQ_MISS)
                    return -EIO;
                chain->err = VQ_MISS;   /* walked again once the IOTLB has the table */
                return 1;
            }
            table_len = d.len / sizeof(struct vring_desc);
            i = 0;
            visited = 0;
            in_indirect = 1;
            continue;
        }

        int writable = (d.flags & VRING_DESC_F_WRITE) != 0;
        if (writable)
            seen_writable = 1;
        else if (seen_writable && !chain->err)
            chain->err = -EINVAL;   /* device-readable after device-writable */
        /* Past a miss the walk goes on translating, only to find the other misses. */
        if (d.len && (!chain->err || chain->err == VQ_MISS)) {
            int n = vq_map_buffer(vq, d.addr, d.len, writable, iov + chain->nseg,
                                  max_iov - chain->nseg);
            if (n < 0) {
                chain->err = n;   /* a fault wins over a miss: no use waiting for the rest */
            } else {
                chain->nseg += (unsigned)n;
                if (!writable)
                    chain->nreadable = chain->nseg;
            }
        }
        last = d;

        if (!(d.flags & VRING_DESC_F_NEXT))
            break;
        i = d.next;
        if (i >= table_len)
            return -EIO;
    }

    if ((last.flags & VRING_DESC_F_WRITE) && last.len) {
        int err;
        chain->last_byte = vq_map_piece(vq, last.addr + last.len - 1, 1, DP_IOTLB_PERM_WO, &err);
    }
    return 1;
}

int vq_split_pop(struct dp_vq *vq, struct vq_chain *chain, struct iovec *iov, unsigned max_iov)
{
    if (vq->broken)
        return -EIO;
    int avail = vq_avail_count(vq);
    if (avail <= 0)
        return avail;

    uint16_t head = __atomic_load_n(&vq->avail->ring[vq->last_avail_idx & (vq->num - 1)],
                                    __ATOMIC_RELAXED);
    vq->last_avail_idx++;
    if (head >= vq->num) {
        vq_set_broken(vq);
        return -EIO;
    }
    if (vq->inflight) {
        /* Spec order: counter, then the inflight flag. */
        vq->inflight->desc[head].counter = vq->inflight_counter++;
        inflight_order();
        vq->inflight->desc[head].inflight = 1;
    }
    int rc = vq_split_read_chain(vq, head, chain, iov, max_iov);
    if (rc < 0) {
        if (vq->inflight)
            vq->inflight->desc[head].inflight = 0;
        vq_set_broken(vq);
    }
    return rc;
}

/* The used element just published and the index (while the queue logs). */
static __attribute__((noinline, cold)) void log_push(struct dp_vq *vq)
{
    uint64_t slot = (uint16_t)(vq->used_idx - 1) & (vq->num - 1);
    vq_log_used(vq, offsetof(struct vring_used, ring) + slot * sizeof(struct vring_used_elem),
                sizeof(struct vring_used_elem));
    vq_log_used(vq, offsetof(struct vring_used, idx), sizeof(uint16_t));
}

/* avail_event, at the end of the used ring. */
static __attribute__((noinline, cold)) void log_avail_event(struct dp_vq *vq)
{
    vq_log_used(vq, offsetof(struct vring_used, ring) + vq->num * sizeof(struct vring_used_elem),
                sizeof(uint16_t));
}

void vq_split_push_used(struct dp_vq *vq, uint16_t head, uint32_t len)
{
    struct inflight_region *r = vq->inflight;
    if (r) {   /* a batch of one: remember it before it becomes visible */
        r->desc[head].next = r->last_batch_head;
        r->last_batch_head = head;
        inflight_order();
    }
    struct vring_used_elem *e = &vq->used->ring[vq->used_idx & (vq->num - 1)];
    e->id = head;
    e->len = len;
    vq->used_idx++;
    virtio_store_release_u16(&vq->used->idx, vq->used_idx);
    if (r) {
        inflight_order();
        r->desc[head].inflight = 0;
        inflight_order();
        r->used_idx = vq->used_idx;
    }
    if (vq_logging(vq))
        log_push(vq);   /* last: a tail call, so the fast path saves no register for it */
}

int vq_split_need_notify(struct dp_vq *vq)
{
    virtio_store_mb();   /* used->idx before used_event / avail->flags */
    if (!(vq->flags & DP_VQ_F_EVENT_IDX))
        return !(__atomic_load_n(&vq->avail->flags, __ATOMIC_RELAXED) & VRING_AVAIL_F_NO_INTERRUPT);

    uint16_t old = vq->signalled_used, new = vq->used_idx;
    int valid = vq->signalled_used_valid;
    vq->signalled_used = new;
    vq->signalled_used_valid = 1;
    if (!valid)
        return 1;
    uint16_t event = __atomic_load_n(used_event_ptr(vq), __ATOMIC_RELAXED);
    /* vring_need_event(): did used->idx move past used_event since the last interrupt? */
    return (uint16_t)(new - event - 1) < (uint16_t)(new - old);
}

int vq_split_enable_notify(struct dp_vq *vq)
{
    if (vq->broken)
        return 0;
    if (vq->flags & DP_VQ_F_EVENT_IDX) {
        __atomic_store_n(avail_event_ptr(vq), vq->last_avail_idx, __ATOMIC_RELAXED);
        if (vq_logging(vq))
            log_avail_event(vq);
    }
    virtio_store_mb();   /* avail_event before the re-read of avail->idx */
    return vq_split_has_avail(vq);
}

/* ---- queue object and configuration (control plane, queue stopped) ---- */

struct dp_vq *dp_vq_new(struct dp_blk_dev *dev, unsigned index)
{
    struct dp_vq *vq = calloc(1, sizeof(*vq));
    if (!vq)
        return NULL;
    vq->index = index;
    vq->dev = dev;
    vq->kick_fd = vq->call_fd = vq->err_fd = -1;
    vq->pk.device_flags = 0xffff;   /* not written yet */
    return vq;
}

int dp_vq_set_num(struct dp_vq *vq, unsigned num)
{
    if (vq->engine)
        return -EBUSY;
    /* A packed ring's size need not be a power of two (virtio 1.2, 2.8.10.1). */
    if (num == 0 || num > DP_MAX_QUEUE_SIZE || (!vq_is_packed(vq) && (num & (num - 1))))
        return -EINVAL;
    vq->num = num;
    return 0;
}

int dp_vq_set_flags(struct dp_vq *vq, unsigned flags)
{
    if (vq->engine)
        return -EBUSY;
    if ((flags ^ vq->flags) & DP_VQ_F_PACKED) {
        /* Another ring format: the areas mean something else now, map them again. */
        vq->desc = NULL;
        vq->avail = NULL;
        vq->used = NULL;
        vq->pk.desc = NULL;
        vq->pk.driver = vq->pk.device = NULL;
        vq->pk.device_flags = 0xffff;
    }
    vq->flags = flags;
    return 0;
}

int dp_vq_set_base(struct dp_vq *vq, uint16_t last_avail_idx)
{
    if (vq->engine)
        return -EBUSY;
    vq->last_avail_idx = vq->shadow_avail_idx = last_avail_idx;
    return 0;
}

void *vq_map_ring_area(struct dp_vq *vq, uint64_t addr, uint64_t len, unsigned perm, int *rc)
{
    int err;
    vq->nmiss = 0;
    void *p = vq_map_area(vq, addr, len, perm, &err);
    if (!p) {
        if (err == VQ_MISS) {
            vq_iotlb_report_miss(vq);   /* every missing area is asked for at once */
            if (!*rc)
                *rc = VQ_MISS;
        } else {
            *rc = -EFAULT;
        }
    }
    return p;
}

/* Translate the three ring areas; each must sit inside one region (behind a vIOMMU: in host
 * memory contiguous IOTLB entries that allow the device's accesses), suitably aligned. */
int vq_split_map_rings(struct dp_vq *vq)
{
    if (!vq->mem || !vq->addr_set || !vq->num)
        return -EINVAL;
    size_t n = vq->num;
    int rc = 0;
    void *desc = vq_map_ring_area(vq, vq->desc_uva, 16 * n, DP_IOTLB_PERM_RO, &rc);
    void *avail = vq_map_ring_area(vq, vq->avail_uva, 6 + 2 * n, DP_IOTLB_PERM_RO, &rc);
    void *used = vq_map_ring_area(vq, vq->used_uva, 6 + 8 * n, DP_IOTLB_PERM_RW, &rc);
    if (rc)
        return rc;
    if ((uintptr_t)desc % 16 || (uintptr_t)avail % 2 || (uintptr_t)used % 4)
        return -EINVAL;
    vq->desc = desc;
    vq->avail = avail;
    vq->used = used;
    return 0;
}

int dp_vq_set_addr(struct dp_vq *vq, struct dp_mem *mem, uint64_t desc_uva, uint64_t avail_uva,
                   uint64_t used_uva)
{
    if (vq->engine)
        return -EBUSY;
    struct dp_vq saved = *vq;
    vq->mem = mem;
    vq->desc_uva = desc_uva;
    vq->avail_uva = avail_uva;
    vq->used_uva = used_uva;
    vq->addr_set = 1;
    int rc = vq_map_rings(vq);
    if (rc == VQ_MISS)
        return -EAGAIN;   /* behind a vIOMMU the IOTLB may not have the rings yet: asked */
    if (rc) {
        *vq = saved;
        return rc;
    }
    if (!vq_is_packed(vq))   /* a packed ring's position is its base */
        vq->used_idx = __atomic_load_n(&vq->used->idx, __ATOMIC_ACQUIRE);
    return 0;
}

void vq_unmap_rings(struct dp_vq *vq)
{
    vq->desc = NULL;
    vq->avail = NULL;
    vq->used = NULL;
    vq->pk.desc = NULL;
    vq->pk.driver = vq->pk.device = NULL;
    vq->rings_ready = 0;
}

static int areas_overlap(uint64_t a, uint64_t len, uint64_t first, uint64_t last)
{
    return len && a <= last && first <= a + (len - 1);
}

int vq_rings_overlap(const struct dp_vq *vq, uint64_t first, uint64_t last)
{
    uint64_t n = vq->num;
    if (vq_is_packed(vq))
        return areas_overlap(vq->desc_uva, 16 * n, first, last) ||
               areas_overlap(vq->avail_uva, sizeof(struct pvirtq_event), first, last) ||
               areas_overlap(vq->used_uva, sizeof(struct pvirtq_event), first, last);
    return areas_overlap(vq->desc_uva, 16 * n, first, last) ||
           areas_overlap(vq->avail_uva, 6 + 2 * n, first, last) ||
           areas_overlap(vq->used_uva, 6 + 8 * n, first, last);
}

int dp_vq_set_mem(struct dp_vq *vq, struct dp_mem *mem)
{
    if (vq->engine)
        return -EBUSY;
    vq->mem = mem;
    vq_iotlb_changed(vq);
    vq_unmap_rings(vq);
    if (!vq->addr_set || !vq->num)
        return 0;
    int rc = vq_map_rings(vq);
    return rc == VQ_MISS ? -EAGAIN : rc;
}

int dp_vq_set_kick_fd(struct dp_vq *vq, int kick_fd)
{
    if (vq->engine)
        return -EBUSY;
    vq->kick_fd = kick_fd;
    return 0;
}

int dp_vq_set_err_fd(struct dp_vq *vq, int err_fd)
{
    if (vq->engine)
        return -EBUSY;
    vq->err_fd = err_fd;
    return 0;
}

int dp_vq_running(const struct dp_vq *vq)
{
    return vq->engine != NULL;
}

int dp_vq_broken(const struct dp_vq *vq)
{
    return (int)__atomic_load_n(&vq->stats.broken, __ATOMIC_RELAXED);
}

uint16_t dp_vq_last_avail_idx(const struct dp_vq *vq)
{
    return vq->last_avail_idx;
}

void dp_vq_get_stats(const struct dp_vq *vq, struct dp_vq_stats *out)
{
    const uint64_t *src = (const uint64_t *)&vq->stats;
    uint64_t *dst = (uint64_t *)out;
    for (size_t i = 0; i < sizeof(*out) / sizeof(uint64_t); i++)
        dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
}

/* ---- ring primitives for tests on a fake guest memory ---- */

static int vq_ready_for_test(struct dp_vq *vq)
{
    if (vq->engine)
        return -EBUSY;
    if (!vq->desc) {
        int rc = vq_map_rings(vq);
        if (rc)
            return rc == VQ_MISS ? -EAGAIN : -EINVAL;
    }
    if (vq_is_packed(vq) && (vq->last_avail_idx >= vq->num || vq->used_idx >= vq->num))
        return -EINVAL;
    return 0;
}

int dp_vq_prepare(struct dp_vq *vq)
{
    int rc = vq_ready_for_test(vq);
    if (!rc)
        rc = vq_start_prepare(vq);
    return rc < 0 ? rc : (int)vq->nresubmit;
}

int dp_vq_resubmits(const struct dp_vq *vq, uint16_t *heads, unsigned max)
{
    unsigned n = vq->nresubmit < max ? vq->nresubmit : max;
    for (unsigned i = 0; i < n; i++)
        heads[i] = vq->resubmit[i];
    return (int)vq->nresubmit;
}

int dp_vq_pop_chain(struct dp_vq *vq, uint16_t *head, struct dp_seg *segs, unsigned max_segs)
{
    struct iovec iov[DP_MAX_QUEUE_SIZE];
    struct vq_chain chain;
    int rc = vq_ready_for_test(vq);
    if (rc)
        return rc;
    if (max_segs > DP_MAX_QUEUE_SIZE)
        max_segs = DP_MAX_QUEUE_SIZE;
    vq->nmiss = 0;
    rc = vq_pop(vq, &chain, iov, max_segs);
    if (rc <= 0)
        return rc == 0 ? -EAGAIN : rc;
    *head = chain.head;
    if (chain.err == VQ_MISS)
        vq_iotlb_report_miss(vq);   /* what the engine does before parking the request */
    if (chain.err)
        return chain.err;
    for (unsigned i = 0; i < chain.nseg; i++)
        segs[i] = (struct dp_seg){ .host_addr = (uint64_t)(uintptr_t)iov[i].iov_base,
                                   .len = (uint32_t)iov[i].iov_len,
                                   .writable = i >= chain.nreadable };
    return (int)chain.nseg;
}

void dp_vq_push_used(struct dp_vq *vq, uint16_t head, uint32_t len)
{
    if (!vq_ready_for_test(vq))
        vq_push_used(vq, head, len);
}

int dp_vq_need_notify(struct dp_vq *vq)
{
    int rc = vq_ready_for_test(vq);
    return rc ? rc : vq_need_notify(vq);
}

int dp_vq_enable_notify(struct dp_vq *vq)
{
    int rc = vq_ready_for_test(vq);
    return rc ? rc : vq_enable_notify(vq);
}

void dp_vq_get_latency(const struct dp_vq *vq, struct dp_hist *out)
{
    memcpy(out, &vq->latency, sizeof(*out));   /* racy while it runs: fine for monitoring */
}
