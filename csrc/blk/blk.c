/* virtio_blk.c — what a virtio-blk request means: header, data, status byte, and the checks
 * that decide between executing it and answering IOERR / UNSUPP at once.
 *
 * The chain arrives as translated iovecs (readable first). The header and any discard
 * ranges are copied out of guest memory once, so the guest cannot change them under us.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "blk/blk.h"

/* A sector range inside the disk; sizes in bytes must be whole sectors. */
static int range_ok(const struct dp_disk *disk, uint64_t sector, uint64_t nbytes)
{
    uint64_t nsectors = nbytes >> SECTOR_SHIFT;
    if (nbytes & ((1u << SECTOR_SHIFT) - 1))
        return 0;
    return sector <= disk->capacity_sectors && nsectors <= disk->capacity_sectors - sector;
}

static int parse_ranges(struct dp_req *req, const struct iovec *data, unsigned cnt,
                        const struct dp_disk *disk)
{
    int discard = req->type == VIRTIO_BLK_T_DISCARD;
    uint32_t max_seg = discard ? disk->p.max_discard_seg : disk->p.max_write_zeroes_seg;
    uint32_t max_sectors = discard ? disk->p.max_discard_sectors : disk->p.max_write_zeroes_sectors;
    size_t len = iov_total(data, cnt);
    size_t n = len / sizeof(struct virtio_blk_discard_write_zeroes);

    if (len == 0 || len % sizeof(struct virtio_blk_discard_write_zeroes) || n > max_seg ||
        n > DP_MAX_DISCARD_SEG)
        return VIRTIO_BLK_S_IOERR;
    if (disk->p.read_only)
        return VIRTIO_BLK_S_IOERR;
    for (size_t i = 0; i < n; i++) {
        struct virtio_blk_discard_write_zeroes r;
        iov_to_buf(data, cnt, i * sizeof(r), &r, sizeof(r));
        /* Spec: unknown flags, or UNMAP on a discard, are UNSUPP. */
        if ((r.flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) || (discard && r.flags))
            return VIRTIO_BLK_S_UNSUPP;
        if (r.num_sectors > max_sectors ||
            !range_ok(disk, r.sector, (uint64_t)r.num_sectors << SECTOR_SHIFT))
            return VIRTIO_BLK_S_IOERR;
        req->ranges[i] = (struct range_op){
            .req = req,
            .offset = r.sector << SECTOR_SHIFT,
            .len = (uint64_t)r.num_sectors << SECTOR_SHIFT,
            .unmap = (r.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) != 0,
        };
    }
    req->nranges = (unsigned)n;
    return VIRTIO_BLK_S_OK;
}

int blk_req_parse(struct dp_req *req, const struct vq_chain *chain, const struct dp_disk *disk)
{
    struct iovec *seg = req->seg;
    unsigned nreadable = chain->nreadable, nwritable = chain->nseg - chain->nreadable;

    req->iov = NULL;
    req->iovcnt = 0;
    req->nbytes = 0;
    req->nranges = 0;
    req->used_len = 1;
    req->type = UINT32_MAX;
    if (chain->err) {
        /* Buffers outside guest memory (or out of order): answer IOERR if the last byte of
         * the chain is writable and mapped, since that is where the driver expects it. */
        req->status = chain->last_byte;
        return req->status ? VIRTIO_BLK_S_IOERR : -EIO;
    }
    if (nwritable == 0)
        return -EIO;

    /* The status byte is the chain's last byte (any_layout: it may share a descriptor). */
    struct iovec *last = &seg[chain->nseg - 1];
    req->status = (uint8_t *)last->iov_base + last->iov_len - 1;
    last->iov_len--;
    unsigned nwritable_data = last->iov_len ? nwritable : nwritable - 1;

    struct virtio_blk_outhdr hdr;
    if (iov_to_buf(seg, nreadable, 0, &hdr, sizeof(hdr)) < sizeof(hdr))
        return VIRTIO_BLK_S_IOERR;
    req->type = hdr.type;

    struct iovec *out = seg;
    unsigned nout = nreadable;
    iov_advance(&out, &nout, sizeof(hdr));

    switch (hdr.type) {
    case VIRTIO_BLK_T_IN:
    case VIRTIO_BLK_T_GET_ID:
        req->iov = seg + nreadable;
        req->iovcnt = nwritable_data;
        break;
    case VIRTIO_BLK_T_OUT:
        req->iov = out;
        req->iovcnt = nout;
        break;
    case VIRTIO_BLK_T_FLUSH:
        return VIRTIO_BLK_S_OK;
    case VIRTIO_BLK_T_DISCARD:
    case VIRTIO_BLK_T_WRITE_ZEROES:
        return parse_ranges(req, out, nout, disk);
    default:
        return VIRTIO_BLK_S_UNSUPP;
    }

    req->nbytes = iov_total(req->iov, req->iovcnt);
    if (hdr.type == VIRTIO_BLK_T_GET_ID)
        return req->nbytes ? VIRTIO_BLK_S_OK : VIRTIO_BLK_S_IOERR;
    if (hdr.type == VIRTIO_BLK_T_OUT && disk->p.read_only)
        return VIRTIO_BLK_S_IOERR;
    if (hdr.sector > UINT64_MAX >> SECTOR_SHIFT || !range_ok(disk, hdr.sector, req->nbytes))
        return VIRTIO_BLK_S_IOERR;
    req->offset = hdr.sector << SECTOR_SHIFT;
    return VIRTIO_BLK_S_OK;
}

/* ---- the disk ---- */

struct dp_disk *dp_disk_new(const struct dp_disk_params *params)
{
    if (!params->null_disk && params->fd < 0)
        return NULL;
    struct dp_disk *disk = calloc(1, sizeof(*disk));
    if (!disk)
        return NULL;
    disk->p = *params;
    if (!disk->p.max_discard_seg)
        disk->p.max_discard_seg = 1;
    if (!disk->p.max_write_zeroes_seg)
        disk->p.max_write_zeroes_seg = 1;
    disk->capacity_sectors = params->size_bytes >> SECTOR_SHIFT;
    disk->writeback = 1;
    return disk;
}

void dp_disk_free(struct dp_disk *disk)
{
    free(disk);
}

int dp_disk_set_latency(struct dp_disk *disk, const struct dp_latency_params *params)
{
    if (params->npoints == 1 || params->npoints > DP_LATENCY_POINTS)
        return -EINVAL;
    for (unsigned i = 1; i < params->npoints; i++)
        if (params->quantile_ns[i] < params->quantile_ns[i - 1])
            return -EINVAL;   /* an inverse CDF never decreases */
    disk->latency = *params;
    return 0;
}

void dp_disk_set_writeback(struct dp_disk *disk, int writeback)
{
    __atomic_store_n(&disk->writeback, writeback != 0, __ATOMIC_RELAXED);
}

int dp_disk_get_writeback(const struct dp_disk *disk)
{
    return __atomic_load_n(&disk->writeback, __ATOMIC_RELAXED);
}
