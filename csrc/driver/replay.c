/* replay.c — trace replay: one thread per queue issues the records Python feeds it, in feed
 * order, either on the trace's schedule (timed, open loop: lateness is measured as issue lag)
 * or as fast as iodepth allows (afap, closed loop), through a virtqueue, split or packed
 * (playing the guest, like load.c), or through an io_uring on a file (the bare-metal
 * baseline).
 *
 * Order within a queue: records are issued in feed order; one that overlaps a request in
 * flight waits for it when either writes (a flush waits for every write in flight), and the
 * records after it wait too, so a read after a write in the same stream sees the write.
 * Completions may come back in any order. Everything read from the used ring is checked.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "replay.h"

#define SECTOR 512
#define STAMP_STRIDE 4096
#define STATUS_UNSET 0xff
#define NO_LAYOUT 0xff
#define HAZARD_SPAN 8
#define DEFAULT_FEED 65536u
#define DEFAULT_TIMEOUT_NS (30ull * 1000000000ull)
#define LATE_NS 1000000ull
#define NS_PER_S 1000000000ull
/* Longest sleep while a second's row waits to be published, so rows flow while idle. */
#define SERIES_TICK_NS (NS_PER_S / 4)

struct replay_stamp {
    uint32_t magic;
    uint32_t queue;
    uint64_t seq;                /* record + 1 */
    uint64_t offset;             /* disk byte offset of the stamped position */
};

static inline int op_writes(unsigned op)
{
    return op == DP_REPLAY_OP_WRITE || op == DP_REPLAY_OP_TRIM;
}

static inline int op_has_data(unsigned op)
{
    return op == DP_REPLAY_OP_READ || op == DP_REPLAY_OP_WRITE;
}

/* A slot's chain laid out for a read or a write (not NO_LAYOUT, a flush or a trim). */
static inline int layout_has_data(unsigned layout)
{
    return layout == DP_REPLAY_OP_READ || layout == DP_REPLAY_OP_WRITE;
}

/* ---- the feed (consumer side; the producer is dp_replay_feed) ---- */

static inline const struct dp_replay_rec *feed_peek(struct dp_replay *r)
{
    struct replay_feed *f = &r->feed;
    /* The producer's tail is read again only when the records known to be there are used up:
     * not once per record, so its cache line is not pulled over while the producer writes it. */
    if (f->local_head == f->local_tail) {
        /* Pairs with the release store of tail in dp_replay_feed: records before the index. */
        f->local_tail = __atomic_load_n(&f->tail, __ATOMIC_ACQUIRE);
        if (f->local_head == f->local_tail)
            return NULL;
    }
    return &f->buf[f->local_head & f->mask];
}

static inline int feed_ended(struct dp_replay *r)
{
    struct replay_feed *f = &r->feed;
    if (!__atomic_load_n(&f->end, __ATOMIC_ACQUIRE))
        return 0;
    return f->local_head == __atomic_load_n(&f->tail, __ATOMIC_ACQUIRE);
}

/* Give the consumed records' room back and wake a producer waiting for it. Done in chunks of
 * an eighth of the feed, and whenever the thread may sleep (force), not per issue batch: the
 * full barrier here would otherwise cost as much as the ring's own. */
