/* null.c — a disk that does no I/O: reads return zeroes, everything else succeeds at once.
 * It measures the data plane alone (ring walk, parsing, completion, notification).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "disk/disk.h"

/* Its state on an engine is the env it was lent: nothing to allocate. */
static int null_open(struct dp_disk *disk, const struct dp_disk_env *env, void **state)
{
    *state = (void *)env;
    return 0;
}

static int null_close(void *state)
{
    return 0;
}

static void null_submit(void *state, void *qstate, struct dp_disk_io *io)
{
    if (io->op == DP_DISK_READ)
        for (unsigned i = 0; i < io->iovcnt; i++)
            memset(io->iov[i].iov_base, 0, io->iov[i].iov_len);
    disk_complete(state, io, 0);
}

static void null_free(struct dp_disk *disk)
{
    free(disk);
}

static const struct dp_disk_ops null_ops = {
    .name = "null", .free = null_free,
    .open = null_open, .close = null_close, .submit = null_submit,
};

struct dp_disk *dp_null_disk_new(const struct dp_disk_info *info, int *err)
{
    struct dp_disk *disk = calloc(1, sizeof(*disk));
    if (!disk) {
        *err = -ENOMEM;
        return NULL;
    }
    disk->ops = &null_ops;
    disk->info = *info;
    disk->info.dio_align = 0;
    disk->info.flags |= DP_DISK_F_FLUSH | DP_DISK_F_DISCARD | DP_DISK_F_WRITE_ZEROES;
    *err = 0;
    return disk;
}
