/* file.c — a regular file or block device through the serving engine's io_uring.
 *
 * READ/WRITE are readv/writev straight on guest memory (zero copy), or READ_FIXED /
 * WRITE_FIXED where the engine registered that memory; only buffers that O_DIRECT cannot take
 * (misaligned) go through an aligned bounce buffer. FLUSH is fdatasync; DISCARD and
 * WRITE_ZEROES are fallocate, one operation per range.
 *
 * With iopoll (a device with poll queues: NVMe's poll_queues), reads and writes go on a
 * ring of the disk's own per engine, made with IORING_SETUP_IOPOLL (polled and interrupt-driven
 * I/O cannot share a ring): the engine keeps calling this disk's poll hook, which reaps it,
 * and does not sleep while any of them is in flight. Everything else stays on the engine's.
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
    int iopoll;                  /* reads and writes on a polled ring */
    int iopoll_state;            /* 1: a polled ring runs; -errno: the kernel refused one */
};

#define IOPOLL_ENTRIES 256
#define IO_NOT_POLLED 1          /* disk_flags: the polled ring refused it; the engine's ring */

/* The file on one engine: where its SQEs go and where its completions are reported. */
struct file_engine {
    const struct file_disk *disk;
    const struct dp_disk_env *env;
    int fd;                      /* what its SQEs name: the fd, or its fixed-file slot */
    int fixed_file;              /* fd is a slot of the ring's file table (IOSQE_FIXED_FILE) */
    int polled;                  /* reads and writes go on pring */
    struct io_uring pring;       /* IORING_SETUP_IOPOLL; the file is its fixed file 0 */
    unsigned pinflight;          /* SQEs on pring not reaped yet */
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
    io->flags = (io->flags | DP_IO_F_BOUNCED) & ~(unsigned)DP_IO_F_FIXED;   /* never registered */
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

static void submit_rw(struct file_engine *fe, struct dp_disk_io *io)
{
    if (fe->polled && !(io->disk_flags & IO_NOT_POLLED)) {
        /* The polled ring has its own file table (the file at 0) and no registered buffers. */
        struct io_uring_sqe *sqe = disk_get_sqe(&fe->pring);
        uint64_t offset = io->offset + io->done;
        if (io->op == DP_DISK_READ) {
            io_uring_prep_readv(sqe, 0, io->xfer_iov, io->xfer_cnt, offset);
        } else {
            io_uring_prep_writev(sqe, 0, io->xfer_iov, io->xfer_cnt, offset);
            if (io->flags & DP_IO_F_FUA)
                sqe->rw_flags = RWF_DSYNC;
        }
        sqe->flags |= IOSQE_FIXED_FILE;
        disk_set_cqe(sqe, &io->cqe);
        io->flags |= DP_IO_F_POLLED;
        fe->pinflight++;
        return;
    }
    struct io_uring_sqe *sqe = disk_get_sqe(fe->env->ring);
    uint64_t offset = io->offset + io->done;
    /* One iovec in a registered buffer (the engine said which; a bounce buffer never is):
     * READ_FIXED / WRITE_FIXED, which skip pinning its pages. The rest of a short transfer
     * is still inside that buffer. */
    int fixed = io->buf_index >= 0 && io->xfer_cnt == 1 && !io->bounce;
    if (fixed)
        io->flags |= DP_IO_F_FIXED;
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
    struct file_engine *fe = io->io_state;
    if (res == -EAGAIN || res == -EINTR) {
        submit_rw(fe, io);
        return;
    }
    if (res == -EOPNOTSUPP && (io->flags & DP_IO_F_POLLED) && !(io->disk_flags & IO_NOT_POLLED)) {
        /* The kernel cannot poll this one (ext4 refuses polled reads of unwritten extents):
         * again, interrupt-driven, on the engine's ring. */
        io->disk_flags |= IO_NOT_POLLED;
        io->flags &= ~(unsigned)(DP_IO_F_POLLED | DP_IO_F_FIXED);
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
    struct file_engine *fe = state;
    io->io_state = (void *)fe;
    io->disk_flags = 0;
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
    struct file_disk *f = (struct file_disk *)disk;
    *fe = (struct file_engine){ .disk = f, .env = env, .fd = f->fd };
    if (f->iopoll) {
        /* made here, on the engine thread that submits to it and reaps it */
        struct io_uring_params params = { .flags = IORING_SETUP_IOPOLL | IORING_SETUP_SINGLE_ISSUER };
        int rc = io_uring_queue_init_params(IOPOLL_ENTRIES, &fe->pring, &params);
        if (rc == -EINVAL) {   /* a kernel without SINGLE_ISSUER */
            params = (struct io_uring_params){ .flags = IORING_SETUP_IOPOLL };
            rc = io_uring_queue_init_params(IOPOLL_ENTRIES, &fe->pring, &params);
        }
        if (rc == 0) {
            rc = io_uring_register_files(&fe->pring, &f->fd, 1);
            if (rc < 0)
                io_uring_queue_exit(&fe->pring);
        }
        fe->polled = rc == 0;
        __atomic_store_n(&f->iopoll_state, rc < 0 ? rc : 1, __ATOMIC_RELAXED);
    }
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
    if (fe->polled)
        io_uring_queue_exit(&fe->pring);
    if (fe->fixed_file)
        fe->env->files->put(fe->env->files->arg, fe->fd);
    free(fe);
    return 0;
}

static void file_free(struct dp_disk *disk)
{
    free(disk);   /* the fd is the caller's */
}

/* The polled ring: submit what is queued and poll the device once for completions. */
static unsigned file_poll(void *state, uint64_t now)
{
    struct file_engine *fe = state;
    if (!fe->polled || (!fe->pinflight && !io_uring_sq_ready(&fe->pring)))
        return 0;
    io_uring_submit_and_get_events(&fe->pring);
    struct io_uring_cqe *cqe;
    unsigned head, n = 0;
    io_uring_for_each_cqe(&fe->pring, head, cqe) {
        struct dp_disk_cqe *done = (struct dp_disk_cqe *)(uintptr_t)cqe->user_data;
        fe->pinflight--;
        done->done(done, cqe->res);   /* may queue a resubmission: SQ, not this CQ */
        n++;
    }
    io_uring_cq_advance(&fe->pring, n);
    return n;
}

static int file_busy(void *state)
{
    const struct file_engine *fe = state;
    return fe->polled && fe->pinflight > 0;
}

static const struct dp_disk_ops file_ops = {
    .name = "file", .free = file_free,
    .open = file_open, .close = file_close, .submit = file_submit,
};

/* With iopoll: the same, plus the hooks that reap the polled ring (an engine calls a poll hook
 * after every reap, so a disk without a polled ring does not have one). */
static const struct dp_disk_ops file_iopoll_ops = {
    .name = "file", .free = file_free,
    .open = file_open, .close = file_close, .submit = file_submit,
    .poll = file_poll, .busy = file_busy,
};

static int is_file_disk(const struct dp_disk *disk)
{
    return disk->ops == &file_ops || disk->ops == &file_iopoll_ops;
}

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

int dp_file_disk_set_iopoll(struct dp_disk *disk, int on)
{
    if (!is_file_disk(disk) || !disk->info.dio_align)
        return -EINVAL;   /* polled I/O is O_DIRECT I/O */
    ((struct file_disk *)disk)->iopoll = on != 0;
    disk->ops = on ? &file_iopoll_ops : &file_ops;
    return 0;
}

int dp_file_disk_iopoll_state(const struct dp_disk *disk)
{
    if (!is_file_disk(disk))
        return 0;
    return __atomic_load_n(&((const struct file_disk *)disk)->iopoll_state, __ATOMIC_RELAXED);
}

int dp_file_disk_set_fixed(struct dp_disk *disk, unsigned what)
{
    if (!is_file_disk(disk) || (what & ~(unsigned)(DP_FILE_FIXED_BUFFERS | DP_FILE_FIXED_FILE)))
        return -EINVAL;
    struct file_disk *f = (struct file_disk *)disk;
    f->fixed = what;
    f->base.ring_flags = (what & DP_FILE_FIXED_BUFFERS) ? DISK_RING_FIXED_BUFFERS : 0;
    return 0;
}
