/* core.h — the whole surface of the C core that Python (cffi) sees: one public header per room,
 * included here in dependency order.
 *
 * Opaque handles (guest memory, disk, virtio-blk device, virtqueue, I/O engine, driver threads)
 * plus plain structs. Every function returns 0 (or a count) on success and -errno on failure;
 * none sets errno. _build.py feeds this file to cffi's cdef with the quoted includes expanded
 * in place (each header once) and every other preprocessor line dropped except integer
 * #defines, so the public headers stay plain C: no macros with arguments, no inline code.
 * Internal headers (no dp_ prefix) are each room's own business and never reach cffi.
 */
#ifndef DP_CORE_H
#define DP_CORE_H

#include "util/dp_hist.h"
#include "vhost/dp_vhost.h"
#include "disk/dp_disk.h"
#include "disk/dp_rbd.h"         /* left out by _build.py without librbd */
#include "blk/dp_blk.h"
#include "record/dp_record.h"
#include "engine/dp_engine.h"
#include "driver/dp_driver.h"
#include "driver/dp_replay.h"
#include "bench/dp_bench.h"

#endif
