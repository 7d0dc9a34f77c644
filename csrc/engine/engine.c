/* engine.c — an I/O thread with its own io_uring, serving one queue (the per-queue design)
 * or several (the shared-thread baseline).
 *
 * The loop: kick CQE -> pop the avail ring -> parse -> SQEs that point into guest memory;
 * I/O CQE -> status byte + used ring; then one interrupt per queue per batch (EVENT_IDX
 * permitting). Nothing here takes a lock per request: the only lock guards the control
 * mailbox, which the control plane uses to attach, detach and reconfigure queues.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "engine/engine.h"
#include "util/clock.h"
#include "util/hist.h"

enum { CMD_ATTACH, CMD_DETACH, CMD_SET_CALL, CMD_EXIT };

struct engine_cmd {
    int op;
    int arg;
    struct dp_vq *vq;
    int done;
    int result;
    struct engine_cmd *next;
};

struct dp_engine {
    struct io_uring ring;
    struct dp_vq *vqs;            /* attached queues (engine thread only) */
    unsigned npolling;            /* attached queues without a kick fd */
    int exiting;
    uint64_t poll_ns;             /* spin at most this long before sleeping (0: never) */
    uint64_t poll_win_ns;         /* the spin window now, adapted within [0, poll_ns] */
    uint64_t timer_late_ns;       /* wake-up lateness of emulated-latency timeouts (median) */
    struct dp_req **delayq;       /* emulated-latency completions held back: a min-heap on due_ns */
    unsigned ndelayed, delayq_cap;
    struct __kernel_timespec timer_ts;  /* the one timeout armed for the earliest of them */
    uint64_t timer_at;            /* its deadline (0: none armed) */
    uint64_t slept_ns;            /* this round's wait began then (0: it did not wait) */
    uint64_t woke_ns;             /* and returned then */
    uint64_t ctl_buf;
    int ctl_fd;

    pthread_t thread;
    char name[16];
    int cpu;
    unsigned entries;
    int tid;
    int init_done;
    int init_rc;

    pthread_mutex_t lock;         /* guards cmds, done flags and init state */
    pthread_cond_t cond;
    struct engine_cmd *cmds;
    struct engine_cmd **cmds_tail;
};

/* Single writer per counter (the queue's engine thread); readers load relaxed. */
#define STAT_ADD(vq, field, n) \
    __atomic_store_n(&(vq)->stats.field, (vq)->stats.field + (n), __ATOMIC_RELAXED)

struct io_uring_sqe *engine_get_sqe(struct dp_engine *engine)
{
    struct io_uring_sqe *sqe;
    while (!(sqe = io_uring_get_sqe(&engine->ring)))
        io_uring_submit(&engine->ring);
    return sqe;
}

/* ---- requests ---- */

static void release_req(struct dp_vq *vq, struct dp_req *req)
{
    free(req->bounce);
    req->bounce = NULL;
    req->next_free = vq->free_reqs;
    vq->free_reqs = req;
    STAT_ADD(vq, inflight, -1);
    if (vq->starved) {
        vq->starved = 0;
        vq->need_pop = 1;
    }
}

/* Publish a finished request: status byte, used ring, statistics. */
static void req_finish(struct dp_req *req, uint8_t status)
{
    struct dp_vq *vq = req->vq;
    if (status == VIRTIO_BLK_S_OK) {
        if (req->type == VIRTIO_BLK_T_IN) {
            req->used_len = (uint32_t)req->nbytes + 1;
            STAT_ADD(vq, bytes_read, req->nbytes);
        } else if (req->type == VIRTIO_BLK_T_OUT) {
            STAT_ADD(vq, bytes_written, req->nbytes);
        }
    } else {
        req->used_len = 1;
        STAT_ADD(vq, errors, 1);
    }
    if (req->seq < vq->max_completed_seq)
        STAT_ADD(vq, out_of_order, 1);
    else
        vq->max_completed_seq = req->seq;
    hist_add(&vq->latency, now_ns() - req->start_ns);
    /* The status byte is ordered before used->idx by the release in vq_push_used. */
    *req->status = status;
    vq_push_used(vq, req->head, req->used_len);
    vq->need_notify = 1;
    release_req(vq, req);
}

