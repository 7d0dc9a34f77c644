/* inflight.h — the inflight tracking region of a split queue (vhost-user spec, "Inflight I/O
 * tracking"), which vq_pop and vq_push_used keep up to date and inflight.c reconciles after a
 * back-end restart. */
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

/* Keep the inflight bookkeeping in program order: only a process kill interrupts it, and
 * the memory (a shared memfd) outlives the process, so ordering the compiler's stores is
 * what makes the region consistent at any instruction boundary. */
#define inflight_order() __atomic_signal_fence(__ATOMIC_SEQ_CST)

#endif
