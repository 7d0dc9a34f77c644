/* packed.c — the device side of a packed virtqueue (virtio 1.2, 2.8): fetch descriptor lists
 * (direct, or one indirect table) in ring order, write used descriptors in completion order
 * (buffer ids, out of order), suppress kicks and interrupts (event suppression areas, with or
 * without EVENT_IDX), and keep the inflight region (QueueRegionPacked) from which a restarted
 * back end recovers both what was in flight and where the ring stands.
 *
 * Everything read from the ring is guest-controlled. A descriptor is copied once and its flags
 * are loaded once; a list may not use more ring slots than are free (the ring size less what
 * is in flight), later descriptors of a list must be available when its head is (the driver
 * publishes the head last), a buffer id must be below the ring size and not in flight, and an
 * indirect table is bounded and may not nest or chain.
 *
 * Every address the walker translates and every store it makes into guest memory goes through
 * the few functions in the first section, so that dirty logging and address translation have
 * one place each to hook into.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "vhost/dirty_log.h"
#include "vhost/virtqueue.h"

/* ---- guest memory: every translation and every store of this walker ---- */

/* A ring area (as SET_VRING_ADDR gives it: a front-end address, or an IOVA). */
static void *packed_map_area(struct dp_vq *vq, uint64_t addr, uint64_t len, unsigned perm, int *rc)
{
    return vq_map_ring_area(vq, addr, len, perm, rc);
}

/* An indirect table (a guest address, or an IOVA); NULL unless it lies in one piece, with
 * VQ_MISS in *err when the IOTLB lacks it. */
static const struct pvirtq_desc *packed_map_table(struct dp_vq *vq, uint64_t addr, uint32_t len,
                                                  int *err)
{
    return vq_map_piece(vq, addr, len, DP_IOTLB_PERM_RO, err);
}

/* A buffer, into iovecs (vq_map_buffer's answer). */
static int packed_map_buffer(struct dp_vq *vq, uint64_t addr, uint32_t len, int writable,
                             struct iovec *iov, unsigned max_iov)
{
    return vq_map_buffer(vq, addr, len, writable, iov, max_iov);
}

/* The status byte: the last byte of a device-writable buffer. */
static uint8_t *packed_map_last_byte(struct dp_vq *vq, uint64_t addr, uint32_t len)
{
    int err;
    return vq_map_piece(vq, addr + len - 1, 1, DP_IOTLB_PERM_WO, &err);
}

/* A used descriptor: id and length first, then (release) the flags that make it the driver's,
 * which also publishes the status byte and the data written before (virtio 1.2, 2.8.15: the
 * device must not change a descriptor after its USED bit). */
static void packed_store_used(struct dp_vq *vq, uint16_t slot, uint16_t id, uint32_t len,
                              uint16_t flags)
{
    struct pvirtq_desc *d = &vq->pk.desc[slot];
    __atomic_store_n(&d->id, id, __ATOMIC_RELAXED);
    __atomic_store_n(&d->len, len, __ATOMIC_RELAXED);
    __atomic_store_n(&d->flags, flags, __ATOMIC_RELEASE);
    if (vq_logging(vq))   /* in the descriptor ring: logged by the GPA of its region */
        vq_log_host(vq, d, sizeof(*d));
}

/* The device event suppression area: the offset (EVENT_IDX) before the flags, which are only
 * stored when they change (the driver reads the area as one 32-bit snapshot). */
static void packed_store_device_event(struct dp_vq *vq, int with_offset, uint16_t off_wrap,
                                      uint16_t flags)
{
    struct pvirtq_event *e = vq->pk.device;
    if (with_offset)
        __atomic_store_n(&e->off_wrap, off_wrap, __ATOMIC_RELAXED);
    if (vq->pk.device_flags != flags) {
        __atomic_store_n(&e->flags, flags, __ATOMIC_RELEASE);
        vq->pk.device_flags = flags;
    } else if (!with_offset) {
        return;   /* nothing stored */
    }
    if (vq_logging(vq))   /* the device area is what log_guest_addr names (QEMU: used_phys) */
        vq_log_used(vq, 0, sizeof(*e));
}

static struct inflight_packed *packed_region(const struct dp_vq *vq)
{
    return (struct inflight_packed *)vq->inflight;
}

/* ---- walking a list ---- */

