/* delay.c — emulated device latency as a disk that stacks on any other (in the spirit of SPDK's
 * delay bdev): each request of the inner disk completes no earlier than a latency drawn from
 * an inverse-CDF table, and no earlier than its queue's share of an IOPS / bandwidth cap.
 *
 * A request that is done below but not yet due waits in a heap ordered by due time; there is
 * one heap and one timeout per engine (per engine and delay disk, to be exact), not a timer
 * per request. The engine polls the heap after every reap and while it spins (a polling
 * engine needs no timer at all), and before it sleeps the heap arms one absolute timeout for
 * its earliest request on the engine's ring.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "disk/disk.h"
#include "util/clock.h"

struct delay_disk {
    struct dp_disk base;
    struct dp_disk *inner;
    struct dp_latency_params lat;
};

/* The delay disk on one engine: its heap, its timer, and the inner disk's state there. */
struct delay_engine {
    const struct delay_disk *disk;
    const struct dp_disk_env *env;     /* the engine's */
    struct dp_disk_env inner_env;      /* lent to the inner disk: completions come back here */
    void *inner_state;
    struct dp_disk_io **heap;          /* held-back completions: a min-heap on due_ns */
    unsigned nheld, cap;
    struct __kernel_timespec timer_ts; /* the one timeout, armed for the earliest of them */
    uint64_t timer_at;                 /* its deadline (0: none armed) */
    int timer_cancelled;               /* close asked the ring to remove it */
    uint64_t timer_late_ns;            /* wake-up lateness of the timeouts (median) */
    struct dp_disk_cqe timer_cqe;
};

/* A queue's own sampler and cap budget: queues share nothing on the I/O path. */
struct delay_queue {
    uint64_t rng;
    uint64_t budget_ns;                /* when the queue's share of the caps is next free */
    void *inner_qstate;
};

/* ---- sampling ---- */

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

/* ---- the timer's lateness ----
 *
 * An expired timeout wakes the engine some microseconds after its deadline (the timer
 * interrupt, then the thread's wake-up: 15-30 us on a VM). Arming each timeout that much early
 * lands completions on the emulated time instead of adding the wake-up to every request. Only
 * deadlines that passed while the engine slept measure it: one reaped late because the thread
 * was busy says how busy it was, and that delay stays in the observed latency. */
#define TIMER_LATE_STEP_NS 500u
#define TIMER_LATE_MAX_NS 50000u

/* Follow the median wake-up lateness: a bounded step toward each sample, so that one long
 * stall (a preempted thread) moves the estimate by a step, not by the stall. */
static void track_timer_lateness(struct delay_engine *de, uint64_t armed, int res)
{
    const struct dp_engine_wait *wait = de->env->wait;
    if (res != -ETIME || !wait->slept_ns || armed < wait->slept_ns || armed > wait->woke_ns)
        return;
    uint64_t late = wait->woke_ns - armed, est = de->timer_late_ns;
    if (late > est)
        est += late - est < TIMER_LATE_STEP_NS ? late - est : TIMER_LATE_STEP_NS;
    else
        est -= est - late < TIMER_LATE_STEP_NS ? est - late : TIMER_LATE_STEP_NS;
    de->timer_late_ns = est < TIMER_LATE_MAX_NS ? est : TIMER_LATE_MAX_NS;
}

/* ---- held-back completions ----
 *
 * A timeout per request cost a hrtimer per request: at 10 us emulated latency and iodepth 32
 * the thread spent ~15 us of system time per I/O (timer programming is a VM exit here) and
 * managed 60k IOPS. Hence the heap and the single timeout. */

static void heap_swap(struct dp_disk_io **q, unsigned a, unsigned b)
{
    struct dp_disk_io *t = q[a];
    q[a] = q[b];
    q[b] = t;
}

static int heap_push(struct delay_engine *de, struct dp_disk_io *io)
{
    if (de->nheld == de->cap) {
        unsigned cap = de->cap ? de->cap * 2 : 256;
        struct dp_disk_io **q = realloc(de->heap, cap * sizeof(*q));
        if (!q)
            return -ENOMEM;
        de->heap = q;
        de->cap = cap;
    }
    struct dp_disk_io **q = de->heap;
    unsigned i = de->nheld++;
    q[i] = io;
    while (i && q[(i - 1) / 2]->due_ns > q[i]->due_ns) {
        heap_swap(q, i, (i - 1) / 2);
        i = (i - 1) / 2;
    }
    return 0;
}

