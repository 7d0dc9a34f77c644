/* rbd.c — a Ceph RBD image through librbd's async API.
 *
 * One rados connection and one image handle per disk, shared by all its queues. A request
 * goes out from the queue's engine thread as rbd_aio_readv / rbd_aio_writev straight on the
 * guest's iovecs (the iovec array lives in the request slot, which outlives the request), or
 * as rbd_aio_flush / rbd_aio_discard / rbd_aio_write_zeroes (one per range).
 *
 * librbd completes on its own threads. Its callback pushes the request onto a lock-free list
 * of the submitting engine's state (a Treiber stack: CAS push, exchange-all drain, so no ABA)
 * and writes that state's eventfd only when the list was empty. The engine keeps one
 * IORING_OP_READ of the eventfd on its ring while any request of the disk is in flight there;
 * when the read completes, the engine thread takes the whole list and completes the requests
 * itself. So completions come back to the thread that submitted them, batched, with no lock on
 * our side, and waiting for them is the same io_uring_enter that waits for guest kicks.
 *
 * A write the guest wants durable (DP_IO_F_FUA: it turned its write cache off) is followed by
 * rbd_aio_flush before it completes when librbd's cache may hold it; FLUSH is rbd_aio_flush.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <rbd/librbd.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "disk/disk.h"
#include "disk/dp_rbd.h"

struct rbd_disk {
    struct dp_disk base;
    rados_t cluster;
    rados_ioctx_t ioctx;
    rbd_image_t image;
    struct dp_rbd_info info;      /* errors / last_error: atomics, from every engine */
    uint32_t close_wait_ms;
};

/* The disk on one engine. The first two fields are shared with librbd's callback threads; the
 * rest belong to the engine thread. */
struct rbd_engine {
    struct dp_disk_io *done;      /* completed by librbd, not yet reaped (atomic) */
    unsigned in_callback;         /* callbacks that may still touch this state (atomic) */
    int efd;                      /* written by a callback that found done empty */

    _Alignas(64) struct rbd_disk *disk;   /* a cache line of their own */
    const struct dp_disk_env *env;
    unsigned inflight;            /* requests submitted here and not completed */
    int armed;                    /* the eventfd read is on the ring */
    int cancelling;               /* close asked the ring to remove it */
    uint64_t efd_value;
    struct dp_disk_cqe efd_cqe;
};

/* ---- librbd's threads ---- */

static void push_done(struct rbd_engine *re, struct dp_disk_io *io)
{
    struct dp_disk_io *head = __atomic_load_n(&re->done, __ATOMIC_RELAXED);
    do
        io->link = head;
    while (!__atomic_compare_exchange_n(&re->done, &head, io, 1, __ATOMIC_RELEASE,
                                        __ATOMIC_RELAXED));
    if (!head) {
        /* The list was empty: the engine may be asleep on the eventfd read. A full counter
         * (impossible here: it is read after every wakeup) would still leave it readable. */
        uint64_t one = 1;
        ssize_t rc = write(re->efd, &one, sizeof(one));
        (void)rc;
    }
}

/* A request that is one librbd operation: read, write, flush. */
static void single_done(rbd_completion_t c, void *arg)
{
    struct dp_disk_io *io = arg;
    struct rbd_engine *re = io->io_state;
    /* Counted before the push: once the engine has reaped io it may close the state, and
     * waits for this count to drop first (the eventfd write comes after the push). */
    __atomic_add_fetch(&re->in_callback, 1, __ATOMIC_SEQ_CST);
    ssize_t r = rbd_aio_get_return_value(c);
    rbd_aio_release(c);
    io->result = r < 0 ? (int)r : 0;
    if (r >= 0 && io->op == DP_DISK_READ)
        io->done = (uint64_t)r;   /* a read answers with the bytes it read */
    push_done(re, io);
    __atomic_sub_fetch(&re->in_callback, 1, __ATOMIC_RELEASE);
}