/* A list's buffers as they are translated: the chain, where its iovecs go, and its last buffer
 * (whose last byte is the status byte when it is device-writable). */
struct packed_walk {
    struct vq_chain *chain;
    struct iovec *iov;
    unsigned max_iov;
    int seen_writable;
    uint64_t last_addr;
    uint32_t last_len;
    int last_writable;
};

static void walk_buffer(struct dp_vq *vq, struct packed_walk *w, uint64_t addr, uint32_t len,
                        int writable)
{
    struct vq_chain *chain = w->chain;
    if (writable)
        w->seen_writable = 1;
    else if (w->seen_writable && !chain->err)
        chain->err = -EINVAL;   /* device-readable after device-writable */
    /* Past a miss the walk goes on translating, only to find the other misses. */
    if (len && (!chain->err || chain->err == VQ_MISS)) {
        int n = packed_map_buffer(vq, addr, len, writable, w->iov + chain->nseg,
                                  w->max_iov - chain->nseg);
        if (n < 0) {
            chain->err = n;   /* a fault wins over a miss: no use waiting for the rest */
        } else {
            chain->nseg += (unsigned)n;
            if (!writable)
                chain->nreadable = chain->nseg;
        }
    }
    w->last_addr = addr;
    w->last_len = len;
    w->last_writable = writable;
}

/* One descriptor of a list (its flags as loaded once). An indirect one must be the whole list
 * (alone: no NEXT, not after others); its table is 1..DP_MAX_QUEUE_SIZE entries of which
 * only WRITE is meaningful, and NEXT or INDIRECT there breaks the ring. -EIO: broken ring. */
static int walk_desc(struct dp_vq *vq, struct packed_walk *w, uint16_t flags, uint64_t addr,
                     uint32_t len, unsigned position)
{
    if (!(flags & VRING_DESC_F_INDIRECT)) {
        walk_buffer(vq, w, addr, len, (flags & VRING_DESC_F_WRITE) != 0);
        return 0;
    }
    if (!(vq->flags & DP_VQ_F_INDIRECT) || position || (flags & VRING_DESC_F_NEXT) || len == 0 ||
        len % sizeof(struct pvirtq_desc) || len / sizeof(struct pvirtq_desc) > DP_MAX_QUEUE_SIZE)
        return -EIO;
    int err;
    const struct pvirtq_desc *table = packed_map_table(vq, addr, len, &err);
    if (!table) {
        if (err != VQ_MISS)
            return -EIO;
        if (!w->chain->err)
            w->chain->err = VQ_MISS;   /* walked again once the IOTLB has the table */
        return 0;
    }
    for (unsigned i = 0; i < len / sizeof(struct pvirtq_desc); i++) {
        struct pvirtq_desc d;
        memcpy(&d, &table[i], sizeof(d));   /* read once: the guest may rewrite it */
        if (d.flags & (VRING_DESC_F_NEXT | VRING_DESC_F_INDIRECT))
            return -EIO;
        walk_buffer(vq, w, d.addr, d.len, (d.flags & VRING_DESC_F_WRITE) != 0);
    }
    return 0;
}

static void walk_finish(struct dp_vq *vq, struct packed_walk *w)
{
    if (w->last_writable && w->last_len)
        w->chain->last_byte = packed_map_last_byte(vq, w->last_addr, w->last_len);
}

/* Move a ring position on by one slot, flipping its wrap counter past the last. */
static inline void ring_advance(uint16_t *pos, uint8_t *wrap, unsigned num)
{
    if (++*pos == num) {
        *pos = 0;
        *wrap ^= 1;
    }
}

/* ---- the inflight region (QueueRegionPacked): fetch, completion, and what resets it ---- */

/* A fetch begins at the head of the free list. */
static uint16_t region_fetch_begin(struct inflight_packed *r, uint64_t counter)
{
    uint16_t head = r->old_free_head;
    r->desc[head].num = 0;
    r->desc[head].counter = counter;
    inflight_order();
    r->desc[head].inflight = 1;
    return head;
}

