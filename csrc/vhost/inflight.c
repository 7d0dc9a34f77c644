/* inflight.c — inflight tracking across back-end restarts (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD,
 * split rings): the region's size and set-up, and at the next start its reconciliation with
 * the used ring into the list of heads to resubmit. vq_pop and vq_push_used keep it current.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>

#include "vhost/virtqueue.h"

/* Order the resubmission by the counter each head got when it was popped. */
static int cmp_counter(const void *a, const void *b, void *arg)
{
    const struct inflight_region *r = arg;
    uint64_t ca = r->desc[*(const uint16_t *)a].counter, cb = r->desc[*(const uint16_t *)b].counter;
    return ca < cb ? -1 : ca > cb;
}

int vq_split_inflight_recover(struct dp_vq *vq)
{
    struct inflight_region *r = vq->inflight;
    vq->nresubmit = 0;
    vq->recovered_out_of_order = 0;
    if (!r)
        return 0;
    uint16_t used_idx = __atomic_load_n(&vq->used->idx, __ATOMIC_ACQUIRE);
    if (r->used_idx != used_idx) {
        /* Killed between publishing used entries and clearing their inflight flags: the
         * last batch (a list from last_batch_head) did complete. */
        uint16_t batch = (uint16_t)(used_idx - r->used_idx), head = r->last_batch_head;
        for (unsigned n = 0; n < batch && n < vq->num && head < vq->num; n++) {
            r->desc[head].inflight = 0;
            head = r->desc[head].next;
        }
        r->used_idx = used_idx;
    }
    free(vq->resubmit);
    vq->resubmit = calloc(vq->num, sizeof(uint16_t));
    if (!vq->resubmit)
        return -ENOMEM;
    uint64_t max_counter = 0, max_done_counter = 0;
    for (unsigned i = 0; i < vq->num; i++) {
        if (r->desc[i].counter > max_counter)
            max_counter = r->desc[i].counter;
        if (r->desc[i].inflight)
            vq->resubmit[vq->nresubmit++] = (uint16_t)i;
        else if (r->desc[i].counter > max_done_counter)
            max_done_counter = r->desc[i].counter;
    }
    qsort_r(vq->resubmit, vq->nresubmit, sizeof(uint16_t), cmp_counter, r);
    /* In flight at the kill although a later request had completed: out of order. */
    for (unsigned i = 0; i < vq->nresubmit; i++)
        if (r->desc[vq->resubmit[i]].counter < max_done_counter)
            vq->recovered_out_of_order++;
    vq->inflight_counter = max_counter + 1;
    /* Everything popped is either in the used ring or in flight (libvhost-user's rule);
     * the front end may have rewound its base to the used index. */
    vq->last_avail_idx = vq->shadow_avail_idx = (uint16_t)(used_idx + vq->nresubmit);
    return (int)vq->nresubmit;
}

/* A head the ring broke on is consumed without a used element: it must not stay marked in
 * flight, or the next start (a reconnect, or the driver resetting the ring) resubmits it. */
void vq_split_inflight_drop(struct dp_vq *vq, uint16_t head)
{
    if (vq->inflight && head < vq->num)
        vq->inflight->desc[head].inflight = 0;
}

int dp_vq_set_inflight(struct dp_vq *vq, void *region, int restored)
{
    if (vq->engine)
        return -EBUSY;
    vq->inflight = region;
    vq->inflight_restored = region && restored;
    if (region && !restored) {
        struct inflight_region *r = region;
        r->version = 1;
        r->desc_num = (uint16_t)vq->num;
    }
    if (region)
        vq->inflight_counter = 1;
    return 0;
}

uint64_t dp_inflight_queue_size(uint16_t queue_size)
{
    uint64_t n = sizeof(struct inflight_region) + (uint64_t)queue_size * sizeof(struct inflight_desc);
    return (n + 63) & ~(uint64_t)63;
}
