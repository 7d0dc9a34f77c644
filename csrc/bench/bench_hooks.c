/* bench_hooks.c — micro-benchmark entry points for the request hot path: pop a chain, parse a
 * request, push a used element. Each hook runs its loop here in C over a fake guest (one
 * memory region holding a split ring and pre-built chains), so that cffi's call overhead is
 * paid once per loop, not once per request. tests/bench drives them with pytest-benchmark.
 *
 * The hooks call the same internal functions the engine does (vq_pop, blk_req_parse,
 * vq_push_used); only the driver's side of the ring is simulated, with the fewest stores that
 * keep the ring valid.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench/dp_bench.h"
#include "engine/dp_engine.h"
#include "vhost/guest_mem.h"
#include "blk/blk.h"
#include "util/clock.h"
#include "vhost/virtqueue.h"

#define BENCH_HDR_BYTES 16u      /* struct virtio_blk_outhdr */
#define BENCH_IOVA_BASE (1ull << 40)   /* behind a vIOMMU: IOVA = guest-physical + this */
#define BENCH_CHAIN_DESCS 3u     /* header, data, status */

struct dp_bench_ring {
    unsigned num;
    unsigned indirect;
    uint32_t data_len;
    uint8_t *guest;              /* the fake guest's memory: gpa 0 .. guest_len */
    size_t guest_len;
    struct dp_mem *mem;
    struct dp_disk *disk;
    struct dp_blk_dev *dev;
    struct dp_vq *vq;
    struct vring_avail *avail;   /* the driver's view of its avail ring */
    uint16_t avail_idx;          /* the driver's next avail index */
    /* parse: chains popped once, parsed again and again from a copy */
    struct vq_chain *chains;
    struct iovec *chain_segs;    /* num * REQ_MAX_SEGS */
    struct iovec *req_segs;      /* the request slot's segment array */
    /* behind a vIOMMU (dp_bench_ring_iommu) */
    struct dp_iommu *iommu;
    struct dp_iotlb *iotlb;
};

static uint64_t align_up(uint64_t v, uint64_t a)
{
    return (v + a - 1) & ~(a - 1);
}

static void write_desc(struct vring_desc *d, uint64_t addr, uint32_t len, uint16_t flags,
                       uint16_t next)
{
    *d = (struct vring_desc){ .addr = addr, .len = len, .flags = flags, .next = next };
}

/* The driver makes head available again (what a guest does when it reuses a slot). The release
 * orders the ring entry before the index, as the driver's write barrier does. */
static void driver_publish(struct dp_bench_ring *r, uint16_t head)
{
    r->avail->ring[r->avail_idx & (r->num - 1)] = head;
    r->avail_idx++;
    __atomic_store_n(&r->avail->idx, r->avail_idx, __ATOMIC_RELEASE);
}

void dp_bench_ring_free(struct dp_bench_ring *r)
{
    if (!r)
        return;
    if (r->vq)
        dp_vq_free(r->vq);
    dp_iotlb_free(r->iotlb);
    dp_iommu_free(r->iommu);
    dp_mem_free(r->mem);
    dp_blk_dev_free(r->dev);
    dp_disk_free(r->disk);
    free(r->guest);
    free(r->chains);
    free(r->chain_segs);
    free(r->req_segs);
    free(r);
}

struct dp_bench_ring *dp_bench_ring_new(unsigned num, int indirect, uint32_t data_len, int *err)
{
    struct dp_bench_ring *r = NULL;
    int rc = -EINVAL;
    /* Direct chains need 3 descriptors each: num / 3 distinct requests fit the table. */
    if (num < 4 || num > DP_MAX_QUEUE_SIZE || (num & (num - 1)) || data_len == 0 ||
        data_len % 512 || data_len > (1u << 20))
        goto fail;
    rc = -ENOMEM;
    r = calloc(1, sizeof(*r));
    if (!r)
        goto fail;
    r->num = num;
    r->indirect = indirect != 0;
    r->data_len = data_len;