static void note_range_result(struct dp_disk_io *io, int r)
{
    int none = 0;
    if (r < 0)   /* the first error wins */
        __atomic_compare_exchange_n(&io->result, &none, r, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
}

/* One range of a DISCARD / WRITE_ZEROES: the last one to finish reports the request. */
static void range_done(rbd_completion_t c, void *arg)
{
    struct dp_disk_range *range = arg;
    struct dp_disk_io *io = range->io;
    struct rbd_engine *re = io->io_state;
    __atomic_add_fetch(&re->in_callback, 1, __ATOMIC_SEQ_CST);
    ssize_t r = rbd_aio_get_return_value(c);
    rbd_aio_release(c);
    note_range_result(io, (int)(r < 0 ? r : 0));
    if (__atomic_sub_fetch(&io->pending, 1, __ATOMIC_ACQ_REL) == 0)
        push_done(re, io);
    __atomic_sub_fetch(&re->in_callback, 1, __ATOMIC_RELEASE);
}

/* ---- the engine's thread ---- */

static void count_error(struct rbd_disk *d, int r)
{
    __atomic_add_fetch(&d->info.errors, 1, __ATOMIC_RELAXED);
    __atomic_store_n(&d->info.last_error, r, __ATOMIC_RELAXED);
}

static void finish(struct rbd_engine *re, struct dp_disk_io *io, int result)
{
    if (result < 0)
        count_error(re->disk, result);
    re->inflight--;
    disk_complete(re->env, io, result);
}

static void arm(struct rbd_engine *re)
{
    struct io_uring_sqe *sqe = disk_get_sqe(re->env->ring);
    io_uring_prep_read(sqe, re->efd, &re->efd_value, sizeof(re->efd_value), (uint64_t)-1);
    disk_set_cqe(sqe, &re->efd_cqe);
    re->armed = 1;
}

static int start_flush(struct rbd_engine *re, struct dp_disk_io *io)
{
    rbd_completion_t c;
    int r = rbd_aio_create_completion(io, single_done, &c);
    if (r < 0)
        return r;
    r = rbd_aio_flush(re->disk->image, c);
    if (r < 0)
        rbd_aio_release(c);   /* refused at submission: the callback never runs */
    return r;
}

static int start_rw(struct rbd_engine *re, struct dp_disk_io *io)
{
    rbd_completion_t c;
    int r = rbd_aio_create_completion(io, single_done, &c);
    if (r < 0)
        return r;
    if (io->op == DP_DISK_READ)
        r = rbd_aio_readv(re->disk->image, io->iov, (int)io->iovcnt, io->offset, c);
    else
        r = rbd_aio_writev(re->disk->image, io->iov, (int)io->iovcnt, io->offset, c);
    if (r < 0)
        rbd_aio_release(c);
    return r;
}

/* Every range of io, each its own librbd operation. A range librbd refuses counts as done
 * with an error, and so do the ones after it, which are not sent. */
static void start_ranges(struct rbd_engine *re, struct dp_disk_io *io)
{
    unsigned n = io->nranges;
    io->pending = n;
    for (unsigned i = 0; i < n; i++) {
        struct dp_disk_range *range = &io->ranges[i];
        range->io = io;
        rbd_completion_t c;
        int r = rbd_aio_create_completion(range, range_done, &c);
        if (r == 0) {
            if (io->op == DP_DISK_DISCARD)
                r = rbd_aio_discard(re->disk->image, range->offset, range->len, c);
            else   /* UNMAP may deallocate; without it the extent stays allocated (as QEMU) */
                r = rbd_aio_write_zeroes(re->disk->image, range->offset, range->len, c,
                                         range->unmap ? 0 : RBD_WRITE_ZEROES_FLAG_THICK_PROVISION,
                                         0);
            if (r < 0)
                rbd_aio_release(c);
        }
        if (r < 0) {
            note_range_result(io, r);
            if (__atomic_sub_fetch(&io->pending, n - i, __ATOMIC_ACQ_REL) == 0)
                push_done(re, io);   /* reaped like the others, through the eventfd */
            return;
        }
    }
}

/* librbd's answer for io: complete it, or take its next step. */
static void reaped(struct rbd_engine *re, struct dp_disk_io *io)
{
    int r = io->result;
    if (io->op == DP_DISK_READ) {
        /* a short read: the image shrank under us (the capacity the guest knows is older) */
        finish(re, io, r < 0 ? r : io->done == io->nbytes ? 0 : -EIO);
        return;
    }
    if (io->op == DP_DISK_WRITE && r == 0 && (io->flags & DP_IO_F_FUA) &&
        re->disk->info.volatile_cache && io->done == 0) {
        /* librbd's cache may have acknowledged it: durable only after a flush */
        io->done = io->nbytes;
        io->result = 0;
        r = start_flush(re, io);
        if (r == 0)
            return;
    }
    finish(re, io, r < 0 ? r : 0);
}

static void efd_done(struct dp_disk_cqe *cqe, int res)
{
    struct rbd_engine *re = container_of(cqe, struct rbd_engine, efd_cqe);
    re->armed = 0;
    struct dp_disk_io *list = __atomic_exchange_n(&re->done, NULL, __ATOMIC_ACQUIRE);
    struct dp_disk_io *fifo = NULL;
    while (list) {   /* the stack is newest first: complete in the order librbd finished */
        struct dp_disk_io *next = list->link;
        list->link = fifo;
        fifo = list;
        list = next;
    }
    while (fifo) {
        struct dp_disk_io *next = fifo->link;
        reaped(re, fifo);
        fifo = next;
    }
    if (re->inflight && !re->cancelling)
        arm(re);
}

static void rbd_submit(void *state, void *qstate, struct dp_disk_io *io)
{
    struct rbd_engine *re = state;
    const struct dp_disk_info *info = &re->disk->base.info;
    io->io_state = re;
    io->result = 0;
    io->done = 0;
    re->inflight++;

    int writes = io->op != DP_DISK_READ && io->op != DP_DISK_FLUSH;
    if (writes && (info->flags & DP_DISK_F_READ_ONLY)) {
        finish(re, io, -EROFS);
        return;
    }
    /* librbd drops the part of a write past the end without a word: check here */
    if (io->op == DP_DISK_READ || io->op == DP_DISK_WRITE) {
        if (io->offset > info->size_bytes || io->nbytes > info->size_bytes - io->offset) {
            finish(re, io, -EIO);
            return;
        }
    } else if (io->op == DP_DISK_DISCARD || io->op == DP_DISK_WRITE_ZEROES) {
        for (unsigned i = 0; i < io->nranges; i++) {
            const struct dp_disk_range *range = &io->ranges[i];
            if (range->offset > info->size_bytes || range->len > info->size_bytes - range->offset) {
                finish(re, io, -EIO);
                return;
            }
        }
        if (!io->nranges) {
            finish(re, io, 0);
            return;
        }
    } else if (io->op != DP_DISK_FLUSH) {
        finish(re, io, -EOPNOTSUPP);
        return;
    }

    if (!re->armed)
        arm(re);
    int r = 0;
    switch (io->op) {
    case DP_DISK_READ:
    case DP_DISK_WRITE:
        r = start_rw(re, io);
        break;
    case DP_DISK_FLUSH:
        r = start_flush(re, io);
        break;
    default:
        start_ranges(re, io);
        break;
    }
    if (r < 0)
        finish(re, io, r);
}

static int rbd_engine_open(struct dp_disk *disk, const struct dp_disk_env *env, void **state)
{
    struct rbd_engine *re = calloc(1, sizeof(*re));
    if (!re)
        return -ENOMEM;
    re->efd = eventfd(0, EFD_CLOEXEC);
    if (re->efd < 0) {
        int rc = -errno;
        free(re);
        return rc;
    }
    re->disk = (struct rbd_disk *)disk;
    re->env = env;
    re->efd_cqe.done = efd_done;
    *state = re;
    return 0;
}

/* Every request completed (the queues drained), but the eventfd read may still be on the
 * ring, and the callback that pushed the last request may still be on its way out. */
static int rbd_engine_close(void *state)
{
    struct rbd_engine *re = state;
    if (re->inflight)
        return -EBUSY;
    if (re->armed) {
        if (!re->cancelling) {
            struct io_uring_sqe *sqe = disk_get_sqe(re->env->ring);
            io_uring_prep_cancel64(sqe, (uintptr_t)&re->efd_cqe, 0);
            io_uring_sqe_set_data64(sqe, DP_CQE_IGNORE);
            re->cancelling = 1;
        }
        return -EBUSY;
    }
    /* A few instructions at most: its eventfd write, then the count. */
    while (__atomic_load_n(&re->in_callback, __ATOMIC_ACQUIRE))
        sched_yield();
    close(re->efd);
    free(re);
    return 0;
}

/* ---- opening and closing ---- */

static void say(struct dp_rbd_params *p, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->error, sizeof(p->error), fmt, ap);
    va_end(ap);
}

