"""virtio-blk vocabulary shared by the backend and the frontend: feature bits, request
types, status codes, and the device config space layout (virtio spec 5.2)."""

from __future__ import annotations

import struct
from enum import IntEnum

# Device feature bits (virtio spec 5.2.3) and transport bits (6).
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14
VIRTIO_F_ANY_LAYOUT = 27
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_IOMMU_PLATFORM = 33     # VIRTIO_F_ACCESS_PLATFORM: addresses go through an IOMMU
VIRTIO_F_RING_PACKED = 34


class ReqType(IntEnum):
    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14


class Status(IntEnum):
    OK = 0
    IOERR = 1
    UNSUPP = 2


def bit(n: int) -> int:
    return 1 << n


def feature_names(features: int) -> list[str]:
    """Names of the set feature bits this module knows, for logs."""
    names = {v: k for k, v in globals().items()
             if k.startswith(("VIRTIO_BLK_F_", "VIRTIO_F_", "VIRTIO_RING_F_")) and isinstance(v, int)}
    return [names.get(i, f"bit{i}") for i in range(64) if features & bit(i)]


# struct virtio_blk_config, up to and including write_zeroes_may_unmap (60 bytes, which is
# what QEMU reads when DISCARD and WRITE_ZEROES are offered), padded to 64.
CONFIG_FORMAT = struct.Struct(
    "<Q"      # capacity (512-byte sectors)
    "I"       # size_max
    "I"       # seg_max
    "HBB"     # geometry: cylinders, heads, sectors
    "I"       # blk_size
    "BBHI"    # topology: physical_block_exp, alignment_offset, min_io_size, opt_io_size
    "B"       # writeback
    "B"       # unused0
    "H"       # num_queues
    "I"       # max_discard_sectors
    "I"       # max_discard_seg
    "I"       # discard_sector_alignment
    "I"       # max_write_zeroes_sectors
    "I"       # max_write_zeroes_seg
    "B"       # write_zeroes_may_unmap
    "3x"      # unused1
)
CONFIG_WRITEBACK_OFFSET = 32
CONFIG_NUM_QUEUES_OFFSET = 34
assert CONFIG_FORMAT.size == 60


def config_space(*, capacity_sectors: int, seg_max: int, blk_size: int, physical_block_size: int,
                 min_io_size: int, opt_io_size: int, writeback: bool, num_queues: int,
                 max_discard_sectors: int, max_discard_seg: int) -> bytes:
    physical_exp = max(0, (physical_block_size // blk_size).bit_length() - 1)
    return CONFIG_FORMAT.pack(
        capacity_sectors, 0, seg_max, 0, 0, 0, blk_size,
        physical_exp, 0, min_io_size // blk_size, opt_io_size // blk_size,
        int(writeback), 0, num_queues,
        max_discard_sectors, max_discard_seg, blk_size // 512,
        max_discard_sectors, max_discard_seg, 1,
    ) + bytes(4)


def parse_config(data: bytes) -> dict[str, int]:
    """Decode a config space read back from a device (frontend side, tests)."""
    data = data.ljust(CONFIG_FORMAT.size, b"\0")[: CONFIG_FORMAT.size]
    (capacity, size_max, seg_max, cylinders, heads, sectors, blk_size, phys_exp, align_off,
     min_io, opt_io, writeback, _unused, num_queues, max_discard_sectors, max_discard_seg,
     discard_align, max_wz_sectors, max_wz_seg, wz_may_unmap) = CONFIG_FORMAT.unpack(data)
    return {
        "capacity": capacity, "size_max": size_max, "seg_max": seg_max, "blk_size": blk_size,
        "physical_block_exp": phys_exp, "alignment_offset": align_off,
        "min_io_size": min_io, "opt_io_size": opt_io, "writeback": writeback,
        "num_queues": num_queues, "max_discard_sectors": max_discard_sectors,
        "max_discard_seg": max_discard_seg, "discard_sector_alignment": discard_align,
        "max_write_zeroes_sectors": max_wz_sectors, "max_write_zeroes_seg": max_wz_seg,
        "write_zeroes_may_unmap": wz_may_unmap,
        "geometry": (cylinders, heads, sectors),
    }
