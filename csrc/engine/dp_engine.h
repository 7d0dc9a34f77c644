/* dp_engine.h — public (cffi): I/O threads, and attaching virtqueues to them. */
#ifndef DP_ENGINE_PUBLIC_H
#define DP_ENGINE_PUBLIC_H

#include <stdint.h>
#include "vhost/dp_vhost.h"

/* ---- I/O engine: one thread + one io_uring serving one or more queues (io_engine.c) ---- */
struct dp_engine;
/* Starts the thread. cpu < 0: not pinned. On failure returns NULL and stores -errno in *err. */
struct dp_engine *dp_engine_new(const char *name, int cpu, unsigned ring_entries, int *err);
/* Stops the thread (every queue must be detached first) and frees the engine. */
void dp_engine_free(struct dp_engine *engine);
int dp_engine_thread_id(const struct dp_engine *engine);
/* Spin up to poll_ns looking for work before sleeping in io_uring_enter (0: never spin); the
 * window adapts between 0 and poll_ns to how long the thread's sleeps last. */
void dp_engine_set_poll(struct dp_engine *engine, uint64_t poll_ns);
/* The spin window now, in ns. */
uint64_t dp_engine_poll_window(const struct dp_engine *engine);

/* ---- serving a virtqueue (queue.c) ---- */
/* call_fd < 0: no interrupts. Safe while the queue runs (swapped on its engine thread, which
 * then signals the new fd once, as a queue does when it starts). */
int dp_vq_set_call_fd(struct dp_vq *vq, int call_fd);
/* Publish a memory table to queues, running or not (the caller frees the old table once this
 * returns). A running queue swaps it on its engine thread; with drain, the call returns only
 * once every request it popped under the old table has completed (a region went away: none
 * may still point into it). A queue whose rings are not inside the new table is marked broken
 * (-EFAULT); its in-flight requests still complete into the old mappings first. */
int dp_vqs_set_mem(struct dp_vq *const *vqs, unsigned n, struct dp_mem *mem, int drain);
/* Publish an IOTLB snapshot to the queues behind a vIOMMU, running or not (the caller frees
 * old once this returns). inval_size != 0: the change is the invalidation of
 * [inval_iova, inval_iova + inval_size - 1] (old: the snapshot before it): the call returns
 * once no queue can use the range any more: each has dropped its cached translations and any
 * ring in the range, and the requests in flight that use memory old mapped it to have
 * completed (requests waiting for an UPDATE hold nothing and are not waited for). Every
 * change also gives the queues' parked requests and missing rings another look. */
int dp_vqs_set_iotlb(struct dp_vq *const *vqs, unsigned n, const struct dp_iotlb *iotlb,
                     const struct dp_iotlb *old, uint64_t inval_iova, uint64_t inval_size);
/* The same for an UPDATE of [iova, iova + size - 1]: what the queues asked for there is
 * answered (they may ask again at once should an invalidation take it away). */
int dp_vqs_update_iotlb(struct dp_vq *const *vqs, unsigned n, const struct dp_iotlb *iotlb,
                        uint64_t iova, uint64_t size);
/* What the queue logs into (log NULL: nothing), and whether it logs its used ring writes at
 * used_gpa (VHOST_VRING_F_LOG). Safe while the queue runs: once this returns, the queue's
 * thread writes into no other log. */
int dp_vq_set_log(struct dp_vq *vq, struct dp_dirty_log *log, int log_used, uint64_t used_gpa);
/* Attach to an engine and start serving the ring. */
int dp_vq_start(struct dp_vq *vq, struct dp_engine *engine);
/* Where the last start put the ring, before the engine took anything from it: last_avail_idx
 * (split) or the GET_VRING_BASE encoding (packed), after any inflight recovery. */
uint32_t dp_vq_started_at(const struct dp_vq *vq);
/* Stop popping, wait for in-flight requests, detach. Returns last_avail_idx or -errno. */
int dp_vq_stop(struct dp_vq *vq);
void dp_vq_free(struct dp_vq *vq);

/* ---- recording what the queue serves (record.c; the recorder is record/dp_record.h) ---- */
struct dp_recorder;
/* Record into rec's ring for this queue's index from now on (NULL: stop). Safe while the queue
 * runs: the swap happens on its thread, so once this returns the old ring is no longer
 * written. -ERANGE when rec has no ring for this index. */
int dp_vq_set_recorder(struct dp_vq *vq, struct dp_recorder *rec);
/* ---- debug switches for tests (process-wide) ---- */
#define DP_DEBUG_NO_START_SIGNAL 1   /* no interrupt when a queue starts or gets a call fd */
#define DP_DEBUG_NO_MEM_DRAIN 2      /* a new table is acknowledged before old requests are done */
void dp_debug_set_flags(unsigned flags);
/* SIGKILL the process at the n-th interrupt any queue is about to send, after the used index
 * it is for was published (0: never). */
void dp_debug_kill_before_signal(unsigned nth);
/* Register guest memory in pieces of at most this many bytes (a multiple of 4096; 0: the
 * kernel's limit, 1 GiB), so tests see a region split without pinning gigabytes. */
int dp_debug_fixed_piece(uint64_t bytes);

#endif