static const char *conf_value(rados_t cluster, const char *option, char *buf, size_t len)
{
    if (rados_conf_get(cluster, option, buf, len) < 0)
        snprintf(buf, len, "?");
    return buf;
}

/* Where the conf leaves one of the timeouts at Ceph's default (none, or 300 s to connect), a
 * dead cluster would hang the caller: use ours. */
static int default_timeouts(rados_t cluster, uint32_t timeout_s)
{
    static const struct { const char *name, *ceph_default; } timeouts[] = {
        { "rados_osd_op_timeout", "0" },
        { "rados_mon_op_timeout", "0" },
        { "client_mount_timeout", "300" },
    };
    char value[32], ours[16];
    snprintf(ours, sizeof(ours), "%u", timeout_s);
    for (size_t i = 0; i < sizeof(timeouts) / sizeof(timeouts[0]); i++) {
        if (rados_conf_get(cluster, timeouts[i].name, value, sizeof(value)) < 0)
            continue;
        if (strtod(value, NULL) == strtod(timeouts[i].ceph_default, NULL)) {
            int r = rados_conf_set(cluster, timeouts[i].name, ours);
            if (r < 0)
                return r;
        }
    }
    return 0;
}

static int connect_cluster(struct rbd_disk *d, struct dp_rbd_params *p)
{
    const char *client = p->client ? p->client : "client.admin";
    const char *cluster = p->cluster ? p->cluster : "ceph";
    char keyring[256], mon_host[256], mount[32];
    int r = rados_create2(&d->cluster, cluster, client, 0);
    if (r < 0) {
        d->cluster = NULL;
        say(p, "cannot make a librados handle for %s: %s", client, strerror(-r));
        return r;
    }
    r = rados_conf_read_file(d->cluster, p->conf);
    if (r < 0) {
        if (p->conf)
            say(p, "cannot read the Ceph configuration %s: %s", p->conf, strerror(-r));
        else
            say(p, "no Ceph configuration found ($CEPH_CONF, /etc/ceph/%s.conf, ~/.ceph/%s.conf, "
                "./%s.conf: %s); give conf=PATH", cluster, cluster, cluster, strerror(-r));
        return r;
    }
    if (p->keyring && (r = rados_conf_set(d->cluster, "keyring", p->keyring)) < 0) {
        say(p, "keyring %s: %s", p->keyring, strerror(-r));
        return r;
    }
    if (p->timeout_s && (r = default_timeouts(d->cluster, p->timeout_s)) < 0) {
        say(p, "cannot set the timeouts: %s", strerror(-r));
        return r;
    }
    for (unsigned i = 0; i < p->noptions && i < DP_RBD_MAX_OPTIONS; i++) {
        r = rados_conf_set(d->cluster, p->option_names[i], p->option_values[i]);
        if (r < 0) {
            say(p, "Ceph option %s=%s: %s", p->option_names[i], p->option_values[i],
                r == -ENOENT ? "librados has no such option" : strerror(-r));
            return r;
        }
    }
    r = rados_connect(d->cluster);
    if (r < 0) {
        conf_value(d->cluster, "keyring", keyring, sizeof(keyring));
        conf_value(d->cluster, "mon_host", mon_host, sizeof(mon_host));
        conf_value(d->cluster, "client_mount_timeout", mount, sizeof(mount));
        const char *why = strerror(-r);
        if (r == -ETIMEDOUT)
            why = "no monitor answered in time (client_mount_timeout)";
        else if (r == -EACCES || r == -EPERM)
            why = "authentication refused (wrong key?)";
        else if (r == -ENOENT)
            why = "no key for this client (keyring not found or without that entity)";
        say(p, "cannot connect to Ceph cluster '%s' as %s (conf %s, keyring %s, mon_host %s, "
            "client_mount_timeout %s s): %s", cluster, client, p->conf ? p->conf : "(searched)",
            keyring, mon_host[0] ? mon_host : "(none)", mount, why);
        return r;
    }
    return 0;
}