/* xorshift64*: a per-queue stream of uniform numbers for the latency sampler. */
static double next_uniform(uint64_t *state)
{
    uint64_t x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return (double)((x * 0x2545F4914F6CDD1DULL) >> 11) * 0x1.0p-53;
}

/* Inverse-CDF sampling: linear interpolation between the table's quantiles. */
static uint64_t sample_latency(uint64_t *state, const struct dp_latency_params *lat)
{
    double x = next_uniform(state) * (lat->npoints - 1);
    unsigned i = (unsigned)x;
    if (i >= lat->npoints - 1)
        return lat->quantile_ns[lat->npoints - 1];
    double lo = (double)lat->quantile_ns[i], hi = (double)lat->quantile_ns[i + 1];
    return (uint64_t)(lo + (hi - lo) * (x - i));
}

void dp_latency_sample(const struct dp_latency_params *params, uint64_t seed, uint64_t *out,
                       unsigned n)
{
    uint64_t state = seed ? seed : 1;
    for (unsigned i = 0; i < n; i++)
        out[i] = params->npoints ? sample_latency(&state, params) : 0;
}

/* When an emulated device would complete this request: the sampled latency (after the real
 * I/O for file disks), no earlier than the queue's share of the IOPS / bandwidth cap allows. */
static uint64_t emulated_done_ns(struct dp_vq *vq, struct dp_req *req, uint64_t now)
{
    const struct dp_latency_params *lat = &vq->disk->latency;
    uint64_t done = (vq->disk->p.null_disk ? req->start_ns : now) +
                    (lat->npoints ? sample_latency(&vq->rng, lat) : 0);
    if (lat->iops || lat->bw) {
        uint64_t cost = 0;
        if (lat->iops)
            cost += 1000000000u / lat->iops;
        if (lat->bw)
            cost += (uint64_t)((double)req->nbytes * 1e9 / (double)lat->bw);
        uint64_t slot = (vq->budget_ns > req->start_ns ? vq->budget_ns : req->start_ns) + cost;
        vq->budget_ns = slot;
        if (slot > done)
            done = slot;
    }
    return done;
}

/* An expired timeout wakes the engine some microseconds after its deadline (the timer
 * interrupt, then the thread's wake-up: 15-30 us on a VM). Arming each timeout that much early
 * lands completions on the emulated time instead of adding the wake-up to every request. Only
 * deadlines that passed while the engine slept measure it: one reaped late because the thread
 * was busy says how busy it was, and that delay stays in the observed latency. */
#define TIMER_LATE_STEP_NS 500u
#define TIMER_LATE_MAX_NS 50000u

/* Follow the median wake-up lateness: a bounded step toward each sample, so that one long
 * stall (a preempted thread) moves the estimate by a step, not by the stall. */
static void track_timer_lateness(struct dp_engine *engine, uint64_t armed, int res)
{
    if (res != -ETIME || !engine->slept_ns || armed < engine->slept_ns || armed > engine->woke_ns)
        return;
    uint64_t late = engine->woke_ns - armed, est = engine->timer_late_ns;
    if (late > est)
        est += late - est < TIMER_LATE_STEP_NS ? late - est : TIMER_LATE_STEP_NS;
    else
        est -= est - late < TIMER_LATE_STEP_NS ? est - late : TIMER_LATE_STEP_NS;
    engine->timer_late_ns = est < TIMER_LATE_MAX_NS ? est : TIMER_LATE_MAX_NS;
}

/* ---- held-back completions: one heap and one timeout per engine ----
 *
 * A timeout per request cost a hrtimer per request: at 10 us emulated latency and iodepth 32
 * the thread spent ~15 us of system time per I/O (timer programming is a VM exit here) and
 * managed 60k IOPS. The engine keeps the held-back requests in a heap instead, completes every
 * due one whenever it runs (a polling engine needs no timer at all), and arms a single
 * absolute timeout for the earliest before it sleeps. */

static void delayq_swap(struct dp_req **q, unsigned a, unsigned b)
{
    struct dp_req *t = q[a];
    q[a] = q[b];
    q[b] = t;
}

