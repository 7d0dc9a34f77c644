/* engine.c — an I/O thread with its own io_uring, serving one queue (the per-queue design)
 * or several (the shared-thread baseline), and the disks of those queues.
 *
 * The loop: wait (spinning first, within the adaptive window) -> reap CQEs (kicks, the
 * mailbox, disks' own) -> let disks run deferred work -> pop and start requests -> one
 * interrupt per queue per batch (EVENT_IDX permitting). Nothing here takes a lock per
 * request: the only lock guards the control mailbox, which the control plane uses to attach,
 * detach and reconfigure queues. How a queue is served is queue.c.
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
#include <unistd.h>

#include "engine/engine.h"
#include "util/clock.h"

/* ---- control mailbox ---- */

static void arm_ctl(struct dp_engine *engine)
{
    struct io_uring_sqe *sqe = disk_get_sqe(&engine->ring);
    io_uring_prep_read(sqe, engine->ctl_fd, &engine->ctl_buf, sizeof(engine->ctl_buf),
                       (uint64_t)-1);
    io_uring_sqe_set_data64(sqe, (uintptr_t)engine | TAG_CTL);
}

void engine_cmd_done(struct dp_engine *engine, struct engine_cmd *cmd, int result)
{
    if (cmd->release) {   /* posted without a waiter */
        cmd->result = result;
        cmd->release(cmd);
        return;
    }
    pthread_mutex_lock(&engine->lock);
    cmd->result = result;
    cmd->done = 1;
    pthread_cond_broadcast(&engine->cond);
    pthread_mutex_unlock(&engine->lock);
}

int engine_post(struct dp_engine *engine, struct engine_cmd *cmd)
{
    uint64_t one = 1;
    cmd->done = 0;
    cmd->next = NULL;
    pthread_mutex_lock(&engine->lock);
    *engine->cmds_tail = cmd;
    engine->cmds_tail = &cmd->next;
    pthread_mutex_unlock(&engine->lock);
    return write(engine->ctl_fd, &one, sizeof(one)) == sizeof(one) ? 0 : -EIO;
}

int engine_wait(struct dp_engine *engine, struct engine_cmd *cmd)
{
    pthread_mutex_lock(&engine->lock);
    while (!cmd->done)
        pthread_cond_wait(&engine->cond, &engine->lock);
    pthread_mutex_unlock(&engine->lock);
    return cmd->result;
}

int engine_call(struct dp_engine *engine, int op, struct dp_vq *vq, int arg)
{
    struct engine_cmd cmd = { .op = op, .vq = vq, .arg = arg };
    if (engine_post(engine, &cmd))
        return -EIO;
    return engine_wait(engine, &cmd);
}

/* ---- debug switches (tests) ---- */

unsigned engine_debug_flags;
unsigned engine_debug_kill_countdown;

void dp_debug_set_flags(unsigned flags)
{
    __atomic_store_n(&engine_debug_flags, flags, __ATOMIC_RELAXED);
}

void dp_debug_kill_before_signal(unsigned nth)
{
    __atomic_store_n(&engine_debug_kill_countdown, nth, __ATOMIC_RELAXED);
}

void engine_debug_kill_point(void)
{
    if (__atomic_sub_fetch(&engine_debug_kill_countdown, 1, __ATOMIC_RELAXED) == 0)
        kill(getpid(), SIGKILL);
}

/* A spurious interrupt costs the driver one look at its used ring; a missing one can hang it
 * for good: a back end that died between publishing a used element and signalling it left
 * the driver waiting for an interrupt nobody sends (libvhost-user signals on SET_VRING_CALL
 * for the same reason). So a queue signals once when it starts and when its call fd changes. */
void engine_signal_call(struct dp_vq *vq)
{
    if (vq->call_fd < 0 || (__atomic_load_n(&engine_debug_flags, __ATOMIC_RELAXED) & DP_DEBUG_NO_START_SIGNAL))
        return;
    uint64_t one = 1;
    ssize_t rc = write(vq->call_fd, &one, sizeof(one));
    (void)rc;
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
            engine_cmd_done(engine, cmd, queue_attach(engine, cmd->vq));
            break;
        case CMD_DETACH:
            queue_begin_detach(engine, cmd->vq, cmd);
            break;
        case CMD_SET_CALL:
            cmd->vq->call_fd = cmd->arg;
            engine_signal_call(cmd->vq);
            engine_cmd_done(engine, cmd, 0);
            break;
        case CMD_SET_MEM:
            queue_set_mem(engine, cmd->vq, cmd);   /* acknowledged once the old table is unused */
            break;
        case CMD_SET_LOG:
            queue_set_log(cmd->vq, cmd->ptr);
            engine_cmd_done(engine, cmd, 0);
            break;
        case CMD_SET_IOTLB:
            queue_set_iotlb(engine, cmd->vq, cmd);   /* acknowledged once the range is unused */
            break;
        case CMD_SET_RECORDER:
            cmd->vq->rec = cmd->vq->rec_next;
            engine_cmd_done(engine, cmd, 0);
            break;
        case CMD_EXIT:
            engine->exiting = 1;
            engine_cmd_done(engine, cmd, 0);
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
    case TAG_DISK: {
        struct dp_disk_cqe *cqe = ptr;
        cqe->done(cqe, res);
        break;
    }
    case TAG_KICK:
        queue_kicked(engine, ptr, res);
        break;
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
    if (!io_uring_cq_ready(&engine->ring))
        return;
    engine->clock_ns = now_ns();   /* the completion time of the requests these CQEs end */
    io_uring_for_each_cqe(&engine->ring, head, cqe) {
        handle_cqe(engine, cqe->user_data, cqe->res);
        n++;
    }
    io_uring_cq_advance(&engine->ring, n);
}

