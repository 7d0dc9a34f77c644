/* inflight.h — the inflight tracking regions of a queue (vhost-user spec, "Inflight I/O
 * tracking"): QueueRegionSplit, which vq_split_pop and vq_split_push_used keep up to date and
 * inflight.c reconciles after a back-end restart; QueueRegionPacked, which packed.c keeps and
 * recovers. */
#ifndef DP_INFLIGHT_H
#define DP_INFLIGHT_H

#include <stdint.h>

/* One queue's region. It lives in a memfd the front end keeps across back-end restarts. */
struct inflight_desc {
    uint8_t inflight;
    uint8_t padding[5];
    uint16_t next;
    uint64_t counter;
};

struct inflight_region {
    uint64_t features;
    uint16_t version;
    uint16_t desc_num;
    uint16_t last_batch_head;
    uint16_t used_idx;
    struct inflight_desc desc[];
};

/* One queue's region on a packed ring (QueueRegionPacked). An entry records one descriptor
 * fetched from the ring; a chain's entries are linked by next from its head entry (inflight,
 * counter, num, last), and the free entries form a list from free_head (ending at an index
 * >= desc_num). The old_* fields are the state at the last commit point: after a fetch
 * (old_free_head) and after a used descriptor (all three). */
struct inflight_packed_desc {
    uint8_t inflight;
    uint8_t padding;
    uint16_t next;
    uint16_t last;               /* head entry: the chain's last entry */
    uint16_t num;                /* head entry: ring descriptors in the chain */
    uint64_t counter;            /* head entry: fetch order */
    uint16_t id;
    uint16_t flags;
    uint32_t len;
    uint64_t addr;
};

struct inflight_packed {
    uint64_t features;
    uint16_t version;
    uint16_t desc_num;
    uint16_t free_head;
    uint16_t old_free_head;
    uint16_t used_idx;
    uint16_t old_used_idx;
    uint8_t used_wrap_counter;
    uint8_t old_used_wrap_counter;
    uint8_t padding[7];
    struct inflight_packed_desc desc[];
};

_Static_assert(sizeof(struct inflight_packed_desc) == 32, "DescStatePacked is 32 bytes");
_Static_assert(__builtin_offsetof(struct inflight_packed, desc) == 32,
               "QueueRegionPacked's entries start at 32");

/* Keep the inflight bookkeeping in program order: only a process kill interrupts it, and
 * the memory (a shared memfd) outlives the process, so ordering the compiler's stores is
 * what makes the region consistent at any instruction boundary. */
#define inflight_order() __atomic_signal_fence(__ATOMIC_SEQ_CST)

#endif