/* Record a descriptor of the list in the next free entry; -EIO when there is none. */
static int region_fetch_desc(struct inflight_packed *r, unsigned num, uint16_t head,
                             const struct pvirtq_desc *d, uint16_t flags, int last)
{
    uint16_t e = r->free_head;
    if (e >= num)
        return -EIO;
    struct inflight_packed_desc *s = &r->desc[e];
    s->addr = d->addr;
    s->len = d->len;
    s->flags = flags;
    s->id = d->id;
    if (last)
        r->desc[head].last = e;
    r->desc[head].num++;
    inflight_order();
    r->free_head = s->next;
    return 0;
}

/* A list that broke the ring was never the back end's: nothing of it stays recorded. */
static void region_fetch_abort(struct inflight_packed *r, uint16_t head)
{
    r->free_head = r->old_free_head;
    inflight_order();
    r->desc[head].inflight = 0;
}

/* A fresh region (or one this process started the queue from before, now drained): an empty
 * free list of every entry, the ring position as the base says. */
static void region_init(struct inflight_packed *r, unsigned num, uint16_t used_idx, int used_wrap)
{
    memset(r->desc, 0, num * sizeof(r->desc[0]));
    for (unsigned i = 0; i < num; i++)
        r->desc[i].next = (uint16_t)(i + 1);
    r->features = 0;
    r->desc_num = (uint16_t)num;
    r->free_head = r->old_free_head = 0;
    r->used_idx = r->old_used_idx = used_idx;
    r->used_wrap_counter = r->old_used_wrap_counter = (uint8_t)used_wrap;
    inflight_order();
    r->version = 1;
}

/* Return a chain's entries to the free list (its last entry links to the old head). */
static void region_release(struct inflight_packed *r, uint16_t head)
{
    r->desc[r->desc[head].last].next = r->free_head;
    r->free_head = head;
}

static void region_commit(struct inflight_packed *r)
{
    r->old_free_head = r->free_head;
    r->old_used_idx = r->used_idx;
    r->old_used_wrap_counter = r->used_wrap_counter;
}

/* ---- fetching ---- */

int vq_packed_has_avail(struct dp_vq *vq)
{
    if (vq->broken)
        return 0;
    uint16_t flags = __atomic_load_n(&vq->pk.desc[vq->last_avail_idx].flags, __ATOMIC_RELAXED);
    return vring_packed_is_avail(flags, vq->pk.avail_wrap);
}

/* A list that stopped at an IOTLB miss is walked again later (vq_packed_retry), when its ring
 * slots may hold used descriptors of other lists: its n descriptors are kept meanwhile in the
 * iovec array it was to fill (16 bytes each, the size of an iovec), read again from the ring
 * now, before anything of this thread could write there. */
_Static_assert(sizeof(struct pvirtq_desc) == sizeof(struct iovec), "a descriptor per iovec");

static void save_list(struct dp_vq *vq, struct vq_chain *chain, struct iovec *iov,
                      unsigned max_iov, uint16_t pos, unsigned n)
{
    if (n > max_iov) {
        chain->err = -E2BIG;   /* more descriptors than a request may have segments */
        return;
    }
    struct pvirtq_desc *saved = (struct pvirtq_desc *)iov;
    for (unsigned k = 0; k < n; k++) {
        memcpy(&saved[k], &vq->pk.desc[pos], sizeof(saved[k]));
        if (++pos == vq->num)
            pos = 0;
    }
    chain->nsaved = (uint16_t)n;
}

int vq_packed_retry(struct dp_vq *vq, uint16_t id, uint16_t nsaved, struct vq_chain *chain,
                    struct iovec *iov, unsigned max_iov)
{
    *chain = (struct vq_chain){ .head = id };
    if (id >= vq->num || !vq->pk.ndesc[id] || nsaved == 0 || nsaved > max_iov ||
        nsaved > DP_MAX_QUEUE_SIZE)
        return -EIO;
    struct pvirtq_desc saved[DP_MAX_QUEUE_SIZE];
    memcpy(saved, iov, nsaved * sizeof(saved[0]));   /* the walk writes iovecs over them */
    struct packed_walk w = { .chain = chain, .iov = iov, .max_iov = max_iov };
    for (unsigned k = 0; k < nsaved; k++)
        if (walk_desc(vq, &w, saved[k].flags, saved[k].addr, saved[k].len, k) < 0)
            return -EIO;
    walk_finish(vq, &w);
    if (chain->err == VQ_MISS) {
        memcpy(iov, saved, nsaved * sizeof(saved[0]));
        chain->nsaved = nsaved;
    }
    return 1;
}

