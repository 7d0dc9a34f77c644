/* driver.h — the driver (guest) side of a split virtqueue, the life of a per-queue thread
 * that drives it (driver_thread.c), and the load generator's state (load.c); the trace
 * replayer (replay.c) uses all but the last. The device side of the same ring is
 * vhost/virtqueue.h; barrier names here say which of its barriers each one pairs with. A
 * packed ring's driver side is packed_driver.h. */
#ifndef DP_DRIVER_H
#define DP_DRIVER_H

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>

#include "driver/dp_driver.h"
#include "util/clock.h"
#include "util/hist.h"
#include "blk/virtio_blk.h"
#include "driver/packed_driver.h"
#include "vhost/vring.h"

/* Barriers, driver side. */
/* Publish descriptors, avail ring entries and request headers before the avail->idx that
 * makes them the device's (pairs with virtio_load_acquire_u16(&avail->idx) in vq_pop). */
#define driver_store_release_u16(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
/* Read used->idx before the used elements, status bytes and data it publishes (pairs with
 * virtio_store_release_u16(&used->idx) in vq_push_used). */
#define driver_load_acquire_u16(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
/* Order a store before a later load: avail->idx before reading avail_event / used->flags
 * (the kick decision), and used_event / avail->flags before re-reading used->idx (going to
 * sleep). Pairs with virtio_store_mb() in vq_enable_notify and vq_need_notify, so neither
 * side can miss the other's update and skip a notification that was needed. */
#define driver_mb() __atomic_thread_fence(__ATOMIC_SEQ_CST)

/* Guest memory a driver thread lays its requests out in is page-aligned. */
#define ARENA_ALIGN 4096
/* head_to_slot entry of a descriptor no request starts at */
#define DRIVER_NO_SLOT 0xffff

/* Single writer (the driver thread); other threads read the field while it runs. */
#define COUNTER_ADD(field, n) \
    __atomic_store_n(&(field), (field) + (n), __ATOMIC_RELAXED)

/* The ring as the driver sees it. Indices are the driver's own copies (it is the only
 * writer of avail->idx); everything read from the used ring is the device's and is checked. */
struct driver_ring {
    unsigned num;
    struct vring_desc *desc;
    struct vring_avail *avail;
    struct vring_used *used;
    uint16_t avail_idx;          /* next avail slot, published or not */
    uint16_t published_idx;      /* avail->idx as last stored */
    uint16_t last_used_idx;      /* next used element to consume */
    int event_idx;
    int kick_fd;
    int call_fd;
};

/* ---- driver side of the split ring: shared by the load generator (load.c) and the trace
 * replayer (replay.c) ---- */

/* -EINVAL unless h is a ring (split or packed) that holds iodepth requests (3 descriptors
 * each, or one indirect) and an aligned arena of at least arena_need bytes. */
static inline int driver_handover_check(const struct dp_ring_handover *h, uint32_t iodepth,
                                        uint64_t arena_need)
{
    if (!h->desc_host || !h->avail_host || !h->used_host || h->kick_fd < 0 || h->call_fd < 0)
        return -EINVAL;
    if (h->num == 0 || h->num > 32768 || (!h->packed && (h->num & (h->num - 1))))
        return -EINVAL;
    if (h->packed && ((h->avail_idx & 0x7fff) >= h->num || (h->last_used_idx & 0x7fff) >= h->num))
        return -EINVAL;
    if (iodepth > (h->indirect ? h->num : h->num / 3))
        return -EINVAL;
    if (h->arena_gpa % ARENA_ALIGN || h->arena_host % ARENA_ALIGN || h->arena_len < arena_need)
        return -EINVAL;
    return 0;
}

/* Take the ring over where the frontend left its indices. */
static inline struct driver_ring driver_ring_of(const struct dp_ring_handover *h)
{
    return (struct driver_ring){
        .num = h->num,
        .desc = (struct vring_desc *)(uintptr_t)h->desc_host,
        .avail = (struct vring_avail *)(uintptr_t)h->avail_host,
        .used = (struct vring_used *)(uintptr_t)h->used_host,
        .avail_idx = h->avail_idx,
        .published_idx = h->avail_idx,
        .last_used_idx = h->last_used_idx,
        .event_idx = h->event_idx,
        .kick_fd = h->kick_fd,
        .call_fd = h->call_fd,
    };
}

static inline uint16_t *driver_used_event(struct driver_ring *r)
{
    return &r->avail->ring[r->num];
}

static inline uint16_t *driver_avail_event(struct driver_ring *r)
{
    return (uint16_t *)&r->used->ring[r->num];
}

static inline void driver_ring_add(struct driver_ring *r, uint16_t head)
{
    __atomic_store_n(&r->avail->ring[r->avail_idx & (r->num - 1)], head, __ATOMIC_RELAXED);
    r->avail_idx++;
}