static void feed_release(struct dp_replay *r, int force)
{
    struct replay_feed *f = &r->feed;
    uint64_t consumed = f->local_head - f->head;
    if (!consumed || (!force && consumed <= f->mask / 8))
        return;
    /* Our reads of the records before the producer may overwrite them. */
    __atomic_store_n(&f->head, f->local_head, __ATOMIC_RELEASE);
    if (__atomic_load_n(&f->end, __ATOMIC_RELAXED))
        return;   /* no producer any more */
    /* head before producer_waiting; pairs with the fence in feed_wait_room. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(&f->producer_waiting, __ATOMIC_RELAXED)) {
        pthread_mutex_lock(&r->t.lock);
        pthread_cond_broadcast(&f->room);
        pthread_mutex_unlock(&r->t.lock);
    }
}

/* ---- per-second rows ----
 * Nothing is recorded per request for them: when a second ends, its row is the difference
 * between the cumulative per-op stats now and at the end of the previous second. */

/* out += now - before (out may already hold other differences). */
static void hist_diff(struct dp_hist *out, const struct dp_hist *now, const struct dp_hist *before)
{
    int first = -1, last = -1;
    out->n += now->n - before->n;
    out->sum += now->sum - before->sum;
    out->sumsq += now->sumsq - before->sumsq;
    for (unsigned i = 0; i < DP_HIST_NR; i++) {
        uint64_t c = now->bucket[i] - before->bucket[i];
        out->bucket[i] += c;
        if (c) {
            if (first < 0)
                first = (int)i;
            last = (int)i;
        }
    }
    if (first >= 0) {
        uint64_t lo = dp_hist_bucket_low((unsigned)first), hi = dp_hist_bucket_value((unsigned)last);
        out->min = out->min && out->min < lo ? out->min : lo;
        out->max = out->max > hi ? out->max : hi;
    }
}

static void series_publish(struct dp_replay *r)
{
    struct replay_series_snap *prev = &r->prev;
    if (r->completed == prev->completed)
        return;
    uint64_t head = __atomic_load_n(&r->series_head, __ATOMIC_ACQUIRE);
    if (r->series_tail - head < REPLAY_SERIES_RING) {
        struct replay_series_entry *e = &r->series[r->series_tail % REPLAY_SERIES_RING];
        memset(e, 0, sizeof(*e));
        e->row.second = r->cur_second;
        for (unsigned op = 0; op < DP_REPLAY_OPS; op++) {
            e->row.ios[op] = r->op[op].ios - prev->ios[op];
            e->row.bytes[op] = r->op[op].bytes - prev->bytes[op];
            hist_diff(&e->hist[2], &r->op[op].slat, &prev->slat[op]);
        }
        hist_diff(&e->hist[0], &r->op[DP_REPLAY_OP_READ].clat, &prev->clat[0]);
        hist_diff(&e->hist[1], &r->op[DP_REPLAY_OP_WRITE].clat, &prev->clat[1]);
        /* The row before the index that publishes it (pairs with dp_replay_take_second). */
        __atomic_store_n(&r->series_tail, r->series_tail + 1, __ATOMIC_RELEASE);
    } else {
        COUNTER_ADD(r->c.series_dropped, 1);
    }
    prev->completed = r->completed;
    for (unsigned op = 0; op < DP_REPLAY_OPS; op++) {
        prev->ios[op] = r->op[op].ios;
        prev->bytes[op] = r->op[op].bytes;
        prev->slat[op] = r->op[op].slat;
    }
    prev->clat[0] = r->op[DP_REPLAY_OP_READ].clat;
    prev->clat[1] = r->op[DP_REPLAY_OP_WRITE].clat;
}

/* At the end of a second, publish its row and move on to the second `now` falls in. */
static inline void series_at(struct dp_replay *r, uint64_t now)
{
    if (now < r->cur_end_ns)
        return;
    series_publish(r);
    uint64_t second = now > r->start_ns ? (now - r->start_ns) / NS_PER_S : 0;
    r->cur_second = second;
    r->cur_end_ns = r->start_ns + (second + 1) * NS_PER_S;
    /* Rows before the horizon are published (or counted as dropped). */
    __atomic_store_n(&r->horizon, second, __ATOMIC_RELEASE);
}

/* ---- transport: the driver side of a virtqueue ---- */

static const uint32_t op_type[DP_REPLAY_OPS] = { VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
                                                 VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_DISCARD };

static void packed_prep(struct dp_replay *r, struct replay_slot *s, int data);

/* The slot's chain is rewritten only when its op changes; otherwise the header's sector, the
 * data length or the discard range is all that differs from the slot's previous request. */
static void vring_prep(struct dp_replay *r, struct replay_slot *s)
{
    struct virtio_blk_outhdr *hdr = (struct virtio_blk_outhdr *)s->meta;
    struct virtio_blk_discard_write_zeroes *range =
        (struct virtio_blk_discard_write_zeroes *)(s->meta + 32);
    uint8_t *status = s->meta + 16;
    int data = op_has_data(s->op);

    hdr->sector = data ? s->offset >> SECTOR_SHIFT : 0;
    if (s->op == DP_REPLAY_OP_TRIM) {
        range->sector = s->offset >> SECTOR_SHIFT;
        range->num_sectors = s->length >> SECTOR_SHIFT;
        range->flags = 0;
    }
    *status = STATUS_UNSET;   /* a device that never writes it is caught */
    if (r->packed) {
        packed_prep(r, s, data);
        return;
    }
    /* Descriptors are plain stores: the release store of avail->idx publishes them. */
    if (s->layout == s->op || (data && layout_has_data(s->layout))) {
        /* A read after a write (or the reverse) has the same chain: the header's type and the
         * data descriptor's WRITE flag are all that change, as in load.c. Only what changed is
         * stored: an unchanged line stays shared with the device's cache instead of bouncing
         * back to ours. */
        if (s->layout != s->op) {
            hdr->type = op_type[s->op];
            s->data_desc->flags = VRING_DESC_F_NEXT | (s->op == DP_REPLAY_OP_READ ? VRING_DESC_F_WRITE : 0);
            s->layout = s->op;
        }
        if (data && s->data_desc->len != s->length)
            s->data_desc->len = s->length;
        driver_ring_add(&r->ring, s->head);
        return;
    }

    struct vring_desc chain[3];
    unsigned n = 0;
    hdr->type = op_type[s->op];
    hdr->ioprio = 0;
    chain[n++] = (struct vring_desc){ .addr = s->meta_gpa, .len = 16, .flags = VRING_DESC_F_NEXT };
    if (data)
        chain[n++] = (struct vring_desc){ .addr = s->data_gpa, .len = s->length, .flags = VRING_DESC_F_NEXT |
                                          (s->op == DP_REPLAY_OP_READ ? VRING_DESC_F_WRITE : 0) };
    else if (s->op == DP_REPLAY_OP_TRIM)
        chain[n++] = (struct vring_desc){ .addr = s->meta_gpa + 32, .len = sizeof(*range),
                                          .flags = VRING_DESC_F_NEXT };
    chain[n++] = (struct vring_desc){ .addr = s->meta_gpa + 16, .len = 1, .flags = VRING_DESC_F_WRITE };

    int indirect = r->p.ring.indirect;
    struct vring_desc *table = indirect ? (struct vring_desc *)(s->meta + 64) : &r->ring.desc[s->head];
    for (unsigned i = 0; i < n; i++) {
        chain[i].next = (uint16_t)((indirect ? 0 : s->head) + i + 1);
        table[i] = chain[i];
    }
    if (indirect)
        r->ring.desc[s->head].len = n * (uint32_t)sizeof(struct vring_desc);
    s->data_desc = &table[1];
    s->layout = s->op;
    driver_ring_add(&r->ring, s->head);
}

/* A packed ring: the slot's list is laid out in its template (direct) or its table (indirect)
 * when its op changes, as vring_prep does; each request then writes it into the ring (the
 * header, status and range are vring_prep's). */
static void packed_prep(struct dp_replay *r, struct replay_slot *s, int data)
{
    unsigned slot = (unsigned)(s - r->slots);
    struct pvirtq_desc *tmpl = &r->ptmpl[slot * 3];
    if (s->layout != s->op && !(data && layout_has_data(s->layout))) {
        struct virtio_blk_outhdr *hdr = (struct virtio_blk_outhdr *)s->meta;
        struct pvirtq_desc chain[3];
        unsigned n = 0;
        hdr->type = op_type[s->op];
        hdr->ioprio = 0;
        chain[n++] = (struct pvirtq_desc){ .addr = s->meta_gpa, .len = 16 };
        if (data)
            chain[n++] = (struct pvirtq_desc){ .addr = s->data_gpa, .len = s->length,
                                               .flags = s->op == DP_REPLAY_OP_READ ? VRING_DESC_F_WRITE : 0 };
        else if (s->op == DP_REPLAY_OP_TRIM)
            chain[n++] = (struct pvirtq_desc){ .addr = s->meta_gpa + 32,
                                               .len = sizeof(struct virtio_blk_discard_write_zeroes) };
        chain[n++] = (struct pvirtq_desc){ .addr = s->meta_gpa + 16, .len = 1, .flags = VRING_DESC_F_WRITE };
        if (r->p.ring.indirect) {   /* only WRITE is valid in an indirect table */
            struct pvirtq_desc *table = (struct pvirtq_desc *)(s->meta + 64);
            memcpy(table, chain, n * sizeof(chain[0]));
            tmpl[0] = (struct pvirtq_desc){ .addr = s->meta_gpa + 64,
                                            .len = n * (uint32_t)sizeof(chain[0]),
                                            .flags = VRING_DESC_F_INDIRECT };
            s->pdata_desc = &table[1];
            s->ring_descs = 1;
        } else {
            for (unsigned i = 0; i + 1 < n; i++)
                chain[i].flags |= VRING_DESC_F_NEXT;
            memcpy(tmpl, chain, n * sizeof(chain[0]));
            s->pdata_desc = &tmpl[1];
            s->ring_descs = (uint8_t)n;
        }
        s->layout = s->op;
    } else if (data) {
        if (s->layout != s->op) {   /* read <-> write: the type and the WRITE flag */
            ((struct virtio_blk_outhdr *)s->meta)->type = op_type[s->op];
            uint16_t next = s->pdata_desc->flags & VRING_DESC_F_NEXT;
            s->pdata_desc->flags = (uint16_t)(next | (s->op == DP_REPLAY_OP_READ ? VRING_DESC_F_WRITE : 0));
            s->layout = s->op;
        }
        if (s->pdata_desc->len != s->length)
            s->pdata_desc->len = s->length;
    }
    driver_packed_add(&r->pring, tmpl, s->ring_descs, (uint16_t)slot);
}

static int vring_submit(struct dp_replay *r)
{
    if (r->packed ? !driver_packed_publish(&r->pring) : !driver_ring_publish(&r->ring))
        return 0;
    int rc = driver_ring_kick(&r->ring);
    if (rc < 0)
        return rc;
    r->c.kicks++;
    return 0;
}

/* ---- transport: io_uring on the file ---- */

static void uring_prep(struct dp_replay *r, struct replay_slot *s)
{
    /* The SQ holds iodepth entries and every batch is submitted: there is always one. */
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->uring);
    unsigned index = (unsigned)(s - r->slots);
    switch (s->op) {
    case DP_REPLAY_OP_READ:
        if (r->fixed_buffers)
            io_uring_prep_read_fixed(sqe, r->p.fd, s->data, s->length, s->offset, (int)index);
        else
            io_uring_prep_read(sqe, r->p.fd, s->data, s->length, s->offset);
        break;
    case DP_REPLAY_OP_WRITE:
        if (r->fixed_buffers)
            io_uring_prep_write_fixed(sqe, r->p.fd, s->data, s->length, s->offset, (int)index);
        else
            io_uring_prep_write(sqe, r->p.fd, s->data, s->length, s->offset);
        break;
    case DP_REPLAY_OP_FLUSH:
        io_uring_prep_fsync(sqe, r->p.fd, IORING_FSYNC_DATASYNC);
        break;
    default:
        /* what the backend does for DISCARD on a file (disk/file.c) */
        io_uring_prep_fallocate(sqe, r->p.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                s->offset, s->length);
        break;
    }
    io_uring_sqe_set_data64(sqe, index);
}

