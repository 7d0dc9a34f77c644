/* fixed.c — what an engine registers with its io_uring: guest memory as fixed buffers (a
 * READ_FIXED / WRITE_FIXED then skips pinning the pages of its buffer per request) and its
 * disks' files as fixed files (no file table lookup and reference per request).
 *
 * Both tables are sparse, made on first use, and owned by the engine thread: registration is
 * a system call on the ring, and a SINGLE_ISSUER ring takes it only from its submitter. A
 * queue registers the regions of its memory table when it attaches and again when the table
 * changes under it (CMD_SET_MEM: memory slots add and remove regions while queues run), each
 * region in pieces of at most 1 GiB (the kernel's limit per buffer). Pieces are shared, by
 * address and length, between queues and between a table and the next, so a change registers
 * only the regions it adds; a slot whose piece no table of this engine holds any more is
 * cleared. Requests already submitted against a cleared slot keep the pages (the kernel holds
 * the buffer until they complete). What the kernel refuses (RLIMIT_MEMLOCK without
 * CAP_IPC_LOCK, an old kernel, a mapping it cannot pin) leaves that piece, or the whole table,
 * unregistered: requests into it go out as plain readv/writev, and the queue's stats say why.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "engine/engine.h"
#include "vhost/guest_mem.h"

#define FIXED_BUF_SLOTS 4096u
#define FIXED_FILE_SLOTS 64u
#define FIXED_PIECE_MAX (1ull << 30)   /* the kernel's limit per registered buffer */

static uint64_t fixed_piece = FIXED_PIECE_MAX;

int dp_debug_fixed_piece(uint64_t bytes)
{
    if (bytes % 4096 || bytes > FIXED_PIECE_MAX)
        return -EINVAL;
    __atomic_store_n(&fixed_piece, bytes ? bytes : FIXED_PIECE_MAX, __ATOMIC_RELAXED);
    return 0;
}

struct fixed_slot {
    uint8_t *addr;
    uint64_t len;
    unsigned refs;                /* queues' piece lists that name it */
};

/* A queue's view: its table's pieces, sorted by host address, each with its slot. */
struct fixed_piece {
    uint8_t *addr;
    uint64_t len;
    int index;
};

struct vq_fixed {
    unsigned n;
    struct fixed_piece *pieces;
};

static int table_ready(struct dp_engine *engine)
{
    struct engine_fixed *f = &engine->fixed;
    if (f->buf_state)
        return f->buf_state;
    f->slots = calloc(FIXED_BUF_SLOTS, sizeof(*f->slots));
    if (!f->slots)
        return f->buf_state = -ENOMEM;
    int rc = io_uring_register_buffers_sparse(&engine->ring, FIXED_BUF_SLOTS);
    if (rc < 0) {
        free(f->slots);
        f->slots = NULL;
        return f->buf_state = rc;
    }
    return f->buf_state = 1;
}

/* The slot holding exactly [addr, addr + len), registering it in a free slot if none does.
 * -errno when the kernel refuses (or every slot is taken: -ENOSPC). */
static int slot_get(struct dp_engine *engine, uint8_t *addr, uint64_t len)
{
    struct engine_fixed *f = &engine->fixed;
    int free_slot = -1;
    for (unsigned i = 0; i < FIXED_BUF_SLOTS; i++) {
        struct fixed_slot *s = &f->slots[i];
        if (s->refs && s->addr == addr && s->len == len) {
            s->refs++;
            return (int)i;
        }
        if (!s->refs && free_slot < 0)
            free_slot = (int)i;
    }
    if (free_slot < 0)
        return -ENOSPC;
    struct iovec iov = { .iov_base = addr, .iov_len = len };
    __u64 tag = 0;
    int rc = io_uring_register_buffers_update_tag(&engine->ring, (unsigned)free_slot, &iov, &tag, 1);
    if (rc < 0)
        return rc;
    if (rc != 1)
        return -EIO;
    f->slots[free_slot] = (struct fixed_slot){ .addr = addr, .len = len, .refs = 1 };
    f->registered_bytes += len;
    return free_slot;
}

static void slot_put(struct dp_engine *engine, int index)
{
    struct fixed_slot *s = &engine->fixed.slots[index];
    if (--s->refs)
        return;
    /* An empty iovec clears the slot; requests in flight on it keep their pages. */
    struct iovec none = { 0 };
    __u64 tag = 0;
    io_uring_register_buffers_update_tag(&engine->ring, (unsigned)index, &none, &tag, 1);
    engine->fixed.registered_bytes -= s->len;
    *s = (struct fixed_slot){ 0 };
}

static void pieces_put(struct dp_engine *engine, struct vq_fixed *vf)
{
    for (unsigned i = 0; i < vf->n; i++)
        slot_put(engine, vf->pieces[i].index);
    free(vf->pieces);
    free(vf);
}

static int piece_cmp(const void *a, const void *b)
{
    const struct fixed_piece *x = a, *y = b;
    return x->addr < y->addr ? -1 : x->addr > y->addr;
}

