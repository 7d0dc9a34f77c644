/* driver.h — the driver (guest) side of a split virtqueue, and the per-queue load thread
 * that drives it (driver.c). The device side of the same ring is virtqueue.h; barrier names
 * here say which of its barriers each one pairs with. */
#ifndef DP_DRIVER_H
#define DP_DRIVER_H

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>

#include "core.h"
#include "stats.h"
#include "virtio_blk.h"
#include "virtqueue.h"

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

/* ---- driver side of the split ring: shared by the load generator (driver.c) and the trace
 * replayer (replay.c) ---- */

static inline uint64_t driver_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline void driver_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
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

/* One request slot: buffers preallocated in the arena, reused for every request. */
struct load_slot {
    uint64_t offset;             /* byte offset of the request on the disk */
    uint64_t t_sched;            /* when the schedule wanted it issued */
    uint64_t t_submit;           /* when it was published */
    uint8_t *data;               /* host address of the data buffer */
    struct virtio_blk_outhdr *hdr;
    uint8_t *status;
    struct vring_desc *data_desc;   /* the descriptor whose WRITE flag says the direction */
    uint32_t generation;         /* verify: the stamp a write carries */
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
    int stop;                    /* set by dp_load_stop (any thread) */
    int wake_fd;                 /* wakes the thread out of its sleep for stop */

    pthread_t thread;
    int tid;
    int done;
    int joined;
    pthread_mutex_t lock;        /* guards tid / done hand-offs, never taken on the I/O path */
    pthread_cond_t cond;

    struct dp_load_stats stats;
};

#endif
