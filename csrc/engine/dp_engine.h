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

/* ---- serving a virtqueue (engine.c) ---- */
/* call_fd < 0: no interrupts. Safe while the queue runs (swapped on its engine thread). */
int dp_vq_set_call_fd(struct dp_vq *vq, int call_fd);
/* Attach to an engine and start serving the ring. */
int dp_vq_start(struct dp_vq *vq, struct dp_engine *engine);
/* Stop popping, wait for in-flight requests, detach. Returns last_avail_idx or -errno. */
int dp_vq_stop(struct dp_vq *vq);
void dp_vq_free(struct dp_vq *vq);

/* ---- recording what the queue serves (record.c; the recorder is record/dp_record.h) ---- */
struct dp_recorder;
/* Record into rec's ring for this queue's index from now on (NULL: stop). Safe while the queue
 * runs: the swap happens on its thread, so once this returns the old ring is no longer
 * written. -ERANGE when rec has no ring for this index. */
int dp_vq_set_recorder(struct dp_vq *vq, struct dp_recorder *rec);

#endif
