/* file.c — a regular file or block device through io_uring.
 *
 * READ/WRITE are readv/writev straight on guest memory (zero copy); only buffers that
 * O_DIRECT cannot take (misaligned) go through an aligned bounce buffer. FLUSH is
 * fdatasync; DISCARD and WRITE_ZEROES are fallocate, one operation per range.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stdlib.h>
#include <string.h>

#include "engine/engine.h"

#define BOUNCE_ALIGN 4096

static int iov_aligned(const struct iovec *iov, unsigned cnt, uint32_t align)
{
    if (align <= 1)
        return 1;
    for (unsigned i = 0; i < cnt; i++)
        if (((uintptr_t)iov[i].iov_base | iov[i].iov_len) & (align - 1))
            return 0;
    return 1;
}

static int setup_bounce(struct dp_req *req)
{
    size_t len = (req->nbytes + BOUNCE_ALIGN - 1) & ~(size_t)(BOUNCE_ALIGN - 1);
    req->bounce = aligned_alloc(BOUNCE_ALIGN, len);
    if (!req->bounce)
        return -ENOMEM;
    if (req->type == VIRTIO_BLK_T_OUT)
        iov_to_buf(req->iov, req->iovcnt, 0, req->bounce, req->nbytes);
    req->bounce_iov = (struct iovec){ .iov_base = req->bounce, .iov_len = req->nbytes };
    req->xfer_iov = &req->bounce_iov;
    req->xfer_cnt = 1;
    __atomic_store_n(&req->vq->stats.bounced, req->vq->stats.bounced + 1, __ATOMIC_RELAXED);
    return 0;
}

static void submit_rw(struct dp_engine *engine, struct dp_req *req)
{
    const struct dp_disk *disk = req->vq->disk;
    struct io_uring_sqe *sqe = engine_get_sqe(engine);
    uint64_t offset = req->offset + req->done;
    if (req->type == VIRTIO_BLK_T_IN) {
        io_uring_prep_readv(sqe, disk->p.fd, req->xfer_iov, req->xfer_cnt, offset);
    } else {
        io_uring_prep_writev(sqe, disk->p.fd, req->xfer_iov, req->xfer_cnt, offset);
        if (!dp_disk_get_writeback(disk))
            sqe->rw_flags = RWF_DSYNC;   /* write-through: durable before completion */
    }
    io_uring_sqe_set_data64(sqe, (uintptr_t)req | TAG_REQ);
}

static void submit_range(struct dp_engine *engine, struct range_op *r)
{
    struct io_uring_sqe *sqe = engine_get_sqe(engine);
    io_uring_prep_fallocate(sqe, r->req->vq->disk->p.fd, r->mode, r->offset, r->len);
    io_uring_sqe_set_data64(sqe, (uintptr_t)r | TAG_RANGE);
}

void file_submit(struct dp_engine *engine, struct dp_req *req)
{
    const struct dp_disk *disk = req->vq->disk;
    switch (req->type) {
    case VIRTIO_BLK_T_IN:
    case VIRTIO_BLK_T_OUT:
        req->xfer_iov = req->iov;
        req->xfer_cnt = req->iovcnt;
        if (disk->p.direct && !iov_aligned(req->iov, req->iovcnt, disk->p.dio_align) &&
            setup_bounce(req)) {
            req_complete(req, VIRTIO_BLK_S_IOERR);
            return;
        }
        req->pending = 1;
        submit_rw(engine, req);
        break;
    case VIRTIO_BLK_T_FLUSH: {
        struct io_uring_sqe *sqe = engine_get_sqe(engine);
        io_uring_prep_fsync(sqe, disk->p.fd, IORING_FSYNC_DATASYNC);
        io_uring_sqe_set_data64(sqe, (uintptr_t)req | TAG_REQ);
        req->pending = 1;
        break;
    }
    case VIRTIO_BLK_T_DISCARD:
    case VIRTIO_BLK_T_WRITE_ZEROES:
        req->pending = req->nranges;
        for (unsigned i = 0; i < req->nranges; i++) {
            struct range_op *r = &req->ranges[i];
            int unmap = req->type == VIRTIO_BLK_T_DISCARD || r->unmap;
            r->mode = FALLOC_FL_KEEP_SIZE | (unmap ? FALLOC_FL_PUNCH_HOLE : FALLOC_FL_ZERO_RANGE);
            submit_range(engine, r);
        }
        break;
    default:
        req_complete(req, VIRTIO_BLK_S_UNSUPP);
        break;
    }
}

static void range_done(struct dp_engine *engine, struct range_op *r, int res)
{
    struct dp_req *req = r->req;
    if (res == -EOPNOTSUPP && (r->mode & FALLOC_FL_ZERO_RANGE)) {
        /* No ZERO_RANGE here (tmpfs, some block devices): a hole reads back zeroes too. */
        r->mode = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE;
        submit_range(engine, r);
        return;
    }
    if (res == -EOPNOTSUPP && req->type == VIRTIO_BLK_T_DISCARD)
        res = 0;   /* discard is a hint; a disk that cannot may ignore it */
    if (res < 0)
        req->result = VIRTIO_BLK_S_IOERR;
    if (--req->pending == 0)
        req_complete(req, req->result);
}

static void rw_done(struct dp_engine *engine, struct dp_req *req, int res)
{
    const struct dp_disk *disk = req->vq->disk;
    if (res == -EAGAIN || res == -EINTR) {
        submit_rw(engine, req);
        return;
    }
    if (res == -EINVAL && disk->p.direct && !req->bounce && req->done == 0) {
        /* O_DIRECT refused the guest's buffers: retry once through an aligned copy. */
        if (setup_bounce(req) == 0) {
            submit_rw(engine, req);
            return;
        }
    }
    if (res <= 0) {   /* an error, or end of file inside the disk (it shrank under us) */
        req_complete(req, VIRTIO_BLK_S_IOERR);
        return;
    }
    req->done += (uint64_t)res;
    if (req->done < req->nbytes) {
        iov_advance(&req->xfer_iov, &req->xfer_cnt, (size_t)res);
        submit_rw(engine, req);
        return;
    }
    if (req->type == VIRTIO_BLK_T_IN && req->bounce)
        iov_from_buf(req->iov, req->iovcnt, 0, req->bounce, req->nbytes);
    req_complete(req, VIRTIO_BLK_S_OK);
}

void file_complete(struct dp_engine *engine, uint64_t user_data, int res)
{
    void *ptr = (void *)(uintptr_t)(user_data & ~(uint64_t)TAG_MASK);
    if ((user_data & TAG_MASK) == TAG_RANGE) {
        range_done(engine, ptr, res);
        return;
    }
    struct dp_req *req = ptr;
    if (req->type == VIRTIO_BLK_T_FLUSH)
        req_complete(req, res < 0 ? VIRTIO_BLK_S_IOERR : VIRTIO_BLK_S_OK);
    else
        rw_done(engine, req, res);
}
