/* disk_hooks.c — test hooks for the disk interface, not part of the data path: drive a disk
 * stack through its ops table by hand, as an engine does, on a private io_uring, to reach a
 * state the protocol tests cannot force on purpose.
 *
 * dp_bench_delay_close: a latency layer over a null disk whose only request is completed by
 * poll (given a `now` past its due time) while the timeout armed for it is still on the ring.
 * The layer's state must then outlive the timeout: close answers -EBUSY, asks the ring to
 * remove the timeout, and succeeds once the engine has reaped its completion.
 *
 * dp_bench_disk_run: one request through any disk, the whole life of its state included
 * (rbd: the eventfd read on the ring when it completes, cancelled by close).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <liburing.h>
#include <stdlib.h>
#include <string.h>

#include "bench/dp_bench.h"
#include "disk/disk.h"
#include "util/clock.h"

static void count_completion(void *arg, struct dp_disk_io *io, int result)
{
    (*(unsigned *)arg)++;
}

/* One reap, dispatched the way the engine's handle_cqe does for disks' SQEs. */
static unsigned reap_disk_cqes(struct io_uring *ring)
{
    struct io_uring_cqe *cqe;
    unsigned head, n = 0;
    io_uring_for_each_cqe(ring, head, cqe) {
        if ((cqe->user_data & DP_CQE_TAG_MASK) == 0 && cqe->user_data) {
            struct dp_disk_cqe *c = (void *)(uintptr_t)cqe->user_data;
            c->done(c, cqe->res);
        }
        n++;
    }
    io_uring_cq_advance(ring, n);
    return n;
}

int dp_bench_delay_close(int *first_close, unsigned *cqes)
{
    struct io_uring ring;
    int rc = io_uring_queue_init(8, &ring, 0);
    if (rc)
        return rc;
    unsigned completed = 0;
    struct dp_engine_wait wait = { 0 };
    struct dp_disk_env env = { .ring = &ring, .complete = count_completion, .arg = &completed,
                               .wait = &wait };
    struct dp_disk_info info = { .size_bytes = 1 << 20, .block_size = 512 };
    static struct dp_latency_params lat = { .npoints = 2, .quantile_ns = { 10000000, 10000000 } };
    struct dp_disk *null = dp_null_disk_new(&info, &rc), *delay = NULL;
    if (null)
        delay = dp_delay_disk_new(null, &lat, &rc);
    if (!delay) {
        dp_disk_free(null);
        io_uring_queue_exit(&ring);
        return rc;
    }
    const struct dp_disk_ops *ops = delay->ops;
    void *state = NULL, *qstate = NULL;
    rc = ops->open(delay, &env, &state);
    if (!rc)
        rc = ops->queue_open(state, 0, &qstate);
    if (rc)
        goto out;

    char buf[512];
    struct iovec iov = { .iov_base = buf, .iov_len = sizeof(buf) };
    struct dp_disk_io io;
    memset(&io, 0, sizeof(io));
    io.op = DP_DISK_READ;
    io.iov = &iov;
    io.iovcnt = 1;
    io.nbytes = sizeof(buf);
    io.start_ns = now_ns();
    io.buf_index = -1;                     /* no registered buffers here */
    ops->submit(state, qstate, &io);       /* null answers at once: held for 10 ms */
    ops->before_wait(state);               /* the engine is about to sleep: timeout armed */
    io_uring_submit(&ring);
    unsigned polled = ops->poll(state, io.start_ns + 20000000);   /* 20 ms on: due */
    ops->queue_close(state, qstate);
    if (polled != 1 || completed != 1 || !(io.flags & DP_IO_F_DELAYED)) {
        rc = -EPROTO;
        goto out;
    }
    *first_close = ops->close(state);
    *cqes = 0;
    rc = *first_close;
    for (int round = 0; rc == -EBUSY && round < 100; round++) {
        io_uring_submit_and_wait(&ring, 1);
        *cqes += reap_disk_cqes(&ring);
        rc = ops->close(state);
    }
    state = NULL;   /* closed (or, on a bug, leaked rather than freed under its timeout) */
out:
    if (state)
        ops->close(state);
    dp_disk_free(delay);
    io_uring_queue_exit(&ring);
    return rc;
}

