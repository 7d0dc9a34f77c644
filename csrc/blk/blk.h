/* blk.h — virtio-blk request semantics: the device over a disk, a request slot, and the
 * parse that turns a descriptor chain into either a disk request or an immediate answer. */
#ifndef DP_BLK_H
#define DP_BLK_H

#include <errno.h>
#include <stdint.h>
#include <sys/uio.h>

#include "blk/dp_blk.h"
#include "blk/virtio_blk.h"
#include "disk/disk.h"
#include "util/iov.h"

/* A chain holds at most seg_max data segments plus header and status; a few more for
 * buffers that straddle memory regions. */
#define REQ_MAX_SEGS (DP_SEG_MAX + 2)

struct dp_blk_dev {
    struct dp_disk *disk;
    struct dp_blk_params p;
    uint64_t capacity_sectors;
    uint32_t disk_flags;          /* DP_DISK_F_* of the disk */
    int writeback;                /* read by every queue thread, written by the control plane */
    int failed;                   /* likewise: answer IOERR to everything (dp_blk_set_failed) */
};

struct dp_vq;

/* One request slot of a queue: the engine's bookkeeping and what the guest asked (type,
 * status byte), then the disk request it became (io: its hot fields first, the ranges last). */
struct dp_req {
    struct dp_vq *vq;
    struct dp_req *next_free;
    uint16_t head;
    uint32_t type;                /* VIRTIO_BLK_T_* (UINT32_MAX: no header) */
    uint8_t *status;              /* the status byte in guest memory */
    uint32_t used_len;            /* bytes the device wrote, reported in the used ring */
    struct iovec *seg;            /* the whole chain (REQ_MAX_SEGS slots) */
    uint64_t seq;                 /* submission order within the queue */
    /* the engine's: where the request is (REQ_* in engine/engine.h), whether a drain waits
     * for it, and, while it waits for an IOTLB UPDATE, until when */
    uint8_t state;
    uint8_t in_drain;
    uint16_t nsaved;              /* a packed list's descriptors kept in seg (vq_retry) */
    uint64_t deadline_ns;         /* parked: IOERR when no UPDATE made it whole by then */
    struct dp_disk_io io;
};

/* Parse the chain (nseg segments already in req->seg, the first nreadable device-readable;
 * chain_err and last_byte as vq_pop reported them) into req. Returns VIRTIO_BLK_S_OK when the
 * request is to be executed, another VIRTIO_BLK_S_* to complete it with at once, or -EIO when
 * the chain has no status byte to complete it with. */
int blk_req_parse(struct dp_req *req, unsigned nseg, unsigned nreadable, int chain_err,
                  uint8_t *last_byte, const struct dp_blk_dev *dev);

/* What the device answers itself, without its disk: GET_ID (the serial) and transfers of no
 * bytes. Returns the status to complete req with, or -1 when the disk is to execute it. */
int blk_req_answer(struct dp_req *req, const struct dp_blk_dev *dev);

/* A disk's result as the guest sees it. */
static inline uint8_t blk_status(int result)
{
    if (result == 0)
        return VIRTIO_BLK_S_OK;
    return result == -EOPNOTSUPP ? VIRTIO_BLK_S_UNSUPP : VIRTIO_BLK_S_IOERR;
}

#endif