static int open_image(struct rbd_disk *d, struct dp_rbd_params *p)
{
    char timeout[32];
    int r = rados_ioctx_create(d->cluster, p->pool, &d->ioctx);
    if (r < 0) {
        d->ioctx = NULL;
        say(p, r == -ENOENT ? "pool '%s' does not exist" : "pool '%s': %s", p->pool, strerror(-r));
        return r;
    }
    if (p->pool_namespace)
        rados_ioctx_set_namespace(d->ioctx, p->pool_namespace);
    if (p->read_only || p->snap)
        r = rbd_open_read_only(d->ioctx, p->image, &d->image, p->snap);
    else
        r = rbd_open(d->ioctx, p->image, &d->image, p->snap);
    if (r < 0) {
        d->image = NULL;
        if (r == -ENOENT && p->snap)
            say(p, "image '%s' or its snapshot '%s' does not exist in pool '%s'", p->image, p->snap,
                p->pool);
        else if (r == -ENOENT)
            say(p, "image '%s' does not exist in pool '%s'", p->image, p->pool);
        else if (r == -ETIMEDOUT)
            say(p, "opening image '%s': no answer from the OSDs within rados_osd_op_timeout (%s s)",
                p->image, conf_value(d->cluster, "rados_osd_op_timeout", timeout, sizeof(timeout)));
        else
            say(p, "cannot open image '%s': %s", p->image, strerror(-r));
        return r;
    }
    return 0;
}

