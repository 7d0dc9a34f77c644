/* ring.h — a queue's record ring: single producer (the queue's I/O thread), single consumer
 * (the recorder's writer thread), fixed size, no lock and no system call.
 *
 * The producer never waits: an entry that finds the ring full is lost and counted, and the
 * next entry that gets in is preceded by a DROP entry saying how many were lost there, so the
 * file can say where the gap is. Head and tail are free-running 64-bit counters; each side
 * owns one cache line and reads the other's counter only when its cached copy says it must.
 */
#ifndef DP_RECORD_RING_H
#define DP_RECORD_RING_H

#include <stdint.h>

#include "record/dp_record.h"

struct rec_ring {
    /* the producer's line */
    uint64_t tail;               /* entries published (release) */
    uint64_t head_seen;          /* the consumer's head when the producer last looked */
    uint64_t lost;               /* entries lost since the last one published */
    uint64_t dropped;            /* entries lost in all (relaxed: read by stats) */
    uint64_t requests;           /* C entries published (relaxed: read by stats) */
    uint64_t size;
    struct dp_rec_entry *slots;
    char pad0[8];
    /* the consumer's line */
    uint64_t head;               /* entries handed back (release) */
    uint64_t next;               /* the next entry to take */
    uint64_t tail_seen;
    uint64_t written;            /* entries the writer has formatted (relaxed) */
    uint64_t csize;              /* size and slots again, so the consumer stays on its line */
    struct dp_rec_entry *cslots;
    uint64_t marked;             /* entries lost that DROP entries have told of */
    char pad1[8];
} __attribute__((aligned(64)));

/* Queue q's ring, or NULL when the recording has fewer queues (recorder.c). */
struct rec_ring *rec_queue_ring(struct dp_recorder *rec, unsigned q);

#define REC_INFO(op, status, fua) ((uint8_t)((op) | (status) << 3 | ((fua) ? DP_REC_F_FUA : 0)))
#define REC_OP(info) ((info) & 7u)
#define REC_STATUS(info) (((info) >> 3) & 3u)

static inline void rec_count(uint64_t *counter, uint64_t n)
{
    __atomic_store_n(counter, *counter + n, __ATOMIC_RELAXED);   /* single writer */
}

/* Producer: publish e, or lose it. */
static inline void rec_push(struct rec_ring *r, const struct dp_rec_entry *e)
{
    uint64_t t = r->tail, need = r->lost ? 2 : 1;
    if (t + need - r->head_seen > r->size) {
        r->head_seen = __atomic_load_n(&r->head, __ATOMIC_ACQUIRE);
        if (t + need - r->head_seen > r->size) {
            r->lost++;
            rec_count(&r->dropped, 1);
            return;
        }
    }
    uint64_t mask = r->size - 1;
    if (r->lost) {
        r->slots[t & mask] = (struct dp_rec_entry){ .time_ns = e->time_ns, .aux = r->lost,
                                                    .kind = DP_REC_DROP };
        r->lost = 0;
        t++;
    }
    r->slots[t & mask] = *e;
    if (e->kind == DP_REC_C)
        rec_count(&r->requests, 1);
    __atomic_store_n(&r->tail, t + 1, __ATOMIC_RELEASE);
}

/* Consumer: the next entry (r->next++ once it is used), or NULL when the ring is empty;
 * rec_release() hands the slots used so far back to the producer. */
static inline const struct dp_rec_entry *rec_peek(struct rec_ring *r)
{
    if (r->next == r->tail_seen) {
        r->tail_seen = __atomic_load_n(&r->tail, __ATOMIC_ACQUIRE);
        if (r->next == r->tail_seen)
            return 0;
    }
    return &r->cslots[r->next & (r->csize - 1)];
}

static inline void rec_release(struct rec_ring *r)
{
    __atomic_store_n(&r->head, r->next, __ATOMIC_RELEASE);
}

#endif
