/* queue.c — how an engine serves a virtqueue: pop the ring (split or packed: virtqueue.h
 * chooses), parse each chain into a request, hand it to the queue's disk through its ops
 * table, and publish what the disk completes (status byte, used ring, one interrupt per
 * batch). Also the queue's life on the
 * engine: attach (binding its disk to the engine), drain and detach, and the control plane's
 * side of it (dp_vq_start / dp_vq_stop).
 *
 * Nothing here knows which disk it serves: a request goes out through disk->ops->submit and
 * comes back through queue_io_done, the completion callback every disk on this engine is lent.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/engine.h"
#include "util/clock.h"
#include "util/hist.h"
#include "vhost/dirty_log.h"

/* ---- requests ---- */

/* The last request a drain waited for is done with guest memory: acknowledge its command. */
static __attribute__((noinline, cold)) void drain_done(struct dp_vq *vq)
{
    struct engine_cmd *cmd = vq->drain_cmd;
    vq->drain_cmd = NULL;
    engine_cmd_done(vq->engine, cmd, cmd->result);
}

/* The request touches guest memory through what it translated no more (only the used ring is
 * left to write, through the queue's own ring addresses). */
static inline void req_memory_done(struct dp_vq *vq, struct dp_req *req)
{
    if (__builtin_expect(req->in_drain, 0)) {
        req->in_drain = 0;
        if (--vq->drain_left == 0)
            drain_done(vq);
    }
}

static void release_req(struct dp_vq *vq, struct dp_req *req)
{
    req->state = REQ_FREE;
    req->next_free = vq->free_reqs;
    vq->free_reqs = req;
    STAT_ADD(vq, inflight, -1);
    if (vq->starved) {
        vq->starved = 0;
        vq->need_pop = 1;
    }
}

/* A command acknowledged once the requests in flight that pass `uses` (NULL: all) are done
 * with guest memory; at once when there are none. Requests waiting for an IOTLB UPDATE hold
 * no translation, and finished ones waiting for their ring hold none either: neither counts
 * (a drain never waits on the front end, which may be waiting for this very answer). */
static void drain_begin(struct dp_engine *engine, struct dp_vq *vq, struct engine_cmd *cmd,
                        int (*uses)(const struct dp_vq *, const struct dp_req *, const void *),
                        const void *arg)
{
    unsigned n = 0;
    for (unsigned i = 0; i < vq->nreqs; i++) {
        struct dp_req *req = &vq->reqs[i];
        if (req->state == REQ_ACTIVE && (!uses || uses(vq, req, arg))) {
            req->in_drain = 1;
            n++;
        }
    }
    if (!n) {
        engine_cmd_done(engine, cmd, cmd->result);
        return;
    }
    vq->drain_left = n;
    vq->drain_cmd = cmd;
}

/* Log what a request wrote into guest memory: the data a read or GET_ID put there (all of the
 * buffers of a read its disk failed: it may have written part of them), and the status byte. */
static __attribute__((noinline, cold)) void log_request(struct dp_vq *vq, const struct dp_req *req,
                                                         uint8_t status, int from_disk)
{
    if (req->type == VIRTIO_BLK_T_IN || req->type == VIRTIO_BLK_T_GET_ID) {
        size_t n = status == VIRTIO_BLK_S_OK ? req->used_len - 1
                   : req->type == VIRTIO_BLK_T_IN && from_disk ? req->io.nbytes : 0;
        vq_log_iov(vq, req->io.iov, req->io.iovcnt, n);
    }
    vq_log_host(vq, req->status, 1);
}

/* Publish a finished request: status byte, used ring, statistics. from_disk: its disk
 * executed it (rather than the device answering at once). */
