/* blk.c — what a virtio-blk request means: header, data, status byte, and the checks that
 * decide between handing it to the disk and answering IOERR / UNSUPP (or GET_ID) at once.
 *
 * The chain arrives as translated iovecs (readable first). The header and any discard
 * ranges are copied out of guest memory once, so the guest cannot change them under us.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "blk/blk.h"

/* A sector range inside the disk; sizes in bytes must be whole sectors. */
static int range_ok(const struct dp_blk_dev *dev, uint64_t sector, uint64_t nbytes)
{
    uint64_t nsectors = nbytes >> SECTOR_SHIFT;
    if (nbytes & ((1u << SECTOR_SHIFT) - 1))
        return 0;
    return sector <= dev->capacity_sectors && nsectors <= dev->capacity_sectors - sector;
}

static int parse_ranges(struct dp_req *req, const struct iovec *data, unsigned cnt,
                        const struct dp_blk_dev *dev)
{
    int discard = req->type == VIRTIO_BLK_T_DISCARD;
    uint32_t max_seg = discard ? dev->p.max_discard_seg : dev->p.max_write_zeroes_seg;
    uint32_t max_sectors = discard ? dev->p.max_discard_sectors : dev->p.max_write_zeroes_sectors;
    size_t len = iov_total(data, cnt);
    size_t n = len / sizeof(struct virtio_blk_discard_write_zeroes);

    if (len == 0 || len % sizeof(struct virtio_blk_discard_write_zeroes) || n > DP_MAX_DISCARD_SEG)
        return VIRTIO_BLK_S_IOERR;
    /* The ranges as asked, copied out first: a recording shows them also when refused below. */
    struct virtio_blk_discard_write_zeroes asked[DP_MAX_DISCARD_SEG];
    req->io.op = discard ? DP_DISK_DISCARD : DP_DISK_WRITE_ZEROES;
    for (size_t i = 0; i < n; i++) {
        struct virtio_blk_discard_write_zeroes *r = &asked[i];
        iov_to_buf(data, cnt, i * sizeof(*r), r, sizeof(*r));
        struct dp_disk_range *range = &req->io.ranges[i];
        range->io = &req->io;
        range->offset = r->sector << SECTOR_SHIFT;
        range->len = (uint64_t)r->num_sectors << SECTOR_SHIFT;
        range->unmap = (r->flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) != 0;
    }
    req->io.nranges = (unsigned)n;
    if (n > max_seg || dev->p.read_only)
        return VIRTIO_BLK_S_IOERR;
    if (!(dev->disk_flags & (discard ? DP_DISK_F_DISCARD : DP_DISK_F_WRITE_ZEROES)))
        return VIRTIO_BLK_S_UNSUPP;   /* not offered either: a driver that sends it anyway */
    for (size_t i = 0; i < n; i++) {
        const struct virtio_blk_discard_write_zeroes *r = &asked[i];
        /* Spec: unknown flags, or UNMAP on a discard, are UNSUPP. */
        if ((r->flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) || (discard && r->flags))
            return VIRTIO_BLK_S_UNSUPP;
        if (r->num_sectors > max_sectors ||
            !range_ok(dev, r->sector, (uint64_t)r->num_sectors << SECTOR_SHIFT))
            return VIRTIO_BLK_S_IOERR;
    }
    return VIRTIO_BLK_S_OK;
}