static int uring_submit(struct dp_replay *r)
{
    int rc = io_uring_submit(&r->uring);
    if (rc < 0)
        return rc;
    r->c.kicks++;
    return 0;
}

/* ---- requests ---- */

/* In-flight ranges, hashed by bucket (offset >> hazard_shift): a record whose buckets hold
 * nothing it could conflict with needs no scan of the in-flight list, so the common case (no
 * overlap) costs one table look per bucket it covers, one for most records. Buckets are sized
 * so that the longest data record covers a few (hazard_setup); hashing, not a modulo, keeps
 * distinct buckets apart however the trace's offsets are spread. Requests spanning
 * HAZARD_SPAN buckets or more (long trims) are not bucketed; while one is in flight every
 * check scans. A hash collision only costs a scan: the scan decides. */
static inline uint32_t hazard_slot(const struct dp_replay *r, uint64_t bucket)
{
    return (uint32_t)((bucket * 0x9e3779b97f4a7c15ull) >> (64 - r->hazard_bits));
}

static void hazard_track(struct dp_replay *r, const struct replay_slot *s, int delta)
{
    if (s->op == DP_REPLAY_OP_FLUSH)
        return;
    unsigned shift = r->hazard_shift;
    uint64_t first = s->offset >> shift, last = (s->offset + s->length - 1) >> shift;
    if (last - first >= HAZARD_SPAN) {
        r->hazard_big += delta;
        return;
    }
    int writes = op_writes(s->op);
    for (uint64_t b = first; b <= last; b++) {
        struct hazard_bucket *h = &r->hazard_map[hazard_slot(r, b)];
        h->any = (uint16_t)(h->any + delta);
        if (writes)
            h->write = (uint16_t)(h->write + delta);
    }
}

/* Would issuing rec now let it pass a request it must follow? */
static int hazard(const struct dp_replay *r, const struct dp_replay_rec *rec)
{
    if (rec->op == DP_REPLAY_OP_FLUSH)
        return r->writes_inflight > 0;
    int writes = op_writes(rec->op);
    if (!writes && !r->writes_inflight)
        return 0;
    uint64_t lo = rec->offset, hi = rec->offset + rec->length;
    unsigned shift = r->hazard_shift;
    uint64_t first = lo >> shift, last = (hi - 1) >> shift;
    if (!r->hazard_big && last - first < HAZARD_SPAN) {
        uint64_t b = first;
        if (writes)
            while (b <= last && !r->hazard_map[hazard_slot(r, b)].any)
                b++;
        else
            while (b <= last && !r->hazard_map[hazard_slot(r, b)].write)
                b++;
        if (b > last)
            return 0;
    }
    for (unsigned i = 0; i < r->inflight; i++) {
        const struct replay_slot *s = &r->slots[r->inflight_list[i]];
        if (s->op == DP_REPLAY_OP_FLUSH || (!writes && !op_writes(s->op)))
            continue;
        if (s->offset < hi && lo < s->offset + s->length)
            return 1;
    }
    return 0;
}

/* Buckets of at least 4 KiB, large enough that the longest data record covers at most five;
 * 16 table entries per request in flight: a collision rate around 1/16 per bucket a write
 * looks at (a scan of the in-flight list, a few dozen ns), and a table small enough (2 KiB at
 * iodepth 32) to stay in the L1 cache while the feed streams through it. */
static int hazard_setup(struct dp_replay *r)
{
    unsigned shift = 12;
    while ((r->p.buf_size >> shift) > 4)
        shift++;
    unsigned bits = 9;
    while ((1u << bits) < 16u * r->p.iodepth && bits < 16)
        bits++;
    r->hazard_shift = shift;
    r->hazard_bits = bits;
    r->hazard_map = calloc((size_t)1 << bits, sizeof(*r->hazard_map));
    return r->hazard_map ? 0 : -ENOMEM;
}

static void stamp_write(struct dp_replay *r, struct replay_slot *s)
{
    for (uint32_t off = 0; off < s->length; off += STAMP_STRIDE) {
        struct replay_stamp st = { .magic = DP_REPLAY_STAMP_MAGIC, .queue = r->p.queue,
                                   .seq = s->seq + 1, .offset = s->offset + off };
        memcpy(s->data + off, &st, sizeof(st));
    }
}

static uint64_t stamp_tag(uint32_t queue, uint64_t seq1)
{
    return ((uint64_t)queue << 48) | (seq1 & 0xffffffffffffull);
}

static uint64_t read_tag(const struct replay_slot *s)
{
    struct replay_stamp st;
    if (s->length < sizeof(st))
        return 0;
    memcpy(&st, s->data, sizeof(st));
    if (st.magic != DP_REPLAY_STAMP_MAGIC || st.offset != s->offset)
        return 0;
    return stamp_tag(st.queue, st.seq);
}