static struct dp_disk_io *heap_pop(struct delay_engine *de)
{
    struct dp_disk_io **q = de->heap, *top = q[0];
    unsigned n = --de->nheld, i = 0;
    q[0] = q[n];
    for (;;) {
        unsigned l = 2 * i + 1, r = l + 1, m = i;
        if (l < n && q[l]->due_ns < q[m]->due_ns)
            m = l;
        if (r < n && q[r]->due_ns < q[m]->due_ns)
            m = r;
        if (m == i)
            break;
        heap_swap(q, i, m);
        i = m;
    }
    return top;
}

/* The inner disk is done with io: hold it until its emulated time. */
static void inner_done(void *arg, struct dp_disk_io *io, int result)
{
    struct delay_engine *de = arg;
    /* From now: after the real I/O, or (a disk that answered within submit, the null disk)
     * right after the pop. Not from io->start_ns, which is the engine's clock for the batch the
     * request was popped in and may be earlier than the driver published it. */
    uint64_t now = now_ns();
    uint64_t done = now + io->delay_ns;
    if (io->due_ns > done)
        done = io->due_ns;   /* the queue's share of the caps is not free before then */
    if (done > now) {
        /* Early by the wake-up lateness, but by no more than half the delay: whatever the
         * estimate, no request completes in less than half its emulated time. Requests
         * overtake each other as a real device's do. */
        uint64_t delay = done - now, late = de->timer_late_ns;
        io->due_ns = done - (late < delay / 2 ? late : delay / 2);
        io->held_result = result;
        if (heap_push(de, io) == 0) {
            io->flags |= DP_IO_F_DELAYED;
            return;
        }
        /* no memory for the heap: complete now rather than lose it */
    }
    disk_complete(de->env, io, result);
}

static void delay_submit(void *state, void *qstate, struct dp_disk_io *io)
{
    struct delay_engine *de = state;
    struct delay_queue *dq = qstate;
    const struct dp_latency_params *lat = &de->disk->lat;
    /* Drawn here, in submission order, from the queue's own stream; the cap slot likewise
     * (a queue's requests take its budget in the order they arrived). */
    io->delay_ns = lat->npoints ? sample_latency(&dq->rng, lat) : 0;
    io->due_ns = 0;
    if (lat->iops || lat->bw) {
        uint64_t cost = 0;
        if (lat->iops)
            cost += 1000000000u / lat->iops;
        if (lat->bw)
            cost += (uint64_t)((double)io->nbytes * 1e9 / (double)lat->bw);
        uint64_t slot = (dq->budget_ns > io->start_ns ? dq->budget_ns : io->start_ns) + cost;
        dq->budget_ns = slot;
        io->due_ns = slot;
    }
    struct dp_disk *inner = de->disk->inner;
    inner->ops->submit(de->inner_state, dq->inner_qstate, io);
}

/* Complete every held-back request that is due (after the inner disk's own deferred work,
 * which may finish requests that then wait here). */
static unsigned delay_poll(void *state, uint64_t now)
{
    struct delay_engine *de = state;
    const struct dp_disk_ops *inner = de->disk->inner->ops;
    unsigned n = inner->poll ? inner->poll(de->inner_state, now) : 0;
    while (de->nheld && de->heap[0]->due_ns <= now) {
        struct dp_disk_io *io = heap_pop(de);
        disk_complete(de->env, io, io->held_result);
        n++;
    }
    return n;
}

static void timer_done(struct dp_disk_cqe *cqe, int res)
{
    struct delay_engine *de = container_of(cqe, struct delay_engine, timer_cqe);
    /* -ETIME is the normal end of a timeout; the due requests complete in the poll after the
     * reap. -ECANCELED: close removed it. */
    track_timer_lateness(de, de->timer_at, res);
    de->timer_at = 0;
}

/* Before the engine sleeps: a timeout for the earliest held-back request (moved earlier when
 * a new one is due sooner than the armed deadline). */
static void delay_before_wait(void *state)
{
    struct delay_engine *de = state;
    const struct dp_disk_ops *inner = de->disk->inner->ops;
    if (inner->before_wait)
        inner->before_wait(de->inner_state);
    if (!de->nheld)
        return;
    disk_arm_timeout(de->env->ring, &de->timer_ts, &de->timer_cqe, &de->timer_at,
                     de->heap[0]->due_ns);
}

