"""The frontend as the guest's vIOMMU (what QEMU's intel-iommu does for a vhost-user device),
so a backend's VIRTIO_F_IOMMU_PLATFORM support is tested and measured without a VM.

`Iommu` keeps the guest's I/O page table (IOVA ranges -> guest-physical addresses, with a
permission) and plays QEMU's side of the IOTLB protocol over the connection:

* the back-end channel (SET_BACKEND_REQ_FD, a socket pair) on which the backend sends IOTLB
  misses; a thread answers each one as QEMU does: an UPDATE, on the main socket, of the page
  (4 KiB) holding the missed IOVA, with the mapping's permission, when the page table maps it
  with the access asked for; nothing when it does not (the backend then gives up on time);
* `push()` sends UPDATEs without a miss (QEMU pre-populates the used rings so);
* `map()` / `unmap()` change the page table, an unmap followed by an INVALIDATE that returns
  once the backend acknowledged it (a guest in strict mode), and `update()` / `invalidate()`
  send raw messages (tests of hostile values).

Guest memory is mapped as a whole in a static window (IOVA = guest-physical address +
IOVA_BASE, read-write): that is what `Device` uses for its rings and requests unless told to
map each request (`strict`), when every buffer gets fresh IOVAs from IOVA_DYNAMIC upwards for
the request's lifetime, with the permission its direction needs (read-only for what the
device reads, write-only for what it writes). Addresses below IOVA_BASE are never mapped.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..errors import DeviceError, ProtocolError
from ..protocol import vhost_user as proto
from ..protocol.vhost_user import (
    IOTLB_MSG,
    VHOST_ACCESS_RO,
    VHOST_ACCESS_RW,
    VHOST_ACCESS_WO,
    BackendRequest,
    IotlbType,
)
from .client import VhostUserClient
from .vring import GuestMemory

log = logging.getLogger("dataplane.iommu")

PAGE = 4096
IOVA_BASE = 1 << 40          # the static window: guest-physical address + IOVA_BASE
IOVA_DYNAMIC = 1 << 44       # per-request (and per-run) mappings are allocated from here
RO, WO, RW = VHOST_ACCESS_RO, VHOST_ACCESS_WO, VHOST_ACCESS_RW


@dataclass(order=True)
class Mapping:
    """[iova, iova + size) -> guest-physical [gpa, gpa + size), perm (RO, WO, RW)."""

    iova: int
    size: int = field(compare=False)
    gpa: int = field(compare=False)
    perm: int = field(compare=False)

    @property
    def end(self) -> int:
        return self.iova + self.size


@dataclass
class IommuCounters:
    misses: int = 0              # misses the backend sent
    answered: int = 0            # of those, answered with an UPDATE
    refused: int = 0             # not mapped (or not for that access): no UPDATE, as QEMU
    updates: int = 0             # UPDATEs sent (answers, pushes, maps)
    invalidations: int = 0


class Iommu:
    """The guest's IOMMU for one connection; channel: the front end's end of the back-end
    channel (Device.connect opens it with SET_BACKEND_REQ_FD before SET_OWNER, as QEMU)."""

    def __init__(self, client: VhostUserClient, mem: GuestMemory, channel: socket.socket,
                 static: bool = True) -> None:
        self.client = client
        self.mem = mem
        self.channel = channel
        self.static = static
        self.maps: list[Mapping] = []          # the page table outside the static window
        self.counters = IommuCounters()
        self._lock = threading.Lock()          # the page table (the miss thread reads it)
        self._next_iova = IOVA_DYNAMIC
        self._free: list[tuple[int, int]] = []   # freed dynamic ranges (iova, size)
        self._answering = threading.Event()    # cleared: misses wait (hold())
        self._answering.set()
        self._busy = False                     # the thread has a message (settle())
        self._busy_lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name="dp-viommu", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Misses wait unanswered inside the block (a vIOMMU slow to answer), answered after."""
        self._answering.clear()
        try:
            yield
        finally:
            self._answering.set()

    def settle(self, timeout: float = 5.0) -> None:
        """Wait until every miss the backend has sent so far is answered: nothing unread on
        the channel and no answer under way (inside hold(), a miss waits: DeviceError after
        timeout). The misses a backend sends while it handles a front-end message (those of
        the rings) are on the channel before its reply, so after a round trip on the main
        socket (REPLY_ACK), this leaves none of their answers (UPDATEs) to arrive after what
        the caller sends next; a request's misses come from its I/O thread, at any time."""
        deadline = time.monotonic() + timeout
        while True:
            with self._busy_lock:
                if not self._busy and not select.select([self.channel], [], [], 0)[0]:
                    return
            if time.monotonic() > deadline:
                raise DeviceError(f"vIOMMU misses still unanswered after {timeout:g} s")
            time.sleep(0.005)

    def close(self) -> None:
        self._answering.set()
        try:
            self.channel.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(timeout=10)
        self.channel.close()

    # ---- the page table ----

    def iova(self, gpa: int) -> int:
        """The static window's IOVA of a guest-physical address."""
        if not self.static:
            raise DeviceError("guest memory is not mapped statically")
        return gpa + IOVA_BASE

    def lookup(self, iova: int) -> tuple[int, int, int] | None:
        """(guest-physical address, permission, bytes mapped from there on) of iova, or None."""
        with self._lock:
            i = bisect.bisect_right(self.maps, Mapping(iova, 0, 0, 0)) - 1
            if i >= 0 and self.maps[i].iova <= iova < self.maps[i].end:
                m = self.maps[i]
                return m.gpa + iova - m.iova, m.perm, m.end - iova
        if self.static and IOVA_BASE <= iova < IOVA_DYNAMIC:
            gpa = iova - IOVA_BASE
            for area in (self.mem.base, *self.mem.extra):
                if area.holds(gpa):
                    return gpa, RW, area.gpa + area.size - gpa
        return None

    def alloc_iova(self, size: int) -> int:
        """A free, page-aligned range of dynamic IOVAs (first fit among freed ones)."""
        size = -(-size // PAGE) * PAGE
        with self._lock:
            for k, (iova, n) in enumerate(self._free):
                if n >= size:
                    self._free[k: k + 1] = [(iova + size, n - size)] if n > size else []
                    return iova
            iova, self._next_iova = self._next_iova, self._next_iova + size
            return iova

    def free_iova(self, iova: int, size: int) -> None:
        with self._lock:
            self._free.append((iova, -(-size // PAGE) * PAGE))

    def map(self, gpa: int, size: int, perm: int = RW, iova: int | None = None,
            push: bool = False) -> int:
        """Map [gpa, gpa + size) at iova (default: fresh dynamic IOVAs keeping gpa's offset in
        its page); returns the IOVA of gpa. push: send the UPDATE now instead of waiting for
        the backend's miss."""
        if iova is None:
            first = gpa // PAGE * PAGE
            iova = self.alloc_iova(gpa + size - first) + (gpa - first)
        m = Mapping(iova, size, gpa, perm)
        with self._lock:
            i = bisect.bisect_left(self.maps, m)
            if (i > 0 and self.maps[i - 1].end > iova) or (i < len(self.maps) and self.maps[i].iova < m.end):
                raise DeviceError(f"IOVA {iova:#x}+{size:#x} is mapped already")
            self.maps.insert(i, m)
        if push:
            self.update(iova, size, gpa, perm)
        return iova

    def unmap(self, iova: int, invalidate: bool = True, release: bool = True) -> None:
        """Remove the mapping that starts at iova; invalidate: tell the backend and wait for its
        acknowledgement (strict mode: the buffer is the guest's again only after that)."""
        with self._lock:
            i = bisect.bisect_left(self.maps, Mapping(iova, 0, 0, 0))
            if i == len(self.maps) or self.maps[i].iova != iova:
                raise DeviceError(f"no mapping at IOVA {iova:#x}")
            m = self.maps.pop(i)
        if invalidate:
            self.invalidate(m.iova, m.size)
        if release and m.iova >= IOVA_DYNAMIC:
            first = m.iova // PAGE * PAGE
            self.free_iova(first, m.end - first)

    # ---- the IOTLB protocol ----

    def update(self, iova: int, size: int, gpa: int, perm: int, uaddr: int | None = None) -> None:
        """One UPDATE (uaddr: the front-end address to claim, default gpa's)."""
        self.client.iotlb_msg(iova, size, self.mem.uva(gpa) if uaddr is None else uaddr, perm,
                              IotlbType.UPDATE)
        self.counters.updates += 1

    def invalidate(self, iova: int, size: int) -> None:
        self.client.iotlb_msg(iova, size, 0, 0, IotlbType.INVALIDATE)
        self.counters.invalidations += 1

    def push(self, iova: int, size: int, page: int = PAGE) -> None:
        """UPDATEs for what the page table maps in [iova, iova + size): one per page (as QEMU
        answers misses), or with page=0 one per contiguous piece."""
        end = iova + size
        at = iova
        while at < end:
            got = self.lookup(at)
            if got is None:
                raise DeviceError(f"IOVA {at:#x} is not mapped")
            gpa, perm, room = got
            n = min(room, end - at)
            if page:
                n = min(n, page - at % page)
            self.update(at, n, gpa, perm)
            at += n

    def _answer(self, iova: int, perm: int) -> None:
        """A miss, answered as QEMU's vhost_device_iotlb_miss does: the page holding iova,
        when its mapping allows the access (a write for WO or RW asked)."""
        self.counters.misses += 1
        page = iova // PAGE * PAGE
        start, got = page, self.lookup(page)
        if got is None or got[2] <= iova - page:   # the mapping of iova starts inside the page
            start, got = iova, self.lookup(iova)
        if got is None or not got[1] & (WO if perm != RO else RO):
            self.counters.refused += 1
            return
        gpa, mperm, room = got
        self.update(start, min(room, page + PAGE - start), gpa, mperm)
        self.counters.answered += 1

    def _serve(self) -> None:
        while True:
            try:
                select.select([self.channel], [], [])
                with self._busy_lock:   # settle() sees the message unread or being answered
                    self._busy = True
                try:
                    msg = proto.recv_message(self.channel)
                    if msg is not None:
                        self._handle(msg)
                finally:
                    with self._busy_lock:
                        self._busy = False
            except (OSError, ValueError, ProtocolError) as exc:
                log.debug("back-end channel: %s", exc)
                return
            if msg is None:
                return

    def _handle(self, msg: proto.Message) -> None:
        proto.close_fds(msg.fds)
        if msg.request != BackendRequest.IOTLB_MSG or len(msg.payload) < IOTLB_MSG.size:
            log.warning("back-end channel: unexpected %r", msg)
            return
        iova, _size, _uaddr, perm, type_ = IOTLB_MSG.unpack_from(msg.payload)
        if type_ != IotlbType.MISS:
            log.warning("back-end channel: IOTLB message of type %d", type_)
            return
        self._answering.wait()
        try:
            self._answer(iova, perm)
        except (DeviceError, ProtocolError, OSError) as exc:
            log.warning("answering the miss at %#x: %s", iova, exc)
