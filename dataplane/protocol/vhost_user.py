"""vhost-user wire format (docs/interop/vhost-user.rst in QEMU): request codes, flags,
protocol feature bits and payload structs, declared once for the backend and the frontend."""

from __future__ import annotations

import array
import socket
import struct
from enum import IntEnum

from ..errors import ProtocolError

VHOST_USER_VERSION = 0x1
VHOST_USER_VERSION_MASK = 0x3
VHOST_USER_REPLY_MASK = 0x1 << 2
VHOST_USER_NEED_REPLY_MASK = 0x1 << 3

VHOST_USER_F_PROTOCOL_FEATURES = 30
VHOST_F_LOG_ALL = 26
VHOST_VRING_F_LOG = 0x1              # SET_VRING_ADDR flags: log used ring writes at log_guest_addr
VHOST_LOG_PAGE = 0x1000              # one bit of the dirty log per page of guest-physical memory

# u64 payload of SET_VRING_KICK/CALL/ERR: queue index in bits 0-7, "no fd" in bit 8.
VHOST_USER_VRING_IDX_MASK = 0xFF
VHOST_USER_VRING_NOFD_MASK = 0x1 << 8

MAX_PAYLOAD = 4096
MAX_FDS = 8   # VHOST_MEMORY_BASELINE_NREGIONS
VHOST_MEMORY_BASELINE_NREGIONS = 8   # SET_MEM_TABLE's most regions (one fd each)
VHOST_USER_MAX_CONFIG_SIZE = 256


class Request(IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


def request_name(code: int) -> str:
    try:
        return Request(code).name
    except ValueError:
        return f"request#{code}"


class ProtocolFeature(IntEnum):
    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19


HEADER = struct.Struct("<III")             # request, flags, size
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")         # index, num
VRING_ADDR = struct.Struct("<IIQQQQ")      # index, flags, desc, used, avail, log
MEMORY_HEADER = struct.Struct("<II")       # nregions, padding
MEMORY_REGION = struct.Struct("<QQQQ")     # guest_phys_addr, memory_size, userspace_addr, mmap_offset
MEM_REG = struct.Struct("<QQQQQ")          # ADD/REM_MEM_REG: padding, then a MEMORY_REGION
LOG = struct.Struct("<QQ")                 # SET_LOG_BASE: mmap_size, mmap_offset
CONFIG_HEADER = struct.Struct("<III")      # offset, size, flags
INFLIGHT = struct.Struct("<QQHH4x")        # mmap_size, mmap_offset, num_queues, queue_size
INFLIGHT_MIN_SIZE = 20                     # the struct without its tail padding
# IOTLB_MSG (22) and the back end's IOTLB miss: struct vhost_iotlb_msg {u64 iova, size, uaddr;
# u8 perm, type; 6 bytes of padding}. QEMU leaves uaddr, perm and the padding of an
# INVALIDATE uninitialised: they mean nothing there.
IOTLB_MSG = struct.Struct("<QQQBB6x")
VHOST_ACCESS_RO, VHOST_ACCESS_WO, VHOST_ACCESS_RW = 1, 2, 3


class IotlbType(IntEnum):
    MISS = 1
    UPDATE = 2
    INVALIDATE = 3
    ACCESS_FAIL = 4
    BATCH_BEGIN = 5
    BATCH_END = 6


class BackendRequest(IntEnum):
    """What a back end sends on the channel SET_BACKEND_REQ_FD hands it (QEMU 7.2 reads these)."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3


class Message:
    """One vhost-user message: header fields, payload bytes and the fds that came with it."""

    __slots__ = ("request", "flags", "payload", "fds")

    def __init__(self, request: int, flags: int = VHOST_USER_VERSION, payload: bytes = b"",
                 fds: list[int] | None = None) -> None:
        self.request = request
        self.flags = flags
        self.payload = payload
        self.fds = fds or []

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_NEED_REPLY_MASK)

    def encode(self) -> bytes:
        return HEADER.pack(self.request, self.flags, len(self.payload)) + self.payload

    def __repr__(self) -> str:
        return (f"Message({request_name(self.request)}, flags={self.flags:#x}, "
                f"size={len(self.payload)}, fds={len(self.fds)})")


def _recv_exact(sock: socket.socket, n: int, fds: list[int]) -> bytes:
    """Read exactly n bytes, collecting any fds that ride along. b'' on a clean EOF at 0."""
    chunks = bytearray()
    while len(chunks) < n:
        data, ancdata, flags, _ = sock.recvmsg(n - len(chunks), socket.CMSG_SPACE(MAX_FDS * 4))
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(cdata[: len(cdata) - len(cdata) % arr.itemsize])
                fds.extend(arr)
        if flags & socket.MSG_CTRUNC:
            raise ProtocolError("more file descriptors than any message may carry")
        if not data:
            if chunks:
                raise ProtocolError(f"connection closed mid-message ({len(chunks)} of {n} bytes)")
            return b""
        chunks += data
    return bytes(chunks)


def recv_message(sock: socket.socket) -> Message | None:
    """Read one message; None on EOF. Raises ProtocolError when the framing is broken
    (after which the stream cannot be trusted: the caller drops the connection)."""
    fds: list[int] = []
    try:
        header = _recv_exact(sock, HEADER.size, fds)
        if not header:
            return None
        request, flags, size = HEADER.unpack(header)
        if size > MAX_PAYLOAD:
            raise ProtocolError(f"{request_name(request)}: payload size {size} exceeds {MAX_PAYLOAD}")
        payload = _recv_exact(sock, size, fds) if size else b""
        if size and len(payload) != size:
            raise ProtocolError(f"{request_name(request)}: connection closed mid-message")
    except BaseException:
        close_fds(fds)
        raise
    return Message(request, flags, payload, fds)


def send_message(sock: socket.socket, msg: Message) -> None:
    data = msg.encode()
    if msg.fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", msg.fds))])
    else:
        sock.sendall(data)


def close_fds(fds: list[int]) -> None:
    import os

    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()
