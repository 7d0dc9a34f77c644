/* record.c — the engine's side of a recording (record/): a queue with a record ring publishes
 * each request it serves there twice, a Q entry when the request is taken from the virtqueue
 * and a C entry when it completes, from the queue's own I/O thread, without a lock or a system
 * call (a full ring loses the entry and counts it). The ring is swapped in and out on that
 * thread (the mailbox), so recording starts and stops while the queue runs.
 */
#include <errno.h>

#include "engine/engine.h"
#include "record/ring.h"

static int rec_op(uint32_t type, unsigned *op)
{
    switch (type) {
    case VIRTIO_BLK_T_IN: *op = DP_REC_OP_READ; return 1;
    case VIRTIO_BLK_T_OUT: *op = DP_REC_OP_WRITE; return 1;
    case VIRTIO_BLK_T_FLUSH: *op = DP_REC_OP_FLUSH; return 1;
    case VIRTIO_BLK_T_DISCARD: *op = DP_REC_OP_DISCARD; return 1;
    case VIRTIO_BLK_T_WRITE_ZEROES: *op = DP_REC_OP_WRITE_ZEROES; return 1;
    default: return 0;   /* GET_ID, unknown types: not block I/O */
    }
}

void queue_record(struct dp_vq *vq, const struct dp_req *req, int done, uint8_t status, uint64_t now)
{
    unsigned op;
    if (!rec_op(req->type, &op))
        return;
    const struct dp_disk_io *io = &req->io;
    uint64_t offset = io->offset, len = io->nbytes;
    if (op == DP_REC_OP_FLUSH) {
        offset = len = 0;
    } else if (op >= DP_REC_OP_DISCARD) {
        /* Several ranges are one request: the first's offset and the bytes of them all, as the
         * guest's blktrace shows a merged discard. */
        offset = io->nranges ? io->ranges[0].offset : 0;
        len = 0;
        for (unsigned i = 0; i < io->nranges; i++)
            len += io->ranges[i].len;
    }
    struct dp_rec_entry e = {
        .time_ns = now,
        .offset = offset,
        .aux = done ? io->start_ns : 0,
        .len = len > UINT32_MAX ? UINT32_MAX : (uint32_t)len,
        .slot = (uint16_t)(req - vq->reqs),
        .kind = done ? DP_REC_C : DP_REC_Q,
        .info = REC_INFO(op, done ? status : 0, io->flags & DP_IO_F_FUA),
    };
    rec_push(vq->rec, &e);
}

int dp_vq_set_recorder(struct dp_vq *vq, struct dp_recorder *rec)
{
    struct rec_ring *ring = rec ? rec_queue_ring(rec, vq->index) : NULL;
    if (rec && !ring)
        return -ERANGE;   /* the recording has fewer queues than this queue's index */
    vq->rec_next = ring;
    if (vq->engine)
        return engine_call(vq->engine, CMD_SET_RECORDER, vq, 0);   /* swapped on its thread */
    vq->rec = ring;
    return 0;
}