static void req_finish(struct dp_req *req, uint8_t status, int from_disk)
{
    struct dp_vq *vq = req->vq;
    if (status == VIRTIO_BLK_S_OK) {
        if (req->type == VIRTIO_BLK_T_IN) {
            req->used_len = (uint32_t)req->io.nbytes + 1;
            STAT_ADD(vq, bytes_read, req->io.nbytes);
        } else if (req->type == VIRTIO_BLK_T_OUT) {
            STAT_ADD(vq, bytes_written, req->io.nbytes);
        }
    } else {
        req->used_len = 1;
        STAT_ADD(vq, errors, 1);
    }
    if (req->io.flags & (DP_IO_F_BOUNCED | DP_IO_F_DELAYED | DP_IO_F_POLLED | DP_IO_F_FIXED)) {
        if (req->io.flags & DP_IO_F_BOUNCED)
            STAT_ADD(vq, bounced, 1);
        if (req->io.flags & DP_IO_F_DELAYED)
            STAT_ADD(vq, delayed, 1);
        if (req->io.flags & DP_IO_F_POLLED)
            STAT_ADD(vq, polled_ios, 1);
        if (req->io.flags & DP_IO_F_FIXED)
            STAT_ADD(vq, fixed_ios, 1);
    }
    if (req->seq < vq->max_completed_seq)
        STAT_ADD(vq, out_of_order, 1);
    else
        vq->max_completed_seq = req->seq;
    uint64_t now = vq->engine->clock_ns;
    hist_add(&vq->latency, now > req->io.start_ns ? now - req->io.start_ns : 0);
    if (vq->rec)
        queue_record(vq, req, 1, status, now);
    /* The status byte is ordered before used->idx by the release in vq_push_used. */
    *req->status = status;
    if (vq_logging(vq))
        log_request(vq, req, status, from_disk);
    if (__builtin_expect(!vq->rings_ready, 0)) {
        /* A vIOMMU invalidation took the ring away: published once the IOTLB has it again. */
        req_memory_done(vq, req);
        req->state = REQ_DEFERRED;
        req->next_free = NULL;
        *vq->deferred_tail = req;
        vq->deferred_tail = &req->next_free;
        return;
    }
    vq_push_used(vq, req->head, req->used_len);
    vq->need_notify = 1;
    req_memory_done(vq, req);   /* after the used ring: a drain's table may go right after */
    release_req(vq, req);
}