static void take_record(struct dp_replay *r, const struct dp_replay_rec *rec, uint64_t t_sched)
{
    struct replay_slot *s = &r->slots[r->free_slots[--r->nfree]];
    s->offset = rec->offset;
    s->length = rec->op == DP_REPLAY_OP_FLUSH ? 0 : rec->length;
    s->op = rec->op;
    s->t_sched = t_sched;
    s->seq = r->seq++;
    if (s->op == DP_REPLAY_OP_WRITE && r->p.stamp)
        stamp_write(r, s);
    s->inflight = 1;
    s->list_pos = (uint16_t)r->inflight;
    r->inflight_list[r->inflight++] = (uint16_t)(s - r->slots);
    if (op_writes(s->op))
        r->writes_inflight++;
    hazard_track(r, s, 1);
    r->c.depth_level[depth_bucket(r->inflight)]++;
    if (r->p.kind == DP_REPLAY_VRING)
        vring_prep(r, s);
    else
        uring_prep(r, s);
    r->batch[r->nbatch++] = (uint16_t)(s - r->slots);
    r->feed.local_head++;
    r->starved = 0;
}

/* Issue what is due at *now, in feed order, up to the free slots; submit once. Returns the
 * number issued or -errno; *ended when the feed is exhausted. The clock is read once per
 * batch, after it is laid out: that is each request's submit time, and the new *now. */
static int issue(struct dp_replay *r, uint64_t *now_io, int *ended)
{
    uint64_t now = *now_io;
    const struct dp_replay_rec *rec = NULL;
    int timed = r->p.mode == DP_REPLAY_TIMED;
    while ((rec = feed_peek(r)) != NULL) {
        /* Records are read once: fetched ahead without displacing what stays hot (locality 0),
         * and the hazard entry of the record four ahead with them (that record may not be
         * there yet: its offset is only a hint, read as the producer may be writing it). */
        uint64_t ahead = __atomic_load_n(&r->feed.buf[(r->feed.local_head + 4) & r->feed.mask].offset,
                                         __ATOMIC_RELAXED);
        __builtin_prefetch(&r->feed.buf[(r->feed.local_head + 8) & r->feed.mask], 0, 0);
        __builtin_prefetch(&r->hazard_map[hazard_slot(r, ahead >> r->hazard_shift)], 1, 3);
        /* A write two records on will stamp the slot it takes then (the free stack's third
         * from the top): ask for its first line now, for writing. That line is wherever the
         * slot's last read left it, often the backend's CPU (the null disk zeroed it). */
        if (r->p.stamp && r->nfree >= 3 && r->feed.local_head + 2 < r->feed.local_tail &&
            r->feed.buf[(r->feed.local_head + 2) & r->feed.mask].op == DP_REPLAY_OP_WRITE)
            __builtin_prefetch(r->slots[r->free_slots[r->nfree - 3]].data, 1, 3);
        uint64_t t_sched = now;
        if (timed) {
            t_sched = r->start_ns + (rec->time_ns > 0 ? (uint64_t)rec->time_ns : 0);
            if (t_sched > now)
                break;
        }
        if (!r->nfree) {
            if (timed && r->noted_full != r->seq + 1) {
                r->c.full_waits++;
                r->noted_full = r->seq + 1;
            }
            break;
        }
        if (hazard(r, rec)) {
            if (r->noted_hazard != r->seq + 1) {
                r->c.hazard_waits++;
                r->noted_hazard = r->seq + 1;
            }
            break;
        }
        take_record(r, rec, t_sched);
    }
    if (!rec && feed_ended(r))
        *ended = 1;
    if (!r->nbatch)
        return 0;

    uint64_t t_submit = now_ns();
    *now_io = t_submit;
    for (unsigned i = 0; i < r->nbatch; i++) {
        struct replay_slot *s = &r->slots[r->batch[i]];
        s->t_submit = t_submit;
        if (timed && t_submit - s->t_sched > LATE_NS)
            r->c.late_ios++;
        if (s->seq < r->p.log_len) {
            struct dp_replay_log_entry *e = &r->p.log[s->seq];
            e->sched_ns = s->t_sched;
            e->submit_ns = t_submit;
            e->op = s->op;
            e->tag = s->op == DP_REPLAY_OP_WRITE && r->p.stamp ? stamp_tag(r->p.queue, s->seq + 1) : 0;
        }
    }
    unsigned added = r->nbatch;
    r->nbatch = 0;
    COUNTER_ADD(r->c.records, added);
    r->c.submit_level[batch_bucket(added)]++;
    feed_release(r, rec == NULL);
    int rc = r->p.kind == DP_REPLAY_VRING ? vring_submit(r) : uring_submit(r);
    return rc < 0 ? rc : (int)added;
}

/* status: virtio-blk status, or for io_uring the result (bytes or -errno). */
static void complete_slot(struct dp_replay *r, struct replay_slot *s, int ok, int short_io,
                          int32_t status, unsigned err_class, uint64_t now)
{
    struct dp_load_dir_stats *ds = &r->op[s->op];
    if (!ok) {
        if (err_class == VIRTIO_BLK_S_IOERR)
            ds->err_ioerr++;
        else if (err_class == VIRTIO_BLK_S_UNSUPP)
            ds->err_unsupp++;
        else
            ds->err_other++;
    } else if (short_io) {
        ds->short_ios++;
    }
    if (s->seq < r->p.log_len) {
        struct dp_replay_log_entry *e = &r->p.log[s->seq];
        e->complete_ns = now;
        e->status = status;
        if (s->op == DP_REPLAY_OP_READ && ok && r->p.stamp)
            e->tag = read_tag(s);
    }
    if (ok) {
        uint64_t clat = now - s->t_submit;
        hist_add(&ds->clat, clat);
        hist_add(&ds->lat, now - s->t_sched);
        hist_add(&ds->slat, s->t_submit - s->t_sched);
        ds->bytes += s->length;
        COUNTER_ADD(ds->ios, 1);
    }
    r->last_completion = now;
    COUNTER_ADD(r->completed, 1);
    /* out of the in-flight list (swap with the last) and back on the free stack */
    uint16_t last = r->inflight_list[--r->inflight];
    r->inflight_list[s->list_pos] = last;
    r->slots[last].list_pos = s->list_pos;
    if (op_writes(s->op))
        r->writes_inflight--;
    hazard_track(r, s, -1);
    s->inflight = 0;
    r->free_slots[r->nfree++] = (uint16_t)(s - r->slots);
}

/* A used element of a request of ours: its status byte and length, and it is done. */
static inline void vring_complete(struct dp_replay *r, struct replay_slot *s, uint32_t len,
                                  uint64_t now)
{
    uint8_t status = __atomic_load_n(s->meta + 16, __ATOMIC_RELAXED);
    uint32_t writable = s->op == DP_REPLAY_OP_READ ? s->length + 1 : 1;
    int ok = status == VIRTIO_BLK_S_OK, short_io = 0;
    unsigned err_class = status;
    if (len > writable) {
        /* the device claims to have written more than it was given */
        r->c.bad_used++;
        ok = 0;
        err_class = STATUS_UNSET;
    } else if (ok && s->op == DP_REPLAY_OP_READ && len < writable) {
        short_io = 1;
    }
    complete_slot(r, s, ok, short_io, status, err_class, now);
}

