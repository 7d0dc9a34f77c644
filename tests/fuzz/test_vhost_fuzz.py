"""Fuzzing the vhost-user control plane with random and mutated message streams.

Two targets:
* in-process: message sequences (well-formed structs with hostile values, random bytes,
  random fds) straight into VhostUserBlkDevice.handle(), including sequences that map
  memory and start queues on rings full of garbage, split or packed, directly or behind a
  vIOMMU (IOTLB updates and invalidations with hostile values among them), so both C ring
  walkers and the IOTLB are fuzzed too;
* over the socket: random byte streams, after which the server must still serve a frontend.

Invariants: no exception escapes the handler, no fd is leaked, every started queue stops
(no hang), the server keeps accepting. DATAPLANE_FUZZ_EXAMPLES sets the campaign length
(CI runs a short bounded one; `make fuzz`-style long runs set it to e.g. 20000).
"""

from __future__ import annotations

import os
import random
import socket
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataplane.backend import EnginePool, VhostUserBlkDevice
from dataplane.disks import open_disk
from dataplane.driver import Device
from dataplane.protocol.vhost_user import (
    CONFIG_HEADER,
    IOTLB_MSG,
    MEMORY_HEADER,
    MEMORY_REGION,
    U64,
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_VERSION,
    VRING_ADDR,
    VRING_STATE,
    Message,
    Request,
)

EXAMPLES = int(os.environ.get("DATAPLANE_FUZZ_EXAMPLES", "300"))
MEM_SIZE = 1 << 20
CASES = {"in_process": 0, "socket": 0, "kicks": 0, "packed": 0, "iommu": 0}
IOVA = 0x1_0000_0000          # where _plausible_start maps guest memory behind the vIOMMU

pytestmark = pytest.mark.fuzz


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


PACKED_BITS = (0x80, 0x80, 0x80, 0x80, 0x8000, 0x8080, 0)   # mostly AVAIL (wrap 1); USED, both, neither


def _garbage_rings(seed: int, packed: bool = False) -> bytes:
    """Memory for _plausible_start's two rings (8 entries at q*4096): small avail indices,
    descriptors with random flags, next indices (packed: buffer ids and AVAIL/USED bits),
    addresses and lengths, and random request headers everywhere else. Deep enough that the C
    walker sees chains, not just a jump."""
    rng = random.Random(seed)
    mem = bytearray(rng.randbytes(64 * 1024))
    for q in range(2):
        base = q * 4096
        for i in range(8):
            flags = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 1, 3, 2])
            addr = rng.choice([rng.randrange(0, MEM_SIZE), rng.randrange(0, 2**64), 16384 + 64 * i])
            length = rng.choice([0, 1, 16, 17, 512, 4096, 0xFFFFFFFF, rng.randrange(0, 2**32)])
            if packed:   # {addr, len, id, flags}: ids mostly in range, fewer indirect tables
                flags = rng.choice([0, 1, 2, 3, 1, 3, 2, 3, 4, 6])
                if flags & 4:
                    addr, length = rng.choice([(16384 + 64 * i, 16 * rng.randrange(0, 5)), (addr, length)])
                id_ = rng.randrange(0, 8) if rng.random() < 0.9 else rng.randrange(0, 40)
                struct.pack_into("<QIHH", mem, base + 16 * i, addr, length, id_,
                                 flags | rng.choice(PACKED_BITS))
                continue
            struct.pack_into("<QIHH", mem, base + 16 * i, addr, length, flags, rng.randrange(0, 10))
        struct.pack_into("<HH", mem, base + 2048, 0, rng.randrange(0, 10))
        for i in range(9):
            struct.pack_into("<H", mem, base + 2048 + 4 + 2 * i, rng.randrange(0, 10))
        struct.pack_into("<HH", mem, base + 3072, 0, 0)
    for i in range(64):   # request headers: mostly known types, sectors near the end
        struct.pack_into("<IIQ", mem, 16384 + 64 * i, rng.choice([0, 1, 4, 8, 11, 13, 99]), 0,
                         rng.choice([0, 1, 32767, 32768, 2**60]))
    return bytes(mem)


def _make_fd(kind: str) -> int:
    if kind == "eventfd":
        return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    if kind == "socket":   # a back-end channel whose front end went away: misses go nowhere
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        theirs.close()
        return ours.detach()
    if kind.startswith("memfd"):
        fd = os.memfd_create("fuzz", os.MFD_CLOEXEC)
        os.ftruncate(fd, MEM_SIZE)
        seed = int(kind.partition(":")[2] or 0)
        os.pwrite(fd, _garbage_rings(seed, packed=kind.startswith("memfd-packed")), 0)
        return fd
    return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)


small = st.integers(0, 4)
index = st.one_of(st.integers(0, 3), st.integers(0, 0xFFFFFFFF))
u64 = st.one_of(st.integers(0, 0x3FF), st.integers(0, 2**64 - 1),
                st.integers(0, MEM_SIZE).map(lambda x: x | 0x1000))   # near the region


