/* guest_mem.c — the memory table a front end hands us, and guest address translation.
 *
 * A table is immutable once queues use it: SET_MEM_TABLE builds a new one while the queues
 * are quiesced, then swaps it in. That keeps lookups lock-free on the I/O path.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "guest_mem.h"

struct dp_mem *dp_mem_new(void)
{
    return calloc(1, sizeof(struct dp_mem));
}

void dp_mem_free(struct dp_mem *mem)
{
    if (!mem)
        return;
    for (unsigned i = 0; i < mem->nregions; i++)
        if (mem->regions[i].mmap_addr)
            munmap(mem->regions[i].mmap_addr, mem->regions[i].mmap_len);
    free(mem);
}

static int ranges_overlap(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
    return a < b + blen && b < a + alen;
}

/* Checks shared by both ways of adding a region: non-empty, no wrap, no overlap. */
static int region_check(const struct dp_mem *mem, uint64_t gpa, uint64_t size, uint64_t uva)
{
    if (mem->nregions >= DP_MAX_MEM_REGIONS)
        return -ENOSPC;
    if (size == 0 || gpa + size < gpa || uva + size < uva)
        return -EINVAL;
    for (unsigned i = 0; i < mem->nregions; i++) {
        const struct mem_region *r = &mem->regions[i];
        if (ranges_overlap(gpa, size, r->guest_phys_addr, r->size) ||
            ranges_overlap(uva, size, r->user_addr, r->size))
            return -EEXIST;
    }
    return 0;
}

int dp_mem_add_region(struct dp_mem *mem, uint64_t gpa, uint64_t size, uint64_t uva, void *host)
{
    int rc = region_check(mem, gpa, size, uva);
    if (rc)
        return rc;
    if (!host)
        return -EINVAL;
    mem->regions[mem->nregions++] = (struct mem_region){
        .guest_phys_addr = gpa, .size = size, .user_addr = uva, .host_addr = host,
    };
    return 0;
}

int dp_mem_map_region(struct dp_mem *mem, int fd, uint64_t gpa, uint64_t size, uint64_t uva,
                      uint64_t mmap_offset)
{
    int rc = region_check(mem, gpa, size, uva);
    if (rc)
        return rc;
    if (fd < 0 || mmap_offset + size < mmap_offset || mmap_offset + size > SIZE_MAX)
        return -EINVAL;
    /* Map from offset 0 so an unaligned mmap_offset needs no special care. */
    size_t len = (size_t)(mmap_offset + size);
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0);
    if (p == MAP_FAILED)
        return -errno;
    mem->regions[mem->nregions++] = (struct mem_region){
        .guest_phys_addr = gpa, .size = size, .user_addr = uva,
        .host_addr = (uint8_t *)p + mmap_offset, .mmap_addr = p, .mmap_len = len,
    };
    return 0;
}

int dp_mem_region_count(const struct dp_mem *mem)
{
    return (int)mem->nregions;
}

static const struct mem_region *find_gpa(const struct dp_mem *mem, uint64_t gpa)
{
    for (unsigned i = 0; i < mem->nregions; i++) {
        const struct mem_region *r = &mem->regions[i];
        if (gpa >= r->guest_phys_addr && gpa - r->guest_phys_addr < r->size)
            return r;
    }
    return NULL;
}

int guest_mem_translate(const struct dp_mem *mem, uint64_t gpa, uint64_t len,
                        struct iovec *iov, unsigned max_iov)
{
    unsigned n = 0;
    if (gpa + len < gpa)
        return -EFAULT;
    while (len > 0) {
        const struct mem_region *r = find_gpa(mem, gpa);
        if (!r)
            return -EFAULT;
        if (n == max_iov)
            return -E2BIG;
        uint64_t off = gpa - r->guest_phys_addr;
        uint64_t piece = r->size - off < len ? r->size - off : len;
        iov[n].iov_base = r->host_addr + off;
        iov[n].iov_len = piece;
        n++;
        gpa += piece;
        len -= piece;
    }
    return (int)n;
}

void *dp_mem_gpa_to_host(const struct dp_mem *mem, uint64_t gpa, uint64_t len)
{
    struct iovec iov;
    if (len == 0)
        len = 1;
    return guest_mem_translate(mem, gpa, len, &iov, 1) == 1 ? iov.iov_base : NULL;
}

void *dp_mem_uva_to_host(const struct dp_mem *mem, uint64_t uva, uint64_t len)
{
    if (uva + len < uva)
        return NULL;
    for (unsigned i = 0; i < mem->nregions; i++) {
        const struct mem_region *r = &mem->regions[i];
        if (uva >= r->user_addr && uva - r->user_addr < r->size &&
            len <= r->size - (uva - r->user_addr))
            return r->host_addr + (uva - r->user_addr);
    }
    return NULL;
}

void *dp_map_shared(int fd, uint64_t size, uint64_t offset)
{
    if (fd < 0 || size == 0 || size > SIZE_MAX || offset % 4096)
        return NULL;
    void *p = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)offset);
    return p == MAP_FAILED ? NULL : p;
}

void dp_unmap_shared(void *addr, uint64_t size)
{
    if (addr)
        munmap(addr, (size_t)size);
}