/* A packed ring's used descriptors, each ending one request (an id that is no slot of ours in
 * flight: -EPROTO). */
static int packed_reap(struct dp_replay *r, uint64_t now)
{
    unsigned n = 0;
    while (driver_packed_used_pending(&r->pring)) {
        uint32_t len;
        uint16_t id = driver_packed_used_id(&r->pring, &len);
        if (id >= r->p.iodepth || !r->slots[id].inflight) {
            r->c.bad_used++;
            return -EPROTO;
        }
        driver_packed_consume(&r->pring, r->slots[id].ring_descs);
        vring_complete(r, &r->slots[id], len, now);
        n++;
    }
    if (n)
        r->c.complete_level[batch_bucket(n)]++;
    return (int)n;
}

static int vring_reap(struct dp_replay *r, uint64_t now)
{
    if (r->packed)
        return packed_reap(r, now);
    struct driver_ring *ring = &r->ring;
    uint16_t n = driver_ring_used_pending(ring);
    if (!n)
        return 0;
    if (n > r->inflight) {
        r->c.bad_used++;   /* more completions than requests outstanding */
        return -EPROTO;
    }
    for (uint16_t i = 0; i < n; i++) {
        uint32_t len;
        uint16_t slot = driver_ring_next_used(ring, r->head_to_slot, &len);
        if (slot == DRIVER_NO_SLOT || !r->slots[slot].inflight) {
            r->c.bad_used++;
            return -EPROTO;
        }
        vring_complete(r, &r->slots[slot], len, now);
    }
    r->c.complete_level[batch_bucket(n)]++;
    return n;
}

static int uring_reap(struct dp_replay *r, uint64_t now)
{
    struct io_uring_cqe *cqe;
    unsigned head, n = 0;
    io_uring_for_each_cqe(&r->uring, head, cqe) {
        uint64_t index = cqe->user_data;
        n++;
        if (index >= r->p.iodepth || !r->slots[index].inflight)
            continue;   /* cannot happen: we submit every SQE */
        struct replay_slot *s = &r->slots[index];
        int32_t res = cqe->res;
        int ok = res >= 0, short_io = 0;
        unsigned err_class = res == -EIO ? VIRTIO_BLK_S_IOERR
                           : res == -EOPNOTSUPP || res == -ENOTSUP ? VIRTIO_BLK_S_UNSUPP : STATUS_UNSET;
        if (ok && op_has_data(s->op) && (uint32_t)res < s->length) {
            if (s->op == DP_REPLAY_OP_READ) {
                short_io = 1;
            } else {
                ok = 0;   /* a short O_DIRECT write: no room on the file system */
                err_class = STATUS_UNSET;
            }
        }
        complete_slot(r, s, ok, short_io, res, err_class, now);
    }
    io_uring_cq_advance(&r->uring, n);
    if (n)
        r->c.complete_level[batch_bucket(n)]++;
    return (int)n;
}

static inline int completions_pending(struct dp_replay *r)
{
    if (r->p.kind == DP_REPLAY_VRING)
        return r->packed ? driver_packed_used_pending(&r->pring)
                         : driver_ring_used_pending(&r->ring) != 0;
    return io_uring_cq_ready(&r->uring) != 0;
}

static inline void vring_disable_interrupts(struct dp_replay *r)
{
    if (r->packed)
        driver_packed_disable_interrupts(&r->pring);
    else
        driver_ring_disable_interrupts(&r->ring);
}

/* ---- the loop ---- */

/* The completion spin adapts to whether it pays. A spin that sees a completion arrive keeps
 * (or doubles back to) the window, one that does not halves it, down to nothing: against a
 * backend thread on another CPU the completions come within a few microseconds and the spin
 * saves a sleep and an interrupt per batch; against one on this thread's CPU (two queues on
 * two CPUs: four threads) nothing can complete while this thread spins, and every spin would
 * be time taken from the backend. At zero a short spin is tried every SPIN_PROBE-th wait, so
 * the window comes back when the threads move apart. */
#define SPIN_MIN_NS 1000u
#define SPIN_PROBE 32u

static uint64_t spin_window(struct dp_replay *r)
{
    if (!r->p.poll_ns)
        return 0;
    if (r->spin_win_ns)
        return r->spin_win_ns;
    if (++r->spin_skipped < SPIN_PROBE)
        return 0;
    r->spin_skipped = 0;
    return SPIN_MIN_NS < r->p.poll_ns ? SPIN_MIN_NS : r->p.poll_ns;
}

static void spin_adapt(struct dp_replay *r, int found)
{
    uint64_t win = r->spin_win_ns, max = r->p.poll_ns;
    if (found)
        win = win ? win * 2 : SPIN_MIN_NS;
    else
        win = win / 2 >= SPIN_MIN_NS ? win / 2 : 0;
    r->spin_win_ns = win < max ? win : max;
}

static int stopping(const struct dp_replay *r)
{
    return driver_thread_stopping(&r->t);
}

/* Nothing to reap and nothing to issue: spin when the deadline is close, else sleep on the
 * wake eventfd (stop, feed) and, with requests in flight, on completions, until deadline. */
