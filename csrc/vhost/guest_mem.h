/* guest_mem.h — guest memory regions and the one gate every guest address passes through. */
#ifndef DP_GUEST_MEM_H
#define DP_GUEST_MEM_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>
#include "vhost/dp_vhost.h"

/* One mmap of a front end's fd. Tables made from one another (dp_mem_clone) share it; the last
 * table that drops it unmaps it. Only the control plane makes, copies and frees tables. */
struct mem_map {
    void *addr;
    size_t len;
    unsigned refs;
};

struct mem_region {
    uint64_t guest_phys_addr;
    uint64_t size;
    uint64_t user_addr;
    uint8_t *host_addr;   /* start of the region in this process */
    struct mem_map *map;  /* NULL when the caller owns the memory */
};

/* Regions sorted by guest-physical address, none overlapping: a lookup is a binary search. */
struct dp_mem {
    unsigned nregions;
    struct mem_region regions[DP_MAX_MEM_REGIONS];
};

/* Translate [gpa, gpa+len) into at most max_iov iovecs (a buffer may straddle adjacent
 * regions). Returns the iovec count, -EFAULT when any byte is outside every region or the
 * range wraps, -E2BIG when more than max_iov pieces would be needed. */
int guest_mem_translate(const struct dp_mem *mem, uint64_t gpa, uint64_t len,
                        struct iovec *iov, unsigned max_iov);

/* The region holding the host address p, or NULL: the way back from an iovec to the
 * guest-physical address it came from (dirty logging). Linear: never on the fast path. */
const struct mem_region *guest_mem_host_region(const struct dp_mem *mem, const void *p);

/* The region holding the front-end user address uva, or NULL (linear, like the host lookup:
 * an IOTLB translation looks once per cache miss). */
const struct mem_region *guest_mem_uva_region(const struct dp_mem *mem, uint64_t uva);

/* 0 when fd (a regular file or memfd) has [offset, offset+len) to map, else -EINVAL / -errno. */
int guest_mem_fd_holds(int fd, uint64_t offset, uint64_t len);

#endif