static int delayq_push(struct dp_engine *engine, struct dp_req *req)
{
    if (engine->ndelayed == engine->delayq_cap) {
        unsigned cap = engine->delayq_cap ? engine->delayq_cap * 2 : 256;
        struct dp_req **q = realloc(engine->delayq, cap * sizeof(*q));
        if (!q)
            return -ENOMEM;
        engine->delayq = q;
        engine->delayq_cap = cap;
    }
    struct dp_req **q = engine->delayq;
    unsigned i = engine->ndelayed++;
    q[i] = req;
    while (i && q[(i - 1) / 2]->due_ns > q[i]->due_ns) {
        delayq_swap(q, i, (i - 1) / 2);
        i = (i - 1) / 2;
    }
    return 0;
}

static struct dp_req *delayq_pop(struct dp_engine *engine)
{
    struct dp_req **q = engine->delayq, *top = q[0];
    unsigned n = --engine->ndelayed, i = 0;
    q[0] = q[n];
    for (;;) {
        unsigned l = 2 * i + 1, r = l + 1, m = i;
        if (l < n && q[l]->due_ns < q[m]->due_ns)
            m = l;
        if (r < n && q[r]->due_ns < q[m]->due_ns)
            m = r;
        if (m == i)
            break;
        delayq_swap(q, i, m);
        i = m;
    }
    return top;
}

/* Complete every held-back request that is due. */
static void expire_delayed(struct dp_engine *engine)
{
    if (!engine->ndelayed)
        return;
    uint64_t now = now_ns();
    while (engine->ndelayed && engine->delayq[0]->due_ns <= now) {
        struct dp_req *req = delayq_pop(engine);
        req_finish(req, req->result);
    }
}

/* Before sleeping: a timeout for the earliest held-back request (moved earlier when a new
 * one is due sooner than the armed deadline). */
static void arm_timer(struct dp_engine *engine)
{
    if (!engine->ndelayed)
        return;
    uint64_t due = engine->delayq[0]->due_ns;
    if (engine->timer_at && engine->timer_at <= due)
        return;
    /* The kernel reads timer_ts when the SQE is submitted: just below, before the wait. */
    engine->timer_ts.tv_sec = (long long)(due / 1000000000u);
    engine->timer_ts.tv_nsec = (long long)(due % 1000000000u);
    struct io_uring_sqe *sqe = engine_get_sqe(engine);
    if (engine->timer_at) {
        /* If it fired meanwhile (-ENOENT), its completion is on the way and re-arms. */
        io_uring_prep_timeout_update(sqe, &engine->timer_ts, TAG_TIMER, IORING_TIMEOUT_ABS);
        io_uring_sqe_set_data64(sqe, TAG_IGNORE);
    } else {
        io_uring_prep_timeout(sqe, &engine->timer_ts, 0, IORING_TIMEOUT_ABS);
        io_uring_sqe_set_data64(sqe, TAG_TIMER);
    }
    engine->timer_at = due;
}

void req_complete(struct dp_req *req, uint8_t status)
{
    struct dp_vq *vq = req->vq;
    const struct dp_latency_params *lat = &vq->disk->latency;
    if ((lat->npoints || lat->iops || lat->bw) && !req->delayed) {
        uint64_t now = now_ns(), done = emulated_done_ns(vq, req, now);
        struct dp_engine *engine = vq->engine;
        if (done > now) {
            /* Early by the wake-up lateness, but by no more than half the delay: whatever the
             * estimate, no request completes in less than half its emulated time. Requests
             * overtake each other as a real device's do. */
            uint64_t delay = done - now, late = engine->timer_late_ns;
            req->due_ns = done - (late < delay / 2 ? late : delay / 2);
            req->delayed = 1;
            req->result = status;
            if (delayq_push(engine, req) == 0) {
                STAT_ADD(vq, delayed, 1);
                return;
            }
            /* no memory for the heap: complete now rather than lose it */
        }
    }
    req_finish(req, status);
}

