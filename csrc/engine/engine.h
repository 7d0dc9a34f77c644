/* engine.h — what the backends need from the engine: SQEs, tags, completion. */
#ifndef DP_IO_ENGINE_H
#define DP_IO_ENGINE_H

#include <liburing.h>

#include "blk/blk.h"
#include "engine/dp_engine.h"

/* user_data = pointer | tag; every tagged object is at least 8-byte aligned. */
enum {
    TAG_REQ = 0,      /* struct dp_req: a read / write / flush */
    TAG_RANGE = 1,    /* struct range_op: one range of a discard / write-zeroes */
    TAG_KICK = 2,     /* struct dp_vq: its kick eventfd fired */
    TAG_CTL = 3,      /* struct dp_engine: the control eventfd fired */
    TAG_IGNORE = 4,   /* cancellations */
    TAG_TIMER = 5,    /* the engine's emulated-latency timeout expired */
    TAG_MASK = 7,
};

/* Next free SQE, submitting what is queued when the SQ ring is full. Never NULL. */
struct io_uring_sqe *engine_get_sqe(struct dp_engine *engine);

/* Report a request done: write its status, publish it in the used ring. */
void req_complete(struct dp_req *req, uint8_t status);

/* Backends: start a parsed request (IN/OUT/FLUSH/DISCARD/WRITE_ZEROES), and handle the CQE
 * of one of its operations. */
void file_submit(struct dp_engine *engine, struct dp_req *req);
void file_complete(struct dp_engine *engine, uint64_t user_data, int res);
void null_submit(struct dp_engine *engine, struct dp_req *req);

#endif
