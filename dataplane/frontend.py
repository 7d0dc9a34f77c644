"""vhost-user frontend: play the guest against any vhost-user-blk backend, no VM needed.

`Device.connect(path, queues=N)` negotiates like QEMU does, shares a memfd as guest memory,
sets up N split virtqueues and exposes blocking and batched virtio-blk I/O:

    with Device.connect("/tmp/vhost.sock", queues=2) as dev:
        dev.write(0, b"x" * 4096)
        assert dev.read(0, 4096) == b"x" * 4096

The ring producer here is Python (fine for tests and small jobs); hostile-chain tests reach
for `Vring.add_chain` / raw descriptors directly.

Like QEMU, the frontend negotiates INFLIGHT_SHMFD when the backend offers it and keeps the
inflight buffer, so that it can play QEMU's part when a backend dies and a new one takes its
place on the socket: `dev.reconnect()` renegotiates, re-sends the memory table and the kept
buffer, and restarts each ring at its used index, leaving the requests still in flight in
guest memory to the new backend (which resubmits them from the buffer).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import select
import socket
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import vhost_proto as proto
from . import virtio_blk as vb
from .errors import DeviceError, ProtocolError
from .vhost_proto import (
    CONFIG_HEADER,
    INFLIGHT,
    MEMORY_HEADER,
    MEMORY_REGION,
    U64,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_REPLY_MASK,
    VHOST_USER_VERSION,
    VRING_ADDR,
    VRING_STATE,
    Message,
    ProtocolFeature,
    Request,
)

if TYPE_CHECKING:
    from .load import Job, LoadResult, VerifyState

SECTOR = 512
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
DESC = struct.Struct("<QIHH")
OUTHDR = struct.Struct("<IIQ")
DISCARD_RANGE = struct.Struct("<QII")

WANTED_PROTOCOL_FEATURES = (
    (1 << ProtocolFeature.MQ) | (1 << ProtocolFeature.REPLY_ACK) | (1 << ProtocolFeature.CONFIG)
    | (1 << ProtocolFeature.INFLIGHT_SHMFD)
)
INFLIGHT_FEATURE = 1 << ProtocolFeature.INFLIGHT_SHMFD
# The inflight buffer's per-queue layout (vhost-user spec, QueueRegionSplit): a 16-byte header
# (features, version, desc_num, last_batch_head, used_idx), then one DescStateSplit per
# descriptor (inflight u8, padding, next u16, counter u64). The front end never needs to read
# it; tests do, to see what the backend has in flight.
INFLIGHT_REGION_HEADER = struct.Struct("<QHHHH")
INFLIGHT_DESC = struct.Struct("<B5xHQ")
DRIVER_FEATURES = sum(1 << b for b in (
    vb.VIRTIO_F_VERSION_1, vb.VIRTIO_RING_F_INDIRECT_DESC, vb.VIRTIO_RING_F_EVENT_IDX,
    vb.VIRTIO_BLK_F_SEG_MAX, vb.VIRTIO_BLK_F_BLK_SIZE, vb.VIRTIO_BLK_F_FLUSH,
    vb.VIRTIO_BLK_F_TOPOLOGY, vb.VIRTIO_BLK_F_MQ, vb.VIRTIO_BLK_F_CONFIG_WCE,
    vb.VIRTIO_BLK_F_DISCARD, vb.VIRTIO_BLK_F_WRITE_ZEROES, vb.VIRTIO_BLK_F_RO,
    VHOST_USER_F_PROTOCOL_FEATURES,
))


def _need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """vring_need_event() from the virtio spec, on 16-bit indices."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


