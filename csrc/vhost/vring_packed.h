/* vring_packed.h — the packed virtqueue as it lies in guest memory (virtio 1.2, 2.8): one ring
 * of descriptors that both sides write, and two 4-byte event suppression areas. Both sides use
 * it: the device-side walker (packed.c) and the driver side in C (driver/packed_driver.h).
 *
 * A descriptor is available when its AVAIL bit equals the driver's wrap counter and its USED
 * bit does not; used when both equal the device's wrap counter. Both counters start at 1 and
 * flip each time a side's position passes the last slot. The ring size need not be a power of
 * two, so positions wrap by comparison, never by mask. */
#ifndef DP_VRING_PACKED_H
#define DP_VRING_PACKED_H

#include <stdint.h>

#define VRING_PACKED_DESC_F_AVAIL (1u << 7)
#define VRING_PACKED_DESC_F_USED (1u << 15)
/* flags of an event suppression area (bits 0-1) */
#define VRING_PACKED_EVENT_FLAG_ENABLE 0
#define VRING_PACKED_EVENT_FLAG_DISABLE 1
#define VRING_PACKED_EVENT_FLAG_DESC 2   /* only with VIRTIO_RING_F_EVENT_IDX */
#define VRING_PACKED_EVENT_F_WRAP_CTR 15
/* GET/SET_VRING_BASE of a packed ring, as QEMU encodes it (hw/virtio/virtio.c): bits 0-14 the
 * next descriptor the device reads, bit 15 its driver-ring wrap counter, bits 16-30 the next
 * slot it writes a used descriptor to, bit 31 the device-ring wrap counter. A reset ring:
 * 0x80008000. */
#define VRING_PACKED_BASE_RESET 0x80008000u

struct pvirtq_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t id;                 /* buffer id: in the last descriptor of a list */
    uint16_t flags;              /* NEXT, WRITE, INDIRECT as split; AVAIL, USED */
};

struct pvirtq_event {
    uint16_t off_wrap;           /* bits 0-14 a descriptor offset, bit 15 its wrap counter */
    uint16_t flags;              /* VRING_PACKED_EVENT_FLAG_* */
};

/* The AVAIL/USED bits a side writes: available for wrap counter w, or used for w. */
static inline uint16_t vring_packed_avail_bits(int wrap)
{
    return wrap ? VRING_PACKED_DESC_F_AVAIL : VRING_PACKED_DESC_F_USED;
}

static inline uint16_t vring_packed_used_bits(int wrap)
{
    return wrap ? VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED : 0;
}

/* Is a descriptor with these flags available to a device whose driver-ring wrap counter is w? */
static inline int vring_packed_is_avail(uint16_t flags, int wrap)
{
    return ((flags & VRING_PACKED_DESC_F_AVAIL) != 0) == (wrap != 0) &&
           ((flags & VRING_PACKED_DESC_F_USED) != 0) != (wrap != 0);
}

/* Is it used for a driver whose device-ring wrap counter is w? */
static inline int vring_packed_is_used(uint16_t flags, int wrap)
{
    return ((flags & VRING_PACKED_DESC_F_AVAIL) != 0) == (wrap != 0) &&
           ((flags & VRING_PACKED_DESC_F_USED) != 0) == (wrap != 0);
}

/* vring_need_event() on a packed ring: did the position, moving from old to new_pos (new_pos
 * in [0, num) on wrap counter `wrap`; old may be new_pos - count, mod 2^16, when the move
 * crossed the end), pass the event offset off_wrap? An offset of the other lap lies num
 * behind. */
static inline int vring_packed_need_event(uint16_t off_wrap, int wrap, uint16_t new_pos,
                                          uint16_t old_pos, unsigned num)
{
    int off = off_wrap & 0x7fff;
    if ((off_wrap >> VRING_PACKED_EVENT_F_WRAP_CTR) != (wrap != 0))
        off -= (int)num;
    return (uint16_t)(new_pos - (uint16_t)off - 1) < (uint16_t)(new_pos - old_pos);
}

#endif
