"""The vhost-user front end's side of the socket (what QEMU sends): one method per message,
REPLY_ACK checking, and the inflight buffer a backend hands out, which the front end keeps
across backend restarts."""

from __future__ import annotations

import contextlib
import errno
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from ..core import ffi, lib
from ..errors import DeviceError, ProtocolError
from ..protocol import vhost_user as proto
from ..protocol.vhost_user import (
    CONFIG_HEADER,
    INFLIGHT,
    LOG,
    MEM_REG,
    MEMORY_HEADER,
    MEMORY_REGION,
    U64,
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_REPLY_MASK,
    VHOST_USER_VERSION,
    VRING_ADDR,
    VRING_STATE,
    Message,
    Request,
)
from ..unix import BacklogFull, connect_unix
from .vring import Vring

# The inflight buffer's per-queue layout (vhost-user spec, QueueRegionSplit): a 16-byte header
# (features, version, desc_num, last_batch_head, used_idx), then one DescStateSplit per
# descriptor (inflight u8, padding, next u16, counter u64). The front end never needs to read
# it; tests do, to see what the backend has in flight.
INFLIGHT_REGION_HEADER = struct.Struct("<QHHHH")
INFLIGHT_DESC = struct.Struct("<B5xHQ")
# A packed ring's (QueueRegionPacked): a 32-byte header (features, version, desc_num,
# free_head, old_free_head, used_idx, old_used_idx, used and old used wrap counters), then one
# DescStatePacked per ring descriptor fetched (inflight, next, last, num, counter, id, flags,
# len, addr).
INFLIGHT_PACKED_HEADER = struct.Struct("<QHHHHHHBB10x")
INFLIGHT_PACKED_DESC = struct.Struct("<BxHHHQHHIQ")