class GuestMemory:
    """A memfd shared with the backend as guest physical memory starting at `gpa_base`."""

    def __init__(self, size: int, gpa_base: int = 0) -> None:
        self.size = size
        self.gpa_base = gpa_base
        self.fd = os.memfd_create("dataplane-guest", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self.map)
        # Front-end "user address" of the region: where it is mapped in this process.
        self.user_addr = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        self._free: list[tuple[int, int]] = [(0, size)]   # (offset, length), sorted
        self._allocated: dict[int, int] = {}

    def alloc(self, length: int, align: int = 64) -> int:
        """First-fit allocation; returns a guest physical address."""
        length = max(length, 1)
        for i, (off, n) in enumerate(self._free):
            start = (off + align - 1) // align * align
            end = start + length
            if end <= off + n:
                pieces = [(off, start - off), (end, off + n - end)]
                self._free[i: i + 1] = [p for p in pieces if p[1] > 0]
                self._allocated[start] = length
                return self.gpa_base + start
        raise DeviceError(f"guest memory exhausted ({length} bytes wanted)")

    def free(self, gpa: int) -> None:
        start = gpa - self.gpa_base
        length = self._allocated.pop(start)
        self._free.append((start, length))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for off, n in self._free:
            if merged and merged[-1][0] + merged[-1][1] == off:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((off, n))
        self._free = merged

    def uva(self, gpa: int) -> int:
        return self.user_addr + gpa - self.gpa_base

    def write(self, gpa: int, data: bytes) -> None:
        off = gpa - self.gpa_base
        self.view[off: off + len(data)] = data

    def read(self, gpa: int, length: int) -> bytes:
        off = gpa - self.gpa_base
        return bytes(self.view[off: off + length])

    def close(self) -> None:
        self.view.release()
        self.map.close()
        os.close(self.fd)


