"""vhost-user frontend: play the guest against any vhost-user-blk backend, no VM needed.

`Device.connect(path, queues=N)` negotiates like QEMU does, shares a memfd as guest memory,
sets up N virtqueues (split, or packed with `ring="packed"` when the backend offers
VIRTIO_F_RING_PACKED) and exposes blocking and batched virtio-blk I/O:

    with Device.connect("/tmp/vhost.sock", queues=2) as dev:
        dev.write(0, b"x" * 4096)
        assert dev.read(0, 4096) == b"x" * 4096

The ring producer here is Python (fine for tests and small jobs); hostile-chain tests reach
for `Vring.add_chain` / raw descriptors directly.

Like QEMU, the frontend negotiates INFLIGHT_SHMFD when the backend offers it and keeps the
inflight buffer, so that it can play QEMU's part when a backend dies and a new one takes its
place on the socket: `dev.reconnect()` renegotiates, re-sends the memory table and the kept
buffer, and restarts each ring at its used index, leaving the requests still in flight in
guest memory to the new backend (which resubmits them from the buffer). A split ring restarts
at its used index; a packed ring at the last base the frontend knew (there is no index in
shared memory to rewind to, so QEMU re-sends a stale one and the backend must take the ring's
position from the inflight buffer).

It also plays QEMU's parts in live migration and memory hotplug, so both are tested without
a VM and against any backend: `dev.start_dirty_log()` shares a dirty log (SET_LOG_BASE, then
LOG_ALL, then VHOST_VRING_F_LOG per ring, while the rings run) and `dev.take_dirty_pages()`
harvests it; with CONFIGURE_MEM_SLOTS the memory table goes region by region (ADD_MEM_REG),
`connect(regions=N)` splits guest memory into N of them, and `dev.add_memory()` /
`dev.remove_memory()` hot-plug more while the rings run.
"""

from __future__ import annotations

import mmap
import os
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..core import ffi, lib
from ..errors import DeviceError, ProtocolError
from ..protocol import virtio_blk as vb
from ..protocol.vhost_user import (
    VHOST_F_LOG_ALL,
    VHOST_LOG_PAGE,
    VHOST_MEMORY_BASELINE_NREGIONS,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_VRING_F_LOG,
    VRING_STATE,
    ProtocolFeature,
    Request,
)
from .client import InflightBuffer, VhostUserClient
from .iommu import RO, WO, Iommu
from .packed import PackedVring
from .vring import Dma, GuestMemory, Vring, _Area

if TYPE_CHECKING:
    from .load import Job, LoadResult, VerifyState

SECTOR = 512
OUTHDR = struct.Struct("<IIQ")
DISCARD_RANGE = struct.Struct("<QII")

WANTED_PROTOCOL_FEATURES = (
    (1 << ProtocolFeature.MQ) | (1 << ProtocolFeature.REPLY_ACK) | (1 << ProtocolFeature.CONFIG)
    | (1 << ProtocolFeature.INFLIGHT_SHMFD) | (1 << ProtocolFeature.LOG_SHMFD)
    | (1 << ProtocolFeature.CONFIGURE_MEM_SLOTS)
)
BACKEND_REQ_FEATURE = 1 << ProtocolFeature.BACKEND_REQ
REPLY_ACK_FEATURE = 1 << ProtocolFeature.REPLY_ACK
IOMMU_FEATURE = 1 << vb.VIRTIO_F_IOMMU_PLATFORM
INFLIGHT_FEATURE = 1 << ProtocolFeature.INFLIGHT_SHMFD
LOG_SHMFD_FEATURE = 1 << ProtocolFeature.LOG_SHMFD
MEM_SLOTS_FEATURE = 1 << ProtocolFeature.CONFIGURE_MEM_SLOTS
DRIVER_FEATURES = sum(1 << b for b in (
    vb.VIRTIO_F_VERSION_1, vb.VIRTIO_RING_F_INDIRECT_DESC, vb.VIRTIO_RING_F_EVENT_IDX,
    vb.VIRTIO_BLK_F_SEG_MAX, vb.VIRTIO_BLK_F_BLK_SIZE, vb.VIRTIO_BLK_F_FLUSH,
    vb.VIRTIO_BLK_F_TOPOLOGY, vb.VIRTIO_BLK_F_MQ, vb.VIRTIO_BLK_F_CONFIG_WCE,
    vb.VIRTIO_BLK_F_DISCARD, vb.VIRTIO_BLK_F_WRITE_ZEROES, vb.VIRTIO_BLK_F_RO,
    VHOST_USER_F_PROTOCOL_FEATURES,
))
PACKED_FEATURE = 1 << vb.VIRTIO_F_RING_PACKED
RINGS = ("split", "packed")


