/* dp_bench.h — public (cffi): hooks for tests only, not part of the data path: hot-path
 * micro-benchmarks for tests/bench (bench_hooks.c) and the disk interface by hand (disk_hooks.c). */
#ifndef DP_BENCH_H
#define DP_BENCH_H

#include <stdint.h>

/* ==== benchmark hooks (bench_hooks.c) — for tests/bench only, not part of the data path ====
 * A fake guest (one memory region, a split ring of num entries, read requests of data_len
 * bytes, direct or indirect chains) and loops that run a hot-path function n times in C. */
struct dp_bench_result {
    uint64_t iterations;
    uint64_t ns;                 /* wall time of the whole loop (CLOCK_MONOTONIC) */
    uint64_t checksum;           /* folds each iteration's output, so nothing is optimised away */
};
struct dp_bench_ring;
/* num: a power of two (4 .. DP_MAX_QUEUE_SIZE); data_len: a multiple of 512, at most 1 MiB.
 * On failure returns NULL and stores -errno in *err. */
struct dp_bench_ring *dp_bench_ring_new(unsigned num, int indirect, uint32_t data_len, int *err);
void dp_bench_ring_free(struct dp_bench_ring *ring);
/* Put the ring behind a vIOMMU (before any loop): its descriptors and ring addresses become
 * IOVAs, the queue translates them through an IOTLB of one entry for all of the fake guest or
 * (per_page) of one 4 KiB entry per page, as QEMU's updates of scattered pages leave it. */
int dp_bench_ring_iommu(struct dp_bench_ring *ring, int per_page);
/* Requests in the ring: num with indirect chains, num / 3 with direct ones. */
unsigned dp_bench_ring_requests(const struct dp_bench_ring *ring);
/* vq_pop n times (the driver re-publishes each head). */
int dp_bench_pop(struct dp_bench_ring *ring, uint64_t n, struct dp_bench_result *out);
/* blk_req_parse n times over the ring's requests. */
int dp_bench_parse(struct dp_bench_ring *ring, uint64_t n, struct dp_bench_result *out);
/* vq_push_used n times, vq_need_notify once per batch used elements (batch 0: never). */
int dp_bench_push_used(struct dp_bench_ring *ring, uint64_t n, unsigned batch,
                       struct dp_bench_result *out);
/* pop + parse + status + push used (+ notify decision per batch) for n requests. */
int dp_bench_request(struct dp_bench_ring *ring, uint64_t n, unsigned batch,
                     struct dp_bench_result *out);

/* Test hook (disk_hooks.c): a latency layer over a null disk, driven through its ops table on a
 * private io_uring until its only request has been completed by poll while its timeout is still
 * armed; then close is called until it succeeds. Stores close's first answer (-EBUSY: it waited
 * for the timeout) and the CQEs reaped until it succeeded; returns 0, or -errno / -EPROTO. */
int dp_bench_delay_close(int *first_close, unsigned *cqes);
/* Benchmark hook (record_hooks.c): play a busy queue into a recorder's ring for queue q: Q and
 * C entries of 4k reads, `rate` requests a second (0: as fast as it goes) for ns nanoseconds.
 * out->iterations: requests played; the recorder's stats say how many entries got in. */
struct dp_recorder;
int dp_bench_record_feed(struct dp_recorder *rec, unsigned queue, uint64_t rate, uint64_t ns,
                         struct dp_bench_result *out);
/* The I/O thread's share alone: n requests' two rec_push calls (prepared entries, no clock) in
 * bursts of 32, each burst followed by gap_ns of spinning (the rest of an I/O thread's work;
 * 0: back to back), while the recorder's writer drains the ring (or does not: then most are
 * drops). out->ns counts the bursts only. */
int dp_bench_record_push(struct dp_recorder *rec, unsigned queue, uint64_t n, uint64_t gap_ns,
                         struct dp_bench_result *out);
/* Test hook (disk_hooks.c): one request through any disk's ops table on a private io_uring, as
 * an engine runs it: open the disk's state, submit, reap until the request completes (at most
 * timeout_ms), then close the state until it succeeds. op: DP_BENCH_IO_*; READ / WRITE use
 * buf (len bytes), DISCARD / WRITE_ZEROES one range [offset, offset + len) with unmap. Stores
 * the request's result and close's first answer; returns 0 or -errno (-ETIMEDOUT: it never
 * completed; its state and request are then left allocated, as they may still be reached). */
#define DP_BENCH_IO_READ 0
#define DP_BENCH_IO_WRITE 1
#define DP_BENCH_IO_FLUSH 2
#define DP_BENCH_IO_DISCARD 3
#define DP_BENCH_IO_WRITE_ZEROES 4
struct dp_disk;
int dp_bench_disk_run(struct dp_disk *disk, unsigned op, uint64_t offset, void *buf, uint64_t len,
                      int unmap, uint32_t timeout_ms, int *result, int *first_close);
/* ==== end of benchmark hooks ==== */

#endif