/* Register mem's regions for vq (what is already registered is shared), then let go of what
 * the queue held before. Never fails the queue: what could not be registered is left out,
 * and the first refusal is kept in the queue's stats. */
void fixed_queue_set(struct dp_engine *engine, struct dp_vq *vq, const struct dp_mem *mem)
{
    struct vq_fixed *old = vq->fixed, *vf = NULL;
    int err = table_ready(engine);
    uint64_t piece = __atomic_load_n(&fixed_piece, __ATOMIC_RELAXED);
    if (err > 0) {
        unsigned cap = 0;
        for (unsigned i = 0; i < mem->nregions; i++)
            cap += (unsigned)((mem->regions[i].size + piece - 1) / piece);
        vf = calloc(1, sizeof(*vf));
        if (vf)
            vf->pieces = calloc(cap ? cap : 1, sizeof(*vf->pieces));
        if (!vf || !vf->pieces) {
            free(vf);
            vf = NULL;
            err = -ENOMEM;
        } else {
            err = 0;
        }
        for (unsigned i = 0; vf && i < mem->nregions; i++) {
            const struct mem_region *r = &mem->regions[i];
            for (uint64_t off = 0; off < r->size; off += piece) {
                uint64_t len = r->size - off < piece ? r->size - off : piece;
                int index = slot_get(engine, r->host_addr + off, len);
                if (index < 0) {
                    err = err ? err : index;   /* left out: its requests go out as readv/writev */
                    continue;
                }
                vf->pieces[vf->n++] = (struct fixed_piece){ .addr = r->host_addr + off, .len = len,
                                                            .index = index };
            }
        }
        if (vf)
            qsort(vf->pieces, vf->n, sizeof(*vf->pieces), piece_cmp);
    }
    vq->fixed = vf;
    if (old)
        pieces_put(engine, old);
    __atomic_store_n(&vq->stats.fixed_buffers, vf ? vf->n : 0, __ATOMIC_RELAXED);
    __atomic_store_n(&vq->stats.fixed_error, err < 0 ? (uint64_t)-err : 0, __ATOMIC_RELAXED);
}

void fixed_queue_clear(struct dp_engine *engine, struct dp_vq *vq)
{
    if (vq->fixed)
        pieces_put(engine, vq->fixed);
    vq->fixed = NULL;
    __atomic_store_n(&vq->stats.fixed_buffers, 0, __ATOMIC_RELAXED);
}

int fixed_lookup(const struct dp_vq *vq, const void *base, size_t len)
{
    const struct vq_fixed *vf = vq->fixed;
    const uint8_t *p = base;
    unsigned lo = 0, hi = vf->n;
    /* the last piece starting at or below p */
    while (lo < hi) {
        unsigned mid = (lo + hi) / 2;
        if (vf->pieces[mid].addr <= p)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0)
        return -1;
    const struct fixed_piece *piece = &vf->pieces[lo - 1];
    uint64_t off = (uint64_t)(p - piece->addr);
    return off < piece->len && len <= piece->len - off ? piece->index : -1;
}

/* ---- fixed files: what the disks on this engine read and write ---- */

struct fixed_file {
    int fd;
    unsigned refs;
};

static int engine_get_file(void *arg, int fd)
{
    struct dp_engine *engine = arg;
    struct engine_fixed *f = &engine->fixed;
    if (!f->file_state) {
        f->files = calloc(FIXED_FILE_SLOTS, sizeof(*f->files));
        int rc = f->files ? io_uring_register_files_sparse(&engine->ring, FIXED_FILE_SLOTS) : -ENOMEM;
        if (rc < 0) {
            free(f->files);
            f->files = NULL;
        }
        f->file_state = rc < 0 ? rc : 1;
    }
    if (f->file_state < 0)
        return f->file_state;
    int free_slot = -1;
    for (unsigned i = 0; i < FIXED_FILE_SLOTS; i++) {
        if (f->files[i].refs && f->files[i].fd == fd) {
            f->files[i].refs++;
            return (int)i;
        }
        if (!f->files[i].refs && free_slot < 0)
            free_slot = (int)i;
    }
    if (free_slot < 0)
        return -ENOSPC;
    int rc = io_uring_register_files_update(&engine->ring, (unsigned)free_slot, &fd, 1);
    if (rc < 0)
        return rc;
    f->files[free_slot] = (struct fixed_file){ .fd = fd, .refs = 1 };
    return free_slot;
}

static void engine_put_file(void *arg, int slot)
{
    struct dp_engine *engine = arg;
    struct fixed_file *file = &engine->fixed.files[slot];
    if (--file->refs)
        return;
    int none = -1;
    io_uring_register_files_update(&engine->ring, (unsigned)slot, &none, 1);
    file->fd = -1;
}

void fixed_init(struct dp_engine *engine)
{
    engine->fixed.ring_files = (struct dp_ring_files){
        .get = engine_get_file, .put = engine_put_file, .arg = engine,
    };
}

void fixed_free(struct dp_engine *engine)
{
    free(engine->fixed.slots);
    free(engine->fixed.files);
}