static int wait_idle(struct dp_replay *r, uint64_t now, uint64_t deadline, int want_feed,
                     int precise)
{
    if (deadline <= now)
        return 0;
    feed_release(r, 1);   /* a producer waiting for room must not wait for us */
    if (r->inflight) {
        uint64_t window = spin_window(r);
        if (window) {
            /* The ring is looked at between pauses, the clock only every eighth time. */
            uint64_t until = now + window < deadline ? now + window : deadline;
            for (unsigned k = 1; !completions_pending(r); k++) {
                cpu_relax();
                if (!(k & 7) && now_ns() >= until)
                    break;
            }
            int found = completions_pending(r);
            spin_adapt(r, found);
            if (found)
                return 0;
        }
        if (r->p.kind == DP_REPLAY_VRING) {
            if (r->packed ? driver_packed_enable_interrupts(&r->pring)
                          : driver_ring_enable_interrupts(&r->ring) != 0) {
                vring_disable_interrupts(r);
                return 0;
            }
        } else if (io_uring_cq_ready(&r->uring)) {
            return 0;
        }
    }
    struct replay_feed *f = &r->feed;
    if (want_feed) {
        __atomic_store_n(&f->consumer_waiting, 1, __ATOMIC_RELAXED);
        /* consumer_waiting before re-reading tail; pairs with the fence in dp_replay_feed. */
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (feed_peek(r) || __atomic_load_n(&f->end, __ATOMIC_ACQUIRE)) {
            __atomic_store_n(&f->consumer_waiting, 0, __ATOMIC_RELAXED);
            goto out;
        }
    }
    if (deadline - now < r->p.spin_ns) {
        /* The schedule is close: a sleep would overshoot it by the timer's wake-up latency. */
        while (now_ns() < deadline && !stopping(r) &&
               !(r->inflight && completions_pending(r)) && !(want_feed && feed_peek(r)))
            cpu_relax();
    } else {
        int cfd = r->p.kind == DP_REPLAY_VRING ? r->ring.call_fd : r->uring.ring_fd;
        struct pollfd fds[2] = { { .fd = r->t.wake_fd, .events = POLLIN },
                                 { .fd = cfd, .events = POLLIN } };
        /* A record's time: wake spin_ns early and spin the rest, as a sleep overshoots. */
        uint64_t left = deadline - now - (precise ? r->p.spin_ns : 0);
        struct timespec ts = { .tv_sec = (time_t)(left / NS_PER_S), .tv_nsec = (long)(left % NS_PER_S) };
        int rc = ppoll(fds, r->inflight ? 2 : 1, &ts, NULL);
        if (rc < 0 && errno != EINTR)
            return -errno;
        if (rc > 0 && (fds[0].revents & POLLIN))
            driver_drain_eventfd(r->t.wake_fd);
        if (rc > 0 && r->inflight && (fds[1].revents & POLLIN)) {
            if (r->p.kind == DP_REPLAY_VRING)
                driver_drain_eventfd(cfd);
            r->c.interrupts++;
        }
    }
    if (want_feed)
        __atomic_store_n(&f->consumer_waiting, 0, __ATOMIC_RELAXED);
out:
    if (r->inflight && r->p.kind == DP_REPLAY_VRING)
        vring_disable_interrupts(r);
    return 0;
}

/* Wait for dp_replay_begin, then for its start time. Returns 0, or 1 when stopped first. */
static int wait_begin(struct dp_replay *r)
{
    pthread_mutex_lock(&r->t.lock);
    while (!r->begun && !r->t.stop)
        pthread_cond_wait(&r->t.cond, &r->t.lock);
    int stopped = !r->begun;
    pthread_mutex_unlock(&r->t.lock);
    if (stopped)
        return 1;
    for (;;) {
        uint64_t now = now_ns();
        if (now >= r->start_ns || stopping(r))
            return 0;
        wait_idle(r, now, r->start_ns, 0, 1);
    }
}

static int replay_run(struct dp_replay *r)
{
    uint64_t usr0 = 0, sys0 = 0, ctx0 = 0, usr1 = 0, sys1 = 0, ctx1 = 0;
    int rc = 0, issuing = 1, timed = r->p.mode == DP_REPLAY_TIMED;

    if (r->p.kind == DP_REPLAY_VRING)
        vring_disable_interrupts(r);
    if (wait_begin(r))
        issuing = 0;
    driver_take_rusage(&usr0, &sys0, &ctx0);
    uint64_t now = now_ns(), last_progress = now;
    r->last_completion = r->start_ns;
    r->cur_end_ns = 0;
    series_at(r, now);

    for (;;) {
        if (issuing && stopping(r))
            issuing = 0;
        int added = 0, ended = 0, n = 0;
        if (issuing) {
            added = issue(r, &now, &ended);
            if (added < 0) {
                rc = added;
                break;
            }
            if (ended)
                issuing = 0;
        }
        /* The clock is read for a batch of completions only when there is one: a pass that
         * only issued already read it (its submit time). */
        if (completions_pending(r)) {
            now = now_ns();
            series_at(r, now);
            n = r->p.kind == DP_REPLAY_VRING ? vring_reap(r, now) : uring_reap(r, now);
            if (n < 0) {
                rc = n;
                break;
            }
            if (n > 0)
                last_progress = now;
        }
        if (!issuing && !r->inflight)
            break;
        if (!n && !added) {
            uint64_t deadline = r->inflight ? last_progress + r->p.timeout_ns : UINT64_MAX;
            int want_feed = 0, precise = 0;
            if (issuing) {
                const struct dp_replay_rec *rec = feed_peek(r);
                if (!rec) {
                    want_feed = 1;
                    if (!r->starved) {
                        r->c.feed_waits++;
                        r->starved = 1;
                    }
                } else if (timed && r->nfree && !hazard(r, rec)) {
                    uint64_t due = r->start_ns + (rec->time_ns > 0 ? (uint64_t)rec->time_ns : 0);
                    if (due < deadline) {
                        deadline = due;
                        precise = 1;
                    }
                }
            }
            if (r->completed != r->prev.completed && r->cur_end_ns < deadline) {
                deadline = r->cur_end_ns;
                precise = 0;
            } else if (now + SERIES_TICK_NS < deadline) {
                deadline = now + SERIES_TICK_NS;   /* rows and stop requests keep flowing */
                precise = 0;
            }
            if (!r->inflight)
                last_progress = now;               /* waiting for the schedule is not a stall */
            rc = wait_idle(r, now, deadline, want_feed, precise);
            if (rc < 0)
                break;
            now = now_ns();
        }
        series_at(r, now);
        if (r->inflight && now - last_progress >= r->p.timeout_ns) {
            rc = -ETIMEDOUT;
            break;
        }
    }

    driver_take_rusage(&usr1, &sys1, &ctx1);
    r->c.usr_ns = usr1 - usr0;
    r->c.sys_ns = sys1 - sys0;
    r->c.ctx = ctx1 - ctx0;
    r->c.start_ns = r->start_ns;
    r->c.completed = r->completed;
    r->c.runtime_ns = r->last_completion > r->start_ns ? r->last_completion - r->start_ns : 0;
    series_publish(r);
    __atomic_store_n(&r->horizon, UINT64_MAX, __ATOMIC_RELEASE);
    r->abandoned = r->inflight;   /* an early end leaves requests that may still write buffers */
    if (r->p.kind == DP_REPLAY_VRING && r->packed) {
        driver_packed_hand_back(&r->pring);
        r->c.avail_idx = driver_packed_avail_pos(&r->pring);
        r->c.last_used_idx = driver_packed_used_pos(&r->pring);
    } else if (r->p.kind == DP_REPLAY_VRING) {
        driver_ring_hand_back(&r->ring);
        r->c.avail_idx = r->ring.avail_idx;
        r->c.last_used_idx = r->ring.last_used_idx;
    }
    return rc;
}

/* ---- setup ---- */

