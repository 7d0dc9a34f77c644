/* core.h — the whole surface of the C core that Python (cffi) sees.
 *
 * Opaque handles (guest memory, disk, virtqueue, I/O engine) plus plain structs.
 * Every function returns 0 (or a count) on success and -errno on failure; none sets errno.
 * _build.py feeds this file to cffi's cdef after dropping preprocessor lines other than
 * integer #defines, so keep it plain C: no macros with arguments, no inline code.
 */
#ifndef DP_CORE_H
#define DP_CORE_H

#include <stdint.h>
#include <stddef.h>

#define DP_MAX_MEM_REGIONS 8
#define DP_MAX_QUEUE_SIZE 1024
#define DP_SEG_MAX 254
#define DP_MAX_DISCARD_SEG 32
#define DP_SERIAL_LEN 20

/* ---- guest memory: regions and address translation (guest_mem.c) ---- */
struct dp_mem;
struct dp_mem *dp_mem_new(void);
void dp_mem_free(struct dp_mem *mem);
/* mmap fd (size + mmap_offset bytes from 0, shared) and publish the region. */
int dp_mem_map_region(struct dp_mem *mem, int fd, uint64_t guest_phys_addr, uint64_t size,
                      uint64_t user_addr, uint64_t mmap_offset);
/* Publish memory the caller owns and keeps mapped (tests, the frontend). */
int dp_mem_add_region(struct dp_mem *mem, uint64_t guest_phys_addr, uint64_t size,
                      uint64_t user_addr, void *host_addr);
int dp_mem_region_count(const struct dp_mem *mem);
/* Host address of [gpa, gpa+len) when it lies in one region, else NULL. */
void *dp_mem_gpa_to_host(const struct dp_mem *mem, uint64_t gpa, uint64_t len);
/* Same for a front-end user (virtual) address, as used for vring addresses. */
void *dp_mem_uva_to_host(const struct dp_mem *mem, uint64_t uva, uint64_t len);

/* ---- backing disk (backend_file.c, backend_null.c) ---- */
struct dp_disk_params {
    int fd;                      /* -1 for the null disk */
    int null_disk;
    int read_only;
    int direct;                  /* fd was opened O_DIRECT: buffers must be aligned */
    uint64_t size_bytes;
    uint32_t logical_block_size;
    uint32_t dio_align;          /* memory alignment O_DIRECT needs (0: none) */
    uint32_t max_discard_sectors;
    uint32_t max_write_zeroes_sectors;
    uint32_t max_discard_seg;
    uint32_t max_write_zeroes_seg;
    char serial[20];
};
struct dp_disk;
struct dp_disk *dp_disk_new(const struct dp_disk_params *params);
void dp_disk_free(struct dp_disk *disk);
/* Writeback cache enabled (1) or write-through (0, every write is FUA). */
void dp_disk_set_writeback(struct dp_disk *disk, int writeback);
int dp_disk_get_writeback(const struct dp_disk *disk);

/* ---- I/O engine: one thread + one io_uring serving one or more queues (io_engine.c) ---- */
struct dp_engine;
/* Starts the thread. cpu < 0: not pinned. On failure returns NULL and stores -errno in *err. */
struct dp_engine *dp_engine_new(const char *name, int cpu, unsigned ring_entries, int *err);
/* Stops the thread (every queue must be detached first) and frees the engine. */
void dp_engine_free(struct dp_engine *engine);
int dp_engine_thread_id(const struct dp_engine *engine);

/* ---- virtqueue (virtqueue.c) ---- */
#define DP_VQ_F_EVENT_IDX 1
#define DP_VQ_F_INDIRECT 2

struct dp_vq_stats {
    uint64_t requests;
    uint64_t reads;
    uint64_t writes;
    uint64_t flushes;
    uint64_t discards;
    uint64_t write_zeroes;
    uint64_t get_ids;
    uint64_t unsupported;
    uint64_t errors;
    uint64_t bytes_read;
    uint64_t bytes_written;
    uint64_t kicks;
    uint64_t notifies;
    uint64_t bounced;
    uint64_t inflight;
    uint64_t broken;
};

struct dp_vq;
struct dp_vq *dp_vq_new(struct dp_disk *disk, unsigned index);
void dp_vq_free(struct dp_vq *vq);
int dp_vq_set_num(struct dp_vq *vq, unsigned num);
int dp_vq_set_flags(struct dp_vq *vq, unsigned flags);
int dp_vq_set_base(struct dp_vq *vq, uint16_t last_avail_idx);
/* Ring addresses are front-end user addresses, translated through mem. */
int dp_vq_set_addr(struct dp_vq *vq, struct dp_mem *mem, uint64_t desc_user_addr,
                   uint64_t avail_user_addr, uint64_t used_user_addr);
/* Point a stopped queue at a new memory table; re-translates its ring addresses. */
int dp_vq_set_mem(struct dp_vq *vq, struct dp_mem *mem);
/* kick_fd < 0: the front end does not kick, the engine polls the ring. */
int dp_vq_set_kick_fd(struct dp_vq *vq, int kick_fd);
/* call_fd < 0: no interrupts. Safe while the queue runs (swapped on its engine thread). */
int dp_vq_set_call_fd(struct dp_vq *vq, int call_fd);
int dp_vq_set_err_fd(struct dp_vq *vq, int err_fd);
/* Attach to an engine and start serving the ring. */
int dp_vq_start(struct dp_vq *vq, struct dp_engine *engine);
/* Stop popping, wait for in-flight requests, detach. Returns last_avail_idx or -errno. */
int dp_vq_stop(struct dp_vq *vq);
int dp_vq_running(const struct dp_vq *vq);
int dp_vq_broken(const struct dp_vq *vq);
uint16_t dp_vq_last_avail_idx(const struct dp_vq *vq);
void dp_vq_get_stats(const struct dp_vq *vq, struct dp_vq_stats *out);

/* Ring primitives, exposed for unit tests on a fake guest memory (queue not running). */
struct dp_seg {
    uint64_t host_addr;
    uint32_t len;
    uint32_t writable;
};
/* Pops one chain: returns the number of segments (>= 0) and stores the head index,
 * -EAGAIN when the ring is empty, -EIO when the ring is broken (queue marked broken),
 * -EFAULT / -EINVAL for a chain whose buffers are bad (head still stored, consumed). */
int dp_vq_pop_chain(struct dp_vq *vq, uint16_t *head, struct dp_seg *segs, unsigned max_segs);
void dp_vq_push_used(struct dp_vq *vq, uint16_t head, uint32_t len);
/* Would the driver want an interrupt for what was pushed since the last notification? */
int dp_vq_need_notify(struct dp_vq *vq);
/* Re-enable kicks after draining; returns 1 if new buffers arrived meanwhile. */
int dp_vq_enable_notify(struct dp_vq *vq);

#endif