void queue_io_done(void *arg, struct dp_disk_io *io, int result)
{
    req_finish(container_of(io, struct dp_req, io), blk_status(result), 1);
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

/* ---- requests behind a vIOMMU: waiting for an IOTLB UPDATE ---- */

/* Ask the front end for what the request's walk missed (the pages not asked for already). */
static void ask_for_miss(struct dp_vq *vq)
{
    vq_iotlb_report_miss(vq);
}

/* The engine's tick is due by then at the latest. */
static void schedule_tick(struct dp_vq *vq, uint64_t due)
{
    struct dp_engine *engine = vq->engine;
    if (engine && (!engine->tick_next || due < engine->tick_next))
        engine->tick_next = due;
}

static void park_tail(struct dp_vq *vq, struct dp_req *req)
{
    req->next_free = NULL;
    *vq->parked_tail = req;
    vq->parked_tail = &req->next_free;
    vq->nparked++;
}

/* The walk stopped at an address the IOTLB lacks: the request waits (its slot held, its
 * chain consumed) and the front end is asked; other requests go on. */
static __attribute__((noinline, cold)) void park(struct dp_vq *vq, struct dp_req *req,
                                                 uint16_t nsaved)
{
    uint64_t now = now_ns();
    req->state = REQ_PARKED;
    req->nsaved = nsaved;
    req->deadline_ns = now + __atomic_load_n(&vq->iommu->timeout_ns, __ATOMIC_RELAXED);
    park_tail(vq, req);
    STAT_ADD(vq, iotlb_misses, 1);
    STAT_ADD(vq, parked, 1);
    ask_for_miss(vq);
    schedule_tick(vq, req->deadline_ns < now + IOTLB_RETRY_NS ? req->deadline_ns
                                                             : now + IOTLB_RETRY_NS);
}

static void run_request(struct dp_req *req, const struct vq_chain *chain);

/* A parked request leaves without an answer (its ring broke, or is gone): no longer in flight. */
static void drop_request(struct dp_vq *vq, struct dp_req *req)
{
    STAT_ADD(vq, errors, 1);
    vq_inflight_drop(vq, req->head);
    release_req(vq, req);
}

/* Walk the parked requests again through the IOTLB as it is now. The ones it completes start;
 * the others stay parked, asking again once per retry period, until their deadline (or, with
 * final, now): then what they miss counts as a fault and they complete with IOERR. Needs the
 * rings (a split chain is walked again from the descriptor table). */
static void retry_parked(struct dp_vq *vq, int final)
{
    if (!vq->nparked || !vq->rings_ready)
        return;
    struct dp_req *list = vq->parked;
    vq->parked = NULL;
    vq->parked_tail = &vq->parked;
    vq->nparked = 0;
    uint64_t now = now_ns();
    vq->engine->clock_ns = now;   /* the requests it runs may complete at once */
    while (list) {
        struct dp_req *req = list;
        list = req->next_free;
        if (vq->broken) {
            STAT_ADD(vq, parked, -1);
            drop_request(vq, req);
            continue;
        }
        struct vq_chain chain;
        vq->nmiss = 0;
        int rc = vq_retry(vq, req->head, req->nsaved, &chain, req->seg, REQ_MAX_SEGS);
        if (rc < 0) {   /* the chain changed under us into one that breaks the ring */
            STAT_ADD(vq, parked, -1);
            drop_request(vq, req);
            vq_set_broken(vq);
            continue;
        }
        if (chain.err == VQ_MISS) {
            if (!final && now < req->deadline_ns) {
                req->nsaved = chain.nsaved;
                park_tail(vq, req);
                ask_for_miss(vq);
                continue;
            }
            chain.err = -EFAULT;   /* never mapped: the device may not touch it */
            STAT_ADD(vq, iotlb_timeouts, 1);
        }
        STAT_ADD(vq, parked, -1);
        run_request(req, &chain);
    }
}

/* Publish what finished while the ring was away. */
static void flush_deferred(struct dp_vq *vq)
{
    struct dp_req *list = vq->deferred;
    vq->deferred = NULL;
    vq->deferred_tail = &vq->deferred;
    while (list) {
        struct dp_req *req = list;
        list = req->next_free;
        vq_push_used(vq, req->head, req->used_len);
        vq->need_notify = 1;
        release_req(vq, req);
    }
}

/* The ring areas through the IOTLB again (misses asked for); 1 when the queue has them. */
static int remap_rings(struct dp_vq *vq)
{
    if (vq->rings_ready)
        return 1;
    int rc = vq_map_rings(vq);
    if (rc == VQ_MISS) {
        schedule_tick(vq, now_ns() + IOTLB_RETRY_NS);   /* ask again if no UPDATE comes */
        return 0;
    }
    if (rc) {
        vq_set_broken(vq);   /* mapped, but not as a ring can be (read-only, misaligned) */
        return 0;
    }
    vq->rings_ready = 1;
    vq->pk.device_flags = 0xffff;   /* the device area may be another page now: write it */
    return 1;
}

/* The IOTLB or the memory table changed: take the rings back if they were lost, publish what
 * waited for them, give the parked requests another walk, and look at the ring. */
static void queue_refresh(struct dp_vq *vq)
{
    if (!remap_rings(vq))
        return;
    flush_deferred(vq);
    retry_parked(vq, 0);
    vq->need_pop = 1;
}

/* A queue that stops: its parked requests get a last walk (what they still miss is a fault),
 * and what waits for a ring the IOTLB does not give back is dropped (the front end stops the
 * ring anyway: GET_VRING_BASE must not wait for it). */
static void finish_waiting(struct dp_vq *vq)
{
    if (!vq->iommu)
        return;
    if (remap_rings(vq)) {
        flush_deferred(vq);
        retry_parked(vq, 1);
        return;
    }
    while (vq->deferred) {
        struct dp_req *req = vq->deferred;
        vq->deferred = req->next_free;
        drop_request(vq, req);
    }
    vq->deferred_tail = &vq->deferred;
    while (vq->parked) {
        struct dp_req *req = vq->parked;
        vq->parked = req->next_free;
        STAT_ADD(vq, parked, -1);
        drop_request(vq, req);
    }
    vq->parked_tail = &vq->parked;
    vq->nparked = 0;
}

static void start_request(struct dp_req *req, const struct vq_chain *chain)
{
    struct dp_vq *vq = req->vq;
    req->head = chain->head;
    req->io.start_ns = vq->engine->clock_ns;   /* read once for the batch (queue_process_avail) */
    req->seq = vq->submit_seq++;
    if (__builtin_expect(chain->err == VQ_MISS, 0)) {
        park(vq, req, chain->nsaved);
        return;
    }
    run_request(req, chain);
}

/* Parse a translated chain and hand it to the disk (or answer it at once). */
static void run_request(struct dp_req *req, const struct vq_chain *chain)
{
    struct dp_vq *vq = req->vq;
    req->state = REQ_ACTIVE;
    if (__builtin_expect(chain->err != 0, 0) && vq->iommu &&
        (chain->err == -EACCES || chain->err == -EFAULT))
        STAT_ADD(vq, iotlb_faults, 1);
    int status = blk_req_parse(req, chain->nseg, chain->nreadable, chain->err, chain->last_byte,
                               vq->dev);
    if (status < 0) {
        /* No status byte to answer with: the driver broke the ring's contract. */
        STAT_ADD(vq, errors, 1);
        vq_inflight_drop(vq, req->head);
        release_req(vq, req);
        vq_set_broken(vq);
        return;
    }
    count_request(vq, req->type);
    if (vq->rec)
        queue_record(vq, req, 0, 0, req->io.start_ns);
    if (status == VIRTIO_BLK_S_OK)
        status = blk_req_answer(req, vq->dev);
    if (status >= 0) {
        req_finish(req, (uint8_t)status, 0);
        return;
    }
    req->io.buf_index = -1;
    if (vq->fixed && req->io.iovcnt == 1 && (req->io.op == DP_DISK_READ || req->io.op == DP_DISK_WRITE)) {
        req->io.buf_index = fixed_lookup(vq, req->io.iov[0].iov_base, req->io.iov[0].iov_len);
    }
    struct engine_disk *d = vq->disk;
    d->disk->ops->submit(d->state, vq->disk_queue, &req->io);
}

/* Pop everything the driver made available, re-enabling kicks before going idle. */
void queue_process_avail(struct dp_engine *engine, struct dp_vq *vq)
{
    vq->need_pop = 0;
    if (vq->stopping || vq->broken || __builtin_expect(!vq->rings_ready, 0))
        return;
    engine->clock_ns = now_ns();   /* the pop time of this batch */
    unsigned popped = 0;
    do {
        struct dp_req *req;
        while ((req = vq->free_reqs)) {
            /* Read again every 16 requests: a long batch (a driver that keeps publishing, a
             * full SQ submitted on the way) must not stamp its last requests with its start. */
            if (++popped % 16 == 0)
                engine->clock_ns = now_ns();
            struct vq_chain chain;
            vq->nmiss = 0;
            int rc = vq_pop(vq, &chain, req->seg, REQ_MAX_SEGS);
            if (rc <= 0)
                break;
            vq->free_reqs = req->next_free;
            STAT_ADD(vq, inflight, 1);
            start_request(req, &chain);
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

void queue_notify(struct dp_vq *vq)
{
    if (__builtin_expect(!vq->rings_ready, 0))
        return;   /* need_notify stays: the ring's flags are read once it is back */
    vq->need_notify = 0;
    if (vq_need_notify(vq) && vq->call_fd >= 0) {
        engine_debug_before_signal();
        uint64_t one = 1;
        ssize_t rc = write(vq->call_fd, &one, sizeof(one));
        (void)rc;   /* a full counter still wakes the driver; nothing else to do */
        STAT_ADD(vq, notifies, 1);
    }
}

static void arm_kick(struct dp_engine *engine, struct dp_vq *vq)
{
    struct io_uring_sqe *sqe = disk_get_sqe(&engine->ring);
    io_uring_prep_read(sqe, vq->kick_fd, &vq->kick_buf, sizeof(vq->kick_buf), (uint64_t)-1);
    io_uring_sqe_set_data64(sqe, (uintptr_t)vq | TAG_KICK);
    vq->kick_armed = 1;
}

void queue_kicked(struct dp_engine *engine, struct dp_vq *vq, int res)
{
    vq->kick_armed = 0;
    if (vq->stopping)
        return;
    if (res == 0 || (res < 0 && res != -EINTR && res != -EAGAIN))
        return;   /* not an eventfd any more, or gone: nothing more will come from it */
    STAT_ADD(vq, kicks, 1);
    vq->need_pop = 1;
    arm_kick(engine, vq);
}

/* After a back-end restart: what the previous process had popped but not completed. */
static void resubmit_inflight(struct dp_vq *vq)
{
    for (unsigned i = 0; i < vq->nresubmit; i++) {
        struct dp_req *req = vq->free_reqs;
        struct vq_chain chain;
        vq->nmiss = 0;
        if (!req || vq_read_chain(vq, vq->resubmit[i], &chain, req->seg, REQ_MAX_SEGS) < 0) {
            for (unsigned j = i; j < vq->nresubmit; j++)
                vq_inflight_drop(vq, vq->resubmit[j]);
            vq_set_broken(vq);
            break;
        }
        vq->free_reqs = req->next_free;
        STAT_ADD(vq, inflight, 1);
        STAT_ADD(vq, resubmitted, 1);
        start_request(req, &chain);
        if (vq->broken)
            break;
    }
    vq->nresubmit = 0;
}

/* ---- the queue's disk on this engine ---- */

static void unlink_disk(struct dp_engine *engine, struct engine_disk *d)
{
    struct engine_disk **link = &engine->disks;
    while (*link != d)
        link = &(*link)->next;
    *link = d->next;
    if (d->disk->ops->poll)
        engine->ndisk_polls--;
    if (d->disk->ops->busy)
        engine->ndisk_busy--;
}

/* Undo open for a disk state no queue ever used: open queues nothing on the ring, so close
 * has nothing to wait for (a disk that broke that rule keeps its state: leaked, not freed
 * under an SQE). */
static void drop_unused_disk(struct dp_engine *engine, struct engine_disk *d)
{
    unlink_disk(engine, d);
    if (d->disk->ops->close(d->state) == 0)
        free(d);
}

/* The disk's state on this engine: the one its other queues here use, or a new one. */
static int bind_disk(struct dp_engine *engine, struct dp_vq *vq)
{
    struct dp_disk *disk = vq->dev->disk;
    struct engine_disk *d = engine->disks;
    while (d && (d->disk != disk || d->closing))
        d = d->next;
    if (!d) {
        d = calloc(1, sizeof(*d));
        if (!d)
            return -ENOMEM;
        d->disk = disk;
        int rc = disk->ops->open(disk, &engine->disk_env, &d->state);
        if (rc) {
            free(d);
            return rc;
        }
        d->next = engine->disks;
        engine->disks = d;
        if (disk->ops->poll)
            engine->ndisk_polls++;
        if (disk->ops->busy)
            engine->ndisk_busy++;
    }
    vq->disk_queue = NULL;
    if (disk->ops->queue_open) {
        int rc = disk->ops->queue_open(d->state, vq->index, &vq->disk_queue);
        if (rc) {
            if (!d->queues)
                drop_unused_disk(engine, d);
            return rc;
        }
    }
    d->queues++;
    vq->disk = d;
    vq->disk_queue_open = 1;
    vq->fixed_wanted = (disk->ring_flags & DISK_RING_FIXED_BUFFERS) != 0;
    if (vq->fixed_wanted)
        fixed_queue_set(engine, vq, vq->mem);
    return 0;
}

/* The queue lets go of its disk; the last queue of it here releases the disk's state, which
 * may have to wait for SQEs of the disk to come back from the ring (-EBUSY: try again). */
static int unbind_disk(struct dp_engine *engine, struct dp_vq *vq)
{
    struct engine_disk *d = vq->disk;
    const struct dp_disk_ops *ops = d->disk->ops;
    if (vq->disk_queue_open) {
        if (ops->queue_close)
            ops->queue_close(d->state, vq->disk_queue);
        vq->disk_queue = NULL;
        vq->disk_queue_open = 0;
        if (--d->queues == 0)
            d->closing = 1;
    }
    if (!d->closing) {
        vq->disk = NULL;
        return 0;
    }
    if (ops->close(d->state) == -EBUSY)
        return -EBUSY;
    unlink_disk(engine, d);
    free(d);
    vq->disk = NULL;
    return 0;
}

/* ---- attach and detach (on the engine thread, from the mailbox) ---- */

int queue_attach(struct dp_engine *engine, struct dp_vq *vq)
{
    int rc = bind_disk(engine, vq);
    if (rc)
        return rc;
    vq_attach_ring(vq);
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
    engine_signal_call(vq);
    engine->clock_ns = now_ns();
    resubmit_inflight(vq);
    return 0;
}

/* A new memory table (CMD_SET_MEM): requests popped from now on translate through it. With
 * drain (cmd->arg), the command is acknowledged once the requests in flight before are all done
 * with guest memory: then nothing of the queue points into a region the old table had and the
 * new one lacks. */
void queue_set_mem(struct dp_engine *engine, struct dp_vq *vq, struct engine_cmd *cmd)
{
    vq->mem = cmd->ptr;
    /* Registered here, on the engine thread, before a request can translate into the table;
     * requests in flight on buffers it drops keep them (the kernel holds them until done). */
    if (vq->fixed_wanted)
        fixed_queue_set(engine, vq, vq->mem);
    vq_iotlb_changed(vq);   /* cached translations hold host addresses of the old table */
    /* The rings' host addresses stay as they were when they cannot be found in the new table:
     * the requests in flight still complete into them (the old mapping lives until the drain
     * is acknowledged), and the broken queue touches them no more after that. A queue whose
     * vIOMMU took its rings away looks for them later (queue_refresh). */
    cmd->result = 0;
    if (vq->rings_ready) {
        int rc = vq_map_rings(vq);
        if (rc == VQ_MISS) {
            vq_unmap_rings(vq);
        } else if (rc) {
            cmd->result = rc;
            vq_set_broken(vq);
        }
    }
    if (!cmd->arg || (__atomic_load_n(&engine_debug_flags, __ATOMIC_RELAXED) & DP_DEBUG_NO_MEM_DRAIN))
        engine_cmd_done(engine, cmd, cmd->result);
    else
        drain_begin(engine, vq, cmd, NULL, NULL);
    if (vq->iommu)   /* cmd may be gone now */
        queue_refresh(vq);
}

/* Does an invalidation take away memory the request still uses (its data buffers, its status
 * byte)? By the front-end user addresses the old IOTLB mapped the range to, so a page the
 * guest mapped under two IOVAs counts whichever it used. */
static int uses_host(const struct dp_vq *vq, const void *p, size_t len,
                     const struct vq_iotlb_cfg *cfg)
{
    if (!len)
        return 0;
    const struct mem_region *r = guest_mem_host_region(vq->mem, p);
    uint64_t off = r ? (uint64_t)((const uint8_t *)p - r->host_addr) : 0;
    if (!r || len > r->size - off)
        return 1;   /* not within one region of the table now: count it, to be safe */
    uint64_t first = r->user_addr + off, last = first + (len - 1);
    for (unsigned i = 0; i < cfg->nremoved; i++)
        if (first <= cfg->removed[i].last && cfg->removed[i].first <= last)
            return 1;
    return 0;
}

static int req_uses_removed(const struct dp_vq *vq, const struct dp_req *req, const void *arg)
{
    const struct vq_iotlb_cfg *cfg = arg;
    if (cfg->all)
        return 1;
    if (uses_host(vq, req->status, 1, cfg))
        return 1;
    for (unsigned i = 0; i < req->io.iovcnt; i++)
        if (uses_host(vq, req->io.iov[i].iov_base, req->io.iov[i].iov_len, cfg))
            return 1;
    return 0;
}

/* A new IOTLB snapshot (CMD_SET_IOTLB). After an invalidation nothing of the queue may use
 * the range once the command is acknowledged: cached translations are stale at once, a ring
 * in it is forgotten (translated again, through a miss, before its next use) and the requests
 * in flight that use it are waited for. Then the queue looks again at what waited for the
 * IOTLB: its rings, its parked requests. */
void queue_set_iotlb(struct dp_engine *engine, struct dp_vq *vq, struct engine_cmd *cmd)
{
    const struct vq_iotlb_cfg *cfg = cmd->ptr;
    const struct dp_iotlb *old = vq->iotlb;
    vq->iotlb = cfg->iotlb;   /* with the reference the poster took for this queue */
    iotlb_put(old);
    vq_iotlb_changed(vq);
    cmd->result = 0;
    if (cfg->update)   /* what was asked for there is answered: ask again at once if need be */
        vq_iotlb_answered(vq, cfg->first, cfg->last);
    int check = !(__atomic_load_n(&vq->iommu->flags, __ATOMIC_RELAXED) & DP_IOMMU_F_NO_CHECK);
    if (cfg->invalidate && check) {
        if (vq->rings_ready && vq_rings_overlap(vq, cfg->first, cfg->last))
            vq_unmap_rings(vq);
        drain_begin(engine, vq, cmd, req_uses_removed, cfg);
        if (vq->drain_cmd)
            STAT_ADD(vq, iotlb_drains, 1);
    } else {
        engine_cmd_done(engine, cmd, 0);
    }
    queue_refresh(vq);   /* cmd and cfg may be gone now */
}

/* ---- the vIOMMU tick: asking again, giving up ---- */

uint64_t queue_iotlb_next_tick(struct dp_engine *engine, uint64_t now)
{
    uint64_t next = 0;
    for (struct dp_vq *vq = engine->vqs; vq; vq = vq->next) {
        if (!vq->iommu || vq->stopping || (vq->rings_ready && !vq->nparked))
            continue;
        uint64_t due = now + IOTLB_RETRY_NS;
        if (vq->nparked && vq->parked->deadline_ns < due)
            due = vq->parked->deadline_ns;   /* the oldest gives up first */
        if (!next || due < next)
            next = due;
    }
    return next;
}

void queue_iotlb_tick(struct dp_engine *engine, uint64_t now)
{
    for (struct dp_vq *vq = engine->vqs; vq; vq = vq->next) {
        if (!vq->iommu || vq->stopping)
            continue;
        if (!vq->rings_ready)
            queue_refresh(vq);        /* asks for the rings again */
        else if (vq->nparked)
            retry_parked(vq, 0);      /* asks again, or gives up */
    }
}

void queue_set_log(struct dp_vq *vq, const struct vq_log_cfg *cfg)
{
    vq->log = cfg->log;
    vq->log_used = cfg->log != NULL && cfg->log_used;
    vq->log_used_gpa = cfg->used_gpa;
    vq->logging = cfg->log != NULL;
}

void queue_begin_detach(struct dp_engine *engine, struct dp_vq *vq, struct engine_cmd *cmd)
{
    finish_waiting(vq);
    vq->stopping = 1;
    vq->detach_cmd = cmd;
    if (vq->kick_armed) {
        struct io_uring_sqe *sqe = disk_get_sqe(&engine->ring);
        io_uring_prep_cancel64(sqe, (uintptr_t)vq | TAG_KICK, 0);
        io_uring_sqe_set_data64(sqe, TAG_IGNORE);
    }
}

/* A stopping queue leaves once its in-flight requests and its kick read are done, and its
 * disk has let go of it. */
void queue_finish_detaches(struct dp_engine *engine)
{
    struct dp_vq **link = &engine->vqs;
    while (*link) {
        struct dp_vq *vq = *link;
        if (!vq->stopping || vq->stats.inflight || vq->kick_armed ||
            (vq->disk && unbind_disk(engine, vq) == -EBUSY)) {
            link = &vq->next;
            continue;
        }
        *link = vq->next;
        vq->next = NULL;
        fixed_queue_clear(engine, vq);
        vq->fixed_wanted = 0;
        if (vq->kick_fd < 0)
            engine->npolling--;
        if (vq->need_notify)
            queue_notify(vq);
        /* Last touch of vq: once acknowledged, the control plane may free it. */
        struct engine_cmd *cmd = vq->detach_cmd;
        int last_avail_idx = vq->last_avail_idx;
        vq->detach_cmd = NULL;
        engine_cmd_done(engine, cmd, last_avail_idx);
    }
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
        req->state = REQ_FREE;
        req->in_drain = 0;
        req->vq = vq;
        req->seg = &vq->iov_pool[(size_t)i * REQ_MAX_SEGS];
        req->next_free = vq->free_reqs;
        vq->free_reqs = req;
    }
    return 0;
}

int dp_vq_start(struct dp_vq *vq, struct dp_engine *engine)
{
    if (vq->engine)
        return -EBUSY;
    if (!vq->dev)
        return -EINVAL;
    int rc = vq_map_rings(vq);
    if (rc == VQ_MISS)
        return -EAGAIN;   /* behind a vIOMMU: not in the IOTLB yet, asked for */
    if (rc)
        return rc;
    rc = vq_alloc_reqs(vq);
    if (rc)
        return rc;
    rc = vq_start_prepare(vq);
    if (rc < 0)
        return rc;
    vq->rings_ready = 1;
    vq->parked = vq->deferred = NULL;
    vq->parked_tail = &vq->parked;
    vq->deferred_tail = &vq->deferred;
    vq->nparked = 0;
    vq->drain_left = 0;
    vq->drain_cmd = NULL;
    __atomic_store_n(&vq->stats.parked, 0, __ATOMIC_RELAXED);
    vq->started_at = vq_is_packed(vq) ? dp_vq_packed_base(vq) : vq->last_avail_idx;
    vq->broken = 0;
    __atomic_store_n(&vq->stats.broken, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&vq->stats.inflight, 0, __ATOMIC_RELAXED);
    vq->engine = engine;
    rc = engine_call(engine, CMD_ATTACH, vq, 0);
    if (rc)
        vq->engine = NULL;
    return rc;
}

uint32_t dp_vq_started_at(const struct dp_vq *vq)
{
    return vq->started_at;
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

/* Wait for the commands posted to queues (those with cmds[i].vq set), the first error after
 * rc's; frees cmds. */
static int wait_posted(struct dp_vq *const *vqs, unsigned n, struct engine_cmd *cmds, int rc)
{
    for (unsigned i = 0; i < n; i++) {
        if (cmds[i].vq) {
            int r = engine_wait(vqs[i]->engine, &cmds[i]);
            if (r && !rc)
                rc = r;
        }
    }
    free(cmds);
    return rc;
}

int dp_vqs_set_mem(struct dp_vq *const *vqs, unsigned n, struct dp_mem *mem, int drain)
{
    struct engine_cmd *cmds = calloc(n ? n : 1, sizeof(*cmds));
    if (!cmds)
        return -ENOMEM;
    int rc = 0;
    /* Post to every running queue first, so that their drains overlap. */
    for (unsigned i = 0; i < n; i++) {
        struct dp_vq *vq = vqs[i];
        if (!vq->engine) {
            int r = dp_vq_set_mem(vq, mem);
            if (r && vq->addr_set && !rc)
                rc = r;
            continue;
        }
        cmds[i] = (struct engine_cmd){ .op = CMD_SET_MEM, .vq = vq, .ptr = mem, .arg = drain != 0 };
        if (engine_post(vq->engine, &cmds[i])) {
            /* The mailbox is gone: nothing can be published safely any more. */
            cmds[i].vq = NULL;
            rc = -EIO;
        }
    }
    return wait_posted(vqs, n, cmds, rc);
}

static int publish_iotlb(struct dp_vq *const *vqs, unsigned n, const struct vq_iotlb_cfg *cfg);

/* A stopped queue takes a snapshot at once. */
static void iotlb_to_stopped(struct dp_vq *vq, const struct vq_iotlb_cfg *cfg)
{
    const struct dp_iotlb *old = vq->iotlb;
    vq->iotlb = iotlb_get(cfg->iotlb);
    iotlb_put(old);
    vq_iotlb_changed(vq);
    if (cfg->invalidate && vq_rings_overlap(vq, cfg->first, cfg->last))
        vq_unmap_rings(vq);
    if (cfg->update)
        vq_iotlb_answered(vq, cfg->first, cfg->last);
}

/* An UPDATE posted to the running queues without waiting: what it adds may be used from
 * when each queue takes it, nothing has to stop using anything first. One allocation holds
 * the payload and the commands; the last queue done frees it. */
struct iotlb_post {
    unsigned left;
    struct vq_iotlb_cfg cfg;
    struct engine_cmd cmds[];
};

static void post_release(struct engine_cmd *cmd)
{
    struct iotlb_post *post = container_of(cmd->ptr, struct iotlb_post, cfg);
    if (__atomic_sub_fetch(&post->left, 1, __ATOMIC_ACQ_REL) == 0)
        free(post);
}

int dp_vqs_update_iotlb(struct dp_vq *const *vqs, unsigned n, const struct dp_iotlb *iotlb,
                        uint64_t iova, uint64_t size)
{
    struct iotlb_post *post = calloc(1, sizeof(*post) + (n ? n : 1) * sizeof(post->cmds[0]));
    if (!post)
        return -ENOMEM;
    post->cfg.iotlb = iotlb;
    if (size) {
        post->cfg.update = 1;
        post->cfg.first = iova;
        post->cfg.last = iova + (size - 1) < iova ? UINT64_MAX : iova + (size - 1);
    }
    post->left = 1;   /* ours, while posting */
    int rc = 0;
    for (unsigned i = 0; i < n; i++) {
        struct dp_vq *vq = vqs[i];
        if (!vq->iommu)
            continue;
        if (!vq->engine) {
            iotlb_to_stopped(vq, &post->cfg);
            continue;
        }
        struct engine_cmd *cmd = &post->cmds[i];
        *cmd = (struct engine_cmd){ .op = CMD_SET_IOTLB, .vq = vq, .ptr = &post->cfg,
                                    .release = post_release };
        iotlb_get(iotlb);   /* the queue's, once it takes the snapshot */
        __atomic_add_fetch(&post->left, 1, __ATOMIC_RELAXED);
        if (engine_post(vq->engine, cmd)) {
            /* the mailbox is gone (the eventfd write failed): the engine may still run it */
            rc = -EIO;
        }
    }
    post_release(&(struct engine_cmd){ .ptr = &post->cfg });
    return rc;
}

int dp_vqs_set_iotlb(struct dp_vq *const *vqs, unsigned n, const struct dp_iotlb *iotlb,
                     const struct dp_iotlb *old, uint64_t inval_iova, uint64_t inval_size)
{
    struct vq_iotlb_cfg cfg = { .iotlb = iotlb };
    if (inval_size) {
        cfg.invalidate = 1;
        cfg.first = inval_iova;
        cfg.last = inval_iova + (inval_size - 1);
        if (cfg.last < cfg.first)
            return -EINVAL;
        unsigned k = iotlb_removed(old, cfg.first, cfg.last, cfg.removed, IOTLB_INVAL_RANGES);
        cfg.nremoved = k < IOTLB_INVAL_RANGES ? k : IOTLB_INVAL_RANGES;
        cfg.all = k > IOTLB_INVAL_RANGES;
    }
    return publish_iotlb(vqs, n, &cfg);
}

/* Post to every running queue behind a vIOMMU first, so that their drains overlap; a
 * stopped one takes the snapshot at once. */
static int publish_iotlb(struct dp_vq *const *vqs, unsigned n, const struct vq_iotlb_cfg *cfg)
{
    struct engine_cmd *cmds = calloc(n ? n : 1, sizeof(*cmds));
    if (!cmds)
        return -ENOMEM;
    int rc = 0;
    for (unsigned i = 0; i < n; i++) {
        struct dp_vq *vq = vqs[i];
        if (!vq->iommu)
            continue;
        if (!vq->engine) {
            iotlb_to_stopped(vq, cfg);
            continue;
        }
        cmds[i] = (struct engine_cmd){ .op = CMD_SET_IOTLB, .vq = vq, .ptr = (void *)cfg };
        iotlb_get(cfg->iotlb);   /* the queue's, once it takes the snapshot */
        if (engine_post(vq->engine, &cmds[i]))
            rc = -EIO;   /* queued all the same: waited for below */
    }
    return wait_posted(vqs, n, cmds, rc);
}

int dp_vq_set_log(struct dp_vq *vq, struct dp_dirty_log *log, int log_used, uint64_t used_gpa)
{
    struct vq_log_cfg cfg = { .log = log, .log_used = log_used, .used_gpa = used_gpa };
    if (!vq->engine) {
        queue_set_log(vq, &cfg);
        return 0;
    }
    struct engine_cmd cmd = { .op = CMD_SET_LOG, .vq = vq, .ptr = &cfg };
    if (engine_post(vq->engine, &cmd))
        return -EIO;
    return engine_wait(vq->engine, &cmd);
}

void dp_vq_free(struct dp_vq *vq)
{
    if (!vq)
        return;
    dp_vq_stop(vq);
    iotlb_put(vq->iotlb);
    free(vq->resubmit);
    free(vq->reqs);
    free(vq->iov_pool);
    free(vq);
}