/* Make the added heads the device's; returns 1 when the device asked to be kicked. */
static inline int driver_ring_publish(struct driver_ring *r)
{
    uint16_t old = r->published_idx, new = r->avail_idx;
    driver_store_release_u16(&r->avail->idx, new);
    r->published_idx = new;
    driver_mb();   /* avail->idx before avail_event / used->flags */
    if (r->event_idx) {
        uint16_t event = __atomic_load_n(driver_avail_event(r), __ATOMIC_RELAXED);
        /* vring_need_event(): did avail->idx move past avail_event with this batch? */
        return (uint16_t)(new - event - 1) < (uint16_t)(new - old);
    }
    return !(__atomic_load_n(&r->used->flags, __ATOMIC_RELAXED) & VRING_USED_F_NO_NOTIFY);
}

static inline uint16_t driver_ring_used_pending(struct driver_ring *r)
{
    return (uint16_t)(driver_load_acquire_u16(&r->used->idx) - r->last_used_idx);
}

/* Ask for an interrupt on the next completion; returns the completions already there
 * (then the caller must not sleep). */
static inline uint16_t driver_ring_enable_interrupts(struct driver_ring *r)
{
    if (r->event_idx)
        __atomic_store_n(driver_used_event(r), r->last_used_idx, __ATOMIC_RELAXED);
    else
        __atomic_store_n(&r->avail->flags, 0, __ATOMIC_RELAXED);
    driver_mb();   /* used_event / avail->flags before the re-read of used->idx */
    return driver_ring_used_pending(r);
}

/* While busy the driver polls. With EVENT_IDX a used_event left behind is enough: the device
 * signals only when used->idx crosses it again (once per 64 Ki completions). */
static inline void driver_ring_disable_interrupts(struct driver_ring *r)
{
    if (!r->event_idx)
        __atomic_store_n(&r->avail->flags, VRING_AVAIL_F_NO_INTERRUPT, __ATOMIC_RELAXED);
}

/* Consume the next used element (driver_ring_used_pending said there is one): its length in
 * *len, and the slot head_to_slot maps its id to (DRIVER_NO_SLOT for an id out of range or
 * where no request starts; the caller checks that slot is in flight). */
static inline uint16_t driver_ring_next_used(struct driver_ring *r, const uint16_t *head_to_slot,
                                             uint32_t *len)
{
    const struct vring_used_elem *e = &r->used->ring[r->last_used_idx & (r->num - 1)];
    uint32_t id = __atomic_load_n(&e->id, __ATOMIC_RELAXED);
    *len = __atomic_load_n(&e->len, __ATOMIC_RELAXED);
    r->last_used_idx++;
    return id < r->num ? head_to_slot[id] : DRIVER_NO_SLOT;
}

static inline int driver_ring_kick(struct driver_ring *r)
{
    uint64_t one = 1;
    if (write(r->kick_fd, &one, sizeof(one)) != sizeof(one))
        return errno == EAGAIN ? 0 : -errno;   /* a saturated counter is still a kick */
    return 0;
}

/* Hand the ring back the way the Python frontend runs it: interrupts on. */
static inline void driver_ring_hand_back(struct driver_ring *r)
{
    if (r->event_idx)
        __atomic_store_n(driver_used_event(r), r->last_used_idx, __ATOMIC_RELAXED);
    else
        __atomic_store_n(&r->avail->flags, 0, __ATOMIC_RELAXED);
}

/* fio's io_u_dist buckets: 1, 2-3, 4-7, 8-15, 16-31, 32-63, >=64 */
static inline unsigned depth_bucket(unsigned depth)
{
    unsigned b = depth ? 31u - (unsigned)__builtin_clz(depth) : 0;
    return b < 6 ? b : 6;
}

/* fio's submit/complete buckets: 0, 1-4, 5-8, 9-16, 17-32, 33-64, >64 */
static inline unsigned batch_bucket(unsigned n)
{
    if (n == 0)
        return 0;
    if (n <= 4)
        return 1;
    unsigned b = 32u - (unsigned)__builtin_clz(n - 1);   /* ceil(log2 n) */
    return b - 1 < 6 ? b - 1 : 6;
}

/* ---- a driver thread's life (driver_thread.c): one per queue, the same for the load
 * generator and the replayer ---- */

/* Started and joined here, stopped by a flag and the wake eventfd, waited for with a timeout.
 * The lock hands over tid, init_rc and done (and whatever the owner guards with it besides);
 * it is never taken per request. */