/* The cache settings that are in force for this image: pool and image metadata override the
 * client's configuration (rbd config pool/image set), so they are read back, not assumed. */
static void read_cache_config(struct rbd_disk *d)
{
    struct dp_rbd_info *info = &d->info;
    snprintf(info->cache_policy, sizeof(info->cache_policy), "?");
    int max = 0;
    rbd_config_image_list(d->image, NULL, &max);   /* -ERANGE, and the count */
    rbd_config_option_t *opts = max > 0 ? calloc((size_t)max, sizeof(*opts)) : NULL;
    if (opts && rbd_config_image_list(d->image, opts, &max) == 0) {
        for (int i = 0; i < max; i++) {
            if (!strcmp(opts[i].name, "rbd_cache")) {
                info->cache = !strcmp(opts[i].value, "true");
                info->cache_source = (int)opts[i].source;
            } else if (!strcmp(opts[i].name, "rbd_cache_policy")) {
                snprintf(info->cache_policy, sizeof(info->cache_policy), "%s", opts[i].value);
            }
        }
        rbd_config_image_list_cleanup(opts, max);
    } else {
        info->cache = 1;   /* unknown: assume the worst for durability */
    }
    free(opts);
    /* rbd_cache_writethrough_until_flush changes nothing here: after the guest's first flush
     * the cache acknowledges writes early (writearound too), and FUA writes are rare before */
    info->volatile_cache = info->cache && strcmp(info->cache_policy, "writethrough") != 0;
}