int vq_packed_pop(struct dp_vq *vq, struct vq_chain *chain, struct iovec *iov, unsigned max_iov)
{
    if (vq->broken)
        return -EIO;
    struct vq_packed *pk = &vq->pk;
    uint16_t pos = vq->last_avail_idx;
    uint8_t wrap = pk->avail_wrap;
    /* The head's flags, acquire: the driver stores them last, after the whole list. */
    uint16_t flags = __atomic_load_n(&pk->desc[pos].flags, __ATOMIC_ACQUIRE);
    if (!vring_packed_is_avail(flags, wrap))
        return 0;   /* not available (an AVAIL flip without USED's is not one either) */

    *chain = (struct vq_chain){ 0 };
    struct packed_walk w = { .chain = chain, .iov = iov, .max_iov = max_iov };
    struct inflight_packed *r = packed_region(vq);
    uint16_t head_entry = r ? region_fetch_begin(r, vq->inflight_counter) : 0;
    unsigned n = 0, num = vq->num;
    uint16_t id = 0;
    int rc = 0;
    for (;;) {
        if (pk->in_ring + n >= num) {
            rc = -EIO;   /* more ring slots than the ring has free: a list longer than the ring */
            break;
        }
        struct pvirtq_desc d;
        memcpy(&d, &pk->desc[pos], sizeof(d));   /* read once; flags as loaded above */
        int last = !(flags & VRING_DESC_F_NEXT);
        if (r && (rc = region_fetch_desc(r, num, head_entry, &d, flags, last)) < 0)
            break;
        if ((rc = walk_desc(vq, &w, flags, d.addr, d.len, n)) < 0)
            break;
        n++;
        ring_advance(&pos, &wrap, num);
        if (last) {
            id = d.id;   /* the buffer id is in the last descriptor (2.8.6) */
            break;
        }
        flags = __atomic_load_n(&pk->desc[pos].flags, __ATOMIC_RELAXED);
        if (!vring_packed_is_avail(flags, wrap)) {
            rc = -EIO;   /* the rest of a published list is not there */
            break;
        }
    }
    if (!rc && (id >= num || pk->ndesc[id]))
        rc = -EIO;   /* an id out of range, or one in flight: completing it twice kills the guest */
    if (rc) {
        if (r)
            region_fetch_abort(r, head_entry);
        vq_set_broken(vq);
        return -EIO;
    }
    if (r) {
        inflight_order();
        r->old_free_head = r->free_head;   /* the fetch's commit point */
        inflight_order();
        vq->inflight_counter++;
        pk->entry[id] = head_entry;
    }
    pk->ndesc[id] = (uint16_t)n;
    pk->in_ring += n;
    if (chain->err == VQ_MISS)
        save_list(vq, chain, iov, max_iov, vq->last_avail_idx, n);
    vq->last_avail_idx = pos;
    pk->avail_wrap = wrap;
    chain->head = id;
    walk_finish(vq, &w);
    return 1;
}

int vq_packed_read_saved(struct dp_vq *vq, uint16_t id, struct vq_chain *chain, struct iovec *iov,
                         unsigned max_iov)
{
    *chain = (struct vq_chain){ .head = id };
    struct inflight_packed *r = packed_region(vq);
    if (!r || id >= vq->num || !vq->pk.ndesc[id])
        return -EIO;
    struct packed_walk w = { .chain = chain, .iov = iov, .max_iov = max_iov };
    uint16_t e = vq->pk.entry[id];
    for (unsigned k = 0; k < vq->pk.ndesc[id]; k++) {
        const struct inflight_packed_desc *s = &r->desc[e];
        if (walk_desc(vq, &w, s->flags, s->addr, s->len, k) < 0)
            return -EIO;
        e = s->next;
    }
    walk_finish(vq, &w);
    if (chain->err == VQ_MISS) {   /* kept for vq_packed_retry, from the region this time */
        unsigned n = vq->pk.ndesc[id];
        if (n > max_iov) {
            chain->err = -E2BIG;
            return 1;
        }
        struct pvirtq_desc *saved = (struct pvirtq_desc *)iov;
        e = vq->pk.entry[id];
        for (unsigned k = 0; k < n; k++) {
            const struct inflight_packed_desc *s = &r->desc[e];
            saved[k] = (struct pvirtq_desc){ .addr = s->addr, .len = s->len, .id = s->id,
                                             .flags = s->flags };
            e = s->next;
        }
        chain->nsaved = (uint16_t)n;
    }
    return 1;
}