@dataclass
class Vring:
    """Driver side of a split virtqueue living in GuestMemory."""

    mem: GuestMemory
    index: int
    num: int
    event_idx: bool = True
    desc: int = 0
    avail: int = 0
    used: int = 0
    kick_fd: int = -1
    call_fd: int = -1
    avail_idx: int = 0
    last_used_idx: int = 0
    free_desc: list[int] = field(default_factory=list)
    chains: dict[int, list[int]] = field(default_factory=dict)   # head -> descriptors used
    # used elements whose head was not in flight: a backend completed something twice, or
    # something it was never given (what a reconnect without inflight tracking can do)
    unexpected_used: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.desc = self.mem.alloc(16 * self.num, 16)
        self.avail = self.mem.alloc(6 + 2 * self.num, 2)
        self.used = self.mem.alloc(6 + 8 * self.num, 4096)
        self.mem.write(self.desc, bytes(16 * self.num))
        self.mem.write(self.avail, bytes(6 + 2 * self.num))
        self.mem.write(self.used, bytes(6 + 8 * self.num))
        self.free_desc = list(range(self.num))
        self.kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    # -- raw access (tests of hostile chains write whatever they like) --

    def write_desc(self, i: int, addr: int, length: int, flags: int, next_: int = 0) -> None:
        self.mem.write(self.desc + 16 * i, DESC.pack(addr, length, flags, next_))

    def publish(self, head: int) -> None:
        """Put a head in the avail ring and bump avail->idx (x86: stores are ordered)."""
        slot = self.avail + 4 + 2 * (self.avail_idx % self.num)
        self.mem.write(slot, struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write(self.avail + 2, struct.pack("<H", self.avail_idx))

    def set_avail_idx(self, value: int) -> None:
        self.avail_idx = value & 0xFFFF
        self.mem.write(self.avail + 2, struct.pack("<H", self.avail_idx))

    def kick(self, old_avail_idx: int | None = None) -> bool:
        """Notify the device unless EVENT_IDX says it does not want to hear about it."""
        if self.event_idx and old_avail_idx is not None:
            avail_event = struct.unpack("<H", self.mem.read(self.used + 4 + 8 * self.num, 2))[0]
            if not _need_event(avail_event, self.avail_idx, old_avail_idx):
                return False
        os.eventfd_write(self.kick_fd, 1)
        return True

    # -- chains --

    def add_chain(self, bufs: Sequence[tuple[int, int, bool]], indirect: bool = False) -> int:
        """Write a chain of (gpa, len, device_writable) buffers; returns its head (unpublished)."""
        if indirect:
            table = self.mem.alloc(16 * len(bufs), 16)
            for i, (addr, length, writable) in enumerate(bufs):
                flags = (VRING_DESC_F_WRITE if writable else 0) | (
                    VRING_DESC_F_NEXT if i + 1 < len(bufs) else 0)
                self.mem.write(table + 16 * i, DESC.pack(addr, length, flags, i + 1))
            head = self._take_desc(1)[0]
            self.write_desc(head, table, 16 * len(bufs), VRING_DESC_F_INDIRECT)
            self.chains[head] = [head, -table]
            return head
        ids = self._take_desc(len(bufs))
        for i, (addr, length, writable) in enumerate(bufs):
            flags = (VRING_DESC_F_WRITE if writable else 0) | (
                VRING_DESC_F_NEXT if i + 1 < len(bufs) else 0)
            self.write_desc(ids[i], addr, length, flags, ids[i + 1] if i + 1 < len(bufs) else 0)
        self.chains[ids[0]] = ids
        return ids[0]

    def _take_desc(self, n: int) -> list[int]:
        if n > len(self.free_desc):
            raise DeviceError(f"queue {self.index}: {n} descriptors wanted, {len(self.free_desc)} free")
        ids, self.free_desc = self.free_desc[:n], self.free_desc[n:]
        return ids

    def used_idx(self) -> int:
        return struct.unpack("<H", self.mem.read(self.used + 2, 2))[0]

    def pop_used(self) -> list[tuple[int, int]]:
        """Collect used elements (id, len) and recycle their descriptors."""
        out = []
        end = self.used_idx()
        while self.last_used_idx != end:
            slot = self.used + 4 + 8 * (self.last_used_idx % self.num)
            head, length = struct.unpack("<II", self.mem.read(slot, 8))
            self.last_used_idx = (self.last_used_idx + 1) & 0xFFFF
            if head not in self.chains:
                self.unexpected_used.append((head, length))
            for d in self.chains.pop(head, []):
                if d >= 0:
                    self.free_desc.append(d)
                else:
                    self.mem.free(-d)
            out.append((head, length))
        # Ask for an interrupt on the next completion (used_event).
        self.mem.write(self.avail + 4 + 2 * self.num, struct.pack("<H", self.last_used_idx))
        return out

    def wait_used(self, timeout: float) -> list[tuple[int, int]]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.pop_used()
            if got:
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            r, _, _ = select.select([self.call_fd], [], [], min(left, 0.05))
            if r:
                try:
                    os.eventfd_read(self.call_fd)
                except BlockingIOError:
                    pass

    def close(self) -> None:
        for fd in (self.kick_fd, self.call_fd):
            if fd >= 0:
                os.close(fd)
        self.kick_fd = self.call_fd = -1


class VhostUserClient:
    """The vhost-user front-end side of the socket: one method per message it sends."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
        except OSError as exc:
            self.sock.close()
            raise DeviceError(f"cannot connect to {path}: {exc.strerror}") from None
        self.reply_ack = False

    def close(self) -> None:
        self.sock.close()

    def call(self, request: int, payload: bytes = b"", fds: Iterable[int] = (),
             reply: bool = False, flags: int | None = None, keep_fds: bool = False) -> Message | None:
        """Send a message; return its reply (GET_*), or check the REPLY_ACK status. The fds a
        reply carries are closed unless keep_fds (then they are the caller's)."""
        want_ack = self.reply_ack and not reply
        if flags is None:
            flags = VHOST_USER_VERSION | (VHOST_USER_NEED_REPLY_MASK if want_ack else 0)
        proto.send_message(self.sock, Message(request, flags, payload, list(fds)))
        if not (reply or want_ack):
            return None
        msg = proto.recv_message(self.sock)
        if msg is None:
            raise ProtocolError(f"{proto.request_name(request)}: backend closed the connection")
        if not keep_fds or msg.request != request or not msg.flags & VHOST_USER_REPLY_MASK:
            proto.close_fds(msg.fds)
        if msg.request != request or not msg.flags & VHOST_USER_REPLY_MASK:
            raise ProtocolError(f"{proto.request_name(request)}: unexpected reply {msg!r}")
        if want_ack:
            (status,) = U64.unpack_from(msg.payload) if len(msg.payload) >= 8 else (1,)
            if status:
                raise DeviceError(f"{proto.request_name(request)} failed (REPLY_ACK status {status})")
            return None
        return msg

    def get_u64(self, request: int) -> int:
        msg = self.call(request, reply=True)
        assert msg is not None
        if len(msg.payload) != 8:
            raise ProtocolError(f"{proto.request_name(request)}: reply of {len(msg.payload)} bytes")
        return U64.unpack(msg.payload)[0]

    def set_u64(self, request: int, value: int, fds: Iterable[int] = ()) -> None:
        self.call(request, U64.pack(value), fds)

    def get_config(self, size: int = 60) -> bytes:
        msg = self.call(Request.GET_CONFIG, CONFIG_HEADER.pack(0, size, 0) + bytes(size), reply=True)
        assert msg is not None
        if len(msg.payload) != CONFIG_HEADER.size + size:
            raise ProtocolError(f"GET_CONFIG: reply of {len(msg.payload)} bytes")
        return msg.payload[CONFIG_HEADER.size:]

    def set_mem_table(self, regions: Sequence[tuple[int, int, int, int, int]]) -> None:
        """regions: (gpa, size, user_addr, mmap_offset, fd)."""
        payload = MEMORY_HEADER.pack(len(regions), 0) + b"".join(
            MEMORY_REGION.pack(gpa, size, uva, off) for gpa, size, uva, off, _ in regions)
        self.call(Request.SET_MEM_TABLE, payload, [r[4] for r in regions])

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> InflightBuffer:
        """GET_INFLIGHT_FD: the backend allocates a buffer for num_queues rings of queue_size."""
        msg = self.call(Request.GET_INFLIGHT_FD, INFLIGHT.pack(0, 0, num_queues, queue_size),
                        reply=True, keep_fds=True)
        assert msg is not None
        if len(msg.payload) < INFLIGHT.size - 4 or len(msg.fds) != 1:
            proto.close_fds(msg.fds)
            raise ProtocolError(f"GET_INFLIGHT_FD: reply of {len(msg.payload)} bytes with "
                                f"{len(msg.fds)} fd(s)")
        size, offset, nq, qs = struct.unpack_from("<QQHH", msg.payload)
        if size == 0 or nq != num_queues or qs != queue_size:
            proto.close_fds(msg.fds)
            raise ProtocolError(f"GET_INFLIGHT_FD: buffer of {size} bytes for {nq} queue(s) of "
                                f"{qs}, asked for {num_queues} of {queue_size}")
        return InflightBuffer(msg.fds[0], size, offset, nq, qs)

    def set_inflight_fd(self, buf: InflightBuffer) -> None:
        self.call(Request.SET_INFLIGHT_FD,
                  INFLIGHT.pack(buf.size, buf.offset, buf.num_queues, buf.queue_size), [buf.fd])

    def setup_vring(self, ring: Vring, base: int = 0) -> None:
        i = ring.index
        self.call(Request.SET_VRING_NUM, VRING_STATE.pack(i, ring.num))
        self.call(Request.SET_VRING_BASE, VRING_STATE.pack(i, base))
        self.call(Request.SET_VRING_ADDR, VRING_ADDR.pack(
            i, 0, ring.mem.uva(ring.desc), ring.mem.uva(ring.used), ring.mem.uva(ring.avail), 0))
        self.set_u64(Request.SET_VRING_KICK, i, [ring.kick_fd])
        self.set_u64(Request.SET_VRING_CALL, i, [ring.call_fd])

    def get_vring_base(self, index: int) -> int:
        msg = self.call(Request.GET_VRING_BASE, VRING_STATE.pack(index, 0), reply=True)
        assert msg is not None
        if len(msg.payload) != VRING_STATE.size:
            raise ProtocolError("GET_VRING_BASE failed")
        return VRING_STATE.unpack(msg.payload)[1]


@dataclass
class InflightBuffer:
    """The inflight-tracking buffer a backend handed out (GET_INFLIGHT_FD). The front end keeps
    the fd for as long as the device lives and hands it to every later backend."""

    fd: int
    size: int
    offset: int
    num_queues: int
    queue_size: int

    def in_flight(self, queue: int) -> list[int]:
        """Heads the backend has marked in flight on a queue, oldest first (by counter)."""
        region = self.size // self.num_queues
        base = self.offset + queue * region
        data = os.pread(self.fd, region, base)
        heads = []
        for head in range(self.queue_size):
            flag, _next, counter = INFLIGHT_DESC.unpack_from(
                data, INFLIGHT_REGION_HEADER.size + head * INFLIGHT_DESC.size)
            if flag:
                heads.append((counter, head))
        return [head for _, head in sorted(heads)]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class BlkRequest:
    """A virtio-blk request in flight: where its pieces live in guest memory."""

    queue: int
    head: int
    type: int
    hdr: int
    data: int
    data_len: int
    status: int
    buffers: list[int]


class Device:
    """A virtio-blk device behind a vhost-user socket, driven from Python."""

    def __init__(self, client: VhostUserClient, mem: GuestMemory, rings: list[Vring],
                 features: int, config: dict[str, int], path: str = "",
                 inflight: InflightBuffer | None = None, want_inflight: bool = True,
                 timeout: float = 10.0) -> None:
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

    @classmethod
    def connect(cls, path: str, queues: int = 1, queue_size: int = 128,
                memory: int = 64 << 20, features: int = DRIVER_FEATURES,
                timeout: float = 10.0, inflight: bool = True) -> Device:
        """Negotiate like QEMU's vhost-user-blk: features, then (when the backend offers
        INFLIGHT_SHMFD and `inflight`) GET_INFLIGHT_FD + SET_INFLIGHT_FD, the memory table,
        and the rings."""
        client = VhostUserClient(path, timeout)
        mem = None
        buf = None
        rings: list[Vring] = []
        try:
            acked, proto = cls._negotiate(client, queues, features, inflight)
            config = vb.parse_config(client.get_config())
            client.set_u64(Request.SET_FEATURES, acked)
            if proto & INFLIGHT_FEATURE:
                buf = client.get_inflight_fd(queues, queue_size)
                client.set_inflight_fd(buf)
            mem = GuestMemory(memory)
            client.set_mem_table([(mem.gpa_base, mem.size, mem.user_addr, 0, mem.fd)])
            event_idx = bool(acked & (1 << vb.VIRTIO_RING_F_EVENT_IDX))
            for i in range(queues):
                ring = Vring(mem, i, queue_size, event_idx=event_idx)
                rings.append(ring)
                client.setup_vring(ring)
            if acked & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
                for i in range(queues):
                    client.call(Request.SET_VRING_ENABLE, VRING_STATE.pack(i, 1))
        except BaseException:
            for ring in rings:
                ring.close()
            if mem is not None:
                mem.close()
            if buf is not None:
                buf.close()
            client.close()
            raise
        return cls(client, mem, rings, acked, config, path=str(path), inflight=buf,
                   want_inflight=inflight, timeout=timeout)

    @staticmethod
    def _negotiate(client: VhostUserClient, queues: int, features: int,
                   inflight: bool) -> tuple[int, int]:
        """GET_FEATURES .. SET_OWNER; returns (features to ack, protocol features acked)."""
        offered = client.get_u64(Request.GET_FEATURES)
        proto = 0
        if offered & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
            wanted = WANTED_PROTOCOL_FEATURES & ~(0 if inflight else INFLIGHT_FEATURE)
            proto = client.get_u64(Request.GET_PROTOCOL_FEATURES) & wanted
            client.set_u64(Request.SET_PROTOCOL_FEATURES, proto)
            client.reply_ack = bool(proto & (1 << ProtocolFeature.REPLY_ACK))
            if proto & (1 << ProtocolFeature.MQ):
                max_queues = client.get_u64(Request.GET_QUEUE_NUM)
                if queues > max_queues:
                    raise DeviceError(f"backend offers {max_queues} queue(s), {queues} wanted")
        client.call(Request.SET_OWNER)
        return offered & features, proto

    def reconnect(self, path: str | None = None, timeout: float | None = None) -> None:
        """Play QEMU's part after the backend went away: connect to the backend now listening
        on `path` (default: the same socket; waits up to `timeout` for it to accept),
        renegotiate the same features, re-send the memory table and the kept inflight buffer,
        and restart every ring at its used index (QEMU rewinds last_avail_idx to used_idx when
        GET_VRING_BASE cannot be asked). Requests still in flight stay as they are in guest
        memory: the new backend resubmits them from the inflight buffer."""
        path = str(path or self.path)
        timeout = self.timeout if timeout is None else timeout
        if self.client is not None:
            self.client.close()
        client = self._connect_retrying(path, timeout)
        try:
            acked, proto = self._negotiate(client, len(self.rings), self.features,
                                           self.want_inflight)
            if acked != self.features:
                raise DeviceError(f"the new backend lacks features {self.features & ~acked:#x}")
            client.set_u64(Request.SET_FEATURES, acked)
            if proto & INFLIGHT_FEATURE:
                if self.inflight is None:   # the previous backend did not track: start now
                    self.inflight = client.get_inflight_fd(len(self.rings), self.rings[0].num)
                client.set_inflight_fd(self.inflight)
            client.set_mem_table([(self.mem.gpa_base, self.mem.size, self.mem.user_addr, 0,
                                   self.mem.fd)])
            for ring in self.rings:
                client.setup_vring(ring, base=ring.used_idx())
            if acked & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
                for ring in self.rings:
                    client.call(Request.SET_VRING_ENABLE, VRING_STATE.pack(ring.index, 1))
        except BaseException:
            client.close()
            raise
        self.client = client
        self.path = path

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
                self.client.get_vring_base(ring.index)
        except (OSError, ProtocolError, DeviceError):
            pass
        self.client.close()
        for ring in self.rings:
            ring.close()
        self.mem.close()
        if self.inflight is not None:
            self.inflight.close()
        self.client = None  # type: ignore[assignment]

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
               read_len: int = 0, queue: int = 0, indirect: bool = False) -> BlkRequest:
        """Build and publish one request. `data` is device-readable payload (OUT, DISCARD...);
        read_len is the device-writable payload size (IN, GET_ID)."""
        ring = self.rings[queue]
        hdr = self.mem.alloc(OUTHDR.size, 16)
        self.mem.write(hdr, OUTHDR.pack(type_, 0, sector))
        bufs: list[tuple[int, int, bool]] = [(hdr, OUTHDR.size, False)]
        owned = [hdr]
        data_gpa, data_len = 0, 0
        if data is not None:
            data_len = len(data)
            data_gpa = self.mem.alloc(data_len, 4096)
            self.mem.write(data_gpa, data)
            bufs.append((data_gpa, data_len, False))
            owned.append(data_gpa)
        elif read_len:
            data_len = read_len
            data_gpa = self.mem.alloc(read_len, 4096)
            bufs.append((data_gpa, read_len, True))
            owned.append(data_gpa)
        status = self.mem.alloc(1, 1)
        self.mem.write(status, b"\xff")
        bufs.append((status, 1, True))
        owned.append(status)
        head = ring.add_chain(bufs, indirect=indirect)
        old = ring.avail_idx
        ring.publish(head)
        ring.kick(old)
        return BlkRequest(queue, head, type_, hdr, data_gpa, data_len, status, owned)

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
        for gpa in req.buffers:
            self.mem.free(gpa)

    def _run(self, type_: int, sector: int = 0, *, data: bytes | None = None,
             read_len: int = 0, queue: int = 0) -> tuple[int, bytes]:
        req = self.submit(type_, sector, data=data, read_len=read_len, queue=queue)
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

    def read(self, offset: int, length: int, queue: int = 0) -> bytes:
        status, data = self._run(vb.ReqType.IN, offset // SECTOR, read_len=length, queue=queue)
        self._check(status, f"read {length} bytes at {offset}")
        return data

    def write(self, offset: int, data: bytes, queue: int = 0) -> None:
        status, _ = self._run(vb.ReqType.OUT, offset // SECTOR, data=data, queue=queue)
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
