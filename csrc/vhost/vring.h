/* vring.h — the split virtqueue as it lies in guest memory (virtio 1.2, 2.7), and the barriers
 * that order it. Both sides use it: the device-side walker (virtqueue.c) and the driver side
 * in C (driver/); each barrier says which one it pairs with on the other side. */
#ifndef DP_VRING_H
#define DP_VRING_H

#include <stdint.h>

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
#define VRING_USED_F_NO_NOTIFY 1
#define VRING_AVAIL_F_NO_INTERRUPT 1

struct vring_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct vring_avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[];   /* num entries, then used_event */
};

struct vring_used_elem {
    uint32_t id;
    uint32_t len;
};

struct vring_used {
    uint16_t flags;
    uint16_t idx;
    struct vring_used_elem ring[];   /* num entries, then avail_event */
};

/* Barriers. Each names what it orders; the driver side has the matching one. */
/* Read avail->idx before the ring entries and descriptors it publishes
 * (pairs with the driver's write barrier between filling descriptors and bumping idx). */
#define virtio_load_acquire_u16(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
/* Make used ring entries visible before the idx that publishes them
 * (pairs with the driver's read barrier after reading used->idx). */
#define virtio_store_release_u16(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
/* Order a store (used->idx, avail_event) before a later load (used_event, avail->idx):
 * pairs with the driver's full barrier between its own store and load, so neither side
 * can miss the other's update and skip a notification that was needed. */
#define virtio_store_mb() __atomic_thread_fence(__ATOMIC_SEQ_CST)

#endif