@dataclass
class BlkRequest:
    """A virtio-blk request in flight: where its pieces live in guest memory (and, mapped per
    request behind a vIOMMU, at which IOVAs)."""

    queue: int
    head: int
    type: int
    hdr: int
    data: int
    data_len: int
    status: int
    buffers: list[int]
    iovas: list[int] = field(default_factory=list)


class DirtyLog:
    """The dirty log shared with the backend (SET_LOG_BASE): a memfd of one bit per 4 KiB
    guest-physical page, which the backend marks and the frontend reads and clears."""

    def __init__(self, size: int) -> None:
        self.size = (size + 7) // 8 * 8
        self.fd = os.memfd_create("dataplane-dirty-log", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.size)
        self.map = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._buf = ffi.from_buffer(self.map)

    @staticmethod
    def size_for(end: int) -> int:
        """Bytes to cover guest-physical memory [0, end), in whole 64-bit words (as QEMU)."""
        pages = (end + VHOST_LOG_PAGE - 1) // VHOST_LOG_PAGE
        return (pages + 63) // 64 * 8

    def take(self) -> set[int]:
        """The pages marked since the last take, cleared (safe while the backend marks it)."""
        words = self.size // 8
        out = ffi.new("uint64_t[]", words)
        lib.dp_log_harvest(self._buf, words, out)
        pages = set()
        for i in range(words):
            w = out[i]
            while w:
                low = w & -w
                pages.add(i * 64 + low.bit_length() - 1)
                w ^= low
        return pages

    def close(self) -> None:
        ffi.release(self._buf)
        self.map.close()
        os.close(self.fd)


