/* dp_vhost.h — public (cffi): guest memory, the device side of a virtqueue (split or packed),
 * its inflight region and the dirty log of live migration. Serving a queue (start, stop, call
 * fd, a new memory table or log while it runs) is engine/dp_engine.h. */
#ifndef DP_VHOST_H
#define DP_VHOST_H

#include <stdint.h>
#include "util/dp_hist.h"

#define DP_MAX_MEM_REGIONS 512   /* memory slots offered (GET_MAX_MEM_SLOTS) */
#define DP_MAX_QUEUE_SIZE 1024

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
/* A new, unpublished table with mem's regions, sharing their mappings: what ADD_MEM_REG and
 * REM_MEM_REG change and publish. NULL when out of memory. */
struct dp_mem *dp_mem_clone(const struct dp_mem *mem);
/* Drop the region matching (guest_phys_addr, size, user_addr) exactly from an unpublished
 * table (-ENOENT: none does). Its mapping goes with the last table holding it. */
int dp_mem_remove_region(struct dp_mem *mem, uint64_t guest_phys_addr, uint64_t size,
                         uint64_t user_addr);
/* Guest-physical address of a host address inside one of the regions; UINT64_MAX if none. */
uint64_t dp_mem_host_to_gpa(const struct dp_mem *mem, const void *host);
/* Host address of [gpa, gpa+len) when it lies in one region, else NULL. */
void *dp_mem_gpa_to_host(const struct dp_mem *mem, uint64_t gpa, uint64_t len);
/* Same for a front-end user (virtual) address, as used for vring addresses. */
void *dp_mem_uva_to_host(const struct dp_mem *mem, uint64_t uva, uint64_t len);

/* ---- vIOMMU (VIRTIO_F_IOMMU_PLATFORM): the device IOTLB (iotlb.c) ---- */
/* Permissions of an IOTLB entry, as vhost's VHOST_ACCESS_*: the device may read, write, both. */
#define DP_IOTLB_PERM_RO 1
#define DP_IOTLB_PERM_WO 2
#define DP_IOTLB_PERM_RW 3
/* Entries a snapshot holds at most; past that an UPDATE evicts one (a cache: the next access
 * to it misses and asks again). */
#define DP_IOTLB_MAX_ENTRIES 4096
/* An immutable snapshot of the IOTLB: (IOVA range -> front-end user address, permission),
 * sorted, non-overlapping. Each change makes a new one. Reference-counted: the queues that
 * translate through a snapshot hold it, so the caller's dp_iotlb_free only drops its own. */
struct dp_iotlb;
struct dp_iotlb *dp_iotlb_new(void);
void dp_iotlb_free(struct dp_iotlb *iotlb);
unsigned dp_iotlb_count(const struct dp_iotlb *iotlb);
/* Entry i (sorted by iova): its range [iova, last] (last inclusive), uaddr, perm. */
int dp_iotlb_entry(const struct dp_iotlb *iotlb, unsigned i, uint64_t *iova, uint64_t *last,
                   uint64_t *uaddr, unsigned *perm);
/* The entry holding iova: 0 with its index in *index, or -ENOENT. */
int dp_iotlb_find(const struct dp_iotlb *iotlb, uint64_t iova, unsigned *index);
/* A new snapshot: iotlb with [iova, iova + size) mapped to uaddr with perm; what that range
 * mapped before is replaced, a neighbour that continues it (same permission, adjacent user
 * addresses) is merged. -EINVAL when size is 0, the range or its user addresses wrap past
 * 2^64, or perm is not 1-3; with clip, a range that wraps is cut at 2^64 instead (what a
 * back end that does not check does: --debug-no-iotlb-check). NULL and -errno in *err. */
struct dp_iotlb *dp_iotlb_update(const struct dp_iotlb *iotlb, uint64_t iova, uint64_t size,
                                 uint64_t uaddr, unsigned perm, int clip, int *err);
/* A new snapshot without [iova, iova + size - 1]: size may reach 2^64 - iova (QEMU's "all"),
 * not beyond; entries it cuts keep their other parts. -EINVAL for size 0 or a wrap. */