static void count_request(struct dp_vq *vq, uint32_t type)
{
    STAT_ADD(vq, requests, 1);
    switch (type) {
    case VIRTIO_BLK_T_IN: STAT_ADD(vq, reads, 1); break;
    case VIRTIO_BLK_T_OUT: STAT_ADD(vq, writes, 1); break;
    case VIRTIO_BLK_T_FLUSH: STAT_ADD(vq, flushes, 1); break;
    case VIRTIO_BLK_T_GET_ID: STAT_ADD(vq, get_ids, 1); break;
    case VIRTIO_BLK_T_DISCARD: STAT_ADD(vq, discards, 1); break;
    case VIRTIO_BLK_T_WRITE_ZEROES: STAT_ADD(vq, write_zeroes, 1); break;
    default: STAT_ADD(vq, unsupported, 1); break;
    }
}

static void start_request(struct dp_engine *engine, struct dp_req *req,
                          const struct vq_chain *chain)
{
    struct dp_vq *vq = req->vq;
    req->head = chain->head;
    req->done = 0;
    req->pending = 0;
    req->delayed = 0;
    req->result = VIRTIO_BLK_S_OK;
    req->start_ns = now_ns();
    req->seq = vq->submit_seq++;

    int status = blk_req_parse(req, chain, vq->disk);
    if (status < 0) {
        /* No status byte to answer with: the driver broke the ring's contract. */
        STAT_ADD(vq, errors, 1);
        vq_inflight_drop(vq, req->head);
        release_req(vq, req);
        vq_set_broken(vq);
        return;
    }
    count_request(vq, req->type);
    if (status != VIRTIO_BLK_S_OK) {
        req_complete(req, (uint8_t)status);
        return;
    }
    if (req->type == VIRTIO_BLK_T_GET_ID) {
        char serial[DP_SERIAL_LEN] = { 0 };
        memcpy(serial, vq->disk->p.serial, sizeof(serial));
        size_t n = iov_from_buf(req->iov, req->iovcnt, 0, serial, sizeof(serial));
        req->used_len = (uint32_t)n + 1;
        req_complete(req, VIRTIO_BLK_S_OK);
        return;
    }
    if ((req->type == VIRTIO_BLK_T_IN || req->type == VIRTIO_BLK_T_OUT) && req->nbytes == 0) {
        req_complete(req, VIRTIO_BLK_S_OK);
        return;
    }
    if (vq->disk->p.null_disk)
        null_submit(engine, req);
    else
        file_submit(engine, req);
}

/* Pop everything the driver made available, re-enabling kicks before going idle. */
static void process_avail(struct dp_engine *engine, struct dp_vq *vq)
{
    vq->need_pop = 0;
    if (vq->stopping || vq->broken)
        return;
    do {
        struct dp_req *req;
        while ((req = vq->free_reqs)) {
            struct vq_chain chain;
            int rc = vq_pop(vq, &chain, req->seg, REQ_MAX_SEGS);
            if (rc <= 0)
                break;
            vq->free_reqs = req->next_free;
            STAT_ADD(vq, inflight, 1);
            start_request(engine, req, &chain);
            if (vq->broken)
                return;
        }
        if (vq->broken)
            return;
        if (!vq->free_reqs) {
            /* Only a driver that re-posts heads still in flight gets here. */
            vq->starved = 1;
            return;
        }
    } while (vq_enable_notify(vq));
}

static void notify(struct dp_vq *vq)
{
    vq->need_notify = 0;
    if (vq_need_notify(vq) && vq->call_fd >= 0) {
        uint64_t one = 1;
        ssize_t rc = write(vq->call_fd, &one, sizeof(one));
        (void)rc;   /* a full counter still wakes the driver; nothing else to do */
        STAT_ADD(vq, notifies, 1);
    }
}

/* ---- control mailbox ---- */

static void arm_kick(struct dp_engine *engine, struct dp_vq *vq)
{
    struct io_uring_sqe *sqe = engine_get_sqe(engine);
    io_uring_prep_read(sqe, vq->kick_fd, &vq->kick_buf, sizeof(vq->kick_buf), (uint64_t)-1);
    io_uring_sqe_set_data64(sqe, (uintptr_t)vq | TAG_KICK);
    vq->kick_armed = 1;
}

static void arm_ctl(struct dp_engine *engine)
{
    struct io_uring_sqe *sqe = engine_get_sqe(engine);
    io_uring_prep_read(sqe, engine->ctl_fd, &engine->ctl_buf, sizeof(engine->ctl_buf),
                       (uint64_t)-1);
    io_uring_sqe_set_data64(sqe, (uintptr_t)engine | TAG_CTL);
}