    /* Layout: desc table | avail | used (4 KiB aligned) | indirect tables | headers | status
     * bytes | one data buffer every request shares (where it points does not matter here). */
    uint64_t desc_off = 0;
    uint64_t avail_off = align_up(desc_off + 16ull * num, 16);
    uint64_t used_off = align_up(avail_off + 6 + 2ull * num, 4096);
    uint64_t table_off = align_up(used_off + 6 + 8ull * num, 16);
    uint64_t hdr_off = align_up(table_off + 16ull * BENCH_CHAIN_DESCS * num, 16);
    uint64_t status_off = align_up(hdr_off + BENCH_HDR_BYTES * num, 64);
    uint64_t data_off = align_up(status_off + num, 4096);
    r->guest_len = align_up(data_off + data_len, 4096);
    r->guest = aligned_alloc(4096, r->guest_len);
    r->chains = calloc(num, sizeof(*r->chains));
    r->chain_segs = calloc((size_t)num * REQ_MAX_SEGS, sizeof(struct iovec));
    r->req_segs = calloc(REQ_MAX_SEGS, sizeof(struct iovec));
    r->mem = dp_mem_new();
    struct dp_disk_info info = { .size_bytes = 1ull << 30, .block_size = 512 };
    struct dp_blk_params blk = { .max_discard_seg = 1, .max_write_zeroes_seg = 1 };
    int disk_err = 0;
    r->disk = dp_null_disk_new(&info, &disk_err);
    if (r->disk)
        r->dev = dp_blk_dev_new(r->disk, &blk, &disk_err);
    if (!r->guest || !r->chains || !r->chain_segs || !r->req_segs || !r->mem || !r->dev)
        goto fail;
    memset(r->guest, 0, r->guest_len);
    uint64_t uva = (uint64_t)(uintptr_t)r->guest;   /* front-end address == host address */
    rc = dp_mem_add_region(r->mem, 0, r->guest_len, uva, r->guest);
    if (rc)
        goto fail;

    /* Requests: a read of data_len bytes at a sector that differs per request. */
    unsigned nreq = r->indirect ? num : num / BENCH_CHAIN_DESCS;
    uint64_t max_sector = (info.size_bytes - data_len) >> SECTOR_SHIFT;
    struct vring_desc *desc = (struct vring_desc *)(r->guest + desc_off);
    r->avail = (struct vring_avail *)(r->guest + avail_off);
    for (unsigned i = 0; i < nreq; i++) {
        struct virtio_blk_outhdr hdr = {
            .type = VIRTIO_BLK_T_IN, .sector = ((uint64_t)i * 7919 * 8) % max_sector,
        };
        uint64_t hdr_gpa = hdr_off + (uint64_t)BENCH_HDR_BYTES * i;
        memcpy(r->guest + hdr_gpa, &hdr, sizeof(hdr));
        uint64_t status_gpa = status_off + i;
        struct vring_desc *d;
        uint16_t first = 0;
        if (r->indirect) {
            uint64_t table_gpa = table_off + 16ull * BENCH_CHAIN_DESCS * i;
            write_desc(&desc[i], table_gpa, 16 * BENCH_CHAIN_DESCS, VRING_DESC_F_INDIRECT, 0);
            d = (struct vring_desc *)(r->guest + table_gpa);
        } else {
            d = desc;
            first = (uint16_t)(i * BENCH_CHAIN_DESCS);
        }
        write_desc(&d[first], hdr_gpa, BENCH_HDR_BYTES, VRING_DESC_F_NEXT, first + 1);
        write_desc(&d[first + 1], data_off, data_len, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
                   first + 2);
        write_desc(&d[first + 2], status_gpa, 1, VRING_DESC_F_WRITE, 0);
        driver_publish(r, r->indirect ? (uint16_t)i : first);
    }

    r->vq = dp_vq_new(r->dev, 0);
    if (!r->vq)
        goto fail;
    unsigned flags = DP_VQ_F_EVENT_IDX | (r->indirect ? DP_VQ_F_INDIRECT : 0);
    if ((rc = dp_vq_set_num(r->vq, num)) || (rc = dp_vq_set_flags(r->vq, flags)) ||
        (rc = dp_vq_set_addr(r->vq, r->mem, uva + desc_off, uva + avail_off, uva + used_off)))
        goto fail;