struct dp_iotlb *dp_iotlb_invalidate(const struct dp_iotlb *iotlb, uint64_t iova, uint64_t size,
                                     int *err);

/* A device's link to its vIOMMU: the back-end channel (SET_BACKEND_REQ_FD) misses go out on,
 * how long a request waits for the UPDATE, and the debug switch. */
struct dp_iommu;
/* Without the check: an address no entry holds is taken as guest-physical when it is one,
 * permissions are not enforced, updates are not validated and invalidations are acknowledged
 * without waiting for the requests that may use the range (--debug-no-iotlb-check: shows
 * what the hostile tests catch). */
#define DP_IOMMU_F_NO_CHECK 1
#define DP_IOTLB_MISS_TIMEOUT_MS 10000
struct dp_iommu_stats {
    uint64_t misses_sent;
    uint64_t misses_dropped;     /* the channel was full or missing */
};
struct dp_iommu *dp_iommu_new(void);
void dp_iommu_free(struct dp_iommu *iommu);
/* The channel's fd (the caller keeps it open while any queue uses the iommu; -1: none). */
void dp_iommu_set_channel(struct dp_iommu *iommu, int fd);
void dp_iommu_set_miss_timeout(struct dp_iommu *iommu, uint64_t timeout_ns);
void dp_iommu_set_flags(struct dp_iommu *iommu, unsigned flags);
void dp_iommu_get_stats(const struct dp_iommu *iommu, struct dp_iommu_stats *out);

/* ---- dirty log (dirty_log.c): VHOST_F_LOG_ALL with LOG_SHMFD ---- */
/* One bit per 4 KiB guest-physical page, bit (page % 8) of byte (page / 8), set with an
 * atomic OR after the device's store into the page. */
#define DP_LOG_PAGE_SHIFT 12
struct dp_dirty_log;
/* Map the log a front end sends with SET_LOG_BASE: size bytes at offset in fd (shared, r/w).
 * NULL on failure, -errno in *err. */
struct dp_dirty_log *dp_log_map(int fd, uint64_t size, uint64_t offset, int *err);
void dp_log_free(struct dp_dirty_log *log);
uint64_t dp_log_size(const struct dp_dirty_log *log);
/* Pages the device wrote beyond the end of the log (not marked: the front end sized it). */
uint64_t dp_log_dropped(const struct dp_dirty_log *log);
/* Mark [gpa, gpa+len) dirty (the walkers' path, exposed for tests). */
void dp_log_mark(struct dp_dirty_log *log, uint64_t gpa, uint64_t len);

/* ---- virtqueue (virtqueue.c) ---- */
#define DP_VQ_F_EVENT_IDX 1
#define DP_VQ_F_INDIRECT 2
/* VIRTIO_F_RING_PACKED: a packed ring. Its addresses (dp_vq_set_addr): desc = the descriptor
 * ring, avail = the driver event suppression area, used = the device event suppression area. */
#define DP_VQ_F_PACKED 4
/* A packed ring's base (GET/SET_VRING_BASE as QEMU encodes it): bits 0-14 the next descriptor
 * to read, bit 15 the driver ring wrap counter, bits 16-30 the next used slot, bit 31 the
 * device ring wrap counter. After a reset: 0x80008000. */
#define DP_VQ_PACKED_BASE_RESET 2147516416

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
    uint64_t out_of_order;       /* completions that left after a later-submitted request */
    uint64_t resubmitted;        /* in-flight requests resubmitted after a reconnect */
    uint64_t recovered_out_of_order;  /* of those, older than a request already completed */
    uint64_t delayed;            /* completions held back by emulated latency */
    uint64_t fixed_ios;          /* reads and writes through a registered buffer (READ_FIXED) */
    uint64_t fixed_buffers;      /* gauge: the memory table's pieces registered with the ring */
    uint64_t fixed_error;        /* gauge: errno of the last refused registration (0: none) */
    uint64_t polled_ios;         /* reads and writes completed by polling (IOPOLL ring) */
    /* vIOMMU */
    uint64_t iotlb_misses;       /* translations the IOTLB had no entry for (requests parked) */
    uint64_t iotlb_timeouts;     /* requests that waited in vain for their UPDATE: IOERR */
    uint64_t iotlb_faults;       /* accesses an entry did not permit, or outside guest memory */
    uint64_t iotlb_drains;       /* invalidations that waited for requests using the range */
    uint64_t parked;             /* requests waiting for an UPDATE now (gauge) */
};

