/* dirty_log.c — the dirty page log a front end maps for live migration (SET_LOG_BASE with
 * LOG_SHMFD, while VHOST_F_LOG_ALL is negotiated), and the walkers' calls into it.
 *
 * The front end (QEMU) reads the log while the queues run, clearing what it read with an
 * atomic exchange, and copies the pages it found marked once more. So a bit goes in with an
 * atomic OR, after the store it stands for (release: the bytes are visible before the bit),
 * and nothing is ever cleared here. A queue logs only through the log it was given through
 * its mailbox (engine/queue.c), so the control plane can swap logs while queues run: once
 * every queue has acknowledged the new one, nothing writes into the old one any more.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "vhost/dirty_log.h"
#include "vhost/guest_mem.h"

struct dp_dirty_log *dp_log_map(int fd, uint64_t size, uint64_t offset, int *err)
{
    *err = -EINVAL;
    if (fd < 0 || size == 0 || offset + size < offset || offset + size > SIZE_MAX)
        return NULL;
    if ((*err = guest_mem_fd_holds(fd, offset, size)))
        return NULL;
    struct dp_dirty_log *log = calloc(1, sizeof(*log));
    if (!log) {
        *err = -ENOMEM;
        return NULL;
    }
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
    uint64_t start = offset & ~(page - 1);
    log->map_len = (size_t)(offset + size - start);
    log->map = mmap(NULL, log->map_len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)start);
    if (log->map == MAP_FAILED) {
        *err = -errno;
        free(log);
        return NULL;
    }
    log->bitmap = (uint8_t *)log->map + (offset - start);
    log->size = size;
    *err = 0;
    return log;
}

void dp_log_free(struct dp_dirty_log *log)
{
    if (!log)
        return;
    munmap(log->map, log->map_len);
    free(log);
}

uint64_t dp_log_size(const struct dp_dirty_log *log)
{
    return log->size;
}

uint64_t dp_log_dropped(const struct dp_dirty_log *log)
{
    return __atomic_load_n(&log->dropped, __ATOMIC_RELAXED);
}

void dirty_log_mark(struct dp_dirty_log *log, uint64_t gpa, uint64_t len)
{
    if (len == 0)
        return;
    uint64_t end = gpa + len - 1 < gpa ? UINT64_MAX : gpa + len - 1;
    uint64_t first = gpa >> DP_LOG_PAGE_SHIFT, last = end >> DP_LOG_PAGE_SHIFT;
    uint64_t pages = log->size * 8;
    if (last >= pages) {
        uint64_t beyond = first >= pages ? last - first + 1 : last - pages + 1;
        __atomic_add_fetch(&log->dropped, beyond, __ATOMIC_RELAXED);
        if (first >= pages)
            return;
        last = pages - 1;
    }
    for (uint64_t byte = first >> 3; byte <= last >> 3; byte++) {
        unsigned lo = byte == first >> 3 ? (unsigned)(first & 7) : 0;
        unsigned hi = byte == last >> 3 ? (unsigned)(last & 7) : 7;
        uint8_t bits = (uint8_t)(((1u << (hi - lo + 1)) - 1) << lo);
        __atomic_fetch_or(&log->bitmap[byte], bits, __ATOMIC_RELEASE);
    }
}

void dp_log_mark(struct dp_dirty_log *log, uint64_t gpa, uint64_t len)
{
    dirty_log_mark(log, gpa, len);
}

void vq_log_gpa(struct dp_vq *vq, uint64_t gpa, uint64_t len)
{
    dirty_log_mark(vq->log, gpa, len);
}

void vq_log_host(struct dp_vq *vq, const void *host, size_t len)
{
    const struct mem_region *r = guest_mem_host_region(vq->mem, host);
    if (!r)
        return;   /* a region removed since the request was popped: not guest memory now */
    uint64_t off = (uint64_t)((const uint8_t *)host - r->host_addr);
    dirty_log_mark(vq->log, r->guest_phys_addr + off, len < r->size - off ? len : r->size - off);
}

void vq_log_iov(struct dp_vq *vq, const struct iovec *iov, unsigned cnt, size_t len)
{
    for (unsigned i = 0; i < cnt && len; i++) {
        size_t n = iov[i].iov_len < len ? iov[i].iov_len : len;
        if (n)
            vq_log_host(vq, iov[i].iov_base, n);
        len -= n;
    }
}

void vq_log_used(struct dp_vq *vq, uint64_t offset, uint64_t len)
{
    if (!vq->log_used)
        return;
    if (vq->iommu) {
        /* log_guest_addr is an IOVA behind a vIOMMU (QEMU reads the log at the ring's GPA):
         * log the ring area by the region its host address lies in, like a buffer. */
        const uint8_t *area = vq_is_packed(vq) ? (const uint8_t *)vq->pk.device
                                               : (const uint8_t *)vq->used;
        if (area)
            vq_log_host(vq, area + offset, len);
        return;
    }
    dirty_log_mark(vq->log, vq->log_used_gpa + offset, len);
}