int blk_req_parse(struct dp_req *req, unsigned nseg, unsigned nreadable, int chain_err,
                  uint8_t *last_byte, const struct dp_blk_dev *dev)
{
    struct iovec *seg = req->seg;
    struct dp_disk_io *io = &req->io;
    unsigned nwritable = nseg - nreadable;

    io->iov = NULL;
    io->iovcnt = 0;
    io->nbytes = 0;
    io->nranges = 0;
    io->flags = 0;
    req->used_len = 1;
    req->type = UINT32_MAX;
    if (chain_err) {
        /* Buffers outside guest memory (or out of order): answer IOERR if the last byte of
         * the chain is writable and mapped, since that is where the driver expects it. */
        req->status = last_byte;
        return req->status ? VIRTIO_BLK_S_IOERR : -EIO;
    }
    if (nwritable == 0)
        return -EIO;

    /* The status byte is the chain's last byte (any_layout: it may share a descriptor). */
    struct iovec *last = &seg[nseg - 1];
    req->status = (uint8_t *)last->iov_base + last->iov_len - 1;
    last->iov_len--;
    unsigned nwritable_data = last->iov_len ? nwritable : nwritable - 1;

    struct virtio_blk_outhdr hdr;
    if (iov_to_buf(seg, nreadable, 0, &hdr, sizeof(hdr)) < sizeof(hdr))
        return VIRTIO_BLK_S_IOERR;
    req->type = hdr.type;
    io->offset = hdr.sector << SECTOR_SHIFT;   /* also for a request refused below (recordings) */
    if (__atomic_load_n(&dev->failed, __ATOMIC_RELAXED))
        return VIRTIO_BLK_S_IOERR;

    struct iovec *out = seg;
    unsigned nout = nreadable;
    iov_advance(&out, &nout, sizeof(hdr));

    switch (hdr.type) {
    case VIRTIO_BLK_T_IN:
    case VIRTIO_BLK_T_GET_ID:
        io->op = DP_DISK_READ;
        io->iov = seg + nreadable;
        io->iovcnt = nwritable_data;
        break;
    case VIRTIO_BLK_T_OUT:
        io->op = DP_DISK_WRITE;
        io->iov = out;
        io->iovcnt = nout;
        break;
    case VIRTIO_BLK_T_FLUSH:
        io->op = DP_DISK_FLUSH;
        return VIRTIO_BLK_S_OK;
    case VIRTIO_BLK_T_DISCARD:
    case VIRTIO_BLK_T_WRITE_ZEROES:
        return parse_ranges(req, out, nout, dev);
    default:
        return VIRTIO_BLK_S_UNSUPP;
    }

    io->nbytes = iov_total(io->iov, io->iovcnt);
    if (hdr.type == VIRTIO_BLK_T_GET_ID)
        return io->nbytes ? VIRTIO_BLK_S_OK : VIRTIO_BLK_S_IOERR;
    if (hdr.type == VIRTIO_BLK_T_OUT) {
        if (dev->p.read_only)
            return VIRTIO_BLK_S_IOERR;
        if (!dp_blk_get_writeback(dev))
            io->flags = DP_IO_F_FUA;   /* the guest turned the write cache off */
    }
    if (hdr.sector > UINT64_MAX >> SECTOR_SHIFT || !range_ok(dev, hdr.sector, io->nbytes))
        return VIRTIO_BLK_S_IOERR;
    return VIRTIO_BLK_S_OK;
}

int blk_req_answer(struct dp_req *req, const struct dp_blk_dev *dev)
{
    if (req->type == VIRTIO_BLK_T_GET_ID) {
        char serial[DP_SERIAL_LEN] = { 0 };
        memcpy(serial, dev->p.serial, sizeof(serial));
        size_t n = iov_from_buf(req->io.iov, req->io.iovcnt, 0, serial, sizeof(serial));
        req->used_len = (uint32_t)n + 1;
        return VIRTIO_BLK_S_OK;
    }
    if ((req->type == VIRTIO_BLK_T_IN || req->type == VIRTIO_BLK_T_OUT) && req->io.nbytes == 0)
        return VIRTIO_BLK_S_OK;
    return -1;
}

/* ---- the device ---- */

struct dp_blk_dev *dp_blk_dev_new(struct dp_disk *disk, const struct dp_blk_params *params, int *err)
{
    if (!disk || params->max_discard_seg > DP_MAX_DISCARD_SEG ||
        params->max_write_zeroes_seg > DP_MAX_DISCARD_SEG) {
        *err = -EINVAL;
        return NULL;
    }
    struct dp_blk_dev *dev = calloc(1, sizeof(*dev));
    if (!dev) {
        *err = -ENOMEM;
        return NULL;
    }
    struct dp_disk_info info;
    dp_disk_get_info(disk, &info);
    dev->disk = disk;
    dev->p = *params;
    if (info.flags & DP_DISK_F_READ_ONLY)
        dev->p.read_only = 1;
    if (!dev->p.max_discard_seg)
        dev->p.max_discard_seg = 1;
    if (!dev->p.max_write_zeroes_seg)
        dev->p.max_write_zeroes_seg = 1;
    dev->capacity_sectors = info.size_bytes >> SECTOR_SHIFT;
    dev->disk_flags = info.flags;
    dev->writeback = 1;
    *err = 0;
    return dev;
}

void dp_blk_dev_free(struct dp_blk_dev *dev)
{
    free(dev);
}

void dp_blk_set_writeback(struct dp_blk_dev *dev, int writeback)
{
    __atomic_store_n(&dev->writeback, writeback != 0, __ATOMIC_RELAXED);
}

int dp_blk_get_writeback(const struct dp_blk_dev *dev)
{
    return __atomic_load_n(&dev->writeback, __ATOMIC_RELAXED);
}

void dp_blk_set_failed(struct dp_blk_dev *dev, int failed)
{
    __atomic_store_n(&dev->failed, failed != 0, __ATOMIC_RELAXED);
}
