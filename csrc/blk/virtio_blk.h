/* virtio_blk.h — virtio-blk on the wire (virtio 1.2, 5.2.6): the request header, a discard /
 * write-zeroes range, request types and status codes. Both sides use it: the device's request
 * semantics (blk.c) and the driver side in C (driver/). */
#ifndef DP_VIRTIO_BLK_H
#define DP_VIRTIO_BLK_H

#include <stdint.h>

#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_T_DISCARD 11
#define VIRTIO_BLK_T_WRITE_ZEROES 13

#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2

#define VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP 1
#define SECTOR_SHIFT 9

struct virtio_blk_outhdr {
    uint32_t type;
    uint32_t ioprio;
    uint64_t sector;
};

struct virtio_blk_discard_write_zeroes {
    uint64_t sector;
    uint32_t num_sectors;
    uint32_t flags;
};

#endif
