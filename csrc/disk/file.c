/* file.c — a regular file or block device through the serving engine's io_uring.
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

#include "disk/disk.h"
#include "util/iov.h"

#define BOUNCE_ALIGN 4096

struct file_disk {
    struct dp_disk base;
    int fd;
    unsigned fixed;              /* DP_FILE_FIXED_*: what it asks the engines to register */
};

/* The file on one engine: where its SQEs go and where its completions are reported. */
struct file_engine {
    const struct file_disk *disk;
    const struct dp_disk_env *env;
    int fd;                      /* what its SQEs name: the fd, or its fixed-file slot */
    int fixed_file;              /* fd is a slot of the ring's file table (IOSQE_FIXED_FILE) */
};

static inline void prep_file(const struct file_engine *fe, struct io_uring_sqe *sqe)
{
    if (fe->fixed_file)
        sqe->flags |= IOSQE_FIXED_FILE;
}

static int iov_aligned(const struct iovec *iov, unsigned cnt, uint32_t align)
{
    if (align <= 1)
        return 1;
    for (unsigned i = 0; i < cnt; i++)
        if (((uintptr_t)iov[i].iov_base | iov[i].iov_len) & (align - 1))
            return 0;
    return 1;
}

static int setup_bounce(struct dp_disk_io *io)
{
    size_t len = (io->nbytes + BOUNCE_ALIGN - 1) & ~(size_t)(BOUNCE_ALIGN - 1);
    io->bounce = aligned_alloc(BOUNCE_ALIGN, len);
    if (!io->bounce)
        return -ENOMEM;
    if (io->op == DP_DISK_WRITE)
        iov_to_buf(io->iov, io->iovcnt, 0, io->bounce, io->nbytes);
    io->bounce_iov = (struct iovec){ .iov_base = io->bounce, .iov_len = io->nbytes };
    io->xfer_iov = &io->bounce_iov;
    io->xfer_cnt = 1;
    io->flags |= DP_IO_F_BOUNCED;
    return 0;
}

/* The bounce buffer is the disk's: it goes before the request is reported. */
static void file_finish(const struct file_engine *fe, struct dp_disk_io *io, int result)
{
    free(io->bounce);
    io->bounce = NULL;
    free(io->xfer_copy);
    io->xfer_copy = NULL;
    disk_complete(fe->env, io, result);
}

static void submit_rw(const struct file_engine *fe, struct dp_disk_io *io)
{
    struct io_uring_sqe *sqe = disk_get_sqe(fe->env->ring);
    uint64_t offset = io->offset + io->done;
    /* One iovec in a registered buffer (the engine said which; a bounce buffer never is):
     * READ_FIXED / WRITE_FIXED, which skip pinning its pages. The rest of a short transfer
     * is still inside that buffer. */
    int fixed = io->buf_index >= 0 && io->xfer_cnt == 1 && !io->bounce;
    if (io->op == DP_DISK_READ) {
        if (fixed)
            io_uring_prep_read_fixed(sqe, fe->fd, io->xfer_iov[0].iov_base,
                                     (unsigned)io->xfer_iov[0].iov_len, offset, io->buf_index);
        else
            io_uring_prep_readv(sqe, fe->fd, io->xfer_iov, io->xfer_cnt, offset);
    } else {
        if (fixed)
            io_uring_prep_write_fixed(sqe, fe->fd, io->xfer_iov[0].iov_base,
                                      (unsigned)io->xfer_iov[0].iov_len, offset, io->buf_index);
        else
            io_uring_prep_writev(sqe, fe->fd, io->xfer_iov, io->xfer_cnt, offset);
        if (io->flags & DP_IO_F_FUA)
            sqe->rw_flags = RWF_DSYNC;   /* write-through: durable before completion */
    }
    prep_file(fe, sqe);
    disk_set_cqe(sqe, &io->cqe);
}

static void submit_range(const struct file_engine *fe, struct dp_disk_range *r)
{
    struct io_uring_sqe *sqe = disk_get_sqe(fe->env->ring);
    io_uring_prep_fallocate(sqe, fe->fd, r->disk_op, r->offset, r->len);
    prep_file(fe, sqe);
    disk_set_cqe(sqe, &r->cqe);
}

static void rw_done(struct dp_disk_cqe *cqe, int res)
{
    struct dp_disk_io *io = container_of(cqe, struct dp_disk_io, cqe);
    const struct file_engine *fe = io->io_state;
    if (res == -EAGAIN || res == -EINTR) {
        submit_rw(fe, io);
        return;
    }
    if (res == -EINVAL && fe->disk->base.info.dio_align && !io->bounce && io->done == 0) {
        /* O_DIRECT refused the guest's buffers: retry once through an aligned copy. */
        if (setup_bounce(io) == 0) {
            submit_rw(fe, io);
            return;
        }
    }
    if (res <= 0) {   /* an error, or end of file inside the disk (it shrank under us) */
        file_finish(fe, io, -EIO);
        return;
    }
    io->done += (uint64_t)res;
    if (io->done < io->nbytes) {
        /* The rest, from a copy of the guest's iovecs: they are the submitter's (which reads
         * them again after completion, e.g. to log what a read wrote). */
        if (io->xfer_iov == io->iov) {
            io->xfer_copy = malloc(io->xfer_cnt * sizeof(struct iovec));
            if (!io->xfer_copy) {
                file_finish(fe, io, -EIO);
                return;
            }
            memcpy(io->xfer_copy, io->iov, io->xfer_cnt * sizeof(struct iovec));
            io->xfer_iov = io->xfer_copy;
        }
        iov_advance(&io->xfer_iov, &io->xfer_cnt, (size_t)res);
        submit_rw(fe, io);
        return;
    }
    if (io->op == DP_DISK_READ && io->bounce)
        iov_from_buf(io->iov, io->iovcnt, 0, io->bounce, io->nbytes);
    file_finish(fe, io, 0);
}