struct one_request {
    struct dp_disk_io io;
    struct iovec iov;
    int done;
    int result;
};

static void note_completion(void *arg, struct dp_disk_io *io, int result)
{
    struct one_request *r = arg;
    r->done++;
    r->result = result;
}

int dp_bench_disk_run(struct dp_disk *disk, unsigned op, uint64_t offset, void *buf, uint64_t len,
                      int unmap, uint32_t timeout_ms, int *result, int *first_close)
{
    if (op > DP_BENCH_IO_WRITE_ZEROES)
        return -EINVAL;
    struct io_uring *ring = calloc(1, sizeof(*ring));
    struct one_request *r = calloc(1, sizeof(*r));
    struct dp_engine_wait *wait = calloc(1, sizeof(*wait));
    struct dp_disk_env *env = calloc(1, sizeof(*env));
    int rc = ring && r && wait && env ? io_uring_queue_init(16, ring, 0) : -ENOMEM;
    if (rc) {
        free(ring), free(r), free(wait), free(env);
        return rc;
    }
    *env = (struct dp_disk_env){ .ring = ring, .complete = note_completion, .arg = r, .wait = wait };
    const struct dp_disk_ops *ops = disk->ops;
    void *state = NULL, *qstate = NULL;
    rc = ops->open(disk, env, &state);
    if (!rc && ops->queue_open)
        rc = ops->queue_open(state, 0, &qstate);
    if (rc)
        goto out;

    struct dp_disk_io *io = &r->io;
    io->op = op;
    io->offset = offset;
    io->start_ns = now_ns();
    io->buf_index = -1;
    if (op == DP_BENCH_IO_READ || op == DP_BENCH_IO_WRITE) {
        r->iov = (struct iovec){ .iov_base = buf, .iov_len = len };
        io->iov = &r->iov;
        io->iovcnt = 1;
        io->nbytes = len;
    } else if (op != DP_BENCH_IO_FLUSH) {
        io->nranges = 1;
        io->ranges[0] = (struct dp_disk_range){ .offset = offset, .len = len, .unmap = unmap };
    }
    ops->submit(state, qstate, io);
    uint64_t deadline = now_ns() + (uint64_t)timeout_ms * 1000000u;
    while (!r->done && now_ns() < deadline) {
        if (ops->poll)
            ops->poll(state, now_ns());
        if (r->done)
            break;
        if (ops->before_wait)
            ops->before_wait(state);
        struct __kernel_timespec ts = { .tv_nsec = 10000000 };
        struct io_uring_cqe *cqe;
        io_uring_submit_and_wait_timeout(ring, &cqe, 1, &ts, NULL);
        reap_disk_cqes(ring);
    }
    if (!r->done)
        return -ETIMEDOUT;   /* the disk still holds io, env and the ring: leave them */
    *result = r->result;
    if (ops->queue_close)
        ops->queue_close(state, qstate);
    rc = *first_close = ops->close(state);
    for (int round = 0; rc == -EBUSY && round < 100; round++) {
        struct __kernel_timespec ts = { .tv_nsec = 10000000 };
        struct io_uring_cqe *cqe;
        io_uring_submit_and_wait_timeout(ring, &cqe, 1, &ts, NULL);
        reap_disk_cqes(ring);
        rc = ops->close(state);
    }
    state = NULL;
    if (!rc && r->done != 1)
        rc = -EPROTO;   /* completed more than once */
out:
    if (state)
        ops->close(state);
    io_uring_queue_exit(ring);
    free(ring), free(r), free(wait), free(env);
    return rc;
}