class Device:
    """A virtio-blk device behind a vhost-user socket, driven from Python."""

    def __init__(self, client: VhostUserClient, mem: GuestMemory, rings: list[Vring | PackedVring],
                 features: int, config: dict[str, int], path: str = "",
                 inflight: InflightBuffer | None = None, want_inflight: bool = True,
                 timeout: float = 10.0, protocol_features: int = 0, offered: int = 0,
                 iommu: Iommu | None = None, iommu_strict: bool = False) -> None:
        self.client = client
        self.mem = mem
        self.rings = rings
        self.features = features
        self.config = config
        self.capacity = config["capacity"] * SECTOR
        self.block_size = config["blk_size"] or SECTOR
        self.path = path
        self.inflight = inflight            # kept across backend restarts (None: not negotiated)
        self.want_inflight = want_inflight
        self.timeout = timeout
        self.protocol_features = protocol_features
        self.offered = offered              # the backend's virtio features (GET_FEATURES)
        self.dirty_log: DirtyLog | None = None
        self._harvested: set[int] = set()   # pages taken from logs a resize replaced
        self.iommu = iommu                  # the guest's vIOMMU (VIRTIO_F_IOMMU_PLATFORM)
        self.iommu_strict = iommu_strict    # each request's buffers mapped for its lifetime

    @property
    def ring(self) -> str:
        """The ring format negotiated: "packed" or "split"."""
        return "packed" if self.features & PACKED_FEATURE else "split"

    @classmethod
    def connect(cls, path: str, queues: int = 1, queue_size: int = 128,
                memory: int = 64 << 20, features: int = DRIVER_FEATURES,
                timeout: float = 10.0, inflight: bool = True, regions: int = 1,
                ring: str | None = None, iommu: bool = False, iommu_strict: bool = False,
                iommu_push: str = "used") -> Device:
        """Negotiate like QEMU's vhost-user-blk: features, then (when the backend offers
        INFLIGHT_SHMFD and `inflight`) GET_INFLIGHT_FD + SET_INFLIGHT_FD, the memory table
        (`regions` pieces of guest memory: one SET_MEM_TABLE, or one ADD_MEM_REG each when
        the backend offers CONFIGURE_MEM_SLOTS), and the rings. ring: "split" (the default:
        every backend has it) or "packed" (VIRTIO_F_RING_PACKED, which the backend must offer).

        iommu: play a guest behind QEMU's intel-iommu (VIRTIO_F_IOMMU_PLATFORM, with
        BACKEND_REQ and REPLY_ACK): addresses are IOVAs of `dev.iommu` (driver.iommu), guest
        memory mapped in its static window, misses answered; iommu_push: what is sent before
        the rings start ("used": each used ring's page, as QEMU does; "rings": all three areas;
        "none"); iommu_strict: each request's buffers mapped at fresh IOVAs for its lifetime
        (an UPDATE before it is published, an INVALIDATE when it is released), as a guest in
        strict IOMMU mode does."""
        ring = ring or "split"
        if ring not in RINGS:
            raise DeviceError(f"ring {ring!r}: expected one of {', '.join(RINGS)}")
        if iommu_push not in ("used", "rings", "none"):
            raise DeviceError(f"iommu_push {iommu_push!r}: expected used, rings or none")
        features = features | PACKED_FEATURE if ring == "packed" else features & ~PACKED_FEATURE
        if iommu:
            features |= IOMMU_FEATURE
        client = VhostUserClient(path, timeout)
        mem = None
        buf = None
        viommu = None
        rings: list[Vring | PackedVring] = []
        try:
            acked, proto, offered, channel = cls._negotiate(client, queues, features, inflight,
                                                            iommu)
            if ring == "packed" and not acked & PACKED_FEATURE:
                raise DeviceError(f"{path}: the backend does not offer packed rings"
                                  " (VIRTIO_F_RING_PACKED)")
            config = vb.parse_config(client.get_config())
            client.set_u64(Request.SET_FEATURES, acked)
            if proto & INFLIGHT_FEATURE:
                buf = client.get_inflight_fd(queues, queue_size, bool(acked & PACKED_FEATURE))
                client.set_inflight_fd(buf)
            mem = GuestMemory(memory, regions=regions)
            if channel is not None:
                viommu = Iommu(client, mem, channel)
                client.ring_addr = viommu.iova
            cls._send_table(client, proto, mem)
            event_idx = bool(acked & (1 << vb.VIRTIO_RING_F_EVENT_IDX))
            kind = PackedVring if acked & PACKED_FEATURE else Vring
            for i in range(queues):
                vring = kind(mem, i, queue_size, event_idx=event_idx)
                rings.append(vring)
                client.setup_vring(vring, base=vring.reconnect_base())
            if acked & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
                for i in range(queues):
                    client.call(Request.SET_VRING_ENABLE, VRING_STATE.pack(i, 1))
            if viommu is not None:
                cls._push_rings(viommu, rings, iommu_push)
        except BaseException:
            if viommu is not None:
                viommu.close()
            for ring in rings:
                ring.close()
            if mem is not None:
                mem.close()
            if buf is not None:
                buf.close()
            client.close()
            raise
        return cls(client, mem, rings, acked, config, path=str(path), inflight=buf,
                   want_inflight=inflight, timeout=timeout, protocol_features=proto,
                   offered=offered, iommu=viommu, iommu_strict=iommu_strict)

    @staticmethod
    def _push_rings(viommu: Iommu, rings: Sequence[Vring | PackedVring], what: str) -> None:
        """What QEMU sends once the rings are enabled: an UPDATE of each used ring's page
        (vhost_dev_start; the rest comes from the backend's misses); or all of them."""
        for r in rings:
            used = 6 + 8 * r.num if isinstance(r, Vring) else 4
            areas = {"used": [(r.used, used)], "none": []}.get(what) or [
                (r.desc, 16 * r.num), (r.avail, 6 + 2 * r.num if isinstance(r, Vring) else 4),
                (r.used, used)]
            for gpa, size in areas:
                viommu.push(viommu.iova(gpa), size)

    def dma_addr(self, gpa: int) -> int:
        """The address the device is given for guest-physical gpa: its IOVA in the vIOMMU's
        static window, or gpa itself without a vIOMMU."""
        return self.iommu.iova(gpa) if self.iommu is not None else gpa

    def _request_dma(self, iovas: list[int]) -> Dma | None:
        """How a request's addresses are made: none (guest-physical), the static window, or
        (strict) a fresh mapping per buffer, read-only for what the device reads and
        write-only for what it writes, pushed before the request is published."""
        viommu = self.iommu
        if viommu is None:
            return None
        if not self.iommu_strict:
            return lambda gpa, length, writable: viommu.iova(gpa)

        def dma(gpa: int, length: int, writable: bool) -> int:
            iova = viommu.map(gpa, max(length, 1), WO if writable else RO)
            iovas.append(iova)
            viommu.push(iova, max(length, 1))
            return iova

        return dma

    @staticmethod
    def _send_table(client: VhostUserClient, proto: int, mem: GuestMemory) -> None:
        """The memory table, as QEMU sends it: region by region with CONFIGURE_MEM_SLOTS, else
        one SET_MEM_TABLE (at most 8 regions)."""
        table = mem.table()
        if proto & MEM_SLOTS_FEATURE:
            for gpa, size, uva, off, fd in table:
                client.add_mem_reg(gpa, size, uva, off, fd)
            return
        if len(table) > VHOST_MEMORY_BASELINE_NREGIONS:
            raise DeviceError(f"{len(table)} memory regions need CONFIGURE_MEM_SLOTS, which the"
                              " backend does not offer")
        client.set_mem_table(table)

    @staticmethod
    def _negotiate(client: VhostUserClient, queues: int, features: int, inflight: bool,
                   iommu: bool = False) -> tuple[int, int, int, socket.socket | None]:
        """GET_FEATURES .. SET_OWNER; returns (features to ack, protocol features acked,
        features offered, the back-end channel when iommu: opened with SET_BACKEND_REQ_FD
        before SET_OWNER, as QEMU does)."""
        offered = client.get_u64(Request.GET_FEATURES)
        proto = 0
        if iommu and not offered & IOMMU_FEATURE:
            raise DeviceError("the backend does not offer VIRTIO_F_IOMMU_PLATFORM")
        if offered & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
            wanted = WANTED_PROTOCOL_FEATURES & ~(0 if inflight else INFLIGHT_FEATURE)
            if iommu:
                wanted |= BACKEND_REQ_FEATURE
            proto = client.get_u64(Request.GET_PROTOCOL_FEATURES) & wanted
            client.set_u64(Request.SET_PROTOCOL_FEATURES, proto)
            client.reply_ack = bool(proto & (1 << ProtocolFeature.REPLY_ACK))
            if proto & (1 << ProtocolFeature.MQ):
                max_queues = client.get_u64(Request.GET_QUEUE_NUM)
                if queues > max_queues:
                    raise DeviceError(f"backend offers {max_queues} queue(s), {queues} wanted")
        channel = None
        if iommu:
            # QEMU refuses IOMMU support without both (vhost_user_backend_init).
            if proto & (BACKEND_REQ_FEATURE | REPLY_ACK_FEATURE) != BACKEND_REQ_FEATURE | REPLY_ACK_FEATURE:
                raise DeviceError("IOMMU support requires the REPLY_ACK and BACKEND_REQ protocol"
                                  " features, which the backend does not offer")
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                client.call(Request.SET_BACKEND_REQ_FD, b"", [theirs.fileno()])
            except BaseException:
                ours.close()
                raise
            finally:
                theirs.close()
            channel = ours
        try:
            client.call(Request.SET_OWNER)
        except BaseException:
            if channel is not None:
                channel.close()
            raise
        return offered & features, proto, offered, channel

    def reconnect(self, path: str | None = None, timeout: float | None = None) -> None:
        """Play QEMU's part after the backend went away: connect to the backend now listening
        on `path` (default: the same socket; waits up to `timeout` for it to accept),
        renegotiate the same features, re-send the memory table and the kept inflight buffer,
        and restart every ring at its used index (QEMU rewinds last_avail_idx to used_idx when
        GET_VRING_BASE cannot be asked). Requests still in flight stay as they are in guest
        memory: the new backend resubmits them from the inflight buffer. A packed ring gets the
        last base the frontend knew, stale as QEMU's is."""
        path = str(path or self.path)
        timeout = self.timeout if timeout is None else timeout
        if self.client is not None:
            self.client.close()
        if self.iommu is not None:
            self.iommu.close()
        client = self._connect_retrying(path, timeout)
        try:
            acked, proto, offered, channel = self._negotiate(
                client, len(self.rings), self.features, self.want_inflight,
                self.iommu is not None)
            if channel is not None:   # the new backend's IOTLB is empty: a new vIOMMU link
                old = self.iommu
                self.iommu = Iommu(client, self.mem, channel)
                self.iommu.maps = old.maps if old is not None else []
                client.ring_addr = self.iommu.iova
            if acked != self.features:
                raise DeviceError(f"the new backend lacks features {self.features & ~acked:#x}")
            client.set_u64(Request.SET_FEATURES, acked)
            if proto & INFLIGHT_FEATURE:
                if self.inflight is None:   # the previous backend did not track: start now
                    self.inflight = client.get_inflight_fd(len(self.rings), self.rings[0].num,
                                                           self.ring == "packed")
                client.set_inflight_fd(self.inflight)
            self._send_table(client, proto, self.mem)
            for ring in self.rings:
                client.setup_vring(ring, base=ring.reconnect_base())
            if acked & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
                for ring in self.rings:
                    client.call(Request.SET_VRING_ENABLE, VRING_STATE.pack(ring.index, 1))
            if self.iommu is not None:
                self._push_rings(self.iommu, self.rings, "used")
        except BaseException:
            client.close()
            raise
        self.client = client
        self.path = path
        self.protocol_features, self.offered = proto, offered

    @staticmethod
    def _connect_retrying(path: str, timeout: float) -> VhostUserClient:
        """Connect, retrying while the socket is missing or refuses (a backend restarting)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return VhostUserClient(path, timeout)
            except DeviceError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.client is None:
            return
        try:
            for ring in self.rings:
                ring.base = self.client.get_vring_base(ring.index)
        except (OSError, ProtocolError, DeviceError):
            pass
        if self.iommu is not None:
            self.iommu.close()
        self.client.close()
        for ring in self.rings:
            ring.close()
        self.mem.close()
        if self.inflight is not None:
            self.inflight.close()
        if self.dirty_log is not None:
            self.dirty_log.close()
            self.dirty_log = None
        self.client = None  # type: ignore[assignment]

    # -- memory hotplug (CONFIGURE_MEM_SLOTS) --

    def max_mem_slots(self) -> int:
        if not self.protocol_features & MEM_SLOTS_FEATURE:
            return VHOST_MEMORY_BASELINE_NREGIONS
        return self.client.get_u64(Request.GET_MAX_MEM_SLOTS)

    def add_memory(self, size: int, gpa: int | None = None) -> _Area:
        """Hot-plug size bytes of guest memory (a new memfd, at the next GiB boundary unless
        gpa is given) with ADD_MEM_REG, while the rings run; allocate from it with
        dev.mem.alloc(..., area=...). The dirty log grows first when it must (as QEMU does)."""
        if not self.protocol_features & MEM_SLOTS_FEATURE:
            raise DeviceError("the backend does not offer CONFIGURE_MEM_SLOTS")
        area = self.mem.add_area(size, gpa)
        try:
            if self.dirty_log is not None and DirtyLog.size_for(self.mem.end()) > self.dirty_log.size:
                self.resize_dirty_log(DirtyLog.size_for(self.mem.end()))
            self.client.add_mem_reg(area.gpa, area.size, area.user_addr, 0, area.fd)
        except BaseException:
            self.mem.drop_area(area)
            raise
        return area

    def remove_memory(self, area: _Area) -> None:
        """REM_MEM_REG, then unmap: once acknowledged, the backend no longer touches it."""
        if area.allocated:
            raise DeviceError(f"memory at {area.gpa:#x} still holds {len(area.allocated)} buffer(s)")
        self.client.rem_mem_reg(area.gpa, area.size, area.user_addr)
        self.mem.drop_area(area)

    # -- dirty logging (LOG_SHMFD + VHOST_F_LOG_ALL): QEMU's side of a live migration --

    def start_dirty_log(self, size: int | None = None) -> DirtyLog:
        """What QEMU sends when a migration starts, while the rings run: SET_LOG_BASE with a
        log covering guest memory (or size bytes), SET_FEATURES with LOG_ALL, then
        SET_VRING_ADDR with VHOST_VRING_F_LOG and the used ring's guest-physical address."""
        if not self.offered & (1 << VHOST_F_LOG_ALL):
            raise DeviceError("the backend does not offer VHOST_F_LOG_ALL")
        if not self.protocol_features & LOG_SHMFD_FEATURE:
            raise DeviceError("the backend does not offer LOG_SHMFD")
        self.resize_dirty_log(size or DirtyLog.size_for(self.mem.end()))
        self.client.set_u64(Request.SET_FEATURES, self.features | (1 << VHOST_F_LOG_ALL))
        for ring in self.rings:   # log_guest_addr: the used ring (its IOVA behind a vIOMMU)
            self.client.set_vring_addr(ring, VHOST_VRING_F_LOG, self.dma_addr(ring.used))
        assert self.dirty_log is not None
        return self.dirty_log

    def resize_dirty_log(self, size: int) -> None:
        """A new log (SET_LOG_BASE); once the reply is in, the old one is harvested and freed,
        as QEMU does when guest memory grows."""
        new = DirtyLog(size)
        try:
            self.client.set_log_base(new.fd, new.size)
        except BaseException:
            new.close()
            raise
        old, self.dirty_log = self.dirty_log, new
        if old is not None:
            self._harvested |= old.take()
            old.close()

    def stop_dirty_log(self) -> None:
        """A migration cancelled: LOG_ALL off and the rings' log flag cleared (QEMU sends no
        message for the log itself, it just frees it)."""
        self.client.set_u64(Request.SET_FEATURES, self.features)
        for ring in self.rings:
            self.client.set_vring_addr(ring)

    def take_dirty_pages(self) -> set[int]:
        """Guest-physical page numbers (gpa // 4096) marked since the last call, cleared."""
        pages, self._harvested = self._harvested, set()
        if self.dirty_log is not None:
            pages |= self.dirty_log.take()
        return pages

    # -- load (C driver threads take the rings over for the run) --

    def load(self, job: Job, queues: Sequence[int] | None = None,
             verify_state: VerifyState | None = None) -> LoadResult:
        """Run a dataplane.load Job on the given queues (all by default), one C thread each.
        Connect with memory=job.memory_needed(queues) and queue_size=job.queue_size(...)
        when the job needs more than the defaults."""
        from .load import run_job

        return run_job(self, job, queues, verify_state)

    # -- requests --

    def submit(self, type_: int, sector: int = 0, *, data: bytes | None = None,
               read_len: int = 0, queue: int = 0, indirect: bool = False,
               area: _Area | None = None, buf: int | None = None) -> BlkRequest:
        """Build and publish one request. `data` is device-readable payload (OUT, DISCARD...);
        read_len is the device-writable payload size (IN, GET_ID). Its buffers are allocated
        in `area` (memory from add_memory) when given. `buf`: the device-writable buffer at
        that guest-physical address instead, which the request does not own (a test's chosen
        place: across a boundary, in a region removed since)."""
        ring = self.rings[queue]
        hdr = self.mem.alloc(OUTHDR.size, 16, area)
        self.mem.write(hdr, OUTHDR.pack(type_, 0, sector))
        bufs: list[tuple[int, int, bool]] = [(hdr, OUTHDR.size, False)]
        owned = [hdr]
        data_gpa, data_len = 0, 0
        if data is not None:
            data_len = len(data)
            data_gpa = self.mem.alloc(data_len, 4096, area)
            self.mem.write(data_gpa, data)
            bufs.append((data_gpa, data_len, False))
            owned.append(data_gpa)
        elif read_len:
            data_len = read_len
            if buf is None:
                data_gpa = self.mem.alloc(read_len, 4096, area)
                owned.append(data_gpa)
            else:
                data_gpa = buf
            bufs.append((data_gpa, read_len, True))
        status = self.mem.alloc(1, 1, area)
        self.mem.write(status, b"\xff")
        bufs.append((status, 1, True))
        owned.append(status)
        iovas: list[int] = []
        try:
            head = ring.add_chain(bufs, indirect=indirect, dma=self._request_dma(iovas))
        except BaseException:
            for iova in iovas:
                self.iommu.unmap(iova)
            raise
        old = ring.avail_idx
        ring.publish(head)
        ring.kick(old)
        return BlkRequest(queue, head, type_, hdr, data_gpa, data_len, status, owned, iovas)

    def wait(self, reqs: Sequence[BlkRequest], timeout: float = 10.0) -> dict[int, tuple[int, int]]:
        """Wait for requests; returns {id(req): (status, used_len)}."""
        pending = {(r.queue, r.head): r for r in reqs}
        done: dict[int, tuple[int, int]] = {}
        deadline = time.monotonic() + timeout
        while pending:
            left = deadline - time.monotonic()
            progressed = False
            for q in {r.queue for r in pending.values()}:
                for head, length in self.rings[q].wait_used(0 if left <= 0 else min(left, 0.05)):
                    req = pending.pop((q, head), None)
                    if req is not None:
                        done[id(req)] = (self.mem.read(req.status, 1)[0], length)
                        progressed = True
            if not progressed and time.monotonic() > deadline:
                raise DeviceError(f"{len(pending)} request(s) did not complete in {timeout} s")
        return done

    def release(self, req: BlkRequest) -> None:
        """The request's buffers are the guest's again: unmapped first when they were mapped
        for it (an INVALIDATE each, acknowledged), then freed."""
        for iova in req.iovas:
            self.iommu.unmap(iova)
        req.iovas = []
        for gpa in req.buffers:
            self.mem.free(gpa)

    def _run(self, type_: int, sector: int = 0, *, data: bytes | None = None,
             read_len: int = 0, queue: int = 0, area: _Area | None = None) -> tuple[int, bytes]:
        req = self.submit(type_, sector, data=data, read_len=read_len, queue=queue, area=area)
        try:
            status, _ = self.wait([req])[id(req)]
            out = self.mem.read(req.data, read_len) if read_len else b""
        finally:
            self.release(req)
        return status, out

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != vb.Status.OK:
            name = vb.Status(status).name if status in vb.Status._value2member_map_ else str(status)
            raise DeviceError(f"{what}: device answered {name}")

    def read(self, offset: int, length: int, queue: int = 0, area: _Area | None = None) -> bytes:
        status, data = self._run(vb.ReqType.IN, offset // SECTOR, read_len=length, queue=queue,
                                 area=area)
        self._check(status, f"read {length} bytes at {offset}")
        return data

    def write(self, offset: int, data: bytes, queue: int = 0, area: _Area | None = None) -> None:
        status, _ = self._run(vb.ReqType.OUT, offset // SECTOR, data=data, queue=queue, area=area)
        self._check(status, f"write {len(data)} bytes at {offset}")

    def flush(self, queue: int = 0) -> None:
        status, _ = self._run(vb.ReqType.FLUSH, queue=queue)
        self._check(status, "flush")

    def get_id(self, queue: int = 0) -> bytes:
        status, data = self._run(vb.ReqType.GET_ID, read_len=20, queue=queue)
        self._check(status, "get_id")
        return data.rstrip(b"\0")

    def _ranges(self, type_: int, ranges: Sequence[tuple[int, int]], unmap: bool,
                queue: int) -> int:
        payload = b"".join(DISCARD_RANGE.pack(off // SECTOR, length // SECTOR, int(unmap))
                           for off, length in ranges)
        status, _ = self._run(type_, data=payload, queue=queue)
        return status

    def discard(self, offset: int, length: int, queue: int = 0) -> None:
        status = self._ranges(vb.ReqType.DISCARD, [(offset, length)], False, queue)
        self._check(status, f"discard {length} bytes at {offset}")

    def write_zeroes(self, offset: int, length: int, unmap: bool = False, queue: int = 0) -> None:
        status = self._ranges(vb.ReqType.WRITE_ZEROES, [(offset, length)], unmap, queue)
        self._check(status, f"write_zeroes {length} bytes at {offset}")
