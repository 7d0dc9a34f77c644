/* iotlb.c — the device IOTLB of a vIOMMU (VIRTIO_F_IOMMU_PLATFORM with QEMU's intel-iommu):
 * snapshots of (IOVA range -> front-end user address, permission), the translation every
 * guest address of a queue behind a vIOMMU goes through, the queue's cache in front of the
 * snapshot, and the misses sent to the front end on the back-end channel.
 *
 * What QEMU sends (IOTLB_MSG, always acknowledged) is one page per UPDATE, answering a miss
 * or pre-populating the used ring, and INVALIDATEs of a page (a guest in strict mode) or of
 * everything (a global device-IOTLB flush: iova + size == 2^64, so the end is computed as
 * iova + (size - 1)). Each message makes a new snapshot here: a sorted array, copied with the
 * range carved out (cut entries keep their other parts) and, for an UPDATE, the new entry
 * inserted, merged with a neighbour it continues. The control plane publishes it to the
 * queues through their mailboxes (engine/queue.c), which is what keeps the I/O path free of
 * locks: a queue thread reads only its own snapshot, and the old one is freed once every
 * queue has moved on.
 *
 * Entries hold the front end's user address, not a host pointer: the host address is found
 * through the queue's memory table when a translation is resolved, so the IOTLB and the
 * memory table (which ADD/REM_MEM_REG change while queues run) stay independent, and an entry
 * naming memory that is gone faults instead of dangling. A resolved translation is cached per
 * queue (64 slots, direct-mapped by page), each slot clipped to one entry and one region and
 * tagged with the generation of the snapshot and table it came from.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "util/clock.h"
#include "vhost/virtqueue.h"

/* ---- snapshots ---- */

static struct dp_iotlb *iotlb_alloc(unsigned cap)
{
    struct dp_iotlb *t = malloc(sizeof(*t) + (size_t)cap * sizeof(t->e[0]));
    if (t) {
        t->refs = 1;
        t->n = 0;
        t->cap = cap;
    }
    return t;
}

struct dp_iotlb *dp_iotlb_new(void)
{
    return iotlb_alloc(0);
}

void iotlb_put(const struct dp_iotlb *t)
{
    struct dp_iotlb *w = (struct dp_iotlb *)t;
    if (w && __atomic_sub_fetch(&w->refs, 1, __ATOMIC_ACQ_REL) == 0)
        free(w);
}

void dp_iotlb_free(struct dp_iotlb *iotlb)
{
    iotlb_put(iotlb);
}

unsigned dp_iotlb_count(const struct dp_iotlb *iotlb)
{
    return iotlb ? iotlb->n : 0;
}

int dp_iotlb_entry(const struct dp_iotlb *iotlb, unsigned i, uint64_t *iova, uint64_t *last,
                   uint64_t *uaddr, unsigned *perm)
{
    if (!iotlb || i >= iotlb->n)
        return -ENOENT;
    const struct iotlb_entry *e = &iotlb->e[i];
    *iova = e->iova;
    *last = e->last;
    *uaddr = e->uaddr;
    *perm = e->perm;
    return 0;
}