/* ---- completing ---- */

void vq_packed_push_used(struct dp_vq *vq, uint16_t id, uint32_t len)
{
    struct vq_packed *pk = &vq->pk;
    if (id >= vq->num || !pk->ndesc[id])
        return;   /* not in flight: nothing to answer */
    unsigned n = pk->ndesc[id];
    uint16_t slot = vq->used_idx, next = vq->used_idx;
    uint8_t wrap = pk->used_wrap, next_wrap = wrap;
    for (unsigned i = 0; i < n; i++)
        ring_advance(&next, &next_wrap, vq->num);
    struct inflight_packed *r = packed_region(vq);
    uint16_t head_entry = pk->entry[id];
    if (r) {   /* a batch of one: the new state before the used descriptor shows */
        region_release(r, head_entry);
        r->used_idx = next;
        r->used_wrap_counter = next_wrap;
        inflight_order();
    }
    /* One used descriptor for the list, at the device's used position; WRITE: len is the
     * bytes written (2.8.3; virtio-blk writes at least the status byte). */
    packed_store_used(vq, slot, id, len,
                      vring_packed_used_bits(wrap) | (len ? VRING_DESC_F_WRITE : 0));
    pk->ndesc[id] = 0;
    pk->in_ring -= n;
    vq->used_idx = next;
    if (next_wrap != wrap) {
        pk->used_wrap = next_wrap;
        vq->signalled_used_valid = 0;   /* positions of two laps do not compare */
    }
    if (r) {
        inflight_order();
        r->desc[head_entry].inflight = 0;
        inflight_order();
        region_commit(r);
    }
}

void vq_packed_inflight_drop(struct dp_vq *vq, uint16_t id)
{
    struct vq_packed *pk = &vq->pk;
    if (id >= vq->num || !pk->ndesc[id])
        return;
    struct inflight_packed *r = packed_region(vq);
    if (r) {
        region_release(r, pk->entry[id]);
        inflight_order();
        r->desc[pk->entry[id]].inflight = 0;
        inflight_order();
        r->old_free_head = r->free_head;
    }
    pk->in_ring -= pk->ndesc[id];
    pk->ndesc[id] = 0;
}

/* ---- notifications ---- */

int vq_packed_need_notify(struct dp_vq *vq)
{
    virtio_store_mb();   /* the used flags before the driver's event area */
    const struct pvirtq_event *e = vq->pk.driver;
    uint16_t flags = __atomic_load_n(&e->flags, __ATOMIC_ACQUIRE) & 3;
    uint16_t off_wrap = __atomic_load_n(&e->off_wrap, __ATOMIC_RELAXED);
    uint16_t old = vq->signalled_used, new = vq->used_idx;
    int valid = vq->signalled_used_valid;
    vq->signalled_used = new;
    vq->signalled_used_valid = 1;
    if (flags == VRING_PACKED_EVENT_FLAG_DISABLE)
        return 0;
    if (flags != VRING_PACKED_EVENT_FLAG_DESC || !(vq->flags & DP_VQ_F_EVENT_IDX))
        return 1;   /* ENABLE, or a value that means nothing here: interrupt */
    if (!valid)
        return 1;
    /* Did the used position pass the driver's event offset since the last interrupt? */
    return vring_packed_need_event(off_wrap, vq->pk.used_wrap, new, old, vq->num);
}

int vq_packed_enable_notify(struct dp_vq *vq)
{
    if (vq->broken)
        return 0;
    struct vq_packed *pk = &vq->pk;
    if (vq->flags & DP_VQ_F_EVENT_IDX)   /* kick me when you make this slot available */
        packed_store_device_event(vq, 1,
                                  (uint16_t)(vq->last_avail_idx |
                                             pk->avail_wrap << VRING_PACKED_EVENT_F_WRAP_CTR),
                                  VRING_PACKED_EVENT_FLAG_DESC);
    else
        packed_store_device_event(vq, 0, 0, VRING_PACKED_EVENT_FLAG_ENABLE);
    virtio_store_mb();   /* the event area before the re-read of the ring */
    return vq_packed_has_avail(vq);
}

