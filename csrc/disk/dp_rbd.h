/* dp_rbd.h — public (cffi): a disk over a Ceph RBD image, through librbd's async API (rbd.c).
 *
 * Only in a C core built with librbd (Debian: librbd-dev): without it _build.py compiles
 * neither rbd.c nor this header into the module, and Python finds no dp_rbd_* in lib.
 * Python parses the disk spec; C gets the pieces (it never parses configuration) and does
 * what only librados can: connect, open, and report what it found.
 */
#ifndef DP_RBD_PUBLIC_H
#define DP_RBD_PUBLIC_H

#include <stddef.h>
#include <stdint.h>

#include "disk/dp_disk.h"

#define DP_RBD_MAX_OPTIONS 32
#define DP_RBD_ERROR_LEN 512
#define DP_RBD_NAME_LEN 128

struct dp_rbd_params {
    const char *cluster;          /* cluster name (NULL: "ceph"), which picks $cluster.conf */
    const char *client;           /* entity name, e.g. "client.admin" (NULL: client.admin) */
    const char *conf;             /* ceph.conf (NULL: librados's search: $CEPH_CONF, /etc/ceph ...) */
    const char *keyring;          /* NULL: what the conf names */
    const char *pool;
    const char *pool_namespace;   /* NULL: the default namespace */
    const char *image;
    const char *snap;             /* NULL: the image's head; a snapshot opens read-only */
    int read_only;
    uint32_t timeout_s;           /* rados_osd_op_timeout, rados_mon_op_timeout and
                                   * client_mount_timeout where the conf leaves Ceph's default */
    uint32_t close_wait_ms;       /* how long freeing the disk waits for librbd's close */
    unsigned noptions;            /* rados_conf_set(name, value), in order, after the conf */
    const char *option_names[DP_RBD_MAX_OPTIONS];
    const char *option_values[DP_RBD_MAX_OPTIONS];
    char error[DP_RBD_ERROR_LEN]; /* out: what failed, in words */
};

/* What the open found (dp_rbd_disk_get_info). */
struct dp_rbd_info {
    uint64_t size;                /* the image's (or snapshot's) size in bytes */
    uint64_t features;            /* RBD_FEATURE_* bits */
    uint64_t object_size;
    int cache;                    /* rbd_cache as in effect for this image */
    int cache_source;             /* where that value came from: 0 config, 1 pool, 2 image */
    int volatile_cache;           /* writes may be acknowledged before the OSDs have them */
    char cache_policy[32];        /* rbd_cache_policy */
    char id[DP_RBD_NAME_LEN];     /* the image id (rbd_get_id) */
    char fsid[64];                /* the cluster's */
    char addr[DP_RBD_NAME_LEN];   /* this client's address: what an exclusive lock it holds shows */
    uint64_t errors;              /* requests librbd failed (all engines) */
    int last_error;               /* the latest of those failures (-errno) */
};

/* Connect, open the image (read-only for a snapshot or params->read_only) and make the disk.
 * Blocks for at most about params->timeout_s per step on a dead cluster. NULL on failure:
 * -errno in *err and the reason in params->error. */
struct dp_disk *dp_rbd_disk_new(struct dp_rbd_params *params, int *err);
/* -EINVAL when disk is not an RBD disk. */
int dp_rbd_disk_get_info(const struct dp_disk *disk, struct dp_rbd_info *out);
/* An option as this disk's librados connection has it (rados_conf_get). */
int dp_rbd_conf_get(const struct dp_disk *disk, const char *option, char *buf, size_t len);
/* The exclusive lock's owner: 1 with its address in buf, 0 when nobody holds it (or the image
 * has no exclusive-lock feature), -errno on failure. */
int dp_rbd_lock_owner(const struct dp_disk *disk, char *buf, size_t len);
/* Break the exclusive lock that owner holds: librbd blocklists that client. */
int dp_rbd_lock_break(const struct dp_disk *disk, const char *owner);

#endif