struct dp_vq;
/* dev: the virtio-blk device the queue serves (blk/dp_blk.h), opaque to this room. */
struct dp_blk_dev;
struct dp_vq *dp_vq_new(struct dp_blk_dev *dev, unsigned index);
int dp_vq_set_num(struct dp_vq *vq, unsigned num);
int dp_vq_set_flags(struct dp_vq *vq, unsigned flags);
int dp_vq_set_base(struct dp_vq *vq, uint16_t last_avail_idx);
/* Packed rings: set both positions (each index is checked against the size at start). */
int dp_vq_set_packed_base(struct dp_vq *vq, uint32_t base);
/* Packed rings: both positions now (after dp_vq_stop: where a restart continues). */
uint32_t dp_vq_packed_base(const struct dp_vq *vq);
/* Ring addresses are front-end user addresses, translated through mem. */
int dp_vq_set_addr(struct dp_vq *vq, struct dp_mem *mem, uint64_t desc_user_addr,
                   uint64_t avail_user_addr, uint64_t used_user_addr);
/* Point a stopped queue at a new memory table; re-translates its ring addresses. */
int dp_vq_set_mem(struct dp_vq *vq, struct dp_mem *mem);
/* A stopped queue behind a vIOMMU (iommu NULL: none): from now on its ring addresses and
 * every descriptor's address are IOVAs, translated through iotlb (the queue takes a reference;
 * engine/dp_engine.h publishes the next ones). With a vIOMMU
 * dp_vq_set_addr and dp_vq_start answer -EAGAIN while a ring is not in the IOTLB, having
 * asked the front end for it (a miss on the channel). */
int dp_vq_set_iommu(struct dp_vq *vq, struct dp_iommu *iommu, const struct dp_iotlb *iotlb);
/* kick_fd < 0: the front end does not kick, the engine polls the ring. */
int dp_vq_set_kick_fd(struct dp_vq *vq, int kick_fd);
int dp_vq_set_err_fd(struct dp_vq *vq, int err_fd);
int dp_vq_running(const struct dp_vq *vq);
int dp_vq_broken(const struct dp_vq *vq);
uint16_t dp_vq_last_avail_idx(const struct dp_vq *vq);
void dp_vq_get_stats(const struct dp_vq *vq, struct dp_vq_stats *out);
/* Observed service time (pop to completion) of a queue's requests, in nanoseconds. */
void dp_vq_get_latency(const struct dp_vq *vq, struct dp_hist *out);

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
/* What dp_vq_start does to the ring before the queue attaches: reconcile (or, packed, set up)
 * the inflight region; returns the requests it would resubmit, or -errno. */
int dp_vq_prepare(struct dp_vq *vq);
/* The heads (packed: buffer ids) the next start resubmits, in order; returns how many. */
int dp_vq_resubmits(const struct dp_vq *vq, uint16_t *heads, unsigned max);

/* ---- inflight tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) ---- */
/* Bytes of one queue's region in the shared inflight buffer (64-byte aligned): the spec's
 * QueueRegionSplit, or QueueRegionPacked for a packed ring. */
uint64_t dp_inflight_queue_size(uint16_t queue_size);
uint64_t dp_inflight_packed_queue_size(uint16_t queue_size);
/* Give a stopped queue its region (host address, NULL to turn tracking off). When the region
 * comes from a previous back end (restored != 0), the next dp_vq_start reconciles it with
 * the used ring and resubmits what was in flight, in the order it was popped. A packed ring
 * also takes its position from such a region (the front end cannot know it after a crash);
 * a region that is not restored is set up at the next start from the ring's base. */
int dp_vq_set_inflight(struct dp_vq *vq, void *region, int restored);
/* Map / unmap the shared inflight buffer a front end hands over. NULL on failure. */
void *dp_map_shared(int fd, uint64_t size, uint64_t offset);
void dp_unmap_shared(void *addr, uint64_t size);

#endif
