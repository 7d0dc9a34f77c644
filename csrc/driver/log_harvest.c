/* log_harvest.c — what a front end does with the dirty log during a migration: take the bits
 * the device set since the last look and clear them, without losing one the device sets
 * meanwhile (QEMU's vhost_dev_sync_region does the same: an exchange per word). */
#include <stdint.h>

#include "driver/dp_driver.h"

uint64_t dp_log_harvest(void *bitmap, uint64_t words, uint64_t *out)
{
    uint64_t *w = bitmap, found = 0;
    for (uint64_t i = 0; i < words; i++) {
        /* A cheap look first: most words are clear and need no locked instruction. */
        out[i] = __atomic_load_n(&w[i], __ATOMIC_RELAXED) ? __atomic_exchange_n(&w[i], 0, __ATOMIC_ACQUIRE) : 0;
        found += (uint64_t)__builtin_popcountll(out[i]);
    }
    return found;
}
