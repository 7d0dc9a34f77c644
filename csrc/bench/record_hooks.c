/* record_hooks.c — a benchmark hook, not part of the data path: a producer that publishes into
 * a record ring what a busy queue would (a Q entry when a request is taken, a C entry when it
 * completes, 32 requests in flight), paced to a request rate, so that bench/record.py can see
 * what a writer (the recorder's C thread, or a Python one draining a DP_REC_NONE recorder)
 * keeps up with, apart from any backend. */
#include <errno.h>

#include "bench/dp_bench.h"
#include "record/ring.h"
#include "util/clock.h"

#define INFLIGHT 32u

int dp_bench_record_feed(struct dp_recorder *rec, unsigned queue, uint64_t rate, uint64_t ns,
                         struct dp_bench_result *out)
{
    struct rec_ring *r = rec_queue_ring(rec, queue);
    if (!r)
        return -ERANGE;
    uint64_t start = now_ns(), end = start + ns, n = 0, sum = 0;
    uint64_t submitted[INFLIGHT];
    uint64_t x = 0x9E3779B97F4A7C15ull;
    for (unsigned i = 0; i < INFLIGHT; i++)
        submitted[i] = start;
    for (;;) {
        uint64_t now = now_ns();
        if (now >= end)
            break;
        if (rate && n * 1000000000ull > (now - start) * rate) {
            cpu_relax();
            continue;
        }
        unsigned slot = (unsigned)(n % INFLIGHT);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        uint64_t offset = (x % (1ull << 18)) << 12;
        struct dp_rec_entry c = { .time_ns = now, .offset = offset, .aux = submitted[slot],
                                  .len = 4096, .slot = (uint16_t)slot, .kind = DP_REC_C,
                                  .info = REC_INFO(DP_REC_OP_READ, 0, 0) };
        rec_push(r, &c);
        struct dp_rec_entry q = c;
        q.kind = DP_REC_Q;
        q.aux = 0;
        q.offset = offset ^ 4096;
        rec_push(r, &q);
        submitted[slot] = now;
        sum += offset;
        n++;
    }
    out->iterations = n;
    out->ns = now_ns() - start;
    out->checksum = sum;
    return 0;
}

int dp_bench_record_push(struct dp_recorder *rec, unsigned queue, uint64_t n, uint64_t gap_ns,
                         struct dp_bench_result *out)
{
    struct rec_ring *r = rec_queue_ring(rec, queue);
    if (!r)
        return -ERANGE;
    struct dp_rec_entry q = { .time_ns = 1, .offset = 4096, .len = 4096, .kind = DP_REC_Q,
                              .info = REC_INFO(DP_REC_OP_READ, 0, 0) };
    struct dp_rec_entry c = q;
    c.kind = DP_REC_C;
    uint64_t busy = 0;
    for (uint64_t i = 0; i < n;) {
        uint64_t t0 = now_ns();
        for (unsigned k = 0; k < INFLIGHT && i < n; k++, i++) {
            q.time_ns = c.aux = i;
            q.slot = c.slot = (uint16_t)(i & (INFLIGHT - 1));
            rec_push(r, &q);
            c.time_ns = i + 1;
            rec_push(r, &c);
        }
        uint64_t t1 = now_ns();
        busy += t1 - t0;
        while (gap_ns && now_ns() - t1 < gap_ns)
            cpu_relax();
    }
    *out = (struct dp_bench_result){ .iterations = n, .ns = busy, .checksum = r->tail };
    return 0;
}
