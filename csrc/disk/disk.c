/* disk.c — what every disk shares: its capabilities, and freeing it through its own ops. */
#include "disk/disk.h"

void dp_disk_get_info(const struct dp_disk *disk, struct dp_disk_info *out)
{
    *out = disk->info;
}

void dp_disk_free(struct dp_disk *disk)
{
    if (disk)
        disk->ops->free(disk);
}
