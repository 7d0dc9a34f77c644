/* blk.h — virtio-blk request semantics: a parsed request, the disk it runs on. */
#ifndef DP_BLK_H
#define DP_BLK_H

#include <stdint.h>
#include <sys/uio.h>

#include "blk/virtio_blk.h"
#include "disk/dp_disk.h"
#include "util/iov.h"
#include "vhost/virtqueue.h"

/* A chain holds at most seg_max data segments plus header and status; a few more for
 * buffers that straddle memory regions. */
#define REQ_MAX_SEGS (DP_SEG_MAX + 2)

struct dp_disk {
    struct dp_disk_params p;
    uint64_t capacity_sectors;
    int writeback;   /* read by every queue thread, written by the control plane */
    struct dp_latency_params latency;
};

struct dp_req;

/* One sub-operation of a multi-range DISCARD / WRITE_ZEROES. */
struct range_op {
    struct dp_req *req;
    uint64_t offset;
    uint64_t len;
    int unmap;       /* WRITE_ZEROES with the UNMAP flag */
    int mode;        /* fallocate mode */
};

struct dp_req {
    struct dp_vq *vq;
    struct dp_req *next_free;
    uint16_t head;
    uint32_t type;
    uint8_t *status;          /* the status byte in guest memory */
    uint32_t used_len;        /* bytes the device wrote, reported in the used ring */
    uint64_t offset;          /* byte offset on the disk */
    uint64_t nbytes;          /* data bytes */
    struct iovec *seg;        /* the whole chain (REQ_MAX_SEGS slots) */
    struct iovec *iov;        /* the data part of the chain */
    unsigned iovcnt;
    struct iovec *xfer_iov;   /* what is submitted: iov, or the bounce buffer */
    unsigned xfer_cnt;
    struct iovec bounce_iov;
    void *bounce;             /* aligned copy for O_DIRECT when guest buffers are not */
    uint64_t done;            /* bytes transferred so far (short transfers resubmit) */
    uint64_t start_ns;        /* popped at (CLOCK_MONOTONIC) */
    uint64_t seq;             /* submission order within the queue */
    uint64_t due_ns;             /* emulated latency: when to complete (CLOCK_MONOTONIC) */
    int delayed;
    unsigned pending;         /* sub-operations in flight */
    uint8_t result;           /* status to report once pending reaches zero */
    unsigned nranges;
    struct range_op ranges[DP_MAX_DISCARD_SEG];
};

/* Parse the chain (already in req->seg) into req. Returns VIRTIO_BLK_S_OK when the request
 * is to be executed, another VIRTIO_BLK_S_* to complete it with at once, or -EIO when the
 * chain has no status byte to complete it with. */
int blk_req_parse(struct dp_req *req, const struct vq_chain *chain, const struct dp_disk *disk);

#endif