static void describe(struct rbd_disk *d)
{
    struct dp_rbd_info *info = &d->info;
    rbd_image_info_t st;
    if (rbd_stat(d->image, &st, sizeof(st)) == 0)
        info->object_size = st.obj_size;
    rbd_get_features(d->image, &info->features);
    if (rbd_get_id(d->image, info->id, sizeof(info->id)) < 0)
        info->id[0] = 0;
    if (rados_cluster_fsid(d->cluster, info->fsid, sizeof(info->fsid)) < 0)
        info->fsid[0] = 0;
    char *addrs = NULL;
    if (rados_getaddrs(d->cluster, &addrs) == 0 && addrs) {
        snprintf(info->addr, sizeof(info->addr), "%s", addrs);
        free(addrs);
    }
    read_cache_config(d);
}

struct closing {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int done;
};

static void close_done(rbd_completion_t c, void *arg)
{
    struct closing *cl = arg;
    rbd_aio_release(c);
    pthread_mutex_lock(&cl->lock);
    cl->done = 1;
    pthread_cond_broadcast(&cl->cond);
    pthread_mutex_unlock(&cl->lock);
}

/* Close the image, waiting at most wait_ms: with the OSDs gone librbd's close (flush, lock
 * release) takes a multiple of the op timeout. 0 when closed; -ETIMEDOUT when it was left to
 * finish on librbd's threads (the connection then stays, for it). */
static int close_image(rbd_image_t image, uint32_t wait_ms)
{
    struct closing *cl = calloc(1, sizeof(*cl));
    rbd_completion_t c;
    if (!cl || rbd_aio_create_completion(cl, close_done, &c) < 0) {
        free(cl);
        return rbd_close(image);
    }
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_mutex_init(&cl->lock, NULL);
    pthread_cond_init(&cl->cond, &attr);
    pthread_condattr_destroy(&attr);
    if (rbd_aio_close(image, c) < 0) {
        rbd_aio_release(c);
        pthread_mutex_destroy(&cl->lock);
        pthread_cond_destroy(&cl->cond);
        free(cl);
        return rbd_close(image);
    }
    struct timespec until;
    clock_gettime(CLOCK_MONOTONIC, &until);
    uint64_t ns = (uint64_t)until.tv_nsec + (uint64_t)wait_ms * 1000000u;
    until.tv_sec += (time_t)(ns / 1000000000u);
    until.tv_nsec = (long)(ns % 1000000000u);
    pthread_mutex_lock(&cl->lock);
    while (!cl->done)
        if (pthread_cond_timedwait(&cl->cond, &cl->lock, &until) == ETIMEDOUT)
            break;
    int done = cl->done;
    pthread_mutex_unlock(&cl->lock);
    if (!done)
        return -ETIMEDOUT;   /* cl stays: the callback will still find it */
    pthread_mutex_destroy(&cl->lock);
    pthread_cond_destroy(&cl->cond);
    free(cl);
    return 0;
}

/* Undo what an open did. A close that did not finish in time leaves the connection to
 * librbd (a leak, on a cluster that is gone), rather than blocking the control plane. */
static void rbd_teardown(struct rbd_disk *d)
{
    int closed = d->image ? close_image(d->image, d->close_wait_ms) : 0;
    if (closed == -ETIMEDOUT)
        return;
    if (d->ioctx)
        rados_ioctx_destroy(d->ioctx);
    if (d->cluster)
        rados_shutdown(d->cluster);
    free(d);
}