static void cmd_done(struct dp_engine *engine, struct engine_cmd *cmd, int result)
{
    pthread_mutex_lock(&engine->lock);
    cmd->result = result;
    cmd->done = 1;
    pthread_cond_broadcast(&engine->cond);
    pthread_mutex_unlock(&engine->lock);
}

static int engine_call(struct dp_engine *engine, int op, struct dp_vq *vq, int arg)
{
    struct engine_cmd cmd = { .op = op, .vq = vq, .arg = arg };
    uint64_t one = 1;

    pthread_mutex_lock(&engine->lock);
    *engine->cmds_tail = &cmd;
    engine->cmds_tail = &cmd.next;
    pthread_mutex_unlock(&engine->lock);
    if (write(engine->ctl_fd, &one, sizeof(one)) != sizeof(one))
        return -EIO;
    pthread_mutex_lock(&engine->lock);
    while (!cmd.done)
        pthread_cond_wait(&engine->cond, &engine->lock);
    pthread_mutex_unlock(&engine->lock);
    return cmd.result;
}

/* After a back-end restart: what the previous process had popped but not completed. */
static void resubmit_inflight(struct dp_engine *engine, struct dp_vq *vq)
{
    for (unsigned i = 0; i < vq->nresubmit; i++) {
        struct dp_req *req = vq->free_reqs;
        struct vq_chain chain;
        if (!req || vq_read_chain(vq, vq->resubmit[i], &chain, req->seg, REQ_MAX_SEGS) < 0) {
            for (unsigned j = i; j < vq->nresubmit; j++)
                vq_inflight_drop(vq, vq->resubmit[j]);
            vq_set_broken(vq);
            break;
        }
        vq->free_reqs = req->next_free;
        STAT_ADD(vq, inflight, 1);
        STAT_ADD(vq, resubmitted, 1);
        start_request(engine, req, &chain);
        if (vq->broken)
            break;
    }
    vq->nresubmit = 0;
}

static void attach(struct dp_engine *engine, struct dp_vq *vq)
{
    vq->used_idx = __atomic_load_n(&vq->used->idx, __ATOMIC_ACQUIRE);
    vq->shadow_avail_idx = vq->last_avail_idx;
    vq->signalled_used_valid = 0;
    vq->stopping = 0;
    vq->starved = 0;
    vq->need_notify = 0;
    vq->need_pop = 1;   /* buffers may have been posted before we listened */
    vq->next = engine->vqs;
    engine->vqs = vq;
    if (vq->kick_fd >= 0)
        arm_kick(engine, vq);
    else
        engine->npolling++;
    resubmit_inflight(engine, vq);
}

static void begin_detach(struct dp_engine *engine, struct dp_vq *vq, struct engine_cmd *cmd)
{
    vq->stopping = 1;
    vq->detach_cmd = cmd;
    if (vq->kick_armed) {
        struct io_uring_sqe *sqe = engine_get_sqe(engine);
        io_uring_prep_cancel64(sqe, (uintptr_t)vq | TAG_KICK, 0);
        io_uring_sqe_set_data64(sqe, TAG_IGNORE);
    }
}

/* A stopping queue leaves once its in-flight requests and its kick read are done. */
static void finish_detaches(struct dp_engine *engine)
{
    struct dp_vq **link = &engine->vqs;
    while (*link) {
        struct dp_vq *vq = *link;
        if (!vq->stopping || vq->stats.inflight || vq->kick_armed) {
            link = &vq->next;
            continue;
        }
        *link = vq->next;
        vq->next = NULL;
        if (vq->kick_fd < 0)
            engine->npolling--;
        if (vq->need_notify)
            notify(vq);
        /* Last touch of vq: once acknowledged, the control plane may free it. */
        struct engine_cmd *cmd = vq->detach_cmd;
        int last_avail_idx = vq->last_avail_idx;
        vq->detach_cmd = NULL;
        cmd_done(engine, cmd, last_avail_idx);
    }
}

