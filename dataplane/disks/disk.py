"""The backing disk: a regular file, a block device, `null:SIZE` (no I/O at all) or a Ceph RBD
image (`rbd:POOL/IMAGE`, rbd.py), with the emulated-latency layer stacked on it when the spec
asks for one, and the virtio-blk device a guest sees over it.

Python opens the file and reads its geometry; the C core only ever sees the result
(`struct dp_disk_info`, `struct dp_blk_params`: C never parses configuration).
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..core import ffi, lib
from ..errors import ConfigError
from ..units import parse_size
from .latency import LatencySpec
from .rbd import RbdImage, is_rbd_spec, open_rbd, reclaim_lock
from .spec import split_disk_options

log = logging.getLogger("dataplane.disk")

SECTOR = 512
BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
BLKPBSZGET = 0x127B
BLKIOMIN = 0x1278
BLKIOOPT = 0x1279

# Limits advertised in the config space (and enforced by the C core).
MAX_DISCARD_SECTORS = 0x400000  # 2 GiB per range
MAX_DISCARD_SEG = 32
# --fixed: what a file disk asks each I/O thread to register with its io_uring
FIXED_MODES = {"all": lib.DP_FILE_FIXED_BUFFERS | lib.DP_FILE_FIXED_FILE,
               "buffers": lib.DP_FILE_FIXED_BUFFERS, "files": lib.DP_FILE_FIXED_FILE, "none": 0}

@dataclass
class Disk:
    """An open backing disk and its C handle. Close it when the backend stops."""

    description: str
    size: int
    null: bool
    read_only: bool
    direct: bool
    logical_block_size: int = SECTOR
    physical_block_size: int = 4096
    min_io_size: int = 0
    opt_io_size: int = 0
    serial: str = "dataplane"
    fd: int = -1
    handle: object = field(default=None, repr=False)   # struct dp_disk *: the top of the stack
    blk: object = field(default=None, repr=False)      # struct dp_blk_dev *: what queues serve
    latency: LatencySpec | None = None
    rbd: RbdImage | None = None                         # an RBD image: its librbd side
    file_handle: object = field(default=None, repr=False)  # a file disk's own struct dp_disk *

    @property
    def iopoll_state(self) -> int:
        """1: a file disk's polled ring runs; -errno: the kernel refused one; 0: none asked for."""
        return lib.dp_file_disk_iopoll_state(self.file_handle) if self.file_handle is not None else 0

    def apply_latency(self, num_queues: int) -> None:
        """Give the latency layer its queues' shares: IOPS/bandwidth caps are split evenly
        between the queues, so the queues still share nothing on the I/O path."""
        if self.latency is None:
            return
        params = _latency_params(self.latency, num_queues)
        if lib.dp_delay_disk_set_params(self.handle, params) < 0:
            raise ConfigError(f"latency {self.latency.text!r}: rejected by the core")

    @property
    def capacity_sectors(self) -> int:
        return self.size // SECTOR

    @property
    def capabilities(self) -> int:
        """The disk's DP_DISK_F_* flags, as the C core reports them."""
        info = ffi.new("struct dp_disk_info *")
        lib.dp_disk_get_info(self.handle, info)
        return int(info.flags)

    def close(self) -> None:
        if self.blk is not None:
            lib.dp_blk_dev_free(self.blk)
            self.blk = None
        if self.handle is not None:
            lib.dp_disk_free(self.handle)   # and the disks it stacks on
            self.handle = None
        if self.rbd is not None:
            self.rbd.closed()
            self.rbd = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def set_writeback(self, enabled: bool) -> None:
        lib.dp_blk_set_writeback(self.blk, int(enabled))

    @property
    def writeback(self) -> bool:
        return bool(lib.dp_blk_get_writeback(self.blk))