/* ---- configuration (control plane, queue stopped) ---- */

int vq_packed_map_rings(struct dp_vq *vq)
{
    if (!vq->mem || !vq->addr_set || !vq->num)
        return -EINVAL;
    int rc = 0;
    struct pvirtq_desc *desc = packed_map_area(vq, vq->desc_uva, 16ull * vq->num,
                                               DP_IOTLB_PERM_RW, &rc);
    struct pvirtq_event *driver = packed_map_area(vq, vq->avail_uva, sizeof(*driver),
                                                  DP_IOTLB_PERM_RO, &rc);
    struct pvirtq_event *device = packed_map_area(vq, vq->used_uva, sizeof(*device),
                                                  DP_IOTLB_PERM_RW, &rc);
    if (rc)
        return rc;
    if ((uintptr_t)desc % 16 || (uintptr_t)driver % 4 || (uintptr_t)device % 4)
        return -EINVAL;
    vq->pk.desc = desc;
    vq->pk.driver = driver;
    vq->pk.device = device;
    vq->desc = (struct vring_desc *)desc;   /* "mapped"; the split ring's areas stay unset */
    vq->avail = NULL;
    vq->used = NULL;
    return 0;
}

int dp_vq_set_packed_base(struct dp_vq *vq, uint32_t base)
{
    if (vq->engine)
        return -EBUSY;
    vq->last_avail_idx = vq->shadow_avail_idx = (uint16_t)(base & 0x7fff);
    vq->pk.avail_wrap = (base >> 15) & 1;
    vq->used_idx = (uint16_t)((base >> 16) & 0x7fff);
    vq->pk.used_wrap = (base >> 31) & 1;
    return 0;
}

uint32_t dp_vq_packed_base(const struct dp_vq *vq)
{
    return (uint32_t)vq->last_avail_idx | (uint32_t)vq->pk.avail_wrap << 15 |
           (uint32_t)vq->used_idx << 16 | (uint32_t)vq->pk.used_wrap << 31;
}

uint64_t dp_inflight_packed_queue_size(uint16_t queue_size)
{
    uint64_t n = sizeof(struct inflight_packed) +
                 (uint64_t)queue_size * sizeof(struct inflight_packed_desc);
    return (n + 63) & ~(uint64_t)63;
}

/* ---- recovery after a back-end restart ---- */

/* Order the resubmission by the counter each list got when it was fetched. */
static int cmp_fetch_order(const void *a, const void *b, void *arg)
{
    const struct dp_vq *vq = arg;
    const struct inflight_packed *r = packed_region(vq);
    uint64_t ca = r->desc[vq->pk.entry[*(const uint16_t *)a]].counter;
    uint64_t cb = r->desc[vq->pk.entry[*(const uint16_t *)b]].counter;
    return ca < cb ? -1 : ca > cb;
}

enum { ENTRY_UNSEEN, ENTRY_FREE, ENTRY_CHAIN };

/* The region a previous back end left: finish or undo its last step (the spec's algorithm),
 * then every entry is either free or part of a list in flight. The ring position follows: the
 * used position is the region's, and every list in flight took its ring slots right before
 * the next one, so the next slot to read is that many past it. Returns the lists to
 * resubmit, or -EBADMSG when the region does not hold together. */