static void run_commands(struct dp_engine *engine)
{
    pthread_mutex_lock(&engine->lock);
    struct engine_cmd *cmd = engine->cmds;
    engine->cmds = NULL;
    engine->cmds_tail = &engine->cmds;
    pthread_mutex_unlock(&engine->lock);

    while (cmd) {
        struct engine_cmd *next = cmd->next;   /* cmd may be gone once done */
        switch (cmd->op) {
        case CMD_ATTACH:
            attach(engine, cmd->vq);
            cmd_done(engine, cmd, 0);
            break;
        case CMD_DETACH:
            begin_detach(engine, cmd->vq, cmd);
            break;
        case CMD_SET_CALL:
            cmd->vq->call_fd = cmd->arg;
            cmd_done(engine, cmd, 0);
            break;
        case CMD_EXIT:
            engine->exiting = 1;
            cmd_done(engine, cmd, 0);
            break;
        }
        cmd = next;
    }
}

/* ---- the loop ---- */

static void handle_cqe(struct dp_engine *engine, uint64_t user_data, int res)
{
    void *ptr = (void *)(uintptr_t)(user_data & ~(uint64_t)TAG_MASK);
    switch (user_data & TAG_MASK) {
    case TAG_REQ:
    case TAG_RANGE:
        file_complete(engine, user_data, res);
        break;
    case TAG_TIMER:
        /* -ETIME is the normal end of a timeout; the due requests complete after the reap */
        track_timer_lateness(engine, engine->timer_at, res);
        engine->timer_at = 0;
        break;
    case TAG_KICK: {
        struct dp_vq *vq = ptr;
        vq->kick_armed = 0;
        if (vq->stopping)
            break;
        if (res == 0 || (res < 0 && res != -EINTR && res != -EAGAIN))
            break;   /* not an eventfd any more, or gone: nothing more will come from it */
        STAT_ADD(vq, kicks, 1);
        vq->need_pop = 1;
        arm_kick(engine, vq);
        break;
    }
    case TAG_CTL:
        run_commands(engine);
        if (!engine->exiting)
            arm_ctl(engine);
        break;
    default:
        break;
    }
}

static void reap(struct dp_engine *engine)
{
    struct io_uring_cqe *cqe;
    unsigned head, n = 0;
    io_uring_for_each_cqe(&engine->ring, head, cqe) {
        handle_cqe(engine, cqe->user_data, cqe->res);
        n++;
    }
    io_uring_cq_advance(&engine->ring, n);
}

/* Before sleeping, spin for new buffers or completions: with the guest on another CPU this
 * saves a wake-up per batch (and the guest's kick, when EVENT_IDX is on). The window adapts
 * (adapt_poll) between 0 and poll_ns. */
static int poll_for_work(struct dp_engine *engine)
{
    uint64_t window = __atomic_load_n(&engine->poll_win_ns, __ATOMIC_RELAXED);
    if (!window)
        return 0;
    io_uring_submit(&engine->ring);
    uint64_t now = now_ns(), until = now + window;
    do {
        for (struct dp_vq *vq = engine->vqs; vq; vq = vq->next)
            if (!vq->stopping && !vq->starved && vq_has_avail(vq)) {
                vq->need_pop = 1;
                return 1;
            }
        if (io_uring_cq_ready(&engine->ring))
            return 1;
        io_uring_get_events(&engine->ring);   /* run deferred completions */
        if (io_uring_cq_ready(&engine->ring))
            return 1;
        cpu_relax();
        now = now_ns();
        if (engine->ndelayed && engine->delayq[0]->due_ns <= now)
            return 1;
    } while (now < until);
    return 0;
}

#define POLL_MIN_NS 2000u

/* After a sleep of block_ns: a wait the largest window would have covered says spinning pays,
 * so the window grows toward it (doubling); a longer one says it would have been spun in vain,
 * so it halves (down to 0). A spin that finds work leaves it as it is. This is the rule QEMU's
 * iothreads follow: on a fast device or a busy guest it settles at poll_ns, on a slow device
 * or an idle guest at 0, where a fixed window would burn poll_ns of CPU per request. */