    /* Pop every request once for the parse loop, then rewind the device to the start. */
    for (unsigned i = 0; i < nreq; i++) {
        rc = vq_pop(r->vq, &r->chains[i], r->chain_segs + (size_t)i * REQ_MAX_SEGS, REQ_MAX_SEGS);
        if (rc != 1 || r->chains[i].err) {
            rc = rc < 0 ? rc : -EIO;
            goto fail;
        }
    }
    if ((rc = dp_vq_set_base(r->vq, 0)))
        goto fail;
    *err = 0;
    return r;
fail:
    dp_bench_ring_free(r);
    *err = rc;
    return NULL;
}

/* Every address the ring's descriptors carry, moved by delta (guest-physical -> IOVA). */
static void shift_descs(struct dp_bench_ring *r, uint64_t delta)
{
    struct vring_desc *desc = (struct vring_desc *)r->guest;   /* the table is at 0 */
    unsigned n = r->indirect ? r->num : r->num / BENCH_CHAIN_DESCS * BENCH_CHAIN_DESCS;
    for (unsigned i = 0; i < n; i++) {
        if (desc[i].flags & VRING_DESC_F_INDIRECT) {
            struct vring_desc *t = (struct vring_desc *)(r->guest + desc[i].addr);
            for (unsigned k = 0; k < desc[i].len / sizeof(*t); k++)
                t[k].addr += delta;
        }
        desc[i].addr += delta;
    }
}

int dp_bench_ring_iommu(struct dp_bench_ring *r, int per_page)
{
    if (r->iommu)
        return -EBUSY;
    uint64_t pages = r->guest_len / 4096, uva = (uint64_t)(uintptr_t)r->guest;
    r->iommu = dp_iommu_new();
    r->iotlb = malloc(sizeof(*r->iotlb) + (per_page ? pages : 1) * sizeof(r->iotlb->e[0]));
    if (!r->iommu || !r->iotlb)
        return -ENOMEM;
    /* Built by hand: pages QEMU sent one by one and whose user addresses are not adjacent
     * would not merge (per_page), which dp_iotlb_update would do with these. */
    r->iotlb->refs = 1;
    r->iotlb->n = r->iotlb->cap = (unsigned)(per_page ? pages : 1);
    for (unsigned i = 0; i < r->iotlb->n; i++) {
        uint64_t off = per_page ? (uint64_t)i * 4096 : 0;
        r->iotlb->e[i] = (struct iotlb_entry){
            .iova = BENCH_IOVA_BASE + off, .uaddr = uva + off, .perm = DP_IOTLB_PERM_RW,
            .last = BENCH_IOVA_BASE + off + (per_page ? 4096 : r->guest_len) - 1,
        };
    }
    shift_descs(r, BENCH_IOVA_BASE);
    uint64_t avail_off = r->vq->avail_uva - uva, used_off = r->vq->used_uva - uva;
    int rc = dp_vq_set_iommu(r->vq, r->iommu, r->iotlb);
    if (!rc)
        rc = dp_vq_set_addr(r->vq, r->mem, BENCH_IOVA_BASE, BENCH_IOVA_BASE + avail_off,
                            BENCH_IOVA_BASE + used_off);
    return rc;
}

unsigned dp_bench_ring_requests(const struct dp_bench_ring *r)
{
    return r->indirect ? r->num : r->num / BENCH_CHAIN_DESCS;
}

/* Pop n chains; the driver re-publishes each head as soon as it is popped. */
int dp_bench_pop(struct dp_bench_ring *r, uint64_t n, struct dp_bench_result *out)
{
    struct iovec iov[REQ_MAX_SEGS];
    struct vq_chain chain;
    uint64_t sum = 0;
    uint64_t t0 = now_ns();
    for (uint64_t i = 0; i < n; i++) {
        int rc = vq_pop(r->vq, &chain, iov, REQ_MAX_SEGS);
        if (rc != 1 || chain.err)
            return rc < 0 ? rc : -EIO;
        sum += chain.nseg + (uintptr_t)iov[0].iov_base + (uintptr_t)chain.last_byte;
        driver_publish(r, chain.head);
    }
    *out = (struct dp_bench_result){ .iterations = n, .ns = now_ns() - t0, .checksum = sum };
    return 0;
}

