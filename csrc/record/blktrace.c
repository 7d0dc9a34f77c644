/* blktrace.c — a recording as blktrace writes one: per queue a file PATH.blktrace.<q> (as
 * blktrace writes one per CPU), each a run of struct blk_io_trace records (48 bytes, this
 * machine's byte order, version 7) with their payloads, which blkparse, btt and fio's
 * read_iolog take as they are.
 *
 * Each file opens with the two notes the kernel writes when tracing starts (the wall-clock time
 * of time 0, and a name for the "process": the queue, dp-vq<q>), then holds for each request a
 * Q event when it was taken from the ring and a C event when it completed, both with the
 * request's sector, bytes and categories as the kernel's blktrace sets them for that request:
 *   read R; write W (FUA when the guest's write cache is off); flush FN (no data, the read
 *   direction, as REQ_OP_FLUSH has); discard D; write-zeroes W, as the kernel traces
 *   REQ_OP_WRITE_ZEROES, plus the 12-byte payload "write-zeroes" that blkparse and btt skip
 *   over and that dataplane's own reader of these files tells it by.
 * A C event's error is the kernel's: 0, or -errno as 16 bits (IOERR -EIO, UNSUPP -EOPNOTSUPP).
 * Events of a file carry consecutive sequence numbers in time order, so blkparse sorts them
 * without complaint; entries the ring lost leave a gap of as many numbers, which blkparse
 * reports as skips ("Skips: N forward (M - x%)"), and a message event ("m N") at the gap says
 * so in words. GET_ID and unknown request types are not block I/O and are not recorded.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "record/record.h"

#define BLK_IO_TRACE_MAGIC 0x65617400u
#define BLK_IO_TRACE_VERSION 0x07u

enum {
    BLK_TC_READ = 1 << 0, BLK_TC_WRITE = 1 << 1, BLK_TC_FLUSH = 1 << 2, BLK_TC_QUEUE = 1 << 4,
    BLK_TC_COMPLETE = 1 << 7, BLK_TC_NOTIFY = 1 << 10, BLK_TC_DISCARD = 1 << 13,
    BLK_TC_FUA = 1 << 15,
};
enum { BLK_TA_QUEUE = 1, BLK_TA_COMPLETE = 8 };
enum { BLK_TN_PROCESS = 0, BLK_TN_TIMESTAMP = 1, BLK_TN_MESSAGE = 2 };
#define BLK_TC_ACT(c) ((uint32_t)(c) << 16)

struct blk_io_trace {
    uint32_t magic;
    uint32_t sequence;
    uint64_t time;
    uint64_t sector;
    uint32_t bytes;
    uint32_t action;
    uint32_t pid;
    uint32_t device;
    uint32_t cpu;
    uint16_t error;
    uint16_t pdu_len;
};
_Static_assert(sizeof(struct blk_io_trace) == 48, "blktrace's record is 48 bytes");

static const char WRITE_ZEROES_PDU[] = "write-zeroes";
#define WZ_PDU_LEN (sizeof(WRITE_ZEROES_PDU) - 1)

static uint32_t category(unsigned op, unsigned info)
{
    uint32_t c;
    switch (op) {
    case DP_REC_OP_READ: c = BLK_TC_READ; break;
    case DP_REC_OP_FLUSH: c = BLK_TC_READ | BLK_TC_FLUSH; break;
    case DP_REC_OP_DISCARD: c = BLK_TC_WRITE | BLK_TC_DISCARD; break;
    default: c = BLK_TC_WRITE; break;   /* write, write-zeroes */
    }
    if (info & DP_REC_F_FUA)
        c |= BLK_TC_FUA;
    return c;
}

static uint16_t error_of(unsigned status)
{
    switch (status) {
    case 0: return 0;
    case 2: return (uint16_t)-EOPNOTSUPP;   /* VIRTIO_BLK_S_UNSUPP */
    default: return (uint16_t)-EIO;         /* VIRTIO_BLK_S_IOERR */
    }
}

static uint64_t rel_time(const struct dp_recorder *rec, uint64_t t)
{
    return t > rec->start_ns ? t - rec->start_ns : 0;
}