/* ---- per engine, per queue ---- */

static int delay_open(struct dp_disk *disk, const struct dp_disk_env *env, void **state)
{
    struct delay_disk *d = (struct delay_disk *)disk;
    struct delay_engine *de = calloc(1, sizeof(*de));
    if (!de)
        return -ENOMEM;
    de->disk = d;
    de->env = env;
    de->inner_env = (struct dp_disk_env){
        .ring = env->ring, .complete = inner_done, .arg = de, .wait = env->wait, .files = env->files,
    };
    de->timer_cqe.done = timer_done;
    int rc = d->inner->ops->open(d->inner, &de->inner_env, &de->inner_state);
    if (rc) {
        free(de);
        return rc;
    }
    *state = de;
    return 0;
}

/* Nothing is held (every queue drained), but the timeout may still be armed: its completion
 * points here, so the state stays until the ring has handed it back. */
static int delay_close(void *state)
{
    struct delay_engine *de = state;
    if (de->nheld)
        return -EBUSY;
    if (de->timer_at) {
        if (!de->timer_cancelled) {
            struct io_uring_sqe *sqe = disk_get_sqe(de->env->ring);
            io_uring_prep_timeout_remove(sqe, (uintptr_t)&de->timer_cqe, 0);
            io_uring_sqe_set_data64(sqe, DP_CQE_IGNORE);
            de->timer_cancelled = 1;
        }
        return -EBUSY;
    }
    int rc = de->disk->inner->ops->close(de->inner_state);
    if (rc)
        return rc;
    free(de->heap);
    free(de);
    return 0;
}

static int delay_queue_open(void *state, unsigned queue, void **qstate)
{
    struct delay_engine *de = state;
    const struct dp_disk_ops *inner = de->disk->inner->ops;
    struct delay_queue *dq = calloc(1, sizeof(*dq));
    if (!dq)
        return -ENOMEM;
    dq->rng = 0x9E3779B97F4A7C15ULL ^ ((uint64_t)queue << 32) ^ (uintptr_t)dq;
    if (inner->queue_open) {
        int rc = inner->queue_open(de->inner_state, queue, &dq->inner_qstate);
        if (rc) {
            free(dq);
            return rc;
        }
    }
    *qstate = dq;
    return 0;
}

static void delay_queue_close(void *state, void *qstate)
{
    struct delay_engine *de = state;
    struct delay_queue *dq = qstate;
    const struct dp_disk_ops *inner = de->disk->inner->ops;
    if (inner->queue_close)
        inner->queue_close(de->inner_state, dq->inner_qstate);
    free(dq);
}

static void delay_free(struct dp_disk *disk)
{
    struct delay_disk *d = (struct delay_disk *)disk;
    dp_disk_free(d->inner);
    free(d);
}

static const struct dp_disk_ops delay_ops = {
    .name = "delay", .free = delay_free,
    .open = delay_open, .close = delay_close,
    .queue_open = delay_queue_open, .queue_close = delay_queue_close,
    .submit = delay_submit, .poll = delay_poll, .before_wait = delay_before_wait,
};

static int check_params(const struct dp_latency_params *params)
{
    if (params->npoints == 1 || params->npoints > DP_LATENCY_POINTS)
        return -EINVAL;
    for (unsigned i = 1; i < params->npoints; i++)
        if (params->quantile_ns[i] < params->quantile_ns[i - 1])
            return -EINVAL;   /* an inverse CDF never decreases */
    return 0;
}

struct dp_disk *dp_delay_disk_new(struct dp_disk *inner, const struct dp_latency_params *params,
                                  int *err)
{
    *err = check_params(params);
    if (*err)
        return NULL;
    struct delay_disk *d = calloc(1, sizeof(*d));
    if (!d) {
        *err = -ENOMEM;
        return NULL;
    }
    d->base.ops = &delay_ops;
    d->base.info = inner->info;
    d->base.ring_flags = inner->ring_flags;   /* its requests are the inner disk's */
    d->inner = inner;
    d->lat = *params;
    return &d->base;
}

int dp_delay_disk_set_params(struct dp_disk *disk, const struct dp_latency_params *params)
{
    if (disk->ops != &delay_ops)
        return -EINVAL;
    int rc = check_params(params);
    if (rc)
        return rc;
    ((struct delay_disk *)disk)->lat = *params;
    return 0;
}