/* The number of entries starting at or below iova. */
static unsigned upper_bound(const struct dp_iotlb *t, uint64_t iova)
{
    unsigned lo = 0, hi = t->n;
    while (lo < hi) {
        unsigned mid = lo + (hi - lo) / 2;
        if (t->e[mid].iova <= iova)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static const struct iotlb_entry *iotlb_lookup(const struct dp_iotlb *t, uint64_t iova)
{
    unsigned i = upper_bound(t, iova);
    if (i == 0)
        return NULL;
    const struct iotlb_entry *e = &t->e[i - 1];
    return iova <= e->last ? e : NULL;
}

int dp_iotlb_find(const struct dp_iotlb *iotlb, uint64_t iova, unsigned *index)
{
    const struct iotlb_entry *e = iotlb ? iotlb_lookup(iotlb, iova) : NULL;
    if (!e)
        return -ENOENT;
    *index = (unsigned)(e - iotlb->e);
    return 0;
}

/* src's entries into dst without [first, last]: an entry it overlaps keeps what lies outside
 * (only the entry holding both ends can become two, so dst needs src->n + 1 slots). */
static void carve(struct dp_iotlb *dst, const struct dp_iotlb *src, uint64_t first, uint64_t last)
{
    unsigned n = 0;
    for (unsigned i = 0; src && i < src->n; i++) {
        const struct iotlb_entry *e = &src->e[i];
        if (e->last < first || e->iova > last) {
            dst->e[n++] = *e;
            continue;
        }
        if (e->iova < first) {
            dst->e[n] = *e;
            dst->e[n].last = first - 1;
            n++;
        }
        if (e->last > last) {
            dst->e[n] = *e;
            dst->e[n].iova = last + 1;
            dst->e[n].uaddr = e->uaddr + (last + 1 - e->iova);
            n++;
        }
    }
    dst->n = n;
}

/* Does b continue a (adjacent IOVAs and user addresses, same permission)? a ends below b. */
static int continues(const struct iotlb_entry *a, const struct iotlb_entry *b)
{
    return a->last + 1 == b->iova && a->perm == b->perm &&
           a->uaddr + (a->last - a->iova) + 1 == b->uaddr;
}

/* Insert ne (overlapping nothing) in order, merged with the neighbours it continues. */
static void insert(struct dp_iotlb *t, struct iotlb_entry ne)
{
    unsigned i = upper_bound(t, ne.iova);
    int prev = i > 0 && continues(&t->e[i - 1], &ne);
    int next = i < t->n && continues(&ne, &t->e[i]);
    if (prev && next) {
        t->e[i - 1].last = t->e[i].last;
        memmove(&t->e[i], &t->e[i + 1], (t->n - i - 1) * sizeof(t->e[0]));
        t->n--;
    } else if (prev) {
        t->e[i - 1].last = ne.last;
    } else if (next) {
        t->e[i].iova = ne.iova;
        t->e[i].uaddr = ne.uaddr;
    } else {
        memmove(&t->e[i + 1], &t->e[i], (t->n - i) * sizeof(t->e[0]));
        t->e[i] = ne;
        t->n++;
    }
}

struct dp_iotlb *dp_iotlb_update(const struct dp_iotlb *iotlb, uint64_t iova, uint64_t size,
                                 uint64_t uaddr, unsigned perm, int clip, int *err)
{
    *err = -EINVAL;
    if (size == 0 || perm < DP_IOTLB_PERM_RO || perm > DP_IOTLB_PERM_RW)
        return NULL;
    uint64_t last = iova + (size - 1);
    if (last < iova) {             /* past 2^64 */
        if (!clip)
            return NULL;
        last = UINT64_MAX;
    }
    if (uaddr + (last - iova) < uaddr) {   /* the user addresses would wrap */
        if (!clip)
            return NULL;
        last = iova + (UINT64_MAX - uaddr);
    }
    unsigned n = dp_iotlb_count(iotlb);
    struct dp_iotlb *t = iotlb_alloc(n + 2);
    if (!t) {
        *err = -ENOMEM;
        return NULL;
    }
    carve(t, iotlb, iova, last);
    if (t->n >= DP_IOTLB_MAX_ENTRIES) {
        /* Full: evict one (scattered by the new address). Dropping a cached translation is
         * always safe: the next access to it misses and asks the front end again. */
        unsigned victim = (unsigned)(((iova >> 12) * 0x9e3779b97f4a7c15ull) >> 32) % t->n;
        memmove(&t->e[victim], &t->e[victim + 1], (t->n - victim - 1) * sizeof(t->e[0]));
        t->n--;
    }
    insert(t, (struct iotlb_entry){ .iova = iova, .last = last, .uaddr = uaddr, .perm = perm });
    *err = 0;
    return t;
}

struct dp_iotlb *dp_iotlb_invalidate(const struct dp_iotlb *iotlb, uint64_t iova, uint64_t size,
                                     int *err)
{
    *err = -EINVAL;
    uint64_t last = iova + (size - 1);
    if (size == 0 || last < iova)
        return NULL;
    struct dp_iotlb *t = iotlb_alloc(dp_iotlb_count(iotlb) + 1);
    if (!t) {
        *err = -ENOMEM;
        return NULL;
    }
    carve(t, iotlb, iova, last);
    *err = 0;
    return t;
}

unsigned iotlb_removed(const struct dp_iotlb *t, uint64_t first, uint64_t last,
                       struct iotlb_range *out, unsigned max)
{
    unsigned n = 0;
    for (unsigned i = 0; t && i < t->n; i++) {
        const struct iotlb_entry *e = &t->e[i];
        if (e->last < first || e->iova > last)
            continue;
        uint64_t lo = e->iova > first ? e->iova : first;
        uint64_t hi = e->last < last ? e->last : last;
        if (n < max)
            out[n] = (struct iotlb_range){ .first = e->uaddr + (lo - e->iova),
                                           .last = e->uaddr + (hi - e->iova) };
        n++;
    }
    return n;
}

/* ---- translation (the queue's thread) ---- */

void vq_iotlb_changed(struct dp_vq *vq)
{
    if (++vq->iotlb_gen == 0) {   /* after 2^32 changes: clear rather than collide */
        memset(vq->cache, 0, sizeof(vq->cache));
        vq->iotlb_gen = 1;
    }
}

/* The cache slot translating iova, resolved from the snapshot and the memory table when the
 * slot holds something else; NULL with VQ_MISS (no entry) or -EFAULT (an entry whose user
 * address is in no region). */
static const struct iotlb_slot *resolve(struct dp_vq *vq, uint64_t iova, int *err)
{
    struct iotlb_slot *s = &vq->cache[(iova >> 12) & (IOTLB_CACHE_SLOTS - 1)];
    if (s->gen == vq->iotlb_gen && iova - s->first <= s->last - s->first)
        return s;
    const struct iotlb_entry *e = vq->iotlb ? iotlb_lookup(vq->iotlb, iova) : NULL;
    if (!e) {
        *err = VQ_MISS;
        return NULL;
    }
    uint64_t uaddr = e->uaddr + (iova - e->iova);
    const struct mem_region *r = vq->mem ? guest_mem_uva_region(vq->mem, uaddr) : NULL;
    if (!r) {
        *err = -EFAULT;
        return NULL;
    }
    uint64_t below = uaddr - r->user_addr;        /* region bytes before uaddr */
    uint64_t above = r->size - 1 - below;         /* and after it */
    s->first = iova - e->iova < below ? e->iova : iova - below;
    s->last = e->last - iova < above ? e->last : iova + above;
    s->delta = (uintptr_t)(r->host_addr + below) - (uintptr_t)iova;
    s->perm = e->perm;
    s->gen = vq->iotlb_gen;
    return s;
}

static void record_miss(struct dp_vq *vq, uint64_t iova, unsigned perm)
{
    for (unsigned i = 0; i < vq->nmiss; i++)
        if ((vq->miss[i].iova >> 12) == (iova >> 12) && (vq->miss[i].perm & perm) == perm)
            return;
    if (vq->nmiss < IOTLB_MISS_BATCH)
        vq->miss[vq->nmiss++] = (struct iotlb_miss){ .iova = iova, .perm = perm };
}

int vq_iova_map(struct dp_vq *vq, uint64_t iova, uint64_t len, unsigned perm, struct iovec *iov,
                unsigned max_iov)
{
    unsigned n = 0;
    if (len == 0)
        return 0;
    if (iova + (len - 1) < iova)
        return -EFAULT;
    int check = !(vq->iommu->flags & DP_IOMMU_F_NO_CHECK);
    int missed = 0;
    while (len > 0) {
        int err;
        const struct iotlb_slot *s = resolve(vq, iova, &err);
        if (!s) {
            if (err != VQ_MISS)
                return err;
            if (!check && !missed) {
                /* The switch: an address without an entry taken as guest-physical, if it is
                 * one; else it is waited for like any miss. */
                int m = guest_mem_translate(vq->mem, iova, len, iov + n, max_iov - n);
                if (m >= 0)
                    return (int)n + m;
            }
            /* Note it and look at the next page: the other misses go out with this one. */
            record_miss(vq, iova, perm);
            missed = 1;
            uint64_t to_page = 4096 - (iova & 4095);
            if (len <= to_page || vq->nmiss == IOTLB_MISS_BATCH)
                return VQ_MISS;
            iova += to_page;
            len -= to_page;
            continue;
        }
        if (missed) {   /* only looking for misses now */
            uint64_t room = s->last - iova;
            if (len - 1 <= room)
                return VQ_MISS;
            iova += room + 1;
            len -= room + 1;
            continue;
        }
        if ((s->perm & perm) != perm && check)
            return -EACCES;
        uint64_t room = s->last - iova;           /* bytes of the slot after iova */
        uint64_t piece = len - 1 <= room ? len : room + 1;
        uint8_t *host = (uint8_t *)(uintptr_t)(iova + s->delta);
        if (n && (uint8_t *)iov[n - 1].iov_base + iov[n - 1].iov_len == host) {
            iov[n - 1].iov_len += piece;          /* contiguous in host memory: one iovec */
        } else {
            if (n == max_iov)
                return -E2BIG;
            iov[n].iov_base = host;
            iov[n].iov_len = piece;
            n++;
        }
        iova += piece;
        len -= piece;
    }
    return (int)n;
}

void *vq_iova_map_contig(struct dp_vq *vq, uint64_t iova, uint64_t len, unsigned perm, int *err)
{
    struct iovec one;
    int n = vq_iova_map(vq, iova, len ? len : 1, perm, &one, 1);
    if (n == 1) {
        *err = 0;
        return one.iov_base;
    }
    *err = n == VQ_MISS || n == -EACCES ? n : -EFAULT;   /* E2BIG: not contiguous */
    return NULL;
}

/* ---- misses ---- */

int iommu_send_miss(struct dp_iommu *iommu, uint64_t iova, unsigned perm)
{
    /* VHOST_USER_BACKEND_IOTLB_MSG: header {request 1, flags version 1, size 32}, then
     * struct vhost_iotlb_msg {iova, size, uaddr, perm, type MISS (1)}; QEMU reads iova and
     * perm. No NEED_REPLY: nothing waits for the answer, which comes as an UPDATE on the
     * main socket (QEMU sends it before it would reply here). */
    uint8_t msg[12 + 32] = { 0 };
    uint32_t hdr[3] = { 1, 1, 32 };
    memcpy(msg, hdr, sizeof(hdr));
    memcpy(msg + 12, &iova, sizeof(iova));
    msg[12 + 24] = (uint8_t)perm;
    msg[12 + 25] = 1;
    pthread_mutex_lock(&iommu->lock);
    ssize_t n = -1;
    if (iommu->fd >= 0 && !iommu->broken)
        n = send(iommu->fd, msg, sizeof(msg), MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n == (ssize_t)sizeof(msg)) {
        __atomic_add_fetch(&iommu->misses_sent, 1, __ATOMIC_RELAXED);
    } else {
        __atomic_add_fetch(&iommu->misses_dropped, 1, __ATOMIC_RELAXED);
        if (n > 0)
            iommu->broken = 1;   /* half a message: nothing more can be framed on it */
    }
    pthread_mutex_unlock(&iommu->lock);
    return n == (ssize_t)sizeof(msg) ? 0 : -EAGAIN;
}

/* Where page is in the set of pages asked for, or where it would go (a free slot, else the
 * oldest within the probe window); *found says which. */
static struct iotlb_asked *asked_slot(struct dp_vq *vq, uint64_t page, int *found)
{
    unsigned h = (unsigned)((page * 0x9e3779b97f4a7c15ull) >> 54);   /* 10 bits */
    struct iotlb_asked *spot = NULL;
    for (unsigned k = 0; k < IOTLB_ASKED_PROBE; k++) {
        struct iotlb_asked *a = &vq->asked[(h + k) % IOTLB_ASKED_SLOTS];
        if (a->at_ns && a->page == page) {
            *found = 1;
            return a;
        }
        if (!spot || (spot->at_ns && (!a->at_ns || a->at_ns < spot->at_ns)))
            spot = a;
    }
    *found = 0;
    return spot;
}

_Static_assert(IOTLB_ASKED_SLOTS == 1024, "asked_slot hashes to 10 bits");

void vq_iotlb_report_miss(struct dp_vq *vq)
{
    if (!vq->iommu || !vq->nmiss)
        return;
    uint64_t now = now_ns();
    for (unsigned m = 0; m < vq->nmiss; m++) {
        uint64_t page = vq->miss[m].iova >> 12;
        uint32_t perm = vq->miss[m].perm;
        int found;
        struct iotlb_asked *a = asked_slot(vq, page, &found);
        if (found && (a->perm & perm) == perm && now - a->at_ns < IOTLB_ASK_AGAIN_NS)
            continue;   /* its UPDATE is on the way (or it was refused: asked again later) */
        if (iommu_send_miss(vq->iommu, vq->miss[m].iova, perm) < 0)
            return;   /* the channel is full: the rest waits for the next look */
        *a = (struct iotlb_asked){ .page = page, .perm = found ? a->perm | perm : perm, .at_ns = now };
    }
}

void vq_iotlb_answered(struct dp_vq *vq, uint64_t first, uint64_t last)
{
    for (unsigned i = 0; i < IOTLB_ASKED_SLOTS; i++) {
        struct iotlb_asked *a = &vq->asked[i];
        if (a->at_ns && a->page >= first >> 12 && a->page <= last >> 12)
            a->at_ns = 0;
    }
}

/* ---- the device's link ---- */

struct dp_iommu *dp_iommu_new(void)
{
    struct dp_iommu *iommu = calloc(1, sizeof(*iommu));
    if (!iommu)
        return NULL;
    pthread_mutex_init(&iommu->lock, NULL);
    iommu->fd = -1;
    iommu->timeout_ns = (uint64_t)DP_IOTLB_MISS_TIMEOUT_MS * 1000000u;
    return iommu;
}

void dp_iommu_free(struct dp_iommu *iommu)
{
    if (!iommu)
        return;
    pthread_mutex_destroy(&iommu->lock);
    free(iommu);
}

void dp_iommu_set_channel(struct dp_iommu *iommu, int fd)
{
    pthread_mutex_lock(&iommu->lock);
    iommu->fd = fd;
    iommu->broken = 0;
    pthread_mutex_unlock(&iommu->lock);
}

void dp_iommu_set_miss_timeout(struct dp_iommu *iommu, uint64_t timeout_ns)
{
    __atomic_store_n(&iommu->timeout_ns, timeout_ns, __ATOMIC_RELAXED);
}

void dp_iommu_set_flags(struct dp_iommu *iommu, unsigned flags)
{
    __atomic_store_n(&iommu->flags, flags, __ATOMIC_RELAXED);
}

void dp_iommu_get_stats(const struct dp_iommu *iommu, struct dp_iommu_stats *out)
{
    out->misses_sent = __atomic_load_n(&iommu->misses_sent, __ATOMIC_RELAXED);
    out->misses_dropped = __atomic_load_n(&iommu->misses_dropped, __ATOMIC_RELAXED);
}

int dp_vq_set_iommu(struct dp_vq *vq, struct dp_iommu *iommu, const struct dp_iotlb *iotlb)
{
    if (vq->engine)
        return -EBUSY;
    if (vq->iommu != iommu)
        vq_unmap_rings(vq);   /* the ring addresses mean something else now */
    vq->iommu = iommu;
    const struct dp_iotlb *old = vq->iotlb;
    vq->iotlb = iotlb_get(iotlb);
    iotlb_put(old);
    vq_iotlb_changed(vq);
    return 0;
}
