/* load.c — a load generator that plays the guest: one thread per virtqueue fills the ring
 * (split or packed) with virtio-blk requests (closed loop at a fixed iodepth, or open loop on
 * a schedule), reaps the used ring, and records latency histograms, errors and verify
 * results.
 *
 * The rings were set up by the Python frontend; this thread takes them over for the run and
 * hands back its indices at the end. Everything read from the used ring comes from the
 * backend under test and is checked before use: a bad element ends the run with -EPROTO.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "driver.h"

#define VERIFY_BUSY 0x80000000u
#define VERIFY_MAGIC 0x564c5044u   /* "DPLV" */
#define SECTOR 512
#define STATUS_UNSET 0xff
#define DEFAULT_TIMEOUT_NS (30ull * 1000000000ull)
#define DEFAULT_SAMPLE_NS (500ull * 1000000ull)
#define SPIN_BELOW_NS 20000ull     /* open loop: closer than this to the schedule, spin */

/* ---- random numbers: splitmix64 to seed, xorshift64* to run ---- */

static uint64_t splitmix64(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static inline uint64_t xorshift64s(uint64_t *state)
{
    uint64_t x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * 0x2545f4914f6cdd1dull;
}

/* Uniform in [0, n) without a division (Lemire's multiply-shift). */
static inline uint64_t rand_below(uint64_t *state, uint64_t n)
{
    return (uint64_t)(((unsigned __int128)xorshift64s(state) * n) >> 64);
}

/* ---- verify pattern: every sector starts with a header, the rest is a seeded stream ---- */

struct verify_header {
    uint32_t magic;
    uint32_t queue;
    uint64_t offset;
    uint64_t generation;
    uint64_t run_id;
};

static uint64_t sector_seed(const struct verify_header *h)
{
    uint64_t s = h->run_id ^ (h->offset * 0x9e3779b97f4a7c15ull) ^
                 ((uint64_t)h->generation << 32) ^ h->queue;
    return splitmix64(&s) | 1;   /* xorshift state must not be 0 */
}

static void fill_sector(uint8_t *p, const struct verify_header *h)
{
    memcpy(p, h, sizeof(*h));
    uint64_t state = sector_seed(h), *w = (uint64_t *)(p + sizeof(*h));
    for (unsigned i = 0; i < (SECTOR - sizeof(*h)) / 8; i++)
        w[i] = xorshift64s(&state);
}

static int check_sector(const uint8_t *p, const struct verify_header *h)
{
    if (memcmp(p, h, sizeof(*h)) != 0)
        return 0;
    uint64_t state = sector_seed(h);
    const uint64_t *w = (const uint64_t *)(p + sizeof(*h));
    for (unsigned i = 0; i < (SECTOR - sizeof(*h)) / 8; i++)
        if (w[i] != xorshift64s(&state))
            return 0;
    return 1;
}

static struct verify_header make_header(const struct dp_load *l, uint64_t offset, uint32_t gen)
{
    return (struct verify_header){ .magic = VERIFY_MAGIC, .queue = l->p.queue, .offset = offset,
                                   .generation = gen, .run_id = l->p.verify_run_id };
}

static void verify_fill(struct dp_load *l, struct load_slot *s)
{
    for (uint32_t off = 0; off < l->p.bs; off += SECTOR) {
        struct verify_header h = make_header(l, s->offset + off, s->generation);
        fill_sector(s->data + off, &h);
    }
}

/* A read came back: every sector this run (or an earlier one sharing the map) wrote must hold
 * what was written. Blocks never written, or whose write failed, are not checked. */
static void verify_check(struct dp_load *l, struct load_slot *s, uint32_t expected)
{
    if (expected == DP_VERIFY_NEVER || expected == DP_VERIFY_UNKNOWN)
        return;
    struct dp_load_stats *st = &l->stats;
    for (uint32_t off = 0; off < l->p.bs; off += SECTOR) {
        struct verify_header h = make_header(l, s->offset + off, expected);
        st->verify_checked++;
        if (!check_sector(s->data + off, &h)) {
            if (st->verify_failures < DP_LOAD_VERIFY_REPORTS)
                st->verify_fail_offset[st->verify_failures] = s->offset + off;
            COUNTER_ADD(st->verify_failures, 1);
        }
    }
}

/* ---- the ring, split or packed ---- */

static inline void ring_add(struct dp_load *l, struct load_slot *s)
{
    if (l->packed)
        driver_packed_add(&l->pring, &l->ptmpl[(size_t)s->head * l->slot_descs], l->slot_descs,
                          s->head);
    else
        driver_ring_add(&l->ring, s->head);
}

/* Make the added requests the device's; 1 when it asked to be kicked. */
static inline int ring_publish(struct dp_load *l)
{
    return l->packed ? driver_packed_publish(&l->pring) : driver_ring_publish(&l->ring);
}

static inline int ring_used_pending(struct dp_load *l)
{
    return l->packed ? driver_packed_used_pending(&l->pring) : driver_ring_used_pending(&l->ring) != 0;
}

static inline int ring_enable_interrupts(struct dp_load *l)
{
    return l->packed ? driver_packed_enable_interrupts(&l->pring)
                     : driver_ring_enable_interrupts(&l->ring) != 0;
}

static inline void ring_disable_interrupts(struct dp_load *l)
{
    if (l->packed)
        driver_packed_disable_interrupts(&l->pring);
    else
        driver_ring_disable_interrupts(&l->ring);
}

/* The direction of a slot's data descriptor (its WRITE flag: the device writes a read). */
static inline void ring_set_dir(struct dp_load *l, struct load_slot *s, unsigned dir)
{
    uint16_t write = dir == DP_DIR_READ ? VRING_DESC_F_WRITE : 0;
    if (l->packed)
        s->pdata_desc->flags = (uint16_t)((s->pdata_desc->flags & VRING_DESC_F_NEXT) | write);
    else
        s->data_desc->flags = VRING_DESC_F_NEXT | write;
}

/* ---- requests ---- */

static uint64_t pick_block(struct dp_load *l, unsigned dir)
{
    uint64_t b;
    int random = l->p.rw == DP_RW_RANDREAD || l->p.rw == DP_RW_RANDWRITE ||
                 l->p.rw == DP_RW_RANDRW;
    if (random)
        b = rand_below(&l->rng, l->nblocks);
    else
        b = l->seq_block[dir];
    if (l->p.verify) {
        /* One request per block at a time, or what a read expects is undefined. There are
         * more blocks than slots, so this ends. */
        while (__atomic_load_n(&l->p.verify_map[b], __ATOMIC_RELAXED) & VERIFY_BUSY)
            b = b + 1 == l->nblocks ? 0 : b + 1;
    }
    if (!random)
        l->seq_block[dir] = b + 1 == l->nblocks ? 0 : b + 1;
    return b;
}

static unsigned pick_dir(struct dp_load *l)
{
    switch (l->p.rw) {
    case DP_RW_READ:
    case DP_RW_RANDREAD:
        return DP_DIR_READ;
    case DP_RW_WRITE:
    case DP_RW_RANDWRITE:
        return DP_DIR_WRITE;
    default:
        return rand_below(&l->rng, 100) < l->p.rwmixread ? DP_DIR_READ : DP_DIR_WRITE;
    }
}

static uint32_t next_generation(struct dp_load *l)
{
    uint32_t g = l->p.verify_generation + 1;
    if (g == 0 || g >= DP_VERIFY_UNKNOWN)
        g = 1;
    l->p.verify_generation = g;
    return g;
}

#define IOTLB_UPDATE 2
#define IOTLB_INVALIDATE 3
#define IOTLB_RW 3
#define IOTLB_TIMEOUT_MS 10000

/* --iommu request: what a guest in strict IOMMU mode does around each request, one mapping
 * for the slot's buffers before the device sees it and its removal once it is back. */
static int map_slot(struct dp_load *l, struct load_slot *s)
{
    return dp_vu_iotlb_msg(l->p.iommu_socket, s->map_iova, s->map_len, s->map_uaddr, IOTLB_RW,
                           IOTLB_UPDATE, IOTLB_TIMEOUT_MS);
}

static int unmap_slot(struct dp_load *l, struct load_slot *s)
{
    return dp_vu_iotlb_msg(l->p.iommu_socket, s->map_iova, s->map_len, 0, 0, IOTLB_INVALIDATE,
                           IOTLB_TIMEOUT_MS);
}

static void prep_request(struct dp_load *l, struct load_slot *s, uint64_t t_sched, int counted)
{
    unsigned dir = pick_dir(l);
    uint64_t block = pick_block(l, dir);
    s->offset = l->p.offset + block * l->p.bs;
    s->dir = (uint8_t)dir;
    s->counted = (uint8_t)counted;
    s->t_sched = t_sched;
    s->hdr->type = dir == DP_DIR_READ ? VIRTIO_BLK_T_IN : VIRTIO_BLK_T_OUT;
    s->hdr->ioprio = 0;
    s->hdr->sector = s->offset >> SECTOR_SHIFT;
    *s->status = STATUS_UNSET;   /* a device that never writes it is caught */
    if (s->desc_dir != dir) {
        ring_set_dir(l, s, dir);
        s->desc_dir = (uint8_t)dir;
    }
    if (l->p.verify) {
        uint32_t *entry = &l->p.verify_map[block];
        __atomic_store_n(entry, *entry | VERIFY_BUSY, __ATOMIC_RELAXED);
        if (dir == DP_DIR_WRITE) {
            s->generation = next_generation(l);
            verify_fill(l, s);
        }
    }
    s->inflight = 1;
    l->inflight++;
}

/* Is there another request to issue now? Sets *t_sched to when it was due. */
static int request_due(struct dp_load *l, uint64_t now, uint64_t *t_sched)
{
    if (!l->nfree)
        return 0;
    if (!l->p.rate_iops) {
        *t_sched = now;
        return 1;
    }
    uint64_t due = l->t_start +
        (uint64_t)((unsigned __int128)l->sched_k * 1000000000ull / l->p.rate_iops);
    if (due > now)
        return 0;
    *t_sched = due;
    return 1;
}

static uint64_t next_due(const struct dp_load *l)
{
    return l->t_start +
        (uint64_t)((unsigned __int128)l->sched_k * 1000000000ull / l->p.rate_iops);
}

/* Add what is due (up to the free slots), publish once, kick once if the device wants it.
 * Returns the number added, or -errno. */
static int issue_batch(struct dp_load *l, uint64_t now, int *issuing)
{
    unsigned added = 0;
    uint64_t t_sched;
    int counted = now >= l->ramp_end;
    while (*issuing && request_due(l, now, &t_sched)) {
        struct load_slot *s = &l->slots[l->free_slots[--l->nfree]];
        prep_request(l, s, t_sched, counted);
        if (l->p.iommu_socket) {
            int rc = map_slot(l, s);
            if (rc < 0)
                return rc;
        }
        l->stats.depth_level[depth_bucket(l->inflight)]++;
        ring_add(l, s);
        l->batch[added] = (uint16_t)(s - l->slots);
        l->sched_k++;
        added++;
        if (counted && l->p.number_ios && ++l->issued_counted >= l->p.number_ios)
            *issuing = 0;
    }
    if (!added)
        return 0;
    uint64_t t_submit = now_ns();
    for (unsigned i = 0; i < added; i++) {
        struct load_slot *s = &l->slots[l->batch[i]];
        s->t_submit = t_submit;
        if (l->p.rate_iops && t_submit - s->t_sched > 1000000000ull / l->p.rate_iops)
            l->stats.late_ios++;
    }
    l->stats.issued += added;
    l->stats.submit_level[batch_bucket(added)]++;
    if (ring_publish(l)) {
        int rc = driver_ring_kick(&l->ring);
        if (rc < 0)
            return rc;
        l->stats.kicks++;
    }
    return (int)added;
}

static int complete_request(struct dp_load *l, struct load_slot *s, uint32_t len, uint64_t now)
{
    if (l->p.iommu_socket) {   /* unmapped before the request counts as done, as a guest does */
        int rc = unmap_slot(l, s);
        if (rc < 0)
            return rc;
        now = now_ns();
    }
    struct dp_load_stats *st = &l->stats;
    struct dp_load_dir_stats *ds = &st->dir[s->dir];
    uint8_t status = __atomic_load_n(s->status, __ATOMIC_RELAXED);
    uint32_t writable = s->dir == DP_DIR_READ ? l->p.bs + 1 : 1;
    int ok = status == VIRTIO_BLK_S_OK;

    if (len > writable) {
        /* The device claims to have written more than it was given. */
        st->bad_used++;
        ok = 0;
        ds->err_other++;
    } else if (status == VIRTIO_BLK_S_IOERR) {
        ds->err_ioerr++;
    } else if (status == VIRTIO_BLK_S_UNSUPP) {
        ds->err_unsupp++;
    } else if (!ok) {
        ds->err_other++;
    } else if (s->dir == DP_DIR_READ && len < writable && s->counted) {
        ds->short_ios++;
    }

    if (l->p.verify) {
        uint64_t block = (s->offset - l->p.offset) / l->p.bs;
        uint32_t *entry = &l->p.verify_map[block], value = *entry & ~VERIFY_BUSY;
        if (s->dir == DP_DIR_WRITE)
            value = ok ? s->generation : DP_VERIFY_UNKNOWN;
        else if (ok)
            verify_check(l, s, value);
        __atomic_store_n(entry, value, __ATOMIC_RELAXED);
    }

    if (ok && s->counted) {
        uint64_t clat = now - s->t_submit, lat = now - s->t_sched;
        hist_add(&ds->clat, clat);
        hist_add(&ds->lat, lat);
        hist_add(&ds->slat, s->t_submit - s->t_sched);
        ds->bytes += l->p.bs;
        COUNTER_ADD(ds->ios, 1);
        l->last_completion = now;
    }
    st->completed++;
    s->inflight = 0;
    l->inflight--;
    l->free_slots[l->nfree++] = (uint16_t)(s - l->slots);
    return 0;
}

/* A packed ring's used descriptors, each ending one request (an id that is no slot of ours in
 * flight: -EPROTO; so no request completes twice). */
static int reap_packed(struct dp_load *l, uint64_t *now)
{
    struct driver_packed *r = &l->pring;
    unsigned n = 0;
    uint64_t t = 0;
    while (driver_packed_used_pending(r)) {
        uint32_t len;
        uint16_t id = driver_packed_used_id(r, &len);
        if (!t)
            t = now_ns();
        if (id >= l->p.iodepth || !l->slots[id].inflight) {
            l->stats.bad_used++;
            return -EPROTO;
        }
        driver_packed_consume(r, l->slot_descs);
        int rc = complete_request(l, &l->slots[id], len, t);
        if (rc < 0)
            return rc;
        n++;
    }
    if (!n)
        return 0;
    l->stats.complete_level[batch_bucket(n)]++;
    *now = t;
    return (int)n;
}

/* Consume the used ring. Returns completions reaped (and the time seen, in *now), or -EPROTO
 * when the backend published something no request matches. */
static int reap(struct dp_load *l, uint64_t *now)
{
    if (l->packed)
        return reap_packed(l, now);
    struct driver_ring *r = &l->ring;
    uint16_t n = driver_ring_used_pending(r);
    if (!n)
        return 0;
    if (n > l->inflight) {
        l->stats.bad_used++;   /* more completions than requests outstanding */
        return -EPROTO;
    }
    uint64_t t = now_ns();
    for (uint16_t i = 0; i < n; i++) {
        uint32_t len;
        uint16_t slot = driver_ring_next_used(r, l->head_to_slot, &len);
        if (slot == DRIVER_NO_SLOT || !l->slots[slot].inflight) {
            l->stats.bad_used++;
            return -EPROTO;
        }
        int rc = complete_request(l, &l->slots[slot], len, t);
        if (rc < 0)
            return rc;
    }
    l->stats.complete_level[batch_bucket(n)]++;
    *now = t;
    return n;
}

/* ---- the loop ---- */

/* Nothing to reap and nothing to issue: spin a little, then sleep on the call eventfd (or,
 * with nothing in flight, until the schedule's next request) until deadline. */
static int wait_idle(struct dp_load *l, uint64_t now, uint64_t deadline)
{
    struct driver_ring *r = &l->ring;
    if (deadline <= now)
        return 0;
    if (l->inflight) {
        if (l->p.poll_ns) {
            uint64_t until = now + l->p.poll_ns < deadline ? now + l->p.poll_ns : deadline;
            while (!ring_used_pending(l)) {
                cpu_relax();
                if (now_ns() >= until)
                    break;
            }
            if (ring_used_pending(l))
                return 0;
        }
        if (ring_enable_interrupts(l)) {
            ring_disable_interrupts(l);
            return 0;
        }
    } else if (deadline - now < SPIN_BELOW_NS) {
        while (now_ns() < deadline && !driver_thread_stopping(&l->t))
            cpu_relax();
        return 0;
    }

    struct pollfd fds[2] = { { .fd = l->t.wake_fd, .events = POLLIN },
                             { .fd = r->call_fd, .events = POLLIN } };
    uint64_t left = deadline - now;
    struct timespec ts = { .tv_sec = (time_t)(left / 1000000000ull),
                           .tv_nsec = (long)(left % 1000000000ull) };
    int rc = ppoll(fds, l->inflight ? 2 : 1, &ts, NULL);
    if (rc < 0 && errno != EINTR)
        return -errno;
    if (rc > 0 && (fds[0].revents & POLLIN))
        driver_drain_eventfd(l->t.wake_fd);
    if (rc > 0 && l->inflight && (fds[1].revents & POLLIN)) {
        driver_drain_eventfd(r->call_fd);
        l->stats.interrupts++;
    }
    if (l->inflight)
        ring_disable_interrupts(l);
    return 0;
}

static void take_samples(struct dp_load *l, uint64_t now)
{
    struct dp_load_stats *st = &l->stats;
    while (now >= l->ramp_end + (st->nsamples + 1) * st->sample_ns &&
           st->nsamples < DP_LOAD_SAMPLES) {
        st->sample_ios[DP_DIR_READ][st->nsamples] = st->dir[DP_DIR_READ].ios;
        st->sample_ios[DP_DIR_WRITE][st->nsamples] = st->dir[DP_DIR_WRITE].ios;
        st->nsamples++;
    }
}

static int load_run(struct dp_load *l)
{
    struct dp_load_stats *st = &l->stats;
    uint64_t usr0 = 0, sys0 = 0, ctx0 = 0, usr1 = 0, sys1 = 0, ctx1 = 0;
    uint64_t now = now_ns(), last_progress = now;
    int issuing = 1, rc = 0;

    l->t_start = now;
    l->ramp_end = now + l->p.ramp_ns;
    l->end = l->p.runtime_ns ? l->ramp_end + l->p.runtime_ns : UINT64_MAX;
    l->last_completion = l->ramp_end;
    ring_disable_interrupts(l);

    for (;;) {
        if (!l->ramp_done && now >= l->ramp_end) {
            l->ramp_done = 1;
            driver_take_rusage(&usr0, &sys0, &ctx0);
        }
        if (issuing && (now >= l->end || driver_thread_stopping(&l->t)))
            issuing = 0;
        int added = 0;
        if (issuing) {
            added = issue_batch(l, now, &issuing);
            if (added < 0) {
                rc = added;
                break;
            }
        }
        rc = reap(l, &now);
        if (rc < 0)
            break;
        if (rc > 0)
            last_progress = now;
        if (!issuing && !l->inflight)
            break;
        if (!rc && !added) {
            uint64_t deadline = last_progress + l->p.timeout_ns;
            if (issuing && l->end < deadline)
                deadline = l->end;
            if (issuing && !l->ramp_done && l->ramp_end < deadline)
                deadline = l->ramp_end;
            if (issuing && l->p.rate_iops && l->nfree && next_due(l) < deadline)
                deadline = next_due(l);
            if (!l->inflight)
                last_progress = now;   /* waiting for the schedule is not a stall */
            rc = wait_idle(l, now, deadline);
            if (rc < 0)
                break;
        }
        now = now_ns();
        if (l->inflight && now - last_progress >= l->p.timeout_ns) {
            rc = -ETIMEDOUT;
            break;
        }
        if (l->ramp_done)
            take_samples(l, now);
        rc = 0;
    }
    if (rc > 0)
        rc = 0;

    if (!l->ramp_done) {
        l->ramp_done = 1;
        driver_take_rusage(&usr0, &sys0, &ctx0);
    }
    driver_take_rusage(&usr1, &sys1, &ctx1);
    st->usr_ns = usr1 - usr0;
    st->sys_ns = sys1 - sys0;
    st->ctx = ctx1 - ctx0;
    st->ramp_ns = l->p.ramp_ns;
    st->runtime_ns = l->last_completion > l->ramp_end ? l->last_completion - l->ramp_end : 0;
    st->verify_generation = l->p.verify_generation;

    if (l->packed) {
        driver_packed_hand_back(&l->pring);
        st->avail_idx = driver_packed_avail_pos(&l->pring);
        st->last_used_idx = driver_packed_used_pos(&l->pring);
        return rc;
    }
    struct driver_ring *r = &l->ring;
    driver_ring_hand_back(r);
    st->avail_idx = r->avail_idx;
    st->last_used_idx = r->last_used_idx;
    return rc;
}

static void *load_thread(void *arg)
{
    struct dp_load *l = arg;
    driver_thread_enter("dp-load", l->p.queue, l->p.cpu);
    driver_thread_ready(&l->t, 0);
    l->stats.error = load_run(l);
    driver_thread_finish(&l->t);
    return NULL;
}

/* ---- setup ---- */

static uint64_t data_stride(uint32_t bs)
{
    return ((uint64_t)bs + ARENA_ALIGN - 1) / ARENA_ALIGN * ARENA_ALIGN;
}

uint64_t dp_load_arena_size(uint32_t bs, uint32_t iodepth)
{
    uint64_t meta = (uint64_t)iodepth * DP_LOAD_SLOT_META;
    return (uint64_t)iodepth * data_stride(bs) + (meta + ARENA_ALIGN - 1) / ARENA_ALIGN * ARENA_ALIGN;
}

/* Mapped per request, a slot is its data buffer and the page after it (header, status,
 * indirect table): one mapping, one UPDATE. */
uint64_t dp_load_arena_size_iommu(uint32_t bs, uint32_t iodepth)
{
    return (uint64_t)iodepth * (data_stride(bs) + ARENA_ALIGN);
}

static int check_params(const struct dp_load_params *p)
{
    if (p->bs == 0 || p->bs % SECTOR || p->offset % SECTOR || p->size < p->bs)
        return -EINVAL;
    uint64_t arena = p->iommu_socket ? dp_load_arena_size_iommu(p->bs, p->iodepth)
                                     : dp_load_arena_size(p->bs, p->iodepth);
    if (p->iodepth == 0 || driver_handover_check(&p->ring, p->iodepth, arena))
        return -EINVAL;
    if (p->rw < DP_RW_READ || p->rw > DP_RW_RW || p->rwmixread > 100)
        return -EINVAL;
    if (p->verify && (!p->verify_map || p->size / p->bs <= p->iodepth))
        return -EINVAL;
    return 0;
}

/* A packed ring: each slot's list is written into the ring per request, from the slot's
 * template (id = the slot): one indirect descriptor to its table, or header, data, status. */
static void setup_packed_slot(struct dp_load *l, struct load_slot *s, unsigned i,
                              uint64_t data_gpa, uint64_t meta_gpa, uint8_t *meta_host)
{
    struct pvirtq_desc chain[3] = {
        { .addr = meta_gpa, .len = 16, .flags = VRING_DESC_F_NEXT },
        { .addr = data_gpa, .len = l->p.bs, .flags = VRING_DESC_F_NEXT | VRING_DESC_F_WRITE },
        { .addr = meta_gpa + 16, .len = 1, .flags = VRING_DESC_F_WRITE },
    };
    struct pvirtq_desc *tmpl = &l->ptmpl[(size_t)i * l->slot_descs];
    if (l->p.ring.indirect) {
        struct pvirtq_desc *table = (struct pvirtq_desc *)(meta_host + 32);
        for (unsigned k = 0; k < 3; k++)   /* only WRITE is valid in an indirect table */
            table[k] = (struct pvirtq_desc){ .addr = chain[k].addr, .len = chain[k].len,
                                             .flags = chain[k].flags & VRING_DESC_F_WRITE };
        tmpl[0] = (struct pvirtq_desc){ .addr = meta_gpa + 32, .len = sizeof(chain),
                                        .flags = VRING_DESC_F_INDIRECT };
        s->pdata_desc = &table[1];
    } else {
        memcpy(tmpl, chain, sizeof(chain));
        s->pdata_desc = &tmpl[1];
    }
    s->head = (uint16_t)i;
}

/* A split ring: each slot's chain is written once, into its indirect table (head: the slot)
 * or into three descriptors of the table (head: 3 x the slot). */
static void setup_split_slot(struct dp_load *l, struct load_slot *s, unsigned i,
                             uint64_t data_gpa, uint64_t meta_gpa, uint8_t *meta_host)
{
    struct vring_desc chain[3] = {
        { .addr = meta_gpa, .len = 16, .flags = VRING_DESC_F_NEXT },
        { .addr = data_gpa, .len = l->p.bs, .flags = VRING_DESC_F_NEXT | VRING_DESC_F_WRITE },
        { .addr = meta_gpa + 16, .len = 1, .flags = VRING_DESC_F_WRITE },
    };
    if (l->p.ring.indirect) {
        struct vring_desc *table = (struct vring_desc *)(meta_host + 32);
        chain[0].next = 1;
        chain[1].next = 2;
        memcpy(table, chain, sizeof(chain));
        s->head = (uint16_t)i;
        l->ring.desc[i] = (struct vring_desc){ .addr = meta_gpa + 32, .len = sizeof(chain),
                                               .flags = VRING_DESC_F_INDIRECT };
        s->data_desc = &table[1];
    } else {
        s->head = (uint16_t)(3 * i);
        chain[0].next = (uint16_t)(3 * i + 1);
        chain[1].next = (uint16_t)(3 * i + 2);
        memcpy(&l->ring.desc[3 * i], chain, sizeof(chain));
        s->data_desc = &l->ring.desc[3 * i + 1];
    }
}

/* Lay out each slot's buffers and its descriptors once; per request only the data
 * descriptor's direction flag changes. */
static void setup_slots(struct dp_load *l)
{
    const struct dp_load_params *p = &l->p;
    uint64_t stride = data_stride(p->bs), meta = (uint64_t)p->iodepth * stride;
    for (unsigned i = 0; i < p->ring.num; i++)
        l->head_to_slot[i] = DRIVER_NO_SLOT;
    for (unsigned i = 0; i < p->iodepth; i++) {
        struct load_slot *s = &l->slots[i];
        uint64_t data_off = i * stride, meta_off = meta + (uint64_t)i * DP_LOAD_SLOT_META;
        if (p->iommu_socket) {   /* each slot one mapping: data, then its own metadata page */
            data_off = i * (stride + ARENA_ALIGN);
            meta_off = data_off + stride;
            s->map_iova = p->ring.arena_gpa + data_off;
            s->map_uaddr = p->ring.arena_host + data_off;
            s->map_len = (uint32_t)(stride + ARENA_ALIGN);
        }
        uint64_t data_gpa = p->ring.arena_gpa + data_off;
        uint64_t meta_gpa = p->ring.arena_gpa + meta_off;
        uint8_t *meta_host = (uint8_t *)(uintptr_t)(p->ring.arena_host + meta_off);
        s->data = (uint8_t *)(uintptr_t)(p->ring.arena_host + data_off);
        s->hdr = (struct virtio_blk_outhdr *)meta_host;
        s->status = meta_host + 16;
        memset(s->data, 0, p->bs);
        s->desc_dir = DP_DIR_READ;
        if (l->packed)
            setup_packed_slot(l, s, i, data_gpa, meta_gpa, meta_host);
        else
            setup_split_slot(l, s, i, data_gpa, meta_gpa, meta_host);
        l->head_to_slot[s->head] = (uint16_t)i;
        l->free_slots[l->nfree++] = (uint16_t)(p->iodepth - 1 - i);
    }
}

struct dp_load *dp_load_start(const struct dp_load_params *params, int *err)
{
    int rc = check_params(params);
    if (rc < 0) {
        *err = rc;
        return NULL;
    }
    struct dp_load *l = calloc(1, sizeof(*l));
    if (!l) {
        *err = -ENOMEM;
        return NULL;
    }
    l->p = *params;
    rc = driver_thread_init(&l->t);
    if (!l->p.timeout_ns)
        l->p.timeout_ns = DEFAULT_TIMEOUT_NS;
    l->stats.sample_ns = l->p.sample_ns ? l->p.sample_ns : DEFAULT_SAMPLE_NS;
    l->ring = driver_ring_of(&params->ring);   /* (its kick and call fds serve a packed ring too) */
    l->packed = params->ring.packed != 0;
    if (l->packed) {
        l->pring = driver_packed_of(&params->ring);
        l->slot_descs = params->ring.indirect ? 1 : 3;
        l->ptmpl = calloc((size_t)params->iodepth * l->slot_descs, sizeof(*l->ptmpl));
    }
    l->nblocks = params->size / params->bs;
    uint64_t seed = params->seed ^ ((uint64_t)params->queue << 32);
    l->rng = splitmix64(&seed) | 1;
    l->slots = calloc(params->iodepth, sizeof(*l->slots));
    l->free_slots = calloc(params->iodepth, sizeof(*l->free_slots));
    l->head_to_slot = calloc(params->ring.num, sizeof(*l->head_to_slot));
    l->batch = calloc(params->iodepth, sizeof(*l->batch));
    if (rc < 0)
        goto fail;
    if (!l->slots || !l->free_slots || !l->head_to_slot || !l->batch || (l->packed && !l->ptmpl)) {
        rc = -ENOMEM;
        goto fail;
    }
    if (params->verify) {
        /* Requests of an earlier run that ended early never completed. */
        for (uint64_t b = 0; b < l->nblocks; b++)
            if (l->p.verify_map[b] & VERIFY_BUSY)
                l->p.verify_map[b] = DP_VERIFY_UNKNOWN;
    }
    setup_slots(l);

    rc = driver_thread_start(&l->t, load_thread, l);
    if (rc < 0)
        goto fail;
    return l;

fail:
    dp_load_free(l);
    *err = rc;
    return NULL;
}

void dp_load_stop(struct dp_load *load)
{
    driver_thread_stop(&load->t);
}

int dp_load_wait(struct dp_load *load, int timeout_ms)
{
    return driver_thread_wait(&load->t, timeout_ms);
}

void dp_load_progress(const struct dp_load *load, uint64_t *reads, uint64_t *writes)
{
    *reads = __atomic_load_n(&load->stats.dir[DP_DIR_READ].ios, __ATOMIC_RELAXED);
    *writes = __atomic_load_n(&load->stats.dir[DP_DIR_WRITE].ios, __ATOMIC_RELAXED);
}

int dp_load_get_stats(const struct dp_load *load, struct dp_load_stats *out)
{
    if (!driver_thread_done(&load->t))
        return -EBUSY;
    memcpy(out, &load->stats, sizeof(*out));
    return 0;
}

int dp_load_thread_id(const struct dp_load *load)
{
    return load->t.tid;
}

void dp_load_free(struct dp_load *load)
{
    if (!load)
        return;
    driver_thread_destroy(&load->t);
    free(load->slots);
    free(load->free_slots);
    free(load->head_to_slot);
    free(load->batch);
    free(load->ptmpl);
    free(load);
}