def _latency_params(spec: LatencySpec, num_queues: int) -> object:
    params = ffi.new("struct dp_latency_params *")
    table = spec.quantiles_ns
    params.npoints = len(table)
    for i, value in enumerate(table):
        params.quantile_ns[i] = value
    params.iops = -(-spec.iops // num_queues) if spec.iops else 0
    params.bw = -(-spec.bw // num_queues) if spec.bw else 0
    return params


def _new_handle(made: object, err: object, what: str) -> object:
    if made == ffi.NULL:
        raise ConfigError(f"cannot set up {what}: {os.strerror(-err[0])}")
    return made


def _block_queue_attr(st_dev: int, name: str) -> int | None:
    """Read /sys/dev/block/MAJ:MIN/queue/NAME for the device a file lives on."""
    base = Path(f"/sys/dev/block/{os.major(st_dev)}:{os.minor(st_dev)}")
    for candidate in (base / "queue" / name, base / ".." / "queue" / name):
        try:
            return int(candidate.read_text().strip())
        except (OSError, ValueError):
            continue
    return None


def _ioctl_int(fd: int, request: int, fmt: str) -> int:
    buf = fcntl.ioctl(fd, request, b"\0" * struct.calcsize(fmt))
    return struct.unpack(fmt, buf)[0]


def open_disk(spec: str, *, read_only: bool = False, cache: str = "none",
              serial: str = "dataplane", fixed: str = "files", iopoll: bool = False) -> Disk:
    """Open `PATH`, `null:SIZE` or `rbd:POOL/IMAGE[,...]` (optionally followed by
    `,latency=...,iops=N,bw=N`) and create the C handles. fixed: what a file disk asks its I/O
    threads to register with io_uring (FIXED_MODES); iopoll: a file disk's reads and writes on
    polled rings (the caller checked the device: placement.iopoll_unsupported). Raises
    ConfigError on bad input."""
    spec, latency = split_disk_options(spec)
    if cache not in ("none", "writeback"):
        raise ConfigError(f"bad --cache {cache!r}: expected none or writeback")
    if fixed not in FIXED_MODES:
        raise ConfigError(f"bad --fixed {fixed!r}: expected one of {', '.join(FIXED_MODES)}")
    serial_bytes = serial.encode()
    if len(serial_bytes) > 20:
        raise ConfigError(f"bad --serial {serial!r}: at most 20 bytes")

    if spec.startswith("null:") or spec == "null":
        size_text = spec.partition(":")[2] or "1G"
        size = parse_size(size_text)
        if size < SECTOR:
            raise ConfigError(f"bad size {size_text!r} for the null disk: at least 512 bytes")
        disk = Disk(description=f"null:{size_text}", size=size - size % SECTOR, null=True,
                    read_only=read_only, direct=False, serial=serial)
    elif is_rbd_spec(spec):
        disk = _open_rbd_disk(spec, read_only=read_only, cache=cache, serial=serial)
    else:
        disk = open_file(spec, read_only=read_only, direct=(cache == "none"), serial=serial)

    if iopoll and (disk.null or disk.rbd is not None or not disk.direct):
        disk.close()
        raise ConfigError("--iopoll: polled I/O needs a file or block device opened with --cache none")
    try:
        _make_handles(disk, latency, serial_bytes, fixed, iopoll)
    except BaseException:
        disk.close()
        raise
    disk.latency = latency
    if latency is not None:
        disk.description += f" ({latency.text})"
    return disk


def _make_handles(disk: Disk, latency: LatencySpec | None, serial: bytes, fixed: str = "files",
                  iopoll: bool = False) -> None:
    """The C side of an open disk: the disk itself, the latency layer on it (caps set later by
    apply_latency, when the queue count is known), and the virtio-blk device over both."""
    info = ffi.new("struct dp_disk_info *")
    info.size_bytes = disk.size
    info.block_size = disk.logical_block_size
    info.dio_align = disk.logical_block_size if disk.direct else 0
    info.flags = lib.DP_DISK_F_READ_ONLY if disk.read_only else 0
    err = ffi.new("int *")
    if disk.rbd is not None:
        pass   # made when the image was opened
    elif disk.null:
        disk.handle = _new_handle(lib.dp_null_disk_new(info, err), err, disk.description)
    else:
        disk.handle = _new_handle(lib.dp_file_disk_new(disk.fd, info, err), err, disk.description)
        lib.dp_file_disk_set_fixed(disk.handle, FIXED_MODES[fixed])   # before the latency layer copies it
        if iopoll and lib.dp_file_disk_set_iopoll(disk.handle, 1) < 0:
            raise ConfigError("--iopoll: polled I/O needs an O_DIRECT file (--cache none)")
        disk.file_handle = disk.handle
    if latency is not None:
        delayed = lib.dp_delay_disk_new(disk.handle, _latency_params(latency, 1), err)
        if delayed == ffi.NULL:
            raise ConfigError(f"latency {latency.text!r}: rejected by the core")
        disk.handle = delayed   # it owns the disk under it now
    params = ffi.new("struct dp_blk_params *")
    params.read_only = int(disk.read_only)
    params.max_discard_sectors = MAX_DISCARD_SECTORS
    params.max_write_zeroes_sectors = MAX_DISCARD_SECTORS
    params.max_discard_seg = MAX_DISCARD_SEG
    params.max_write_zeroes_seg = MAX_DISCARD_SEG
    ffi.memmove(params.serial, serial.ljust(20, b"\0"), 20)
    disk.blk = _new_handle(lib.dp_blk_dev_new(disk.handle, params, err), err, disk.description)


def _open_rbd_disk(spec: str, *, read_only: bool, cache: str, serial: str) -> Disk:
    """An RBD image: connected and opened here (the C disk exists from this point on), its
    exclusive lock reclaimed from a dead predecessor when there is one to reclaim."""
    image = open_rbd(spec, read_only=read_only, cache=cache)
    disk = Disk(description=f"rbd:{image.spec.name}", size=image.size - image.size % SECTOR,
                null=False, read_only=read_only or image.spec.snap is not None, direct=cache == "none",
                serial=serial, handle=image.handle, rbd=image)
    try:
        if not disk.read_only:
            reclaim_lock(image)
    except BaseException:
        disk.close()
        raise
    return disk


def open_file(path: str, *, read_only: bool, direct: bool, serial: str) -> Disk:
    """Open a regular file or block device (O_DIRECT when direct) and read its geometry;
    no C handle yet (open_disk makes them)."""
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
    if direct:
        flags |= os.O_DIRECT
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ConfigError(f"disk {path!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"disk {path!r} is a directory") from None
    except PermissionError:
        raise ConfigError(f"disk {path!r}: permission denied") from None
    except OSError as exc:
        if direct and exc.errno == 22:
            raise ConfigError(f"disk {path!r}: its filesystem does not support O_DIRECT; "
                              "use --cache=writeback") from None
        raise ConfigError(f"disk {path!r}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISBLK(st.st_mode):
            size = _ioctl_int(fd, BLKGETSIZE64, "Q")
            logical = _ioctl_int(fd, BLKSSZGET, "i")
            physical = _ioctl_int(fd, BLKPBSZGET, "I")
            min_io = _ioctl_int(fd, BLKIOMIN, "I")
            opt_io = _ioctl_int(fd, BLKIOOPT, "I")
        elif stat.S_ISREG(st.st_mode):
            size = st.st_size
            logical = _block_queue_attr(st.st_dev, "logical_block_size") or SECTOR
            physical = max(logical, 4096)
            min_io, opt_io = 0, 0
        else:
            raise ConfigError(f"disk {path!r} is neither a regular file nor a block device")
        size -= size % SECTOR
        if size == 0:
            raise ConfigError(f"disk {path!r} is empty (size must be at least 512 bytes)")
    except BaseException:
        os.close(fd)
        raise
    return Disk(description=path, size=size, null=False, read_only=read_only, direct=direct,
                logical_block_size=max(logical, SECTOR), physical_block_size=physical,
                min_io_size=min_io, opt_io_size=opt_io, serial=serial, fd=fd)