@st.composite
def structured_message(draw) -> tuple[int, bytes, list[str]]:
    req = draw(st.sampled_from(list(Request)))
    fds: list[str] = []
    if req in (Request.SET_VRING_NUM, Request.SET_VRING_BASE, Request.GET_VRING_BASE,
               Request.SET_VRING_ENABLE):
        num = draw(st.one_of(st.sampled_from([0, 1, 8, 64, 128, 1024, 4096]), st.integers(0, 2**32 - 1)))
        payload = VRING_STATE.pack(draw(index), num)
    elif req == Request.SET_VRING_ADDR:
        payload = VRING_ADDR.pack(draw(index), draw(st.integers(0, 3)), draw(u64), draw(u64), draw(u64),
                                  draw(u64))
    elif req in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
        nofd = draw(st.booleans())
        payload = U64.pack(draw(st.integers(0, 3)) | (0x100 if nofd else 0))
        fds = draw(st.lists(st.sampled_from(["eventfd", "null"]), max_size=2))
    elif req == Request.SET_MEM_TABLE:
        n = draw(st.integers(0, 3))
        regions = b"".join(MEMORY_REGION.pack(draw(st.sampled_from([0, 0x100000, 2**63])),
                                              draw(st.sampled_from([MEM_SIZE, 4096, 0, 2**63])),
                                              draw(st.sampled_from([0x7F0000000000, 0])),
                                              draw(st.sampled_from([0, 4096, 2**62])))
                           for _ in range(n))
        payload = MEMORY_HEADER.pack(draw(st.integers(0, 9)), 0) + regions
        fds = draw(st.lists(st.sampled_from(["memfd", "null", "eventfd"]), min_size=0, max_size=3))
    elif req in (Request.GET_CONFIG, Request.SET_CONFIG):
        size = draw(st.integers(0, 300))
        payload = CONFIG_HEADER.pack(draw(st.integers(0, 300)), size, 0) + draw(st.binary(max_size=size))
    elif req in (Request.SET_FEATURES, Request.SET_PROTOCOL_FEATURES):
        payload = U64.pack(draw(u64))
    elif req == Request.IOTLB_MSG:
        iova = draw(st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, IOVA, 2**64 - 4096]),
                              st.integers(0, 64).map(lambda p: IOVA + p * 4096)))
        size = draw(st.sampled_from([0, 1, 4096, 8192, MEM_SIZE, 2**64 - 1, 0xFFFF_FFFF_0110_0000]))
        uaddr = draw(st.one_of(st.integers(0, 2**64 - 1),
                               st.integers(0, MEM_SIZE // 4096).map(lambda p: 0x7F0000000000 + p * 4096)))
        payload = IOTLB_MSG.pack(iova, size, uaddr, draw(st.integers(0, 255)),
                                 draw(st.sampled_from([0, 1, 2, 2, 3, 3, 4, 5, 6, 255])))
    elif req == Request.SET_BACKEND_REQ_FD:
        fds = draw(st.lists(st.sampled_from(["socket", "eventfd", "null"]), max_size=2))
        payload = b""
    else:
        payload = draw(st.binary(max_size=64))
    return int(req), payload, fds


random_message = st.tuples(st.integers(0, 60), st.binary(max_size=300),
                           st.lists(st.sampled_from(["eventfd", "memfd", "null"]), max_size=2))


@st.composite
def message_stream(draw) -> list[tuple[int, int, bytes, list[str]]]:
    msgs = draw(st.lists(st.one_of(structured_message(), structured_message(), random_message),
                         max_size=40))
    out = []
    for req, payload, fds in msgs:
        flags = draw(st.sampled_from([VHOST_USER_VERSION, VHOST_USER_VERSION | VHOST_USER_NEED_REPLY_MASK,
                                      0, 0xFF]))
        out.append((req, flags, payload, fds))
    return out


def _plausible_start(seed: int, packed: bool = False,
                     iommu: bool = False) -> list[tuple[int, int, bytes, list[str]]]:
    """A valid start-up sequence whose rings (split, or packed: the descriptor ring, the driver
    and the device areas at the same offsets) sit in a memfd full of random bytes. With iommu:
    behind a vIOMMU, guest memory mapped at IOVA + its offset, a page at a time with random
    permissions and some pages left out, so that the garbage rings' addresses (guest-physical
    ones) miss, fault or hit."""
    uva = 0x7F0000000000
    features = (1 << 32) | (1 << 28) | (1 << 29) | (1 << 30) | ((1 << 34) if packed else 0)
    seq = []
    base = 0
    if iommu:
        features |= 1 << 33
        proto = (1 << 3) | (1 << 5)   # REPLY_ACK, BACKEND_REQ
        seq += [(Request.SET_PROTOCOL_FEATURES, 1, U64.pack(proto), []),
                (Request.SET_BACKEND_REQ_FD, 9, b"", ["socket"])]
        base = IOVA
    seq += [
        (Request.SET_FEATURES, 1, U64.pack(features), []),
        (Request.SET_MEM_TABLE, 1, MEMORY_HEADER.pack(1, 0) + MEMORY_REGION.pack(0, MEM_SIZE, uva, 0),
         [f"memfd{'-packed' if packed else ''}:{seed}"]),
    ]
    if iommu:
        rng = random.Random(seed)
        for p in range(24):   # the rings' pages, headers, some buffers
            if p < 2 or rng.random() < 0.8:
                perm = 3 if p < 2 else rng.choice([1, 2, 3, 3, 3])
                seq.append((Request.IOTLB_MSG, 9, IOTLB_MSG.pack(IOVA + p * 4096, 4096, uva + p * 4096,
                                                                 perm, 2), []))
    ring = (lambda off: base + off) if iommu else (lambda off: uva + off)
    for q in range(2):
        seq += [
            (Request.SET_VRING_NUM, 1, VRING_STATE.pack(q, 8), []),
            (Request.SET_VRING_BASE, 1, VRING_STATE.pack(q, 0x80008000 if packed else 0), []),
            (Request.SET_VRING_ADDR, 1, VRING_ADDR.pack(q, 0, ring(q * 4096), ring(q * 4096 + 3072),
                                                       ring(q * 4096 + 2048), 0), []),
            (Request.SET_VRING_KICK, 1, U64.pack(q), ["eventfd"]),
            (Request.SET_VRING_ENABLE, 1, VRING_STATE.pack(q, 1), []),
        ]
    return seq


@pytest.fixture(scope="module")
def fuzz_disk():
    disk = open_disk("null:16M")
    yield disk
    disk.close()


def campaign_summary() -> str | None:
    """One line for the test run's summary (tests/conftest.py prints it)."""
    if not CASES["in_process"] and not CASES["socket"]:
        return None
    return (f"fuzz campaign: {CASES['in_process']} in-process message streams ({CASES['packed']} "
            f"starting packed rings, {CASES['iommu']} behind a vIOMMU), {CASES['socket']} socket"
            f" byte streams, {CASES['kicks']} kicks on garbage rings"
            f" (DATAPLANE_FUZZ_EXAMPLES={EXAMPLES})")


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(stream=message_stream(), start=st.booleans(), packed=st.booleans(), iommu=st.booleans(),
       seed=st.integers(0, 2**32), data=st.data())
def test_random_message_streams_never_crash_hang_or_leak(fuzz_disk, stream, start, packed, iommu,
                                                          seed, data):
    CASES["in_process"] += 1
    CASES["packed"] += int(start and packed)
    CASES["iommu"] += int(start and iommu)
    before = _fd_count()
    engines = EnginePool(ring_entries=64)
    # a short miss timeout: garbage rings park requests on IOVAs nothing will ever map
    device = VhostUserBlkDevice(fuzz_disk, 2, engines, iotlb_miss_timeout_ms=20)
    try:
        sequence = (_plausible_start(seed, packed, iommu) if start else []) + stream
        for req, flags, payload, fd_kinds in sequence:
            fds = [_make_fd(k) for k in fd_kinds]
            msg = Message(req, flags, payload, fds)
            reply = device.handle(msg)
            assert reply is None or isinstance(reply, Message)
            for fd in msg.fds:   # what the server loop does with fds a handler did not keep
                os.close(fd)
            if start and data.draw(st.booleans(), label="kick"):
                for vring in device.vrings:
                    if vring.kick_fd is not None and vring.kick_fd >= 0:
                        os.eventfd_write(vring.kick_fd, 1)   # the backend only keeps eventfds
                        CASES["kicks"] += 1
    finally:
        device.close()
        engines.close()
    assert _fd_count() <= before, "file descriptors leaked"


@settings(max_examples=max(EXAMPLES // 5, 20), deadline=None,
          suppress_health_check=list(HealthCheck))
@given(chunks=st.lists(st.binary(min_size=1, max_size=200), min_size=1, max_size=8),
       header=st.tuples(st.integers(0, 50), st.integers(0, 15), st.integers(0, 400)))
def test_random_byte_streams_on_the_socket(socket_backend, chunks, header):
    CASES["socket"] += 1
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(2)
    for _ in range(200):   # a full listen backlog answers EAGAIN: wait for the server to catch up
        try:
            sock.connect(socket_backend.socket)
            break
        except BlockingIOError:
            time.sleep(0.01)
    try:
        sock.sendall(struct.pack("<III", *header))
        for chunk in chunks:
            sock.sendall(chunk)
    except OSError:
        pass   # the server may drop a connection it cannot parse
    finally:
        sock.close()


@pytest.fixture(scope="module")
def socket_backend(tmp_path_factory):
    import threading

    from dataplane.backend import ServerOptions, VhostUserBlkServer

    disk = open_disk("null:16M")
    path = tmp_path_factory.mktemp("fuzz") / "vhost.sock"
    server = VhostUserBlkServer(disk, ServerOptions(socket_path=path, num_queues=2))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    class Backend:
        socket = str(path)

    yield Backend
    # After all the garbage, a well-behaved front end is still served.
    with Device.connect(str(path), queues=2) as dev:
        assert dev.read(0, 4096, queue=1) == bytes(4096)
    server.stop()
    thread.join(timeout=30)
    server.close()
    disk.close()