/* Deferred work of the disks (a latency layer's due completions): how many requests it ended. */
static unsigned poll_disks(struct dp_engine *engine, uint64_t now)
{
    unsigned n = 0;
    engine->clock_ns = now;
    for (struct engine_disk *d = engine->disks; d; d = d->next)
        if (d->disk->ops->poll)
            n += d->disk->ops->poll(d->state, now);
    return n;
}

/* A disk with requests on a polled ring of its own: the engine must not sleep. */
static int disks_busy(struct dp_engine *engine)
{
    for (struct engine_disk *d = engine->disks; d; d = d->next)
        if (d->disk->ops->busy && d->disk->ops->busy(d->state))
            return 1;
    return 0;
}

static void disks_before_wait(struct dp_engine *engine)
{
    for (struct engine_disk *d = engine->disks; d; d = d->next)
        if (d->disk->ops->before_wait)
            d->disk->ops->before_wait(d->state);
}

/* ---- the vIOMMU tick: queues waiting for IOTLB UPDATEs ask again and give up on time ---- */

static void tick_done(struct dp_disk_cqe *cqe, int res)
{
    struct dp_engine *engine = container_of(cqe, struct dp_engine, tick_cqe);
    engine->tick_at = 0;   /* the loop sees tick_next has passed */
}

/* Before sleeping: a timeout for the next tick (moved earlier when it is due sooner than the
 * armed one). The loop runs the tick itself when it is busy. */
static void arm_tick(struct dp_engine *engine)
{
    if (engine->tick_next)
        disk_arm_timeout(&engine->ring, &engine->tick_ts, &engine->tick_cqe, &engine->tick_at,
                         engine->tick_next);
}

static void run_tick(struct dp_engine *engine)
{
    uint64_t now = now_ns();
    if (now < engine->tick_next)
        return;
    queue_iotlb_tick(engine, now);
    engine->tick_next = queue_iotlb_next_tick(engine, now_ns());
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
    unsigned round = 0;
    do {
        /* Every queue with work, not just the first: while one queue always has some, its
         * thread never enters the kernel, so the kicks of the others (deferred task work)
         * would not be seen and queues later in the list would starve. */
        int found = 0;
        for (struct dp_vq *vq = engine->vqs; vq; vq = vq->next)
            if (!vq->stopping && !vq->starved && vq->rings_ready && vq_has_avail(vq)) {
                vq->need_pop = 1;
                found = 1;
            }
        if (found)
            return 1;
        if (io_uring_cq_ready(&engine->ring))
            return 1;
        /* Deferred completions (DEFER_TASKRUN) run only in a system call: every fourth look,
         * not every one (the rings themselves are read in memory each time). */
        if (++round % 4 == 0) {
            io_uring_get_events(&engine->ring);
            if (io_uring_cq_ready(&engine->ring))
                return 1;
        }
        cpu_relax();
        now = now_ns();
        if (engine->ndisk_polls && poll_disks(engine, now))
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
    fixed_init(engine);
    engine->disk_env = (struct dp_disk_env){
        .ring = &engine->ring, .complete = queue_io_done, .arg = engine, .wait = &engine->wait,
        .files = &engine->fixed.ring_files,
    };
    engine->tick_cqe.done = tick_done;

    pthread_mutex_lock(&engine->lock);
    engine->tid = (int)syscall(SYS_gettid);
    engine->init_rc = rc;
    engine->init_done = 1;
    pthread_cond_broadcast(&engine->cond);
    pthread_mutex_unlock(&engine->lock);
    if (rc)
        return NULL;

    while (!engine->exiting) {
        engine->wait.slept_ns = 0;
        if (engine->npolling || (engine->ndisk_busy && disks_busy(engine))) {
            /* a queue without a kick fd, or polled I/O in flight: look, never sleep */
            io_uring_submit_and_get_events(&engine->ring);
        } else if (!poll_for_work(engine)) {
            disks_before_wait(engine);
            arm_tick(engine);
            engine->wait.slept_ns = now_ns();
            io_uring_submit_and_wait(&engine->ring, 1);
            engine->wait.woke_ns = now_ns();
            adapt_poll(engine, engine->wait.woke_ns - engine->wait.slept_ns);
        }
        reap(engine);
        if (engine->ndisk_polls)
            poll_disks(engine, now_ns());
        if (__builtin_expect(engine->tick_next != 0, 0))
            run_tick(engine);
        for (struct dp_vq *vq = engine->vqs; vq; vq = vq->next)
            if (vq->need_pop || (vq->kick_fd < 0 && !vq->stopping))
                queue_process_avail(engine, vq);
        for (struct dp_vq *vq = engine->vqs; vq; vq = vq->next)
            if (vq->need_notify)
                queue_notify(vq);
        queue_finish_detaches(engine);
    }
    io_uring_queue_exit(&engine->ring);   /* unregisters its buffers and files too */
    fixed_free(engine);
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
