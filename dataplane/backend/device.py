"""vhost-user control plane, backend side: the protocol state of one front-end session, with
one handler per message, dispatched from a table.

It negotiates features, maps guest memory, and hands finished vring descriptions to the C
core, which serves each virtqueue from its I/O thread (backend.engines). Nothing here runs
per I/O request; the socket and the session's life are backend.server's.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..core import check, ffi, lib
from ..disks import MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, Disk
from ..errors import DeviceError, ProtocolError
from ..protocol import virtio_blk as vb
from ..protocol.vhost_user import (
    CONFIG_HEADER,
    INFLIGHT,
    INFLIGHT_MIN_SIZE,
    IOTLB_MSG,
    LOG,
    MEM_REG,
    MEMORY_HEADER,
    MEMORY_REGION,
    U64,
    VHOST_F_LOG_ALL,
    VHOST_LOG_PAGE,
    VHOST_MEMORY_BASELINE_NREGIONS,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_MAX_CONFIG_SIZE,
    VHOST_USER_REPLY_MASK,
    VHOST_USER_VERSION,
    VHOST_USER_VERSION_MASK,
    VHOST_USER_VRING_IDX_MASK,
    VHOST_USER_VRING_NOFD_MASK,
    VHOST_VRING_F_LOG,
    VRING_ADDR,
    VRING_STATE,
    IotlbType,
    Message,
    ProtocolFeature,
    Request,
    close_fds,
    request_name,
)
from .engines import EnginePool

log = logging.getLogger("dataplane.vhost")

SEG_MAX = int(lib.DP_SEG_MAX)
MAX_QUEUE_SIZE = int(lib.DP_MAX_QUEUE_SIZE)
MAX_MEM_REGIONS = int(lib.DP_MAX_MEM_REGIONS)

# BACKEND_REQ and REPLY_ACK are what QEMU requires of a back end that offers
# VIRTIO_F_IOMMU_PLATFORM (vhost_user_backend_init): misses go out on the back-end channel and
# every IOTLB_MSG is acknowledged.
PROTOCOL_FEATURES = (
    (1 << ProtocolFeature.MQ)
    | (1 << ProtocolFeature.LOG_SHMFD)
    | (1 << ProtocolFeature.REPLY_ACK)
    | (1 << ProtocolFeature.BACKEND_REQ)
    | (1 << ProtocolFeature.CONFIG)
    | (1 << ProtocolFeature.INFLIGHT_SHMFD)
    | (1 << ProtocolFeature.CONFIGURE_MEM_SLOTS)
)
LOG_SHMFD = 1 << ProtocolFeature.LOG_SHMFD
MEM_SLOTS = 1 << ProtocolFeature.CONFIGURE_MEM_SLOTS
BACKEND_REQ = 1 << ProtocolFeature.BACKEND_REQ
IOMMU_PLATFORM = 1 << vb.VIRTIO_F_IOMMU_PLATFORM
IOTLB_MISS_TIMEOUT_MS = int(lib.DP_IOTLB_MISS_TIMEOUT_MS)


def device_features(disk: Disk) -> int:
    """Virtio features this backend offers for a disk (from what the disk can do)."""
    caps = disk.capabilities
    # Packed rings are offered always: a front end takes them only when asked to (QEMU:
    # `packed=on`), and the same connection may go from one format to the other (SeaBIOS
    # drives the disk over a split ring before Linux resets it and starts it packed). So is
    # the vIOMMU (QEMU: `iommu_platform=on` with an IOMMU in front of the device; without
    # one QEMU drops the bit itself).
    f = [vb.VIRTIO_F_VERSION_1, vb.VIRTIO_RING_F_INDIRECT_DESC, vb.VIRTIO_RING_F_EVENT_IDX,
         vb.VIRTIO_F_ANY_LAYOUT, vb.VIRTIO_F_RING_PACKED, vb.VIRTIO_F_IOMMU_PLATFORM,
         vb.VIRTIO_BLK_F_SEG_MAX,
         vb.VIRTIO_BLK_F_BLK_SIZE, vb.VIRTIO_BLK_F_TOPOLOGY, vb.VIRTIO_BLK_F_MQ,
         VHOST_USER_F_PROTOCOL_FEATURES, VHOST_F_LOG_ALL]
    if caps & lib.DP_DISK_F_FLUSH:
        f += [vb.VIRTIO_BLK_F_FLUSH, vb.VIRTIO_BLK_F_CONFIG_WCE]
    if disk.read_only or caps & lib.DP_DISK_F_READ_ONLY:
        f.append(vb.VIRTIO_BLK_F_RO)
    else:
        if caps & lib.DP_DISK_F_DISCARD:
            f.append(vb.VIRTIO_BLK_F_DISCARD)
        if caps & lib.DP_DISK_F_WRITE_ZEROES:
            f.append(vb.VIRTIO_BLK_F_WRITE_ZEROES)
    return sum(1 << b for b in f)


def _is_eventfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


class MessageError(Exception):
    """A message that cannot be honoured; the connection survives, the reply says 'failed'."""


@dataclass
class Vring:
    """What the front end told us about one virtqueue, and the C queue that serves it."""

    index: int
    handle: object
    num: int = 0
    addr: tuple[int, int, int] | None = None   # desc, avail, used (front-end user addresses)
    addr_flags: int = 0          # SET_VRING_ADDR's flags (VHOST_VRING_F_LOG)
    log_addr: int = 0            # guest-physical address of the used ring, for the dirty log
    base: int = 0
    kick_fd: int | None = None   # None: not received; -1: "no fd", poll the ring
    call_fd: int = -1
    err_fd: int = -1
    enabled: bool = False
    started: bool = False        # a kick was received since the last GET_VRING_BASE
    running: bool = False        # attached to its I/O thread
    packed: bool = False         # the ring format of its base and of its last start
    waiting_iotlb: bool = False  # ready to start but its rings are not in the IOTLB yet

    def close_fds(self) -> None:
        for name in ("kick_fd", "call_fd", "err_fd"):
            fd = getattr(self, name)
            if fd is not None and fd >= 0:
                os.close(fd)
            setattr(self, name, -1)
        self.kick_fd = None


def inflight_queue_size(queue_size: int, packed: bool) -> int:
    """Bytes of one queue's region: the spec's QueueRegionSplit or QueueRegionPacked."""
    if packed:
        return lib.dp_inflight_packed_queue_size(queue_size)
    return lib.dp_inflight_queue_size(queue_size)


@dataclass
class InflightBuffer:
    """The shared inflight-tracking buffer (INFLIGHT_SHMFD), mapped by the C core. Its regions
    are laid out for the ring format negotiated when the front end handed it over; key (the
    memfd's device and inode) tells the same buffer handed over again."""

    addr: object
    size: int
    num_queues: int
    queue_size: int
    packed: bool = False
    key: tuple[int, int] = (0, 0)

    def region(self, index: int) -> object | None:
        if index >= self.num_queues:
            return None
        return ffi.cast("char *", self.addr) + index * inflight_queue_size(self.queue_size,
                                                                           self.packed)

    def close(self) -> None:
        lib.dp_unmap_shared(self.addr, self.size)


@dataclass
class DirtyLog:
    """The dirty log a front end maps for live migration (SET_LOG_BASE), mapped by the C core."""

    handle: object
    size: int

    def close(self) -> None:
        dropped = lib.dp_log_dropped(self.handle)
        if dropped:
            log.warning("dirty log: %d page(s) written beyond its %d bytes were not logged",
                        dropped, self.size)
        lib.dp_log_free(self.handle)


@dataclass
class IotlbCounters:
    """What the front end's vIOMMU did in a session (logged when it ends)."""

    updates: int = 0
    invalidations: int = 0
    refused: int = 0

    def line(self, iommu: object, queues: list[dict[str, int]]) -> str:
        st = ffi.new("struct dp_iommu_stats *")
        lib.dp_iommu_get_stats(iommu, st)
        total = {k: sum(q[k] for q in queues)
                 for k in ("iotlb_misses", "iotlb_timeouts", "iotlb_faults", "iotlb_drains")}
        return (f"vIOMMU: {self.updates} update(s), {self.invalidations} invalidation(s)"
                f" ({total['iotlb_drains']} waited for requests in flight), {self.refused}"
                f" refused; {st.misses_sent} miss(es) sent"
                + (f", {st.misses_dropped} dropped (channel full or missing)"
                   if st.misses_dropped else "")
                + f"; {total['iotlb_misses']} request(s) waited for an entry,"
                f" {total['iotlb_timeouts']} in vain, {total['iotlb_faults']} fault(s)")


class VhostUserBlkDevice:
    """The protocol state of one front-end session; `handle()` processes one message."""

    def __init__(self, disk: Disk, num_queues: int, engines: EnginePool,
                 inflight: bool = True, dirty_log: bool = True, iotlb_check: bool = True,
                 iotlb_miss_timeout_ms: int = IOTLB_MISS_TIMEOUT_MS) -> None:
        self.disk = disk
        self.num_queues = num_queues
        self.engines = engines
        self.features_offered = device_features(disk)
        self.protocol_features_offered = PROTOCOL_FEATURES
        if not inflight:   # a debug switch: reconnects then lose out-of-order requests
            self.protocol_features_offered &= ~(1 << ProtocolFeature.INFLIGHT_SHMFD)
        # A debug switch when False: the features are offered and the log mapped, but nothing
        # is ever logged (a migration then loses what the device wrote).
        self.dirty_log = dirty_log
        # The vIOMMU: the device's link (back-end channel, miss timeout) and the IOTLB
        # snapshot every queue translates through; iotlb_check False is the debug switch that
        # enforces nothing (--debug-no-iotlb-check).
        self.iotlb_check = iotlb_check
        self.iommu = lib.dp_iommu_new()
        self.iotlb = lib.dp_iotlb_new()
        if self.iommu == ffi.NULL or self.iotlb == ffi.NULL:
            raise DeviceError("out of memory for the vIOMMU state")
        lib.dp_iommu_set_miss_timeout(self.iommu, iotlb_miss_timeout_ms * 1_000_000)
        lib.dp_iommu_set_flags(self.iommu, 0 if iotlb_check else lib.DP_IOMMU_F_NO_CHECK)
        self.backend_fd = -1
        self.iotlb_counters = IotlbCounters()
        self._err = ffi.new("int *")
        self.vrings = [Vring(i, self._new_vq(i)) for i in range(num_queues)]
        self._vq_array = ffi.new("struct dp_vq *[]", [v.handle for v in self.vrings])
        self.mem: object | None = None
        self.inflight: InflightBuffer | None = None
        self.recorder: object | None = None   # a C dp_recorder every queue records into
        self.log: DirtyLog | None = None
        # (buffer key, queue) a packed ring was started from in this session: its region is
        # this session's, not a previous back end's (see _attach_inflight)
        self._inflight_live: set[tuple[tuple[int, int], int]] = set()
        self._fixed_error_told = 0   # the fixed-buffer refusal already logged
        self._iopoll_error_told = 0  # and the polled ring's
        self._reset_state()
        self.handlers: dict[int, Callable[[Message], bytes | Message | None]] = {
            Request.GET_FEATURES: self.get_features,
            Request.SET_FEATURES: self.set_features,
            Request.SET_OWNER: self.set_owner,
            Request.RESET_OWNER: self.reset_owner,
            Request.RESET_DEVICE: self.reset_device,
            Request.GET_PROTOCOL_FEATURES: self.get_protocol_features,
            Request.SET_PROTOCOL_FEATURES: self.set_protocol_features,
            Request.GET_QUEUE_NUM: self.get_queue_num,
            Request.SET_MEM_TABLE: self.set_mem_table,
            Request.SET_VRING_NUM: self.set_vring_num,
            Request.SET_VRING_ADDR: self.set_vring_addr,
            Request.SET_VRING_BASE: self.set_vring_base,
            Request.GET_VRING_BASE: self.get_vring_base,
            Request.SET_VRING_KICK: self.set_vring_kick,
            Request.SET_VRING_CALL: self.set_vring_call,
            Request.SET_VRING_ERR: self.set_vring_err,
            Request.SET_VRING_ENABLE: self.set_vring_enable,
            Request.GET_CONFIG: self.get_config,
            Request.SET_CONFIG: self.set_config,
            Request.GET_INFLIGHT_FD: self.get_inflight_fd,
            Request.SET_INFLIGHT_FD: self.set_inflight_fd,
            Request.SET_LOG_BASE: self.set_log_base,
            Request.GET_MAX_MEM_SLOTS: self.get_max_mem_slots,
            Request.ADD_MEM_REG: self.add_mem_reg,
            Request.REM_MEM_REG: self.rem_mem_reg,
            Request.SET_BACKEND_REQ_FD: self.set_backend_req_fd,
            Request.IOTLB_MSG: self.iotlb_msg,
        }

    # ---- lifecycle ----

    def _new_vq(self, index: int) -> object:
        vq = lib.dp_vq_new(self.disk.blk, index)
        if vq == ffi.NULL:
            raise DeviceError(f"cannot allocate virtqueue {index}")
        return vq

    def _reset_state(self) -> None:
        self.features = 0
        self.protocol_features = 0
        self.owner = False

    def stop_all(self) -> None:
        """Stop every queue, draining in-flight requests."""
        for vring in self.vrings:
            self._stop(vring)

    def fail_requests(self) -> int:
        """The export is going away: drain the running queues, then serve them again answering
        IOERR to every request without touching the disk. Returns how many were running."""
        running = [v for v in self.vrings if v.running]
        for vring in running:
            self._stop(vring)
        lib.dp_blk_set_failed(self.disk.blk, 1)
        for vring in running:
            self._maybe_start(vring, quiet=True)
        return len(running)

    def close(self) -> None:
        """Stop every queue (draining in-flight requests) and release memory and fds."""
        for vring in self.vrings:
            self._stop(vring)
        if self._iommu_used():
            log.info("%s", self.iotlb_counters.line(self.iommu, self.stats()))
        for vring in self.vrings:
            vring.close_fds()
            lib.dp_vq_free(vring.handle)
        self.vrings = []
        self._free_mem()
        self._free_inflight()
        self._free_log()
        self._set_backend_fd(-1)
        lib.dp_iommu_free(self.iommu)
        lib.dp_iotlb_free(self.iotlb)
        self.iommu = self.iotlb = ffi.NULL

    def _free_mem(self) -> None:
        if self.mem is not None:
            lib.dp_mem_free(self.mem)
            self.mem = None

    def _free_log(self) -> None:
        if self.log is not None:
            for vring in self.vrings:
                lib.dp_vq_set_log(vring.handle, ffi.NULL, 0, 0)
            self.log.close()
            self.log = None

    def _free_inflight(self) -> None:
        if self.inflight is not None:
            for vring in self.vrings:
                lib.dp_vq_set_inflight(vring.handle, ffi.NULL, 0)
            self.inflight.close()
            self.inflight = None

    def set_recorder(self, recorder: object | None) -> None:
        """Record every queue's requests into recorder (a C dp_recorder; None: stop). Safe
        while queues run; once it returns, no queue writes into the previous recorder."""
        self.recorder = recorder
        handle = ffi.NULL if recorder is None else recorder
        for vring in self.vrings:
            check(lib.dp_vq_set_recorder(vring.handle, handle), f"vq{vring.index}: recording")

    def stats(self) -> list[dict[str, int]]:
        out = []
        for vring in self.vrings:
            s = ffi.new("struct dp_vq_stats *")
            lib.dp_vq_get_stats(vring.handle, s)
            out.append({name: getattr(s, name) for name, _ in ffi.typeof(s[0]).fields})
        return out

    # ---- dispatch ----

    def handle(self, msg: Message) -> Message | None:
        """Process one message and return the reply to send, if any."""
        name = request_name(msg.request)
        if (msg.flags & VHOST_USER_VERSION_MASK) != VHOST_USER_VERSION:
            close_fds(msg.fds)
            log.error("%s: unsupported protocol version in flags %#x", name, msg.flags)
            return self._ack(msg, ok=False)
        handler = self.handlers.get(msg.request)
        if handler is None:
            close_fds(msg.fds)
            log.warning("%s (%d bytes): not supported, ignored", name, len(msg.payload))
            return self._ack(msg, ok=False)
        try:
            payload = handler(msg)
        except (MessageError, ProtocolError, DeviceError) as exc:
            close_fds(msg.fds)
            log.error("%s failed: %s", name, exc)
            if msg.request in _REPLY_REQUESTS:
                return Message(msg.request, VHOST_USER_VERSION | VHOST_USER_REPLY_MASK)
            if msg.request == Request.SET_LOG_BASE and self.protocol_features & LOG_SHMFD:
                # QEMU waits for this reply whether or not it asked for an ack.
                return Message(msg.request, VHOST_USER_VERSION | VHOST_USER_REPLY_MASK, U64.pack(1))
            return self._ack(msg, ok=False)
        if isinstance(payload, Message):
            return payload
        if payload is not None:
            return Message(msg.request, VHOST_USER_VERSION | VHOST_USER_REPLY_MASK, payload)
        return self._ack(msg, ok=True)

    def _ack(self, msg: Message, ok: bool) -> Message | None:
        """REPLY_ACK: a u64 status when the front end asked for one (0 = success)."""
        if not msg.need_reply or msg.request in _REPLY_REQUESTS:
            return None
        return Message(msg.request, VHOST_USER_VERSION | VHOST_USER_REPLY_MASK,
                       U64.pack(0 if ok else 1))

    # ---- payload helpers ----

    @staticmethod
    def _payload(msg: Message, st: struct.Struct) -> tuple:
        if len(msg.payload) < st.size:
            raise MessageError(f"payload of {len(msg.payload)} bytes, expected {st.size}")
        return st.unpack_from(msg.payload)

    @staticmethod
    def _no_fds(msg: Message) -> None:
        if msg.fds:
            raise MessageError(f"unexpected {len(msg.fds)} file descriptor(s)")

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise MessageError(f"queue index {index} out of range (device has {len(self.vrings)})")
        return self.vrings[index]

    def _fd_message(self, msg: Message) -> tuple[Vring, int]:
        """SET_VRING_KICK/CALL/ERR: a u64 with the index and a 'no fd' bit, plus 0 or 1 fd."""
        (value,) = self._payload(msg, U64)
        vring = self._vring(value & VHOST_USER_VRING_IDX_MASK)
        nofd = bool(value & VHOST_USER_VRING_NOFD_MASK)
        expected = 0 if nofd else 1
        if len(msg.fds) != expected:
            raise MessageError(f"queue {vring.index}: expected {expected} fd(s), got {len(msg.fds)}")
        fd = -1 if nofd else msg.fds[0]
        if fd >= 0 and not _is_eventfd(fd):
            raise MessageError(f"queue {vring.index}: the fd is not an eventfd")
        if fd >= 0:
            msg.fds.pop()
        return vring, fd

    # ---- feature negotiation ----

    def get_features(self, msg: Message) -> bytes:
        return U64.pack(self.features_offered)

    def set_features(self, msg: Message) -> None:
        self._no_fds(msg)
        (features,) = self._payload(msg, U64)
        unknown = features & ~self.features_offered
        if unknown:
            raise MessageError(f"features {unknown:#x} were not offered")
        if (features ^ self.features) & IOMMU_PLATFORM and any(v.running for v in self.vrings):
            raise MessageError("VIRTIO_F_IOMMU_PLATFORM cannot change while queues run")
        logging_was = self._logging()
        self.features = features
        for vring in self.vrings:
            if not vring.running:
                self._apply_iommu(vring)
        log.info("features acked: %s", " ".join(
            "VHOST_F_LOG_ALL" if name == f"bit{VHOST_F_LOG_ALL}" else name
            for name in vb.feature_names(features & ~(1 << VHOST_USER_F_PROTOCOL_FEATURES))))
        if self._logging() != logging_was:
            # LOG_ALL comes and goes while the rings run (migration starts, is cancelled):
            # only the queues' log changes, never their ring state.
            for vring in self.vrings:
                self._apply_log(vring)
            log.info("dirty logging %s", "on" if self._logging() else "off")

    def get_protocol_features(self, msg: Message) -> bytes:
        return U64.pack(self.protocol_features_offered)

    def set_protocol_features(self, msg: Message) -> None:
        self._no_fds(msg)
        (features,) = self._payload(msg, U64)
        unknown = features & ~self.protocol_features_offered
        if unknown:
            raise MessageError(f"protocol features {unknown:#x} were not offered")
        self.protocol_features = features

    def set_owner(self, msg: Message) -> None:
        self.owner = True

    def reset_owner(self, msg: Message) -> None:
        """Deprecated RESET_OWNER: disable every ring (the spec warns against discarding
        connection state here)."""
        for vring in self.vrings:
            self._stop(vring)
            vring.enabled = False

    def reset_device(self, msg: Message) -> None:
        """RESET_DEVICE: back to the state of a fresh connection."""
        for vring in self.vrings:
            self._stop(vring)
            vring.close_fds()
            vring.num, vring.addr, vring.base, vring.packed = 0, None, 0, False
            vring.enabled = vring.started = False
        self._free_mem()
        self._free_log()
        self._reset_state()
        self._replace_iotlb(lib.dp_iotlb_new(), 0, 0)
        for vring in self.vrings:
            self._apply_iommu(vring)

    def get_queue_num(self, msg: Message) -> bytes:
        return U64.pack(self.num_queues)

    @property
    def _protocol_features_acked(self) -> bool:
        return bool(self.features & (1 << VHOST_USER_F_PROTOCOL_FEATURES))

    @property
    def packed(self) -> bool:
        """The rings are packed (the format is chosen at every SET_FEATURES)."""
        return bool(self.features & (1 << vb.VIRTIO_F_RING_PACKED))

    def _vq_flags(self) -> int:
        flags = 0
        if self.features & (1 << vb.VIRTIO_RING_F_EVENT_IDX):
            flags |= lib.DP_VQ_F_EVENT_IDX
        if self.features & (1 << vb.VIRTIO_RING_F_INDIRECT_DESC):
            flags |= lib.DP_VQ_F_INDIRECT
        if self.packed:
            flags |= lib.DP_VQ_F_PACKED
        return flags

    def _check_ring_size(self, what: str, num: int) -> None:
        """Split rings: a power of two; packed rings: any size (virtio 1.2, 2.8.10.1)."""
        if not 0 < num <= MAX_QUEUE_SIZE or (not self.packed and num & (num - 1)):
            rule = "up to" if self.packed else "is not a power of 2 up to"
            raise MessageError(f"{what}: size {num} {rule} {MAX_QUEUE_SIZE}"
                               + (" is out of range" if self.packed else ""))

    # ---- memory ----

    def set_mem_table(self, msg: Message) -> None:
        nregions, _ = self._payload(msg, MEMORY_HEADER)
        if not 1 <= nregions <= VHOST_MEMORY_BASELINE_NREGIONS:
            raise MessageError(f"{nregions} memory regions (1 to {VHOST_MEMORY_BASELINE_NREGIONS}"
                               " allowed; more with ADD_MEM_REG)")
        if len(msg.payload) < MEMORY_HEADER.size + nregions * MEMORY_REGION.size:
            raise MessageError(f"payload too short for {nregions} regions")
        if len(msg.fds) != nregions:
            raise MessageError(f"{nregions} regions but {len(msg.fds)} fds")
        mem = lib.dp_mem_new()
        try:
            for i in range(nregions):
                gpa, size, uva, offset = MEMORY_REGION.unpack_from(
                    msg.payload, MEMORY_HEADER.size + i * MEMORY_REGION.size)
                rc = lib.dp_mem_map_region(mem, msg.fds[i], gpa, size, uva, offset)
                if rc < 0:
                    raise MessageError(
                        f"region {i} (gpa {gpa:#x} size {size:#x} uva {uva:#x} offset {offset:#x}):"
                        f" {os.strerror(-rc)}")
        except BaseException:
            lib.dp_mem_free(mem)
            raise
        finally:
            close_fds(msg.fds)   # the mappings keep the memory alive

        # Quiesce the running queues, swap the table, resume (rings re-translated).
        running = [v for v in self.vrings if v.running]
        for vring in running:
            self._stop(vring)
        old, self.mem = self.mem, mem
        for vring in self.vrings:
            rc = lib.dp_vq_set_mem(vring.handle, mem)
            if rc < 0 and vring.addr is not None:
                log.error("vq%d: rings not inside the new memory table (%s)", vring.index,
                          os.strerror(-rc))
        if old is not None:
            lib.dp_mem_free(old)
        for vring in running:
            self._maybe_start(vring)
        log.info("memory table: %d region(s), %d MiB%s", nregions,
                 sum(MEMORY_REGION.unpack_from(msg.payload, MEMORY_HEADER.size + i * 32)[1]
                     for i in range(nregions)) >> 20,
                 f", {len(running)} queue(s) resumed" if running else "")

    # ---- memory slots (CONFIGURE_MEM_SLOTS): one region at a time, while the rings run ----

    def get_max_mem_slots(self, msg: Message) -> bytes:
        self._no_fds(msg)
        return U64.pack(MAX_MEM_REGIONS)   # never less across reconnects: a constant

    def _mem_reg(self, msg: Message) -> tuple[int, int, int, int]:
        if not self.protocol_features & MEM_SLOTS:
            raise MessageError("CONFIGURE_MEM_SLOTS was not negotiated")
        _, gpa, size, uva, offset = self._payload(msg, MEM_REG)
        return gpa, size, uva, offset

    def add_mem_reg(self, msg: Message) -> None:
        gpa, size, uva, offset = self._mem_reg(msg)
        if len(msg.fds) != 1:
            raise MessageError(f"expected 1 fd, got {len(msg.fds)}")
        new = lib.dp_mem_clone(self.mem) if self.mem is not None else lib.dp_mem_new()
        if new == ffi.NULL:
            raise DeviceError("out of memory for a memory table")
        rc = lib.dp_mem_map_region(new, msg.fds[0], gpa, size, uva, offset)
        close_fds(msg.fds)   # the mapping keeps the memory alive
        if rc < 0:
            lib.dp_mem_free(new)
            raise MessageError(f"region gpa {gpa:#x} size {size:#x} uva {uva:#x} offset {offset:#x}:"
                               f" {os.strerror(-rc)}"
                               + (f" ({MAX_MEM_REGIONS} slots)" if rc == -errno.ENOSPC else ""))
        # Nothing points into a region that did not exist: the queues swap tables at once.
        self._publish_mem(new, drain=False)
        log.info("memory: added gpa %#x, %d MiB (%d region(s))", gpa, size >> 20,
                 lib.dp_mem_region_count(new))

    def rem_mem_reg(self, msg: Message) -> None:
        gpa, size, uva, _ = self._mem_reg(msg)
        close_fds(msg.fds)   # QEMU 7.2 sends none; a later front end may send the region's fd
        if self.mem is None:
            raise MessageError("no memory table")
        new = lib.dp_mem_clone(self.mem)
        if new == ffi.NULL:
            raise DeviceError("out of memory for a memory table")
        if lib.dp_mem_remove_region(new, gpa, size, uva) < 0:
            lib.dp_mem_free(new)
            raise MessageError(f"no region gpa {gpa:#x} size {size:#x} uva {uva:#x}")
        # Running queues keep serving; the swap is acknowledged once the requests they had
        # popped (which may point into the region) have completed. Then the region is unmapped.
        waited = self._publish_mem(new, drain=True)
        log.info("memory: removed gpa %#x, %d MiB (%d region(s) left; %.2f ms for requests in"
                 " flight)", gpa, size >> 20, lib.dp_mem_region_count(new), waited * 1e3)

    def _publish_mem(self, new: object, drain: bool) -> float:
        """Make `new` every queue's table (running ones swap it on their thread), then free the
        old one, which no queue uses any more. Returns the seconds the swap took."""
        vqs = ffi.new("struct dp_vq *[]", [v.handle for v in self.vrings])
        t0 = time.monotonic()
        rc = lib.dp_vqs_set_mem(vqs, len(self.vrings), new, int(drain))
        waited = time.monotonic() - t0
        old, self.mem = self.mem, new
        if old is not None:
            lib.dp_mem_free(old)
        if rc < 0:
            log.error("a queue's rings are not inside the new memory table (%s): queue stopped",
                      os.strerror(-rc))
        return waited

    # ---- dirty log (LOG_SHMFD, VHOST_F_LOG_ALL): live migration ----

    def _logging(self) -> bool:
        return bool(self.features & (1 << VHOST_F_LOG_ALL)) and self.log is not None and self.dirty_log

    def _apply_log(self, vring: Vring) -> None:
        """Point a queue at what it must log into now (safe while it runs)."""
        on = self._logging()
        log_used = on and bool(vring.addr_flags & VHOST_VRING_F_LOG)
        check(lib.dp_vq_set_log(vring.handle, self.log.handle if on else ffi.NULL, int(log_used),
                                vring.log_addr), f"vq{vring.index}: dirty log")

    def set_log_base(self, msg: Message) -> bytes:
        """Map the new log, move every queue onto it, and only then reply: the front end frees
        the old log as soon as it has the reply."""
        if not self.protocol_features & LOG_SHMFD:
            raise MessageError("LOG_SHMFD was not negotiated (a log without an fd is not supported)")
        size, offset = self._payload(msg, LOG)
        if len(msg.fds) != 1:
            raise MessageError(f"expected 1 fd, got {len(msg.fds)}")
        err = ffi.new("int *")
        handle = lib.dp_log_map(msg.fds[0], size, offset, err)
        if handle == ffi.NULL:
            raise MessageError(f"cannot map a log of {size} bytes at offset {offset}:"
                               f" {os.strerror(-err[0])}")
        old, self.log = self.log, DirtyLog(handle, size)
        for vring in self.vrings:
            self._apply_log(vring)
        if old is not None:
            old.close()
        log.info("dirty log: %d bytes (guest-physical memory up to %d MiB)%s", size,
                 size * 8 * VHOST_LOG_PAGE >> 20, "" if self.dirty_log else
                 " (--debug-no-dirty-log: nothing will be logged)")
        return U64.pack(0)

    # ---- vIOMMU (VIRTIO_F_IOMMU_PLATFORM): the device IOTLB and the back-end channel ----

    @property
    def iommu_on(self) -> bool:
        """Ring and descriptor addresses are IOVAs (VIRTIO_F_IOMMU_PLATFORM negotiated)."""
        return bool(self.features & IOMMU_PLATFORM)

    def _iommu_used(self) -> bool:
        c = self.iotlb_counters
        return self.iommu_on or bool(c.updates or c.invalidations or c.refused)

    def _apply_iommu(self, vring: Vring) -> None:
        """A stopped queue translates through the IOTLB when the vIOMMU is on, else not."""
        on = self.iommu_on
        check(lib.dp_vq_set_iommu(vring.handle, self.iommu if on else ffi.NULL,
                                  self.iotlb if on else ffi.NULL), f"vq{vring.index}: vIOMMU")

    def _set_backend_fd(self, fd: int) -> None:
        old, self.backend_fd = self.backend_fd, fd
        if self.iommu != ffi.NULL:
            lib.dp_iommu_set_channel(self.iommu, fd)   # no queue writes to old after this
        if old >= 0:
            os.close(old)

    def set_backend_req_fd(self, msg: Message) -> None:
        """SET_BACKEND_REQ_FD (BACKEND_REQ): the back end's end of a socket pair, on which the
        queues send IOTLB misses (VHOST_USER_BACKEND_IOTLB_MSG)."""
        if not self.protocol_features & BACKEND_REQ:
            raise MessageError("BACKEND_REQ was not negotiated")
        if len(msg.fds) != 1:
            raise MessageError(f"expected 1 fd, got {len(msg.fds)}")
        if not stat.S_ISSOCK(os.fstat(msg.fds[0]).st_mode):
            raise MessageError("the back-end channel is not a socket")
        self._set_backend_fd(msg.fds.pop())
        log.info("back-end channel open (IOTLB misses go out on it)")

    def iotlb_msg(self, msg: Message) -> None:
        """IOTLB_MSG: an UPDATE or an INVALIDATE of the device IOTLB, acknowledged once every
        queue has the new snapshot (an invalidation: once no queue can use the range)."""
        self._no_fds(msg)
        if not self.iommu_on:
            raise MessageError("VIRTIO_F_IOMMU_PLATFORM was not negotiated")
        iova, size, uaddr, perm, type_ = self._payload(msg, IOTLB_MSG)
        try:
            if type_ == IotlbType.UPDATE:
                self._iotlb_update(iova, size, uaddr, perm)
            elif type_ == IotlbType.INVALIDATE:
                self._iotlb_invalidate(iova, size)   # uaddr and perm are stack garbage here
            else:
                name = IotlbType(type_).name if type_ in IotlbType._value2member_map_ else type_
                raise MessageError(f"IOTLB message of type {name} from the front end")
        except MessageError:
            self.iotlb_counters.refused += 1
            raise

    def _iotlb_update(self, iova: int, size: int, uaddr: int, perm: int) -> None:
        # (QEMU sends one per miss, and a guest in strict mode makes one per request: the
        # path is kept short)
        if self.iotlb_check:
            if size == 0 or iova + size - 1 >= 1 << 64 or uaddr + size - 1 >= 1 << 64:
                problem = "empty, or past the end of the address space"
            elif perm not in (1, 2, 3):
                problem = "permission must be 1 (RO), 2 (WO) or 3 (RW)"
            elif self.mem is None or lib.dp_mem_uva_to_host(self.mem, uaddr, size) == ffi.NULL:
                problem = "not inside one memory region"   # the spec: within the regions
            else:
                problem = ""
            if problem:
                raise MessageError(f"IOTLB update iova {iova:#x} size {size:#x} uaddr"
                                   f" {uaddr:#x} perm {perm}: {problem}")
        new = lib.dp_iotlb_update(self.iotlb, iova, size, uaddr, perm, int(not self.iotlb_check),
                                  self._err)
        if new == ffi.NULL:
            raise MessageError(f"IOTLB update iova {iova:#x} size {size:#x}:"
                               f" {os.strerror(-self._err[0])}")
        rc = lib.dp_vqs_update_iotlb(self._vq_array, len(self.vrings), new, iova, size)
        self._swap_iotlb(new, rc)
        self.iotlb_counters.updates += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("IOTLB update iova %#x size %#x uaddr %#x perm %d (%d entries)", iova, size,
                      uaddr, perm, lib.dp_iotlb_count(new))
        if self._waiting_rings:
            for vring in self.vrings:
                if vring.waiting_iotlb:
                    self._maybe_start(vring)

    @property
    def _waiting_rings(self) -> bool:
        return any(v.waiting_iotlb for v in self.vrings)

    def _iotlb_invalidate(self, iova: int, size: int) -> None:
        # size may reach 2^64 - iova: QEMU's "everything" arrives as iova + size == 2^64.
        if size == 0 or iova + size - 1 >= 1 << 64:
            raise MessageError(f"IOTLB invalidate iova {iova:#x} size {size:#x}: empty, or past"
                               " the end of the address space")
        new = lib.dp_iotlb_invalidate(self.iotlb, iova, size, self._err)
        if new == ffi.NULL:
            raise MessageError(f"IOTLB invalidate iova {iova:#x} size {size:#x}:"
                               f" {os.strerror(-self._err[0])}")
        self._replace_iotlb(new, iova, size)
        self.iotlb_counters.invalidations += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("IOTLB invalidate iova %#x size %#x (%d entries left)", iova, size,
                      lib.dp_iotlb_count(new))

    def _replace_iotlb(self, new: object, inval_iova: int, inval_size: int) -> None:
        """Publish new to every queue (an invalidation: returns once none can use the range)."""
        rc = lib.dp_vqs_set_iotlb(self._vq_array, len(self.vrings), new, self.iotlb, inval_iova,
                                  inval_size)
        self._swap_iotlb(new, rc)

    def _swap_iotlb(self, new: object, rc: int) -> None:
        """new is the snapshot now; the old one goes with the last queue that moves off it."""
        old, self.iotlb = self.iotlb, new
        lib.dp_iotlb_free(old)
        if rc < 0:
            log.error("publishing the IOTLB: %s", os.strerror(-rc))

    # ---- vrings ----

    def set_vring_num(self, msg: Message) -> None:
        self._no_fds(msg)
        index, num = self._payload(msg, VRING_STATE)
        vring = self._vring(index)
        if vring.running:
            raise MessageError(f"queue {index} is running")
        self._check_ring_size(f"queue {index}", num)
        check(lib.dp_vq_set_flags(vring.handle, self._vq_flags()), f"vq{index}: SET_VRING_NUM")
        check(lib.dp_vq_set_num(vring.handle, num), f"vq{index}: SET_VRING_NUM")
        vring.num = num

    def set_vring_addr(self, msg: Message) -> None:
        self._no_fds(msg)
        index, flags, desc, used, avail, log_addr = self._payload(msg, VRING_ADDR)
        vring = self._vring(index)
        if flags & ~VHOST_VRING_F_LOG:
            raise MessageError(f"queue {index}: unknown ring address flags {flags:#x}")
        if vring.running:
            # A migration starting or ending re-sends the same addresses with the log flag
            # changed: the ring keeps running, only what it logs changes.
            if (desc, avail, used) != vring.addr:
                raise MessageError(f"queue {index} is running: its ring addresses cannot change")
            vring.addr_flags, vring.log_addr = flags, log_addr
            self._apply_log(vring)
            return
        vring.addr_flags, vring.log_addr = flags, log_addr
        if self.mem is not None and vring.num:
            check(lib.dp_vq_set_flags(vring.handle, self._vq_flags()), f"vq{index}: SET_VRING_ADDR")
            self._apply_iommu(vring)
            rc = lib.dp_vq_set_addr(vring.handle, self.mem, desc, avail, used)
            if rc == -errno.EAGAIN:
                # IOVAs the IOTLB does not have yet: the misses are out, the queue starts once
                # the UPDATEs are in.
                log.debug("vq%d: rings not in the IOTLB yet (desc %#x avail %#x used %#x)",
                          index, desc, avail, used)
            elif rc < 0:
                raise MessageError(
                    f"queue {index}: ring addresses desc={desc:#x} avail={avail:#x} used={used:#x}"
                    f" are not inside guest memory ({os.strerror(-rc)})")
        vring.addr = (desc, avail, used)

    def set_vring_base(self, msg: Message) -> None:
        self._no_fds(msg)
        index, num = self._payload(msg, VRING_STATE)
        vring = self._vring(index)
        if vring.running:
            raise MessageError(f"queue {index} is running")
        if self.packed:
            # bits 0-14 next avail, 15 its wrap counter, 16-30 next used, 31 its wrap counter
            avail_idx, used_idx = num & 0x7FFF, (num >> 16) & 0x7FFF
            if vring.num and max(avail_idx, used_idx) >= vring.num:
                raise MessageError(f"queue {index}: packed base {num:#010x} (avail {avail_idx},"
                                   f" used {used_idx}) beyond the ring of {vring.num}")
            vring.base, vring.packed = num, True
            check(lib.dp_vq_set_packed_base(vring.handle, num), f"vq{index}: SET_VRING_BASE")
            return
        if num > 0xFFFF:
            raise MessageError(f"queue {index}: base {num} does not fit a split ring index")
        vring.base, vring.packed = num, False
        check(lib.dp_vq_set_base(vring.handle, num), f"vq{index}: SET_VRING_BASE")

    def get_vring_base(self, msg: Message) -> bytes:
        self._no_fds(msg)
        index, _ = self._payload(msg, VRING_STATE)
        vring = self._vring(index)
        self._stop(vring)
        vring.started = False
        vring.waiting_iotlb = False
        vring.base = (lib.dp_vq_packed_base(vring.handle) if vring.packed
                      else lib.dp_vq_last_avail_idx(vring.handle))
        # The ring is stopped: forget the kick fd, a restart sends a new one.
        if vring.kick_fd is not None and vring.kick_fd >= 0:
            os.close(vring.kick_fd)
        vring.kick_fd = None
        return VRING_STATE.pack(index, vring.base)

    def set_vring_kick(self, msg: Message) -> None:
        vring, fd = self._fd_message(msg)
        was_running = vring.running
        self._stop(vring)
        if vring.kick_fd is not None and vring.kick_fd >= 0:
            os.close(vring.kick_fd)
        vring.kick_fd = fd
        vring.started = True
        if not self._protocol_features_acked:
            vring.enabled = True   # without PROTOCOL_FEATURES a ring starts enabled
        self._maybe_start(vring, quiet=was_running)

    def set_vring_call(self, msg: Message) -> None:
        vring, fd = self._fd_message(msg)
        check(lib.dp_vq_set_call_fd(vring.handle, fd), f"vq{vring.index}: SET_VRING_CALL")
        if vring.call_fd >= 0:
            os.close(vring.call_fd)
        vring.call_fd = fd

    def set_vring_err(self, msg: Message) -> None:
        vring, fd = self._fd_message(msg)
        was_running = vring.running
        self._stop(vring, quiet=True)
        check(lib.dp_vq_set_err_fd(vring.handle, fd), f"vq{vring.index}: SET_VRING_ERR")
        if vring.err_fd >= 0:
            os.close(vring.err_fd)
        vring.err_fd = fd
        if was_running:
            self._maybe_start(vring, quiet=True)

    def set_vring_enable(self, msg: Message) -> None:
        self._no_fds(msg)
        index, enable = self._payload(msg, VRING_STATE)
        vring = self._vring(index)
        if enable not in (0, 1):
            raise MessageError(f"queue {index}: enable must be 0 or 1, got {enable}")
        vring.enabled = bool(enable)
        if vring.enabled:
            self._maybe_start(vring)
        else:
            self._stop(vring)

    # ---- inflight tracking (reconnect without losing requests) ----

    def _inflight_payload(self, msg: Message) -> tuple[int, int, int, int]:
        if not self.protocol_features & (1 << ProtocolFeature.INFLIGHT_SHMFD):
            raise MessageError("INFLIGHT_SHMFD was not negotiated")
        if len(msg.payload) < INFLIGHT_MIN_SIZE:
            raise MessageError(f"payload of {len(msg.payload)} bytes, expected {INFLIGHT_MIN_SIZE}")
        size, offset, num_queues, queue_size = struct.unpack_from("<QQHH", msg.payload)
        if not 0 < num_queues <= self.num_queues:
            raise MessageError(f"{num_queues} queues (the device has {self.num_queues})")
        self._check_ring_size("inflight buffer", queue_size)
        return size, offset, num_queues, queue_size

    def get_inflight_fd(self, msg: Message) -> Message:
        """Allocate a fresh, zeroed buffer for the ring format SET_FEATURES chose; the front
        end keeps it across our restarts."""
        self._no_fds(msg)
        _, _, num_queues, queue_size = self._inflight_payload(msg)
        per_queue = inflight_queue_size(queue_size, self.packed)
        size = per_queue * num_queues
        fd = os.memfd_create("dataplane-inflight", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            if not self.packed:   # version 1, desc_num (spec's QueueRegionSplit)
                for q in range(num_queues):
                    os.pwrite(fd, struct.pack("<HH", 1, queue_size), q * per_queue + 8)
            # QueueRegionPacked stays at version 0 (uninitialised) until its queue starts: the
            # region's ring position is the queue's base then.
        except OSError:
            os.close(fd)
            raise
        log.info("inflight buffer: %d queue(s) of %d descriptors, %d bytes (%s rings)",
                 num_queues, queue_size, size, "packed" if self.packed else "split")
        return Message(msg.request, VHOST_USER_VERSION | VHOST_USER_REPLY_MASK,
                       INFLIGHT.pack(size, 0, num_queues, queue_size), [fd])

    def set_inflight_fd(self, msg: Message) -> None:
        size, offset, num_queues, queue_size = self._inflight_payload(msg)
        if len(msg.fds) != 1:
            raise MessageError(f"expected 1 fd, got {len(msg.fds)}")
        needed = inflight_queue_size(queue_size, self.packed) * num_queues
        if size < needed:
            raise MessageError(f"buffer of {size} bytes, {needed} needed"
                               f" ({'packed' if self.packed else 'split'} rings)")
        if any(v.running for v in self.vrings):
            raise MessageError("queues are running")
        st = os.fstat(msg.fds[0])
        addr = lib.dp_map_shared(msg.fds[0], size, offset)
        if addr == ffi.NULL:
            raise MessageError(f"cannot map the inflight buffer ({size} bytes at {offset})")
        self._free_inflight()
        self.inflight = InflightBuffer(addr, size, num_queues, queue_size, self.packed,
                                       (st.st_dev, st.st_ino))

    # ---- config space ----

    def config_bytes(self) -> bytes:
        return vb.config_space(
            capacity_sectors=self.disk.capacity_sectors, seg_max=SEG_MAX,
            blk_size=self.disk.logical_block_size,
            physical_block_size=self.disk.physical_block_size,
            min_io_size=self.disk.min_io_size, opt_io_size=self.disk.opt_io_size,
            writeback=self.disk.writeback, num_queues=self.num_queues,
            max_discard_sectors=MAX_DISCARD_SECTORS, max_discard_seg=MAX_DISCARD_SEG)

    def get_config(self, msg: Message) -> bytes:
        self._no_fds(msg)
        offset, size, flags = self._payload(msg, CONFIG_HEADER)
        if size > VHOST_USER_MAX_CONFIG_SIZE or offset + size > VHOST_USER_MAX_CONFIG_SIZE:
            raise MessageError(f"config range {offset}+{size} beyond {VHOST_USER_MAX_CONFIG_SIZE}")
        space = self.config_bytes().ljust(VHOST_USER_MAX_CONFIG_SIZE, b"\0")
        return CONFIG_HEADER.pack(offset, size, flags) + space[offset: offset + size]

    def set_config(self, msg: Message) -> None:
        self._no_fds(msg)
        offset, size, _flags = self._payload(msg, CONFIG_HEADER)
        data = msg.payload[CONFIG_HEADER.size: CONFIG_HEADER.size + size]
        if len(data) != size:
            raise MessageError(f"SET_CONFIG announces {size} bytes, carries {len(data)}")
        current = self.config_bytes()
        for i, byte in enumerate(data, start=offset):
            if i == vb.CONFIG_WRITEBACK_OFFSET:
                if not self.features & (1 << vb.VIRTIO_BLK_F_CONFIG_WCE):
                    raise MessageError("writeback changed without CONFIG_WCE")
                if byte not in (0, 1):
                    raise MessageError(f"writeback must be 0 or 1, got {byte}")
            elif i >= len(current) or current[i] != byte:
                raise MessageError(f"config byte {i} is read-only")
        if offset <= vb.CONFIG_WRITEBACK_OFFSET < offset + size:
            wce = data[vb.CONFIG_WRITEBACK_OFFSET - offset]
            self.disk.set_writeback(bool(wce))
            log.info("write cache: %s", "writeback" if wce else "writethrough")

    # ---- starting and stopping queues ----

    def _ready(self, vring: Vring) -> bool:
        return (vring.started and vring.enabled and vring.kick_fd is not None
                and vring.addr is not None and vring.num > 0 and self.mem is not None)

    def _maybe_start(self, vring: Vring, quiet: bool = False) -> None:
        if vring.running or not self._ready(vring):
            return
        vq = vring.handle
        desc, avail, used = vring.addr
        what = f"vq{vring.index}"
        if vring.packed != self.packed:
            # No SET_VRING_BASE since the format changed: start where a reset ring starts.
            vring.packed = self.packed
            vring.base = int(lib.DP_VQ_PACKED_BASE_RESET) if self.packed else 0
            log.warning("%s: no base for a %s ring, starting at %#x", what,
                        "packed" if self.packed else "split", vring.base)
            check(lib.dp_vq_set_packed_base(vq, vring.base) if self.packed
                  else lib.dp_vq_set_base(vq, vring.base), what)
        check(lib.dp_vq_set_flags(vq, self._vq_flags()), what)
        check(lib.dp_vq_set_num(vq, vring.num), what)
        self._apply_iommu(vring)
        rc = lib.dp_vq_set_addr(vq, self.mem, desc, avail, used)
        if rc == -errno.EAGAIN:
            if not vring.waiting_iotlb:
                log.info("%s: waiting for the IOTLB to map its rings (desc %#x avail %#x used %#x)",
                         what, desc, avail, used)
            vring.waiting_iotlb = True
            return
        if rc < 0:
            log.error("%s: cannot start, rings outside guest memory (%s)", what, os.strerror(-rc))
            return
        vring.waiting_iotlb = False
        check(lib.dp_vq_set_kick_fd(vq, vring.kick_fd), what)
        check(lib.dp_vq_set_call_fd(vq, vring.call_fd), what)
        check(lib.dp_vq_set_err_fd(vq, vring.err_fd), what)
        restored = self._attach_inflight(vring)
        self._apply_log(vring)
        engine = self.engines.engine_for(vring.index)
        rc = lib.dp_vq_start(vq, engine)
        if rc == -errno.EAGAIN:   # an invalidation in between took a ring away: asked again
            vring.waiting_iotlb = True
            return
        check(rc, f"{what}: start")
        vring.running = True
        packed = vring.packed
        started_at = lib.dp_vq_started_at(vq)   # the engine may have popped since
        if packed and self.inflight is not None:
            self._inflight_live.add((self.inflight.key, vring.index))
            base = started_at
            if restored and base != vring.base:
                log.warning("%s: packed ring position %#010x from the inflight region (the front"
                            " end's base %#010x is stale after a back-end restart)", what, base,
                            vring.base)
        stats = self._vq_stats(vring)
        if stats.fixed_error and stats.fixed_error != self._fixed_error_told:
            # once per errno and session: every queue of an engine meets the same refusal
            self._fixed_error_told = stats.fixed_error
            log.warning("%s: guest memory not registered with io_uring as fixed buffers (%s%s): "
                        "reads and writes of it go out as readv/writev", what,
                        errno.errorcode.get(stats.fixed_error, stats.fixed_error),
                        ", RLIMIT_MEMLOCK too small for it without CAP_IPC_LOCK"
                        if stats.fixed_error == errno.ENOMEM else "")
        if stats.resubmitted:
            log.warning("%s: resubmitted %d request(s) in flight at the previous back end's end"
                        " (%d of them older than a request that had completed)", what,
                        stats.resubmitted, stats.recovered_out_of_order)
        if not quiet:
            position = (f"packed ring, base {started_at:#010x}" if packed
                        else f"avail_idx {started_at}")
            iopoll = self.disk.iopoll_state
            if iopoll < 0 and iopoll != self._iopoll_error_told:
                self._iopoll_error_told = iopoll
                log.warning("%s: --iopoll: the kernel refused a polled ring (%s): interrupt-driven I/O",
                            what, errno.errorcode.get(-iopoll, -iopoll))
            log.info("%s started: size %d, %s, thread %s%s%s%s", what, vring.num, position,
                     self.engines.name_for(vring.index),
                     "" if vring.kick_fd >= 0 else ", polling (no kick fd)",
                     f", {stats.fixed_buffers} fixed buffer(s)" if stats.fixed_buffers else "",
                     ", polled I/O (IOPOLL)" if iopoll > 0 else "")

    def _attach_inflight(self, vring: Vring) -> bool:
        """Give the queue its region; returns whether it counts as a previous back end's.

        A split ring's region is reconciled with the used ring at every start (harmless on a
        region of this session). A packed ring also takes its position from a previous back
        end's region, since the front end's base is stale then; but after a start in this
        session the region is ours, drained by GET_VRING_BASE, and the base the front end
        sends is the truth (it may have reset the ring)."""
        buf = self.inflight
        region = buf.region(vring.index) if buf is not None else None
        if region is not None and buf.queue_size != vring.num:
            log.error("vq%d: inflight buffer is for %d descriptors, the ring has %d: not tracked",
                      vring.index, buf.queue_size, vring.num)
            region = None
        if region is not None and buf.packed != self.packed:
            log.error("vq%d: inflight buffer laid out for %s rings, the ring is %s: not tracked",
                      vring.index, "packed" if buf.packed else "split",
                      "packed" if self.packed else "split")
            region = None
        restored = region is not None and not (
            self.packed and (buf.key, vring.index) in self._inflight_live)
        check(lib.dp_vq_set_inflight(vring.handle, region if region is not None else ffi.NULL,
                                     1 if restored or not self.packed else 0),
              f"vq{vring.index}: inflight")
        return restored

    @staticmethod
    def _vq_stats(vring: Vring) -> object:
        s = ffi.new("struct dp_vq_stats *")
        lib.dp_vq_get_stats(vring.handle, s)
        return s

    def _stop(self, vring: Vring, quiet: bool = False) -> None:
        if not vring.running:
            return
        idx = check(lib.dp_vq_stop(vring.handle), f"vq{vring.index}: stop")
        vring.running = False
        if not quiet:
            s = self._vq_stats(vring)
            log.info("vq%d stopped at avail_idx %d: %d requests (%d reads, %d writes, %d flushes,"
                     " %d discards, %d write-zeroes), %d errors%s", vring.index, idx, s.requests,
                     s.reads, s.writes, s.flushes, s.discards, s.write_zeroes, s.errors,
                     ", ring broken" if s.broken else "")


# Requests whose reply carries data (their failure is an empty reply, not a REPLY_ACK).
_REPLY_REQUESTS = {
    Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.GET_QUEUE_NUM,
    Request.GET_VRING_BASE, Request.GET_CONFIG, Request.GET_INFLIGHT_FD,
    Request.GET_MAX_MEM_SLOTS, Request.GET_STATUS,
}
