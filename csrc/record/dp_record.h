/* dp_record.h — public (cffi): recording what a backend serves. A recorder owns one record ring
 * per queue (a lock-free single-producer ring the queue's I/O thread writes, record/ring.h) and
 * a writer thread that turns the entries into a trace file: blktrace binary (one file per
 * queue, PATH.blktrace.<q>, with Q and C events) or a fio iolog v3 (one file, PATH). The I/O
 * path never waits for the writer: when a ring is full its entries are dropped and counted. */
#ifndef DP_RECORD_H
#define DP_RECORD_H

#include <stdint.h>

#define DP_REC_BLKTRACE 0            /* PATH.blktrace.<q>: blkparse, btt, fio read_iolog */
#define DP_REC_IOLOG 1               /* PATH: fio iolog v3, three fields more per line */
#define DP_REC_NONE 2                /* no writer thread: entries wait in the rings (tests) */
#define DP_REC_DEFAULT_ENTRIES 262144 /* per queue: 8 MiB, 130 ms at 1M requests/s */

/* The ops a recording knows (virtio-blk's block requests; GET_ID and unknown types are not
 * block I/O and are not recorded). */
#define DP_REC_OP_READ 0
#define DP_REC_OP_WRITE 1
#define DP_REC_OP_FLUSH 2
#define DP_REC_OP_DISCARD 3
#define DP_REC_OP_WRITE_ZEROES 4

struct dp_recorder_params {
    int format;                  /* DP_REC_* */
    unsigned queues;             /* rings (queue indexes 0 .. queues-1) */
    unsigned ring_entries;       /* per queue, a power of two (0: DP_REC_DEFAULT_ENTRIES) */
    uint32_t device;             /* blktrace's device field: major << 20 | minor */
    uint32_t hold_lines;         /* iolog: lines a queue may hold waiting for their completion
                                    or for the output, at most (0: 1 Mi, 32 MiB) */
    char names[8];               /* iolog: a queue's file name is this + its index ("vq0") */
};

/* One queue's side of a recording. Entries: a Q when a request is taken from the ring, a C
 * when it completes (so a request is two). */
struct dp_record_stats {
    uint64_t requests;           /* completions recorded (C entries that reached the ring) */
    uint64_t dropped;            /* entries lost because the ring was full */
    uint64_t written;            /* entries the writer has taken (into the file, or lost with it) */
};

struct dp_recorder;
/* Opens the output file(s) (truncating them) and starts the writer thread. NULL and -errno in
 * *err on failure; nothing is left open then. */
struct dp_recorder *dp_recorder_new(const char *path, const struct dp_recorder_params *params,
                                    int *err);
/* The writer drains every ring, finishes the files and closes them. No queue may still record
 * into it (dp_vq_set_recorder(vq, NULL) first). Returns 0, or the first write error (-errno)
 * the output met. Statistics stay readable until dp_recorder_free. */
int dp_recorder_stop(struct dp_recorder *rec);
/* Stops it if needed, and frees it. */
void dp_recorder_free(struct dp_recorder *rec);
void dp_recorder_get_stats(const struct dp_recorder *rec, unsigned queue, struct dp_record_stats *out);
/* Bytes written to the output(s), and the first write error (0 when none). */
uint64_t dp_recorder_bytes(const struct dp_recorder *rec);
int dp_recorder_error(const struct dp_recorder *rec);

/* DP_REC_NONE recorders: take up to max entries of a queue's ring out, as the writer would,
 * into out (32 bytes an entry, the layout of struct dp_rec_entry below). Returns the count. */
struct dp_rec_entry {
    uint64_t time_ns;            /* Q: taken from the ring; C: completed; DROP: noticed */
    uint64_t offset;             /* bytes */
    uint64_t aux;                /* C: when it was taken from the ring; DROP: entries lost */
    uint32_t len;                /* bytes */
    uint16_t slot;               /* the request slot: a Q and its C share it */
    uint8_t kind;                /* DP_REC_Q, DP_REC_C, DP_REC_DROP */
    uint8_t info;                /* op | status << 3 | DP_REC_F_FUA */
};
#define DP_REC_Q 1
#define DP_REC_C 2
#define DP_REC_DROP 3
#define DP_REC_F_FUA 32
unsigned dp_recorder_take(struct dp_recorder *rec, unsigned queue, struct dp_rec_entry *out,
                          unsigned max);

#endif