/* A note or message (no sequence number: blkparse does not count them). */
static int put_note(struct dp_recorder *rec, unsigned q, uint32_t what, uint64_t time, uint32_t pid,
                    const void *pdu, uint16_t pdu_len)
{
    struct rec_out *out = &rec->outs[q];
    char *p = out_reserve(rec, out, sizeof(struct blk_io_trace) + pdu_len);
    if (!p)
        return -EAGAIN;
    struct blk_io_trace t = {
        .magic = BLK_IO_TRACE_MAGIC | BLK_IO_TRACE_VERSION, .time = time,
        .action = what | BLK_TC_ACT(BLK_TC_NOTIFY), .pid = pid, .device = rec->p.device, .cpu = q,
        .pdu_len = pdu_len,
    };
    memcpy(p, &t, sizeof(t));
    memcpy(p + sizeof(t), pdu, pdu_len);
    out_commit(out, sizeof(t) + pdu_len);
    return 0;
}

static int blk_open(struct dp_recorder *rec, const char *path)
{
    unsigned n = rec->p.queues;
    uint32_t *seq = calloc(n, sizeof(*seq));   /* per queue: the last sequence number given */
    char **paths = calloc(n, sizeof(*paths));
    int rc = seq && paths ? 0 : -ENOMEM;
    rec->state = seq;
    for (unsigned q = 0; q < n && !rc; q++)
        if (asprintf(&paths[q], "%s.blktrace.%u", path, q) < 0) {
            paths[q] = NULL;
            rc = -ENOMEM;
        }
    if (!rc)
        rc = rec_open_outputs(rec, n, (const char *const *)paths);
    for (unsigned q = 0; paths && q < n; q++)
        free(paths[q]);
    free(paths);
    for (unsigned q = 0; q < n && !rc; q++) {
        uint32_t when[2] = { (uint32_t)rec->start_real.tv_sec, (uint32_t)rec->start_real.tv_nsec };
        char comm[16] = { 0 };
        snprintf(comm, sizeof(comm), "dp-vq%u", q);
        put_note(rec, q, BLK_TN_TIMESTAMP, 0, q, when, sizeof(when));
        put_note(rec, q, BLK_TN_PROCESS, 0, q, comm, sizeof(comm));
    }
    return rc;
}

static int blk_entry(struct dp_recorder *rec, unsigned q, const struct dp_rec_entry *e)
{
    uint32_t *seq = rec->state;
    uint64_t time = rel_time(rec, e->time_ns);
    if (e->kind == DP_REC_DROP) {
        char msg[96];
        int len = snprintf(msg, sizeof(msg), "dataplane: %llu events lost here (record ring full)",
                           (unsigned long long)e->aux);
        if (put_note(rec, q, BLK_TN_MESSAGE, time, q, msg, (uint16_t)len) < 0)
            return -EAGAIN;
        seq[q] += (uint32_t)e->aux;   /* the gap blkparse counts as skips */
        return 0;
    }
    unsigned op = REC_OP(e->info);
    uint16_t pdu_len = op == DP_REC_OP_WRITE_ZEROES ? WZ_PDU_LEN : 0;
    struct rec_out *out = &rec->outs[q];
    char *p = out_reserve(rec, out, sizeof(struct blk_io_trace) + pdu_len);
    if (!p)
        return -EAGAIN;
    int done = e->kind == DP_REC_C;
    uint32_t cat = category(op, e->info) | (done ? BLK_TC_COMPLETE : BLK_TC_QUEUE);
    struct blk_io_trace t = {
        .magic = BLK_IO_TRACE_MAGIC | BLK_IO_TRACE_VERSION,
        .sequence = ++seq[q],
        .time = time,
        .sector = op == DP_REC_OP_FLUSH ? 0 : e->offset >> 9,
        .bytes = op == DP_REC_OP_FLUSH ? 0 : e->len,
        .action = (done ? BLK_TA_COMPLETE : BLK_TA_QUEUE) | BLK_TC_ACT(cat),
        .pid = q,
        .device = rec->p.device,
        .cpu = q,
        .error = done ? error_of(REC_STATUS(e->info)) : 0,
        .pdu_len = pdu_len,
    };
    memcpy(p, &t, sizeof(t));
    memcpy(p + sizeof(t), WRITE_ZEROES_PDU, pdu_len);
    out_commit(out, sizeof(t) + pdu_len);
    return 0;
}

static uint64_t blk_pump(struct dp_recorder *rec, uint64_t now, int final, int *blocked)
{
    return 0;   /* every entry was written as it came */
}

static void blk_finish(struct dp_recorder *rec)
{
}

static void blk_free(struct dp_recorder *rec)
{
    free(rec->state);
    rec->state = NULL;
}

const struct rec_format rec_blktrace = {
    .open = blk_open, .entry = blk_entry, .pump = blk_pump, .finish = blk_finish, .free = blk_free,
};
