/* guest_mem.c — the memory table a front end hands us, and guest address translation.
 *
 * A table is immutable once queues use it. A change (SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG)
 * builds a new table, a copy sharing the old one's mappings (dp_mem_clone), and publishes it
 * to the queues (engine/queue.c: through each engine's mailbox while they run); the old table
 * is freed once no queue uses it, and a mapping goes with the last table that holds it. That
 * keeps lookups lock-free on the I/O path. Regions are kept sorted by guest-physical address,
 * so a lookup among the 512 a front end may add is a binary search (a few are just looked at).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "guest_mem.h"

int guest_mem_fd_holds(int fd, uint64_t offset, uint64_t len)
{
    struct stat st;
    if (fstat(fd, &st))
        return -errno;
    /* A file shorter than the mapping would fault (SIGBUS) on the first access past its end. */
    if (S_ISREG(st.st_mode) && (uint64_t)st.st_size < offset + len)
        return -EINVAL;
    return 0;
}

struct dp_mem *dp_mem_new(void)
{
    return calloc(1, sizeof(struct dp_mem));
}

static void map_put(struct mem_map *map)
{
    if (map && __atomic_sub_fetch(&map->refs, 1, __ATOMIC_ACQ_REL) == 0) {
        munmap(map->addr, map->len);
        free(map);
    }
}

void dp_mem_free(struct dp_mem *mem)
{
    if (!mem)
        return;
    for (unsigned i = 0; i < mem->nregions; i++)
        map_put(mem->regions[i].map);
    free(mem);
}

struct dp_mem *dp_mem_clone(const struct dp_mem *mem)
{
    struct dp_mem *copy = malloc(sizeof(*copy));
    if (!copy)
        return NULL;
    copy->nregions = mem->nregions;
    memcpy(copy->regions, mem->regions, mem->nregions * sizeof(mem->regions[0]));
    for (unsigned i = 0; i < copy->nregions; i++)
        if (copy->regions[i].map)
            __atomic_add_fetch(&copy->regions[i].map->refs, 1, __ATOMIC_RELAXED);
    return copy;
}

static int ranges_overlap(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
    return a < b + blen && b < a + alen;
}

/* Checks shared by both ways of adding a region: room left, non-empty, no wrap, no overlap. */
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

/* Insert in guest-physical order (region_check ruled out overlaps). */
static void region_insert(struct dp_mem *mem, const struct mem_region *r)
{
    unsigned i = mem->nregions;
    while (i > 0 && mem->regions[i - 1].guest_phys_addr > r->guest_phys_addr) {
        mem->regions[i] = mem->regions[i - 1];
        i--;
    }
    mem->regions[i] = *r;
    mem->nregions++;
}

int dp_mem_add_region(struct dp_mem *mem, uint64_t gpa, uint64_t size, uint64_t uva, void *host)
{
    int rc = region_check(mem, gpa, size, uva);
    if (rc)
        return rc;
    if (!host)
        return -EINVAL;
    region_insert(mem, &(struct mem_region){
        .guest_phys_addr = gpa, .size = size, .user_addr = uva, .host_addr = host,
    });
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
    if ((rc = guest_mem_fd_holds(fd, mmap_offset, size)))
        return rc;
    /* Map from the page below mmap_offset, so any offset works and only the region is mapped. */
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
    uint64_t start = mmap_offset & ~(page - 1);
    struct mem_map *map = malloc(sizeof(*map));
    if (!map)
        return -ENOMEM;
    map->len = (size_t)(mmap_offset + size - start);
    map->refs = 1;
    map->addr = mmap(NULL, map->len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd,
                     (off_t)start);
    if (map->addr == MAP_FAILED) {
        rc = -errno;
        free(map);
        return rc;
    }
    region_insert(mem, &(struct mem_region){
        .guest_phys_addr = gpa, .size = size, .user_addr = uva,
        .host_addr = (uint8_t *)map->addr + (mmap_offset - start), .map = map,
    });
    return 0;
}

int dp_mem_remove_region(struct dp_mem *mem, uint64_t gpa, uint64_t size, uint64_t uva)
{
    for (unsigned i = 0; i < mem->nregions; i++) {
        struct mem_region *r = &mem->regions[i];
        if (r->guest_phys_addr == gpa && r->size == size && r->user_addr == uva) {
            struct mem_map *map = r->map;
            memmove(r, r + 1, (mem->nregions - i - 1) * sizeof(*r));
            mem->nregions--;
            map_put(map);
            return 0;
        }
    }
    return -ENOENT;
}

int dp_mem_region_count(const struct dp_mem *mem)
{
    return (int)mem->nregions;
}

/* The region holding gpa: a look at each of a few (the usual table), else a binary search for
 * the last region starting at or below gpa. (gpa - start < size also rules out gpa < start:
 * no region wraps.) */
static const struct mem_region *find_gpa(const struct dp_mem *mem, uint64_t gpa)
{
    if (mem->nregions <= 8) {
        for (unsigned i = 0; i < mem->nregions; i++) {
            const struct mem_region *r = &mem->regions[i];
            if (gpa - r->guest_phys_addr < r->size)
                return r;
        }
        return NULL;
    }
    unsigned lo = 0, hi = mem->nregions;
    while (lo < hi) {
        unsigned mid = (lo + hi) / 2;
        if (mem->regions[mid].guest_phys_addr <= gpa)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0)
        return NULL;
    const struct mem_region *r = &mem->regions[lo - 1];
    return gpa - r->guest_phys_addr < r->size ? r : NULL;
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

const struct mem_region *guest_mem_host_region(const struct dp_mem *mem, const void *p)
{
    uintptr_t a = (uintptr_t)p;
    for (unsigned i = 0; i < mem->nregions; i++) {
        const struct mem_region *r = &mem->regions[i];
        if (a >= (uintptr_t)r->host_addr && a - (uintptr_t)r->host_addr < r->size)
            return r;
    }
    return NULL;
}

const struct mem_region *guest_mem_uva_region(const struct dp_mem *mem, uint64_t uva)
{
    for (unsigned i = 0; i < mem->nregions; i++) {
        const struct mem_region *r = &mem->regions[i];
        if (uva - r->user_addr < r->size)
            return r;
    }
    return NULL;
}

uint64_t dp_mem_host_to_gpa(const struct dp_mem *mem, const void *host)
{
    const struct mem_region *r = guest_mem_host_region(mem, host);
    return r ? r->guest_phys_addr + ((const uint8_t *)host - r->host_addr) : UINT64_MAX;
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
    if (fd < 0 || size == 0 || size > SIZE_MAX || offset % 4096 || guest_mem_fd_holds(fd, offset, size))
        return NULL;
    void *p = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)offset);
    return p == MAP_FAILED ? NULL : p;
}

void dp_unmap_shared(void *addr, uint64_t size)
{
    if (addr)
        munmap(addr, (size_t)size);
}