static void adapt_poll(struct dp_engine *engine, uint64_t block_ns)
{
    uint64_t max = __atomic_load_n(&engine->poll_ns, __ATOMIC_RELAXED);
    uint64_t win = __atomic_load_n(&engine->poll_win_ns, __ATOMIC_RELAXED);
    if (block_ns > max)
        win = win / 2 >= POLL_MIN_NS ? win / 2 : 0;
    else if (block_ns > win)
        win = win ? win * 2 : POLL_MIN_NS;
    __atomic_store_n(&engine->poll_win_ns, win < max ? win : max, __ATOMIC_RELAXED);
}

static int ring_init(struct dp_engine *engine)
{
    static const unsigned flag_sets[] = {
        IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN,
        IORING_SETUP_COOP_TASKRUN,
        0,
    };
    int rc = -EINVAL;
    for (size_t i = 0; i < sizeof(flag_sets) / sizeof(flag_sets[0]); i++) {
        struct io_uring_params params = { .flags = flag_sets[i] | IORING_SETUP_CQSIZE | IORING_SETUP_CLAMP,
                                          .cq_entries = engine->entries * 4 };
        rc = io_uring_queue_init_params(engine->entries, &engine->ring, &params);
        if (rc != -EINVAL)
            break;
    }
    return rc;
}

static void *engine_main(void *arg)
{
    struct dp_engine *engine = arg;
    int rc = 0;

    pthread_setname_np(pthread_self(), engine->name);
    if (engine->cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(engine->cpu, &set);
        rc = -pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
    }
    if (!rc)
        rc = ring_init(engine);   /* created here: SINGLE_ISSUER wants the submitting thread */
    if (!rc)
        arm_ctl(engine);

    pthread_mutex_lock(&engine->lock);
    engine->tid = (int)syscall(SYS_gettid);
    engine->init_rc = rc;
    engine->init_done = 1;
    pthread_cond_broadcast(&engine->cond);
    pthread_mutex_unlock(&engine->lock);
    if (rc)
        return NULL;

    while (!engine->exiting) {
        engine->slept_ns = 0;
        if (engine->npolling) {
            io_uring_submit_and_get_events(&engine->ring);
        } else if (!poll_for_work(engine)) {
            arm_timer(engine);
            engine->slept_ns = now_ns();
            io_uring_submit_and_wait(&engine->ring, 1);
            engine->woke_ns = now_ns();
            adapt_poll(engine, engine->woke_ns - engine->slept_ns);
        }
        reap(engine);
        expire_delayed(engine);
        for (struct dp_vq *vq = engine->vqs; vq; vq = vq->next)
            if (vq->need_pop || (vq->kick_fd < 0 && !vq->stopping))
                process_avail(engine, vq);
        for (struct dp_vq *vq = engine->vqs; vq; vq = vq->next)
            if (vq->need_notify)
                notify(vq);
        finish_detaches(engine);
    }
    io_uring_queue_exit(&engine->ring);
    free(engine->delayq);
    return NULL;
}

struct dp_engine *dp_engine_new(const char *name, int cpu, unsigned ring_entries, int *err)
{
    struct dp_engine *engine = calloc(1, sizeof(*engine));
    *err = -ENOMEM;
    if (!engine)
        return NULL;
    strncpy(engine->name, name, sizeof(engine->name) - 1);
    engine->cpu = cpu;
    engine->entries = ring_entries ? ring_entries : 256;
    engine->cmds_tail = &engine->cmds;
    pthread_mutex_init(&engine->lock, NULL);
    pthread_cond_init(&engine->cond, NULL);
    engine->ctl_fd = eventfd(0, EFD_CLOEXEC);
    if (engine->ctl_fd < 0) {
        *err = -errno;
        goto fail;
    }
    /* Signals belong to the control plane's main thread: the new thread starts with all
     * of them blocked (it inherits the mask in force at pthread_create). */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int rc = pthread_create(&engine->thread, NULL, engine_main, engine);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc) {
        *err = -rc;
        goto fail;
    }
    pthread_mutex_lock(&engine->lock);
    while (!engine->init_done)
        pthread_cond_wait(&engine->cond, &engine->lock);
    pthread_mutex_unlock(&engine->lock);
    if (engine->init_rc) {
        *err = engine->init_rc;
        pthread_join(engine->thread, NULL);
        goto fail;
    }
    *err = 0;
    return engine;

