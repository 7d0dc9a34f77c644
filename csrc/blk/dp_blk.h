/* dp_blk.h — public (cffi): the virtio-blk device a guest sees over a disk: its capacity and
 * limits (what the config space promised), serial, read-only flag and write cache. */
#ifndef DP_BLK_PUBLIC_H
#define DP_BLK_PUBLIC_H

#include <stdint.h>

#include "disk/dp_disk.h"

#define DP_SEG_MAX 254
#define DP_SERIAL_LEN 20

struct dp_blk_params {
    int read_only;               /* also when the disk is (DP_DISK_F_READ_ONLY) */
    uint32_t max_discard_sectors;
    uint32_t max_write_zeroes_sectors;
    uint32_t max_discard_seg;    /* at most DP_MAX_DISCARD_SEG */
    uint32_t max_write_zeroes_seg;
    char serial[20];             /* GET_ID; not NUL-terminated when 20 bytes long */
};

struct dp_blk_dev;
/* The device over disk (which stays the caller's, and must outlive it). NULL and -errno in
 * *err on failure. */
struct dp_blk_dev *dp_blk_dev_new(struct dp_disk *disk, const struct dp_blk_params *params, int *err);
void dp_blk_dev_free(struct dp_blk_dev *dev);
/* Writeback cache enabled (1) or write-through (0, every write is FUA). */
void dp_blk_set_writeback(struct dp_blk_dev *dev, int writeback);
int dp_blk_get_writeback(const struct dp_blk_dev *dev);
/* Failed (1): every request from now on completes with IOERR without reaching the disk (an
 * export being removed by force: the guest sees errors instead of a hang). */
void dp_blk_set_failed(struct dp_blk_dev *dev, int failed);

#endif