static void flush_done(struct dp_disk_cqe *cqe, int res)
{
    struct dp_disk_io *io = container_of(cqe, struct dp_disk_io, cqe);
    file_finish(io->io_state, io, res < 0 ? -EIO : 0);
}

static void range_done(struct dp_disk_cqe *cqe, int res)
{
    struct dp_disk_range *r = container_of(cqe, struct dp_disk_range, cqe);
    struct dp_disk_io *io = r->io;
    const struct file_engine *fe = io->io_state;
    if (res == -EOPNOTSUPP && (r->disk_op & FALLOC_FL_ZERO_RANGE)) {
        /* No ZERO_RANGE here (tmpfs, some block devices): a hole reads back zeroes too. */
        r->disk_op = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE;
        submit_range(fe, r);
        return;
    }
    if (res == -EOPNOTSUPP && io->op == DP_DISK_DISCARD)
        res = 0;   /* discard is a hint; a disk that cannot may ignore it */
    if (res < 0)
        io->result = -EIO;
    if (--io->pending == 0)
        file_finish(fe, io, io->result);
}

static void file_submit(void *state, void *qstate, struct dp_disk_io *io)
{
    const struct file_engine *fe = state;
    io->io_state = (void *)fe;
    io->done = 0;
    io->result = 0;
    io->bounce = NULL;
    io->xfer_copy = NULL;
    switch (io->op) {
    case DP_DISK_READ:
    case DP_DISK_WRITE:
        io->xfer_iov = io->iov;
        io->xfer_cnt = io->iovcnt;
        io->cqe.done = rw_done;
        if (!iov_aligned(io->iov, io->iovcnt, fe->disk->base.info.dio_align) && setup_bounce(io)) {
            file_finish(fe, io, -EIO);
            return;
        }
        io->pending = 1;
        submit_rw(fe, io);
        break;
    case DP_DISK_FLUSH: {
        struct io_uring_sqe *sqe = disk_get_sqe(fe->env->ring);
        io_uring_prep_fsync(sqe, fe->fd, IORING_FSYNC_DATASYNC);
        prep_file(fe, sqe);
        io->cqe.done = flush_done;
        disk_set_cqe(sqe, &io->cqe);
        io->pending = 1;
        break;
    }
    case DP_DISK_DISCARD:
    case DP_DISK_WRITE_ZEROES:
        io->pending = io->nranges;
        for (unsigned i = 0; i < io->nranges; i++) {
            struct dp_disk_range *r = &io->ranges[i];
            int unmap = io->op == DP_DISK_DISCARD || r->unmap;
            r->disk_op = FALLOC_FL_KEEP_SIZE | (unmap ? FALLOC_FL_PUNCH_HOLE : FALLOC_FL_ZERO_RANGE);
            r->cqe.done = range_done;
            submit_range(fe, r);
        }
        break;
    default:
        file_finish(fe, io, -EOPNOTSUPP);
        break;
    }
}

static int file_open(struct dp_disk *disk, const struct dp_disk_env *env, void **state)
{
    struct file_engine *fe = malloc(sizeof(*fe));
    if (!fe)
        return -ENOMEM;
    const struct file_disk *f = (const struct file_disk *)disk;
    *fe = (struct file_engine){ .disk = f, .env = env, .fd = f->fd };
    if ((f->fixed & DP_FILE_FIXED_FILE) && env->files) {
        /* refused (an old kernel, a full table): the fd itself, as before */
        int slot = env->files->get(env->files->arg, f->fd);
        if (slot >= 0) {
            fe->fd = slot;
            fe->fixed_file = 1;
        }
    }
    *state = fe;
    return 0;
}

/* Every request completed before this is called, so none of its SQEs is left on the ring. */
static int file_close(void *state)
{
    struct file_engine *fe = state;
    if (fe->fixed_file)
        fe->env->files->put(fe->env->files->arg, fe->fd);
    free(fe);
    return 0;
}

static void file_free(struct dp_disk *disk)
{
    free(disk);   /* the fd is the caller's */
}

static const struct dp_disk_ops file_ops = {
    .name = "file", .free = file_free,
    .open = file_open, .close = file_close, .submit = file_submit,
};

struct dp_disk *dp_file_disk_new(int fd, const struct dp_disk_info *info, int *err)
{
    if (fd < 0) {
        *err = -EBADF;
        return NULL;
    }
    struct file_disk *f = calloc(1, sizeof(*f));
    if (!f) {
        *err = -ENOMEM;
        return NULL;
    }
    f->base.ops = &file_ops;
    f->base.info = *info;
    f->base.info.flags |= DP_DISK_F_FLUSH | DP_DISK_F_DISCARD | DP_DISK_F_WRITE_ZEROES;
    f->fd = fd;
    f->fixed = DP_FILE_FIXED_BUFFERS | DP_FILE_FIXED_FILE;
    f->base.ring_flags = DISK_RING_FIXED_BUFFERS;
    *err = 0;
    return &f->base;
}

int dp_file_disk_set_fixed(struct dp_disk *disk, unsigned what)
{
    if (disk->ops != &file_ops || (what & ~(unsigned)(DP_FILE_FIXED_BUFFERS | DP_FILE_FIXED_FILE)))
        return -EINVAL;
    struct file_disk *f = (struct file_disk *)disk;
    f->fixed = what;
    f->base.ring_flags = (what & DP_FILE_FIXED_BUFFERS) ? DISK_RING_FIXED_BUFFERS : 0;
    return 0;
}
