/* packed_driver.h — the driver (guest) side of a packed virtqueue, for the driver threads
 * (load.c, replay.c); the split ring's is driver.h. The device side of the same ring is
 * vhost/packed.c; each barrier here says which of its barriers it pairs with.
 *
 * The driver writes a list's descriptors at its avail position, the head's flags last (that
 * store publishes the list), and finds used descriptors at its used position, moving on by
 * the ring slots of the list each one ends (the driver's own count: 1 for an indirect list).
 * Buffer ids are the driver's: its request slots. */
#ifndef DP_PACKED_DRIVER_H
#define DP_PACKED_DRIVER_H

#include <stdint.h>

#include "driver/dp_driver.h"
#include "vhost/vring_packed.h"

struct driver_packed {
    unsigned num;
    struct pvirtq_desc *desc;
    struct pvirtq_event *driver;   /* ours: when the device should interrupt */
    struct pvirtq_event *device;   /* the device's: when it wants a kick */
    uint16_t next_avail;
    uint8_t avail_wrap;
    uint8_t used_wrap;
    uint16_t next_used;
    uint16_t driver_flags;         /* what driver->flags holds */
    unsigned added;                /* slots published since the last kick decision */
    int event_idx;
    int kick_fd;
    int call_fd;
};

/* Take the ring over where the frontend left it: positions with their wrap counters in bit
 * 15, the descriptor ring in desc_host, the driver area in avail_host, the device area in
 * used_host. */
static inline struct driver_packed driver_packed_of(const struct dp_ring_handover *h)
{
    return (struct driver_packed){
        .num = h->num,
        .desc = (struct pvirtq_desc *)(uintptr_t)h->desc_host,
        .driver = (struct pvirtq_event *)(uintptr_t)h->avail_host,
        .device = (struct pvirtq_event *)(uintptr_t)h->used_host,
        .next_avail = h->avail_idx & 0x7fff,
        .avail_wrap = (h->avail_idx >> 15) & 1,
        .next_used = h->last_used_idx & 0x7fff,
        .used_wrap = (h->last_used_idx >> 15) & 1,
        .driver_flags = 0xffff,
        .event_idx = h->event_idx,
        .kick_fd = h->kick_fd,
        .call_fd = h->call_fd,
    };
}

static inline uint16_t driver_packed_avail_pos(const struct driver_packed *r)
{
    return (uint16_t)(r->next_avail | r->avail_wrap << 15);
}

static inline uint16_t driver_packed_used_pos(const struct driver_packed *r)
{
    return (uint16_t)(r->next_used | r->used_wrap << 15);
}

/* Write a list of n descriptors (their NEXT/WRITE/INDIRECT flags; the AVAIL/USED bits are
 * added here) for buffer id at the avail position. The head's flags go last, with release:
 * pairs with the acquire load of the head's flags in vq_packed_pop, so the device sees the
 * whole list, the request's header and (writes) its data. */
static inline void driver_packed_add(struct driver_packed *r, const struct pvirtq_desc *d,
                                     unsigned n, uint16_t id)
{
    uint16_t head = r->next_avail;
    uint16_t bits = vring_packed_avail_bits(r->avail_wrap);
    uint16_t head_flags = d[0].flags | bits;
    for (unsigned i = 0; i < n; i++) {
        struct pvirtq_desc *slot = &r->desc[r->next_avail];
        slot->addr = d[i].addr;
        slot->len = d[i].len;
        slot->id = id;
        if (i)
            slot->flags = d[i].flags | bits;
        if (++r->next_avail == r->num) {
            r->next_avail = 0;
            r->avail_wrap ^= 1;
            bits = vring_packed_avail_bits(r->avail_wrap);
        }
    }
    __atomic_store_n(&r->desc[head].flags, head_flags, __ATOMIC_RELEASE);
    r->added += n;
}

/* After a batch of adds: 1 when the device asked to be kicked for it. The full barrier orders
 * the head flags before the read of the device area (pairs with virtio_store_mb() in
 * vq_packed_enable_notify). */
static inline int driver_packed_publish(struct driver_packed *r)
{
    unsigned added = r->added;
    r->added = 0;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint16_t flags = __atomic_load_n(&r->device->flags, __ATOMIC_ACQUIRE) & 3;
    if (flags == VRING_PACKED_EVENT_FLAG_DISABLE)
        return 0;
    if (flags != VRING_PACKED_EVENT_FLAG_DESC || !r->event_idx)
        return 1;
    uint16_t off_wrap = __atomic_load_n(&r->device->off_wrap, __ATOMIC_RELAXED);
    return vring_packed_need_event(off_wrap, r->avail_wrap, r->next_avail,
                                   (uint16_t)(r->next_avail - added), r->num);
}

/* Is there a used descriptor at the used position? (flags acquire: pairs with the release
 * store of the used flags in packed_store_used, which publishes id, len, status and data.) */
static inline int driver_packed_used_pending(struct driver_packed *r)
{
    uint16_t flags = __atomic_load_n(&r->desc[r->next_used].flags, __ATOMIC_ACQUIRE);
    return vring_packed_is_used(flags, r->used_wrap);
}

/* The used descriptor at the used position (driver_packed_used_pending said there is one). */
static inline uint16_t driver_packed_used_id(struct driver_packed *r, uint32_t *len)
{
    const struct pvirtq_desc *d = &r->desc[r->next_used];
    *len = __atomic_load_n(&d->len, __ATOMIC_RELAXED);
    return __atomic_load_n(&d->id, __ATOMIC_RELAXED);
}

/* Move the used position past the list a used descriptor ended (its ring slots). */
static inline void driver_packed_consume(struct driver_packed *r, unsigned slots)
{
    unsigned pos = r->next_used + slots;
    if (pos >= r->num) {
        pos -= r->num;
        r->used_wrap ^= 1;
    }
    r->next_used = (uint16_t)pos;
}

static inline void driver_packed_set_flags(struct driver_packed *r, uint16_t flags)
{
    if (r->driver_flags != flags) {
        __atomic_store_n(&r->driver->flags, flags, __ATOMIC_RELEASE);
        r->driver_flags = flags;
    }
}

/* Ask for an interrupt on the next used descriptor; returns 1 when one is there already
 * (then the caller must not sleep). The full barrier pairs with virtio_store_mb() in
 * vq_packed_need_notify. */
static inline int driver_packed_enable_interrupts(struct driver_packed *r)
{
    if (r->event_idx) {
        __atomic_store_n(&r->driver->off_wrap, driver_packed_used_pos(r), __ATOMIC_RELAXED);
        driver_packed_set_flags(r, VRING_PACKED_EVENT_FLAG_DESC);
    } else {
        driver_packed_set_flags(r, VRING_PACKED_EVENT_FLAG_ENABLE);
    }
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return driver_packed_used_pending(r);
}

/* While busy the driver polls: no interrupts at all. */
static inline void driver_packed_disable_interrupts(struct driver_packed *r)
{
    driver_packed_set_flags(r, VRING_PACKED_EVENT_FLAG_DISABLE);
}

/* Hand the ring back the way the Python frontend runs it: interrupts on. */
static inline void driver_packed_hand_back(struct driver_packed *r)
{
    driver_packed_enable_interrupts(r);
}

#endif