fail:
    if (engine->ctl_fd >= 0)
        close(engine->ctl_fd);
    pthread_mutex_destroy(&engine->lock);
    pthread_cond_destroy(&engine->cond);
    free(engine);
    return NULL;
}

void dp_engine_free(struct dp_engine *engine)
{
    if (!engine)
        return;
    engine_call(engine, CMD_EXIT, NULL, 0);
    pthread_join(engine->thread, NULL);
    close(engine->ctl_fd);
    pthread_mutex_destroy(&engine->lock);
    pthread_cond_destroy(&engine->cond);
    free(engine);
}

void dp_engine_set_poll(struct dp_engine *engine, uint64_t poll_ns)
{
    /* The window starts at the maximum and adapts from there. */
    __atomic_store_n(&engine->poll_ns, poll_ns, __ATOMIC_RELAXED);
    __atomic_store_n(&engine->poll_win_ns, poll_ns, __ATOMIC_RELAXED);
}

uint64_t dp_engine_poll_window(const struct dp_engine *engine)
{
    return __atomic_load_n(&engine->poll_win_ns, __ATOMIC_RELAXED);   /* for monitoring */
}

int dp_engine_thread_id(const struct dp_engine *engine)
{
    return engine->tid;
}

/* ---- queue lifecycle (control plane side) ---- */

static int vq_alloc_reqs(struct dp_vq *vq)
{
    if (vq->nreqs != vq->num) {
        free(vq->reqs);
        free(vq->iov_pool);
        vq->nreqs = 0;
        vq->reqs = calloc(vq->num, sizeof(*vq->reqs));
        vq->iov_pool = calloc((size_t)vq->num * REQ_MAX_SEGS, sizeof(struct iovec));
        if (!vq->reqs || !vq->iov_pool)
            return -ENOMEM;
        vq->nreqs = vq->num;
    }
    vq->free_reqs = NULL;
    for (unsigned i = vq->nreqs; i-- > 0;) {
        struct dp_req *req = &vq->reqs[i];
        req->vq = vq;
        req->seg = &vq->iov_pool[(size_t)i * REQ_MAX_SEGS];
        req->bounce = NULL;
        req->next_free = vq->free_reqs;
        vq->free_reqs = req;
    }
    return 0;
}

int dp_vq_start(struct dp_vq *vq, struct dp_engine *engine)
{
    if (vq->engine)
        return -EBUSY;
    int rc = vq_map_rings(vq);
    if (rc)
        return rc;
    rc = vq_alloc_reqs(vq);
    if (rc)
        return rc;
    if (vq->inflight_restored) {
        rc = vq_inflight_recover(vq);
        if (rc < 0)
            return rc;
        vq->inflight_restored = 0;
        __atomic_store_n(&vq->stats.recovered_out_of_order, vq->recovered_out_of_order,
                         __ATOMIC_RELAXED);
    }
    if (!vq->rng)
        vq->rng = 0x9E3779B97F4A7C15ULL ^ ((uint64_t)vq->index << 32) ^ (uintptr_t)vq;
    vq->broken = 0;
    __atomic_store_n(&vq->stats.broken, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&vq->stats.inflight, 0, __ATOMIC_RELAXED);
    vq->engine = engine;
    rc = engine_call(engine, CMD_ATTACH, vq, 0);
    if (rc)
        vq->engine = NULL;
    return rc;
}

int dp_vq_stop(struct dp_vq *vq)
{
    if (!vq->engine)
        return vq->last_avail_idx;
    int rc = engine_call(vq->engine, CMD_DETACH, vq, 0);
    vq->engine = NULL;
    return rc;
}

int dp_vq_set_call_fd(struct dp_vq *vq, int call_fd)
{
    if (vq->engine)
        return engine_call(vq->engine, CMD_SET_CALL, vq, call_fd);
    vq->call_fd = call_fd;
    return 0;
}

void dp_vq_free(struct dp_vq *vq)
{
    if (!vq)
        return;
    dp_vq_stop(vq);
    free(vq->resubmit);
    free(vq->reqs);
    free(vq->iov_pool);
    free(vq);
}
