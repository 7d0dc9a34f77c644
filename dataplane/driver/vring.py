"""The guest's side of the data path in Python: guest memory (a memfd shared with the
backend) and a split virtqueue producer that writes descriptors into it. Protocol and
hostile-chain tests reach for `Vring.add_chain` / raw descriptors directly; measurements hand
the same rings over to the C driver threads (driver.load, replay)."""

from __future__ import annotations

import ctypes
import mmap
import os
import select
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import DeviceError

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
DESC = struct.Struct("<QIHH")
# (guest-physical address, length, device-writable) -> the address a descriptor carries
Dma = Callable[[int, int, bool], int]


def _need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """vring_need_event() from the virtio spec, on 16-bit indices."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


PAGE = 4096


class _Area:
    """One memfd of guest memory at a guest-physical address, with a first-fit allocator."""

    def __init__(self, size: int, gpa: int, name: str) -> None:
        self.size = size
        self.gpa = gpa
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self.map)
        # Front-end "user address" of the area: where it is mapped in this process.
        self.user_addr = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        self.free_list: list[tuple[int, int]] = [(0, size)]   # (offset, length), sorted
        self.allocated: dict[int, int] = {}

    def holds(self, gpa: int) -> bool:
        return self.gpa <= gpa < self.gpa + self.size

    def alloc(self, length: int, align: int) -> int | None:
        for i, (off, n) in enumerate(self.free_list):
            start = (off + align - 1) // align * align
            end = start + length
            if end <= off + n:
                pieces = [(off, start - off), (end, off + n - end)]
                self.free_list[i: i + 1] = [p for p in pieces if p[1] > 0]
                self.allocated[start] = length
                return self.gpa + start
        return None

    def free(self, gpa: int) -> None:
        start = gpa - self.gpa
        length = self.allocated.pop(start)
        self.free_list.append((start, length))
        self.free_list.sort()
        merged: list[tuple[int, int]] = []
        for off, n in self.free_list:
            if merged and merged[-1][0] + merged[-1][1] == off:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((off, n))
        self.free_list = merged

    def close(self) -> None:
        self.view.release()
        self.map.close()
        os.close(self.fd)


class GuestMemory:
    """Guest physical memory shared with the backend: a base memfd at `gpa_base` (given to the
    backend as `regions` table entries, pieces of the one fd, as QEMU splits a RAMBlock), plus
    memfds added later at their own guest-physical addresses (hot-plugged memory, sent with
    ADD_MEM_REG)."""

    def __init__(self, size: int, gpa_base: int = 0, regions: int = 1) -> None:
        if regions < 1 or size < regions * PAGE:
            raise DeviceError(f"{size} bytes cannot be split into {regions} region(s)")
        self.base = _Area(size, gpa_base, "dataplane-guest")
        self.extra: list[_Area] = []
        self.regions = regions
        # the base area's attributes, as a one-region GuestMemory always had them
        self.size, self.gpa_base, self.fd = size, gpa_base, self.base.fd
        self.map, self.view, self.user_addr = self.base.map, self.base.view, self.base.user_addr

    def table(self) -> list[tuple[int, int, int, int, int]]:
        """The memory table as the backend is told it: (gpa, size, user_addr, mmap_offset, fd)."""
        piece = self.size // self.regions // PAGE * PAGE
        out = []
        for i in range(self.regions):
            off = i * piece
            length = piece if i + 1 < self.regions else self.size - off
            out.append((self.gpa_base + off, length, self.user_addr + off, off, self.fd))
        for a in self.extra:
            out.append((a.gpa, a.size, a.user_addr, 0, a.fd))
        return out

    def end(self) -> int:
        """One past the highest guest-physical address."""
        return max([self.gpa_base + self.size] + [a.gpa + a.size for a in self.extra])

    def add_area(self, size: int, gpa: int | None = None) -> _Area:
        """New memory (not yet told to the backend): at gpa, by default the next GiB boundary
        above everything else."""
        if gpa is None:
            gpa = (self.end() + (1 << 30) - 1) >> 30 << 30
        if any(a.holds(gpa) or a.holds(gpa + size - 1) or gpa <= a.gpa < gpa + size
               for a in [self.base, *self.extra]):
            raise DeviceError(f"guest memory already at {gpa:#x}")
        area = _Area(size, gpa, "dataplane-guest-extra")
        self.extra.append(area)
        return area

    def drop_area(self, area: _Area) -> None:
        self.extra.remove(area)
        area.close()

    def _area(self, gpa: int) -> _Area:
        for a in (self.base, *self.extra):
            if a.holds(gpa):
                return a
        raise DeviceError(f"guest-physical address {gpa:#x} is not guest memory")

    def alloc(self, length: int, align: int = 64, area: _Area | None = None) -> int:
        """First-fit allocation (in the base memory unless area is given); returns a guest
        physical address."""
        got = (area or self.base).alloc(max(length, 1), align)
        if got is None:
            raise DeviceError(f"guest memory exhausted ({length} bytes wanted)")
        return got

    def free(self, gpa: int) -> None:
        self._area(gpa).free(gpa)

    def uva(self, gpa: int) -> int:
        """The front-end address of gpa (outside every area: as if the base area went on,
        which is what tests of addresses beyond guest memory want)."""
        a = next((a for a in self.extra if a.holds(gpa)), self.base)
        return a.user_addr + gpa - a.gpa

    def write(self, gpa: int, data: bytes) -> None:
        a = self._area(gpa)
        off = gpa - a.gpa
        a.view[off: off + len(data)] = data

    def read(self, gpa: int, length: int) -> bytes:
        a = self._area(gpa)
        off = gpa - a.gpa
        return bytes(a.view[off: off + length])

    def close(self) -> None:
        for a in self.extra:
            a.close()
        self.extra = []
        self.base.close()


def wait_used(ring: Any, timeout: float) -> list[tuple[int, int]]:
    """A ring's pop_used, waiting up to timeout on its call eventfd for something to pop."""
    deadline = time.monotonic() + timeout
    while True:
        got = ring.pop_used()
        if got:
            return got
        left = deadline - time.monotonic()
        if left <= 0:
            return []
        r, _, _ = select.select([ring.call_fd], [], [], min(left, 0.05))
        if r:
            try:
                os.eventfd_read(ring.call_fd)
            except BlockingIOError:
                pass


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
    base: int = 0                     # the last GET_VRING_BASE answer
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

    def add_chain(self, bufs: Sequence[tuple[int, int, bool]], indirect: bool = False,
                  dma: Dma | None = None) -> int:
        """Write a chain of (gpa, len, device_writable) buffers; returns its head (unpublished).
        dma(gpa, len, writable): the address the device is to use (behind a vIOMMU, an IOVA),
        for every buffer and the indirect table; default the guest-physical address."""
        if dma is not None:
            bufs = [(dma(addr, length, writable), length, writable) for addr, length, writable in bufs]
        if indirect:
            table = self.mem.alloc(16 * len(bufs), 16)
            for i, (addr, length, writable) in enumerate(bufs):
                flags = (VRING_DESC_F_WRITE if writable else 0) | (
                    VRING_DESC_F_NEXT if i + 1 < len(bufs) else 0)
                self.mem.write(table + 16 * i, DESC.pack(addr, length, flags, i + 1))
            head = self._take_desc(1)[0]
            table_addr = dma(table, 16 * len(bufs), False) if dma is not None else table
            self.write_desc(head, table_addr, 16 * len(bufs), VRING_DESC_F_INDIRECT)
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
        return wait_used(self, timeout)

    def reconnect_base(self) -> int:
        """What QEMU re-sends as SET_VRING_BASE after the backend died: the used index
        (virtio_queue_restore_last_avail_idx)."""
        return self.used_idx()

    def close(self) -> None:
        for fd in (self.kick_fd, self.call_fd):
            if fd >= 0:
                os.close(fd)
        self.kick_fd = self.call_fd = -1