/* Parse n requests (the ring's chains in turn), each from a fresh copy of its segments, as
 * the engine parses what vq_pop just wrote into the request slot. */
int dp_bench_parse(struct dp_bench_ring *r, uint64_t n, struct dp_bench_result *out)
{
    struct dp_req req;
    memset(&req, 0, sizeof(req));
    req.seg = r->req_segs;
    unsigned nreq = dp_bench_ring_requests(r);
    uint64_t sum = 0;
    unsigned k = 0;
    uint64_t t0 = now_ns();
    for (uint64_t i = 0; i < n; i++, k = k + 1 == nreq ? 0 : k + 1) {
        const struct vq_chain *chain = &r->chains[k];
        memcpy(req.seg, r->chain_segs + (size_t)k * REQ_MAX_SEGS, chain->nseg * sizeof(struct iovec));
        int status = blk_req_parse(&req, chain->nseg, chain->nreadable, chain->err,
                                   chain->last_byte, r->dev);
        if (status != VIRTIO_BLK_S_OK)
            return status < 0 ? status : -EIO;
        sum += req.io.offset + req.io.nbytes + req.io.iovcnt;
    }
    *out = (struct dp_bench_result){ .iterations = n, .ns = now_ns() - t0, .checksum = sum };
    return 0;
}

/* Push n used elements (the used index is free-running: no consumer is needed), with the
 * EVENT_IDX decision once per batch of `batch` (0: never), as the engine notifies per batch. */
int dp_bench_push_used(struct dp_bench_ring *r, uint64_t n, unsigned batch,
                       struct dp_bench_result *out)
{
    unsigned nreq = dp_bench_ring_requests(r);
    uint64_t sum = 0;
    unsigned head = 0, in_batch = 0;
    uint64_t t0 = now_ns();
    for (uint64_t i = 0; i < n; i++) {
        vq_push_used(r->vq, (uint16_t)head, r->data_len + 1);
        head = head + 1 == nreq ? 0 : head + 1;
        if (batch && ++in_batch == batch) {
            in_batch = 0;
            sum += (uint64_t)vq_need_notify(r->vq);
        }
    }
    sum += r->vq->used_idx;
    *out = (struct dp_bench_result){ .iterations = n, .ns = now_ns() - t0, .checksum = sum };
    return 0;
}

/* The ring work of n whole requests: pop, parse, status byte, push used, and the notification
 * decision per batch; the driver re-publishes each head once it is used. */
int dp_bench_request(struct dp_bench_ring *r, uint64_t n, unsigned batch,
                     struct dp_bench_result *out)
{
    struct dp_req req;
    memset(&req, 0, sizeof(req));
    req.seg = r->req_segs;
    struct vq_chain chain;
    unsigned in_batch = 0;
    uint64_t sum = 0;
    uint64_t t0 = now_ns();
    for (uint64_t i = 0; i < n; i++) {
        int rc = vq_pop(r->vq, &chain, req.seg, REQ_MAX_SEGS);
        if (rc != 1 || chain.err)
            return rc < 0 ? rc : -EIO;
        int status = blk_req_parse(&req, chain.nseg, chain.nreadable, chain.err, chain.last_byte,
                                   r->dev);
        if (status != VIRTIO_BLK_S_OK)
            return status < 0 ? status : -EIO;
        *req.status = VIRTIO_BLK_S_OK;
        vq_push_used(r->vq, chain.head, (uint32_t)req.io.nbytes + 1);
        if (batch && ++in_batch == batch) {
            in_batch = 0;
            sum += (uint64_t)vq_need_notify(r->vq);
        }
        sum += req.io.offset;
        driver_publish(r, chain.head);
    }
    *out = (struct dp_bench_result){ .iterations = n, .ns = now_ns() - t0, .checksum = sum };
    return 0;
}