static int uring_setup(struct dp_replay *r)
{
    const struct dp_replay_params *p = &r->p;
    struct io_uring_params up = { 0 };
    int rc = io_uring_queue_init_params(p->iodepth, &r->uring, &up);
    if (rc < 0)
        return rc;
    r->uring_ready = 1;
    uint64_t total = (uint64_t)p->iodepth * p->buf_size;
    void *bufs = NULL;
    rc = -posix_memalign(&bufs, ARENA_ALIGN, total);
    if (rc < 0)
        return rc;
    memset(bufs, 0, total);
    r->own_bufs = bufs;
    struct iovec *iov = calloc(p->iodepth, sizeof(*iov));
    if (!iov)
        return -ENOMEM;
    for (unsigned i = 0; i < p->iodepth; i++) {
        iov[i].iov_base = r->own_bufs + (uint64_t)i * p->buf_size;
        iov[i].iov_len = p->buf_size;
        r->slots[i].data = iov[i].iov_base;
    }
    /* Registered buffers save a page pin per request; without (RLIMIT_MEMLOCK), plain. */
    r->fixed_buffers = io_uring_register_buffers(&r->uring, iov, p->iodepth) == 0;
    free(iov);
    return 0;
}

static void vring_setup(struct dp_replay *r)
{
    const struct dp_replay_params *p = &r->p;
    uint64_t data_total = (uint64_t)p->iodepth * p->buf_size;
    for (unsigned i = 0; i < p->ring.num; i++)
        r->head_to_slot[i] = DRIVER_NO_SLOT;
    for (unsigned i = 0; i < p->iodepth; i++) {
        struct replay_slot *s = &r->slots[i];
        s->data_gpa = p->ring.arena_gpa + (uint64_t)i * p->buf_size;
        s->data = (uint8_t *)(uintptr_t)(p->ring.arena_host + (uint64_t)i * p->buf_size);
        s->meta_gpa = p->ring.arena_gpa + data_total + (uint64_t)i * DP_REPLAY_SLOT_META;
        s->meta = (uint8_t *)(uintptr_t)(p->ring.arena_host + data_total) + (uint64_t)i * DP_REPLAY_SLOT_META;
        memset(s->meta, 0, DP_REPLAY_SLOT_META);
        s->layout = NO_LAYOUT;
        memset(s->data, 0, p->buf_size);   /* fault the pages in now, not on the clock */
        if (r->packed) {
            s->head = (uint16_t)i;   /* its buffer id; its list is written per request */
        } else if (p->ring.indirect) {
            s->head = (uint16_t)i;
            r->ring.desc[i] = (struct vring_desc){ .addr = s->meta_gpa + 64, .len = 0,
                                                   .flags = VRING_DESC_F_INDIRECT };
        } else {
            s->head = (uint16_t)(3 * i);
        }
        r->head_to_slot[s->head] = (uint16_t)i;
    }
}

static void *replay_thread(void *arg)
{
    struct dp_replay *r = arg;
    driver_thread_enter("dp-replay", r->p.queue, r->p.cpu);
    /* The io_uring belongs to the thread that submits to it. */
    int rc = r->p.kind == DP_REPLAY_URING ? uring_setup(r) : 0;
    driver_thread_ready(&r->t, rc);
    if (rc == 0)
        rc = replay_run(r);
    r->c.error = rc;
    driver_thread_finish(&r->t);
    /* A producer waiting for room sees done now. */
    pthread_mutex_lock(&r->t.lock);
    pthread_cond_broadcast(&r->feed.room);
    pthread_mutex_unlock(&r->t.lock);
    return NULL;
}

uint64_t dp_replay_arena_size(uint32_t buf_size, uint32_t iodepth)
{
    uint64_t meta = (uint64_t)iodepth * DP_REPLAY_SLOT_META;
    return (uint64_t)iodepth * buf_size + (meta + ARENA_ALIGN - 1) / ARENA_ALIGN * ARENA_ALIGN;
}

static int check_params(const struct dp_replay_params *p)
{
    if (p->mode != DP_REPLAY_TIMED && p->mode != DP_REPLAY_AFAP)
        return -EINVAL;
    if (p->iodepth == 0 || p->iodepth > DP_REPLAY_MAX_IODEPTH)
        return -EINVAL;
    if (p->buf_size < ARENA_ALIGN || p->buf_size > DP_REPLAY_MAX_BUF || p->buf_size % ARENA_ALIGN)
        return -EINVAL;
    if (p->capacity < SECTOR || (p->log_len && !p->log) || p->feed_records > (1u << 30))
        return -EINVAL;
    if (p->kind == DP_REPLAY_URING)
        return p->fd >= 0 ? 0 : -EBADF;
    if (p->kind != DP_REPLAY_VRING)
        return -EINVAL;
    return driver_handover_check(&p->ring, p->iodepth,
                                 dp_replay_arena_size(p->buf_size, p->iodepth));
}

struct dp_replay *dp_replay_new(const struct dp_replay_params *params, int *err)
{
    int rc = check_params(params);
    if (rc < 0) {
        *err = rc;
        return NULL;
    }
    struct dp_replay *r = calloc(1, sizeof(*r));
    if (!r) {
        *err = -ENOMEM;
        return NULL;
    }
    r->p = *params;
    rc = driver_thread_init(&r->t);
    if (!r->p.timeout_ns)
        r->p.timeout_ns = DEFAULT_TIMEOUT_NS;
    r->spin_win_ns = r->p.poll_ns;   /* the spin starts at its longest and adapts */
    uint32_t feed = r->p.feed_records ? r->p.feed_records : DEFAULT_FEED;
    uint32_t cap = 16;
    while (cap < feed)
        cap <<= 1;
    r->feed.mask = cap - 1;
    if (params->kind == DP_REPLAY_VRING) {
        r->ring = driver_ring_of(&params->ring);   /* (its kick and call fds serve packed too) */
        r->packed = params->ring.packed != 0;
        if (r->packed)
            r->pring = driver_packed_of(&params->ring);
    }
    driver_cond_init(&r->feed.room);
    if (rc < 0)
        goto fail;

    unsigned depth = params->iodepth;
    r->slots = calloc(depth, sizeof(*r->slots));
    r->free_slots = calloc(depth, sizeof(*r->free_slots));
    r->inflight_list = calloc(depth, sizeof(*r->inflight_list));
    r->batch = calloc(depth, sizeof(*r->batch));
    r->feed.buf = calloc(cap, sizeof(*r->feed.buf));
    r->series = calloc(REPLAY_SERIES_RING, sizeof(*r->series));
    if (params->kind == DP_REPLAY_VRING)
        r->head_to_slot = calloc(params->ring.num, sizeof(*r->head_to_slot));
    if (r->packed)
        r->ptmpl = calloc((size_t)depth * 3, sizeof(*r->ptmpl));
    if (!r->slots || !r->free_slots || !r->inflight_list || !r->batch || !r->feed.buf ||
        !r->series || (params->kind == DP_REPLAY_VRING && !r->head_to_slot) ||
        (r->packed && !r->ptmpl)) {
        rc = -ENOMEM;
        goto fail;
    }
    for (unsigned i = 0; i < depth; i++)
        r->free_slots[r->nfree++] = (uint16_t)(depth - 1 - i);
    if (hazard_setup(r) < 0) {
        rc = -ENOMEM;
        goto fail;
    }
    if (params->kind == DP_REPLAY_VRING)
        vring_setup(r);