class VhostUserClient:
    """The vhost-user front-end side of the socket: one method per message it sends.

    More than one thread may talk on it (the vIOMMU's miss thread, a background thread, C
    driver threads mapping each request): a message and its reply are one exchange under the
    socket's lock (a C mutex, csrc/driver/vu_socket.c, which the C threads take too)."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.timeout = timeout
        try:
            # A backend serves one front end at a time: others wait in its backlog.
            self.sock = connect_unix(str(path), timeout)
        except BacklogFull:
            raise DeviceError(f"cannot connect to {path}: its backlog stayed full for "
                              f"{timeout:g} s") from None
        except OSError as exc:
            raise DeviceError(f"cannot connect to {path}: {exc.strerror}") from None
        self.reply_ack = False
        self.vu = lib.dp_vu_socket_new(self.sock.fileno())
        if self.vu == ffi.NULL:
            self.sock.close()
            raise DeviceError("out of memory")
        # Behind a vIOMMU ring addresses are IOVAs: the frontend's translation of a guest
        # address (None: front-end user addresses, as without one).
        self.ring_addr: Callable[[int], int] | None = None

    def close(self) -> None:
        self.sock.close()
        if self.vu != ffi.NULL:
            lib.dp_vu_socket_free(self.vu)
            self.vu = ffi.NULL

    @contextlib.contextmanager
    def exchange(self) -> Iterator[None]:
        """Hold the socket for one message and its reply."""
        lib.dp_vu_socket_lock(self.vu)   # without the GIL: a C thread may hold it
        try:
            yield
        finally:
            lib.dp_vu_socket_unlock(self.vu)

    def call(self, request: int, payload: bytes = b"", fds: Iterable[int] = (),
             reply: bool = False, flags: int | None = None, keep_fds: bool = False) -> Message | None:
        """Send a message; return its reply (GET_*), or check the REPLY_ACK status. The fds a
        reply carries are closed unless keep_fds (then they are the caller's)."""
        with self.exchange():
            return self._call(request, payload, fds, reply, flags, keep_fds)

    def _call(self, request: int, payload: bytes, fds: Iterable[int], reply: bool,
              flags: int | None, keep_fds: bool) -> Message | None:
        want_ack = self.reply_ack and not reply
        if flags is None:
            flags = VHOST_USER_VERSION | (VHOST_USER_NEED_REPLY_MASK if want_ack else 0)
        elif flags & VHOST_USER_NEED_REPLY_MASK and not reply:
            want_ack = True
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

    def add_mem_reg(self, gpa: int, size: int, uva: int, mmap_offset: int, fd: int) -> None:
        """ADD_MEM_REG (CONFIGURE_MEM_SLOTS): one region, its fd."""
        self.call(Request.ADD_MEM_REG, MEM_REG.pack(0, gpa, size, uva, mmap_offset), [fd])

    def rem_mem_reg(self, gpa: int, size: int, uva: int) -> None:
        """REM_MEM_REG: matched by (gpa, size, uva); no fd, mmap_offset 0 (as QEMU 7.2)."""
        self.call(Request.REM_MEM_REG, MEM_REG.pack(0, gpa, size, uva, 0))

    def set_log_base(self, fd: int, size: int, offset: int = 0) -> int:
        """SET_LOG_BASE with LOG_SHMFD: the reply always comes (QEMU waits for it), header
        flags exactly REPLY | version. Like QEMU, the reply's u64 is not judged (dataplane
        answers 0, or 1 when it failed; libvhost-user the old log's size): it is returned."""
        msg = self.call(Request.SET_LOG_BASE, LOG.pack(size, offset), [fd], reply=True)
        assert msg is not None
        if msg.flags != VHOST_USER_VERSION | VHOST_USER_REPLY_MASK or len(msg.payload) != 8:
            raise ProtocolError(f"SET_LOG_BASE: reply flags {msg.flags:#x}, {len(msg.payload)} bytes")
        return U64.unpack(msg.payload)[0]

    def set_vring_addr(self, ring: Vring, flags: int = 0, log_addr: int = 0) -> None:
        addr = self.ring_addr or ring.mem.uva
        self.call(Request.SET_VRING_ADDR, VRING_ADDR.pack(
            ring.index, flags, addr(ring.desc), addr(ring.used), addr(ring.avail), log_addr))

    def iotlb_msg(self, iova: int, size: int, uaddr: int, perm: int, type_: int) -> None:
        """IOTLB_MSG with NEED_REPLY, as QEMU sends it (BACKEND_REQ and REPLY_ACK negotiated);
        DeviceError when the back end refuses it."""
        rc = lib.dp_vu_iotlb_msg(self.vu, iova, size, uaddr, perm, type_, int(self.timeout * 1000))
        if rc == -errno.EIO:
            raise DeviceError(f"IOTLB_MSG type {type_} iova {iova:#x} size {size:#x}: refused"
                              " (REPLY_ACK status 1)")
        if rc < 0:
            raise ProtocolError(f"IOTLB_MSG: {os.strerror(-rc)}")

    def get_inflight_fd(self, num_queues: int, queue_size: int,
                        packed: bool = False) -> InflightBuffer:
        """GET_INFLIGHT_FD: the backend allocates a buffer for num_queues rings of queue_size
        (laid out for the ring format negotiated: packed says which, for in_flight)."""
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
        return InflightBuffer(msg.fds[0], size, offset, nq, qs, packed)

    def set_inflight_fd(self, buf: InflightBuffer) -> None:
        self.call(Request.SET_INFLIGHT_FD,
                  INFLIGHT.pack(buf.size, buf.offset, buf.num_queues, buf.queue_size), [buf.fd])

    def setup_vring(self, ring: Vring, base: int = 0) -> None:
        i = ring.index
        self.call(Request.SET_VRING_NUM, VRING_STATE.pack(i, ring.num))
        self.call(Request.SET_VRING_BASE, VRING_STATE.pack(i, base))
        self.set_vring_addr(ring)
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
    packed: bool = False

    def in_flight(self, queue: int) -> list[int]:
        """Heads (packed: buffer ids) the backend has marked in flight on a queue, oldest first
        (by counter)."""
        region = self.size // self.num_queues
        base = self.offset + queue * region
        data = os.pread(self.fd, region, base)
        if self.packed:
            return self._packed_in_flight(data)
        heads = []
        for head in range(self.queue_size):
            flag, _next, counter = INFLIGHT_DESC.unpack_from(
                data, INFLIGHT_REGION_HEADER.size + head * INFLIGHT_DESC.size)
            if flag:
                heads.append((counter, head))
        return [head for _, head in sorted(heads)]

    def _packed_in_flight(self, data: bytes) -> list[int]:
        """The lists at the last commit point: every entry off the free list that heads one."""
        hdr = INFLIGHT_PACKED_HEADER.unpack_from(data)
        if not hdr[1]:
            return []   # version 0: the queue never started
        n = self.queue_size
        entries = [INFLIGHT_PACKED_DESC.unpack_from(data, INFLIGHT_PACKED_HEADER.size + 32 * i)
                   for i in range(n)]
        free, e = set(), hdr[4]   # from old_free_head
        while e < n and e not in free:
            free.add(e)
            e = entries[e][1]
        heads = [(entries[h][4], entries[entries[h][2]][5]) for h in range(n)
                 if h not in free and entries[h][0] and entries[h][2] < n]
        return [id_ for _, id_ in sorted(heads)]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