struct driver_thread {
    int stop;                    /* set by driver_thread_stop (any thread) */
    int wake_fd;                 /* stop (and the owner's own events) wake the thread */
    pthread_t thread;
    int tid;
    int init_rc;                 /* the thread's own setup, reported to driver_thread_start */
    int done;
    int joined;
    pthread_mutex_t lock;
    pthread_cond_t cond;         /* tid and done (and the owner's own conditions) */
};

/* The lock, the cond (CLOCK_MONOTONIC) and the wake eventfd. 0 or -errno; either way
 * driver_thread_destroy undoes it. */
int driver_thread_init(struct driver_thread *t);
/* Run fn(arg) in a new thread and wait for its driver_thread_ready: its init_rc, or -errno
 * when no thread could be made. */
int driver_thread_start(struct driver_thread *t, void *(*fn)(void *), void *arg);
/* In the new thread, first: named "<prefix><queue>", µs timer slack, pinned to cpu (>= 0). */
void driver_thread_enter(const char *prefix, unsigned queue, int cpu);
/* In the new thread, once set up: publish its tid and init_rc. */
void driver_thread_ready(struct driver_thread *t, int init_rc);
/* In the thread, last: done. What it wrote before is the reader's once it sees done. */
void driver_thread_finish(struct driver_thread *t);
void driver_thread_stop(struct driver_thread *t);
/* Wait up to timeout_ms (< 0: forever): 1 when the thread finished, 0 on timeout. */
int driver_thread_wait(struct driver_thread *t, int timeout_ms);
int driver_thread_done(const struct driver_thread *t);
static inline int driver_thread_stopping(const struct driver_thread *t)
{
    return __atomic_load_n(&t->stop, __ATOMIC_RELAXED);
}
/* Stops and joins a started thread, then releases what driver_thread_init made. */
void driver_thread_destroy(struct driver_thread *t);
/* A cond whose timed waits count on CLOCK_MONOTONIC (see driver_deadline). */
void driver_cond_init(pthread_cond_t *cond);
/* CLOCK_MONOTONIC timeout_ms (>= 0) from now, for pthread_cond_timedwait on such a cond. */
void driver_deadline(struct timespec *deadline, int timeout_ms);
/* This thread's CPU time (ns) and context switches. */
void driver_take_rusage(uint64_t *usr, uint64_t *sys, uint64_t *ctx);

static inline void driver_wake(int fd)
{
    uint64_t one = 1;
    ssize_t rc = write(fd, &one, sizeof(one));
    (void)rc;   /* a saturated counter still wakes */
}

static inline void driver_drain_eventfd(int fd)
{
    uint64_t v;
    ssize_t rc = read(fd, &v, sizeof(v));
    (void)rc;   /* nonblocking: nothing to read is fine */
}

/* One request slot: buffers preallocated in the arena, reused for every request. */
struct load_slot {
    uint64_t offset;             /* byte offset of the request on the disk */
    uint64_t t_sched;            /* when the schedule wanted it issued */
    uint64_t t_submit;           /* when it was published */
    uint8_t *data;               /* host address of the data buffer */
    struct virtio_blk_outhdr *hdr;
    uint8_t *status;
    union {                      /* the descriptor whose WRITE flag says the direction */
        struct vring_desc *data_desc;
        struct pvirtq_desc *pdata_desc;   /* packed: in the slot's table or its template */
    };
    uint32_t generation;         /* verify: the stamp a write carries */
    uint64_t map_iova;           /* --iommu request: the slot's mapping, made per request */
    uint64_t map_uaddr;
    uint32_t map_len;
    uint16_t head;
    uint8_t dir;                 /* DP_DIR_* */
    uint8_t desc_dir;            /* the direction data_desc's flags currently say */
    uint8_t counted;             /* issued after the ramp: goes into the stats */
    uint8_t inflight;
};

struct dp_load {
    struct dp_load_params p;
    struct driver_ring ring;
    struct load_slot *slots;
    /* a packed ring: its driver side, each slot's ring descriptors (slot_descs per slot, id =
     * the slot), and the slots of the batch being issued */
    int packed;
    struct driver_packed pring;
    struct pvirtq_desc *ptmpl;
    unsigned slot_descs;
    uint16_t *batch;
    uint16_t *free_slots;        /* stack of free slot numbers */
    unsigned nfree;
    unsigned inflight;
    uint16_t *head_to_slot;      /* num entries, NO_SLOT where no request starts */
    uint64_t nblocks;            /* bs-sized blocks in the region */
    uint64_t seq_block[2];       /* sequential cursors, per direction like fio's last_pos */
    uint64_t rng;
    uint64_t issued_counted;     /* toward number_ios */
    uint64_t sched_k;            /* open loop: requests scheduled so far */
    uint64_t t_start;
    uint64_t ramp_end;
    uint64_t end;
    uint64_t last_completion;
    int ramp_done;
    struct driver_thread t;

    struct dp_load_stats stats;
};

#endif