    rc = driver_thread_start(&r->t, replay_thread, r);
    if (rc < 0)
        goto fail;
    return r;

fail:
    dp_replay_free(r);
    *err = rc;
    return NULL;
}

int dp_replay_begin(struct dp_replay *r, uint64_t start_ns)
{
    pthread_mutex_lock(&r->t.lock);
    int rc = r->begun ? -EALREADY : 0;
    if (!rc) {
        r->start_ns = start_ns;
        r->begun = 1;
        pthread_cond_broadcast(&r->t.cond);
    }
    pthread_mutex_unlock(&r->t.lock);
    return rc;
}

static int check_record(const struct dp_replay *r, const struct dp_replay_rec *rec)
{
    if (rec->op >= DP_REPLAY_OPS)
        return 0;
    if (rec->op == DP_REPLAY_OP_FLUSH)
        return 1;
    if (!rec->length || rec->length % SECTOR || rec->offset % SECTOR)
        return 0;
    if (op_has_data(rec->op) && rec->length > r->p.buf_size)
        return 0;
    return rec->offset < r->p.capacity && rec->length <= r->p.capacity - rec->offset;
}

/* Wait until the feed has room or the thread is gone; 0 on timeout. */
static int feed_wait_room(struct dp_replay *r, int timeout_ms)
{
    struct replay_feed *f = &r->feed;
    struct timespec deadline;
    driver_deadline(&deadline, timeout_ms);
    int room = 0;
    pthread_mutex_lock(&r->t.lock);
    for (;;) {
        __atomic_store_n(&f->producer_waiting, 1, __ATOMIC_RELAXED);
        /* producer_waiting before re-reading head; pairs with the fence in feed_release. */
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        uint64_t head = __atomic_load_n(&f->head, __ATOMIC_ACQUIRE);
        room = f->tail - head <= f->mask;
        if (room || r->t.done)
            break;
        if (timeout_ms < 0)
            pthread_cond_wait(&f->room, &r->t.lock);
        else if (pthread_cond_timedwait(&f->room, &r->t.lock, &deadline) == ETIMEDOUT)
            break;
    }
    __atomic_store_n(&f->producer_waiting, 0, __ATOMIC_RELAXED);
    int done = r->t.done;
    pthread_mutex_unlock(&r->t.lock);
    return done ? -EPIPE : room;
}

int dp_replay_feed(struct dp_replay *r, const struct dp_replay_rec *recs, uint32_t n, int timeout_ms)
{
    struct replay_feed *f = &r->feed;
    if (__atomic_load_n(&f->end, __ATOMIC_RELAXED))
        return -EINVAL;
    for (uint32_t i = 0; i < n; i++)
        if (!check_record(r, &recs[i]))
            return -EINVAL;
    if (__atomic_load_n(&r->t.done, __ATOMIC_ACQUIRE))
        return -EPIPE;
    uint64_t cap = (uint64_t)f->mask + 1;
    uint64_t head = __atomic_load_n(&f->head, __ATOMIC_ACQUIRE);
    if (f->tail - head >= cap && n) {
        if (timeout_ms == 0)
            return 0;
        int rc = feed_wait_room(r, timeout_ms);
        if (rc <= 0)
            return rc;
        head = __atomic_load_n(&f->head, __ATOMIC_ACQUIRE);
    }
    uint64_t room = cap - (f->tail - head);
    uint32_t count = n < room ? n : (uint32_t)room;
    uint32_t at = (uint32_t)(f->tail & f->mask);
    uint32_t first = count < cap - at ? count : (uint32_t)(cap - at);
    memcpy(&f->buf[at], recs, (size_t)first * sizeof(*recs));
    memcpy(f->buf, recs + first, (size_t)(count - first) * sizeof(*recs));
    /* The records before the index that hands them over (pairs with feed_peek). */
    __atomic_store_n(&f->tail, f->tail + count, __ATOMIC_RELEASE);
    /* tail before consumer_waiting; pairs with the fence in wait_idle. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(&f->consumer_waiting, __ATOMIC_RELAXED))
        driver_wake(r->t.wake_fd);
    return (int)count;
}

void dp_replay_feed_end(struct dp_replay *r)
{
    __atomic_store_n(&r->feed.end, 1, __ATOMIC_RELEASE);
    driver_wake(r->t.wake_fd);
}

void dp_replay_stop(struct dp_replay *r)
{
    driver_thread_stop(&r->t);
}

int dp_replay_wait(struct dp_replay *r, int timeout_ms)
{
    return driver_thread_wait(&r->t, timeout_ms);
}

uint64_t dp_replay_completed(const struct dp_replay *r)
{
    return __atomic_load_n(&r->completed, __ATOMIC_RELAXED);
}

int dp_replay_take_second(struct dp_replay *r, struct dp_replay_second *row, struct dp_hist *hists)
{
    uint64_t head = r->series_head;
    /* Pairs with the release store in series_publish: the row before its index. */
    if (head == __atomic_load_n(&r->series_tail, __ATOMIC_ACQUIRE))
        return 0;
    const struct replay_series_entry *e = &r->series[head % REPLAY_SERIES_RING];
    *row = e->row;
    if (hists)
        memcpy(hists, e->hist, sizeof(e->hist));
    /* Our copy is done before the thread may reuse the entry. */
    __atomic_store_n(&r->series_head, head + 1, __ATOMIC_RELEASE);
    return 1;
}

uint64_t dp_replay_series_horizon(const struct dp_replay *r)
{
    return __atomic_load_n(&r->horizon, __ATOMIC_ACQUIRE);
}

int dp_replay_get_counters(const struct dp_replay *r, struct dp_replay_counters *out)
{
    if (!driver_thread_done(&r->t))
        return -EBUSY;
    *out = r->c;
    return 0;
}

int dp_replay_get_op(const struct dp_replay *r, unsigned op, struct dp_load_dir_stats *out)
{
    if (op >= DP_REPLAY_OPS)
        return -EINVAL;
    if (!driver_thread_done(&r->t))
        return -EBUSY;
    *out = r->op[op];
    return 0;
}

int dp_replay_thread_id(const struct dp_replay *r)
{
    return r->t.tid;
}

void dp_replay_free(struct dp_replay *r)
{
    if (!r)
        return;
    driver_thread_destroy(&r->t);
    if (r->uring_ready)
        io_uring_queue_exit(&r->uring);
    pthread_cond_destroy(&r->feed.room);
    if (!r->abandoned)
        free(r->own_bufs);   /* else leaked: the kernel may still complete into them */
    free(r->slots);
    free(r->free_slots);
    free(r->inflight_list);
    free(r->batch);
    free(r->feed.buf);
    free(r->series);
    free(r->head_to_slot);
    free(r->ptmpl);
    free(r->hazard_map);
    free(r);
}
