/* dirty_log.h — live migration's dirty page log, and the calls a ring walker makes at each
 * store of the device into guest memory while the queue logs (vq->logging).
 *
 * The walkers know host addresses; the log wants guest-physical ones. vq_log_host and
 * vq_log_iov find the region a host address lies in and log by its guest-physical address,
 * whatever address the descriptor carried (an IOVA under a vIOMMU would still be logged by
 * its GPA). vq_log_used logs a write at an offset into the device area of the ring, at the
 * guest-physical address the front end gave for it (SET_VRING_ADDR's log_guest_addr with
 * VHOST_VRING_F_LOG; behind a vIOMMU that is an IOVA, so the area is logged by the region
 * its host address lies in instead). Each call comes after the store it logs, so a front end that finds the
 * bit and clears it reads the new bytes.
 */
#ifndef DP_DIRTY_LOG_H
#define DP_DIRTY_LOG_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "vhost/virtqueue.h"

struct dp_dirty_log {
    uint8_t *bitmap;
    uint64_t size;                /* bytes of bitmap: size * 8 pages */
    void *map;
    size_t map_len;
    uint64_t dropped;             /* pages past the end (atomic) */
};

/* Is the queue logging? One load of a field on the queue's hot line: the whole cost of the
 * log while it is off. */
static inline int vq_logging(const struct dp_vq *vq)
{
    return __builtin_expect(vq->logging, 0);
}

/* Mark [gpa, gpa+len): an atomic OR per byte of the bitmap it touches. */
void dirty_log_mark(struct dp_dirty_log *log, uint64_t gpa, uint64_t len);

/* The walkers' calls (only while vq_logging): */
/* [gpa, gpa+len) was written. */
void vq_log_gpa(struct dp_vq *vq, uint64_t gpa, uint64_t len);
/* len bytes at a host address inside one region were written. */
void vq_log_host(struct dp_vq *vq, const void *host, size_t len);
/* The first len bytes of an iovec list were written. */
void vq_log_iov(struct dp_vq *vq, const struct iovec *iov, unsigned cnt, size_t len);
/* len bytes at offset into the ring's device area (split: the used ring) were written. */
void vq_log_used(struct dp_vq *vq, uint64_t offset, uint64_t len);

#endif