static void rbd_free(struct dp_disk *disk)
{
    rbd_teardown((struct rbd_disk *)disk);
}

static const struct dp_disk_ops rbd_ops = {
    .name = "rbd", .free = rbd_free,
    .open = rbd_engine_open, .close = rbd_engine_close, .submit = rbd_submit,
};

struct dp_disk *dp_rbd_disk_new(struct dp_rbd_params *p, int *err)
{
    p->error[0] = 0;
    if (!p->pool || !p->image) {
        say(p, "a pool and an image name are required");
        *err = -EINVAL;
        return NULL;
    }
    struct rbd_disk *d = calloc(1, sizeof(*d));
    if (!d) {
        *err = -ENOMEM;
        return NULL;
    }
    d->close_wait_ms = p->close_wait_ms ? p->close_wait_ms : 30000;
    int r = connect_cluster(d, p);
    if (r == 0)
        r = open_image(d, p);
    uint64_t size = 0;
    if (r == 0 && (r = rbd_get_size(d->image, &size)) < 0)
        say(p, "cannot read the size of image '%s': %s", p->image, strerror(-r));
    if (r == 0 && size < 512) {
        say(p, "image '%s' is smaller than one 512-byte sector", p->image);
        r = -EINVAL;
    }
    if (r < 0) {
        rbd_teardown(d);
        *err = r;
        return NULL;
    }
    describe(d);
    d->info.size = size;
    d->base.ops = &rbd_ops;
    d->base.info = (struct dp_disk_info){
        .size_bytes = size - size % 512,
        .block_size = 512,
        .flags = DP_DISK_F_FLUSH | DP_DISK_F_DISCARD | DP_DISK_F_WRITE_ZEROES |
                 (p->read_only || p->snap ? DP_DISK_F_READ_ONLY : 0),
    };
    *err = 0;
    return &d->base;
}

static const struct rbd_disk *as_rbd(const struct dp_disk *disk)
{
    return disk && disk->ops == &rbd_ops ? (const struct rbd_disk *)disk : NULL;
}

int dp_rbd_disk_get_info(const struct dp_disk *disk, struct dp_rbd_info *out)
{
    const struct rbd_disk *d = as_rbd(disk);
    if (!d)
        return -EINVAL;
    *out = d->info;
    out->errors = __atomic_load_n(&d->info.errors, __ATOMIC_RELAXED);
    out->last_error = __atomic_load_n(&d->info.last_error, __ATOMIC_RELAXED);
    return 0;
}

int dp_rbd_conf_get(const struct dp_disk *disk, const char *option, char *buf, size_t len)
{
    const struct rbd_disk *d = as_rbd(disk);
    return d ? rados_conf_get(d->cluster, option, buf, len) : -EINVAL;
}

int dp_rbd_lock_owner(const struct dp_disk *disk, char *buf, size_t len)
{
    const struct rbd_disk *d = as_rbd(disk);
    if (!d)
        return -EINVAL;
    if (!(d->info.features & RBD_FEATURE_EXCLUSIVE_LOCK))
        return 0;
    rbd_lock_mode_t mode;
    char *owners[8];
    size_t n = sizeof(owners) / sizeof(owners[0]);
    int r = rbd_lock_get_owners(d->image, &mode, owners, &n);
    if (r == -ENOENT)
        return 0;   /* nobody holds it */
    if (r < 0)
        return r;
    if (n)
        snprintf(buf, len, "%s", owners[0]);
    rbd_lock_get_owners_cleanup(owners, n);
    return n ? 1 : 0;
}

int dp_rbd_lock_break(const struct dp_disk *disk, const char *owner)
{
    const struct rbd_disk *d = as_rbd(disk);
    return d ? rbd_lock_break(d->image, RBD_LOCK_MODE_EXCLUSIVE, owner) : -EINVAL;
}
