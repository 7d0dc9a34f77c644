/* guest_mem.h — guest memory regions and the one gate every guest address passes through. */
#ifndef DP_GUEST_MEM_H
#define DP_GUEST_MEM_H

#include <stdint.h>
#include <sys/uio.h>
#include "vhost/dp_vhost.h"

struct mem_region {
    uint64_t guest_phys_addr;
    uint64_t size;
    uint64_t user_addr;
    uint8_t *host_addr;   /* start of the region in this process */
    void *mmap_addr;      /* what to munmap (NULL when the caller owns the memory) */
    size_t mmap_len;
};

struct dp_mem {
    unsigned nregions;
    struct mem_region regions[DP_MAX_MEM_REGIONS];
};

/* Translate [gpa, gpa+len) into at most max_iov iovecs (a buffer may straddle adjacent
 * regions). Returns the iovec count, -EFAULT when any byte is outside every region or the
 * range wraps, -E2BIG when more than max_iov pieces would be needed. */
int guest_mem_translate(const struct dp_mem *mem, uint64_t gpa, uint64_t len,
                        struct iovec *iov, unsigned max_iov);

#endif