static int packed_recover(struct dp_vq *vq)
{
    struct inflight_packed *r = packed_region(vq);
    struct vq_packed *pk = &vq->pk;
    unsigned num = vq->num;
    if (r->desc_num != num || r->free_head > num || r->old_free_head > num ||
        r->used_idx >= num || r->old_used_idx >= num || r->used_wrap_counter > 1 ||
        r->old_used_wrap_counter > 1)
        return -EBADMSG;
    if (r->used_idx != r->old_used_idx || r->used_wrap_counter != r->old_used_wrap_counter) {
        /* Killed inside a completion: did its used descriptor reach the ring? The slot still
         * shows the flags the driver made it available with if not. */
        uint16_t flags = __atomic_load_n(&pk->desc[r->old_used_idx].flags, __ATOMIC_ACQUIRE);
        uint16_t bits = flags & (VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED);
        if (bits != vring_packed_avail_bits(r->old_used_wrap_counter))
            region_commit(r);
    }
    r->free_head = r->old_free_head;
    r->used_idx = r->old_used_idx;
    r->used_wrap_counter = r->old_used_wrap_counter;

    uint8_t *state = calloc(num, 1);
    free(vq->resubmit);
    vq->resubmit = calloc(num, sizeof(uint16_t));
    if (!state || !vq->resubmit) {
        free(state);
        return -ENOMEM;
    }
    int rc = -EBADMSG;
    unsigned steps = 0, in_ring = 0;
    for (uint16_t e = r->free_head; e < num; e = r->desc[e].next) {
        if (state[e] || ++steps > num)
            goto out;   /* a loop */
        state[e] = ENTRY_FREE;
        r->desc[e].inflight = 0;
    }
    uint64_t max_counter = 0;
    for (unsigned h = 0; h < num; h++) {
        const struct inflight_packed_desc *s = &r->desc[h];
        if (s->counter > max_counter)
            max_counter = s->counter;
        if (state[h] != ENTRY_UNSEEN || !s->inflight)
            continue;   /* free, already walked, or not a head */
        unsigned n = s->num;
        uint16_t e = (uint16_t)h;
        if (n == 0 || in_ring + n > num)
            goto out;
        for (unsigned k = 0;; k++) {
            if (e >= num || state[e] != ENTRY_UNSEEN)
                goto out;
            state[e] = ENTRY_CHAIN;
            if (k + 1 == n)
                break;
            e = r->desc[e].next;
        }
        uint16_t id = r->desc[e].id;
        if (e != s->last || id >= num || pk->ndesc[id])
            goto out;
        pk->ndesc[id] = (uint16_t)n;
        pk->entry[id] = (uint16_t)h;
        in_ring += n;
        vq->resubmit[vq->nresubmit++] = id;
    }
    for (unsigned e = 0; e < num; e++)
        if (state[e] == ENTRY_UNSEEN)
            goto out;   /* neither free nor in flight */
    qsort_r(vq->resubmit, vq->nresubmit, sizeof(uint16_t), cmp_fetch_order, vq);
    /* Fetches are numbered in order and the last one holds the highest counter: a list with
     * more fetches after it than lists in flight after it was overtaken by one that completed
     * (a freed entry's counter says little, the next fetch reuses it at once). */
    for (unsigned i = 0; i < vq->nresubmit; i++)
        if (max_counter - r->desc[pk->entry[vq->resubmit[i]]].counter > vq->nresubmit - 1 - i)
            vq->recovered_out_of_order++;
    vq->inflight_counter = max_counter + 1;
    pk->in_ring = in_ring;
    vq->used_idx = r->used_idx;
    pk->used_wrap = r->used_wrap_counter;
    unsigned next = r->used_idx + in_ring;
    vq->last_avail_idx = vq->shadow_avail_idx = (uint16_t)(next % num);
    pk->avail_wrap = (uint8_t)(pk->used_wrap ^ ((next / num) & 1));
    rc = (int)vq->nresubmit;
out:
    free(state);
    if (rc < 0) {
        memset(pk->ndesc, 0, sizeof(pk->ndesc));
        vq->nresubmit = 0;
    }
    return rc;
}

int vq_packed_prepare(struct dp_vq *vq)
{
    struct vq_packed *pk = &vq->pk;
    memset(pk->ndesc, 0, sizeof(pk->ndesc));
    pk->in_ring = 0;
    pk->device_flags = 0xffff;   /* unknown: the first enable writes it */
    vq->nresubmit = 0;
    vq->recovered_out_of_order = 0;
    struct inflight_packed *r = packed_region(vq);
    int restored = vq->inflight_restored;
    vq->inflight_restored = 0;
    if (r && restored && r->version) {
        int rc = packed_recover(vq);
        if (rc < 0)
            return rc;
        __atomic_store_n(&vq->stats.recovered_out_of_order, vq->recovered_out_of_order,
                         __ATOMIC_RELAXED);
    }
    if (vq->last_avail_idx >= vq->num || vq->used_idx >= vq->num)
        return -EINVAL;   /* a base that does not fit the ring */
    if (r && !(restored && r->version))
        region_init(r, vq->num, vq->used_idx, pk->used_wrap);
    return 0;
}
