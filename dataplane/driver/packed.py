"""The driver side of a packed virtqueue (virtio 1.2, 2.8) in Python, with the same surface as
the split `Vring` (vring.py): `add_chain` + `publish` + `kick`, `pop_used`, `wait_used`, raw
descriptor writes for hostile-chain tests. Measurements hand the ring to the C driver threads
(csrc/driver/packed_driver.h), which take its positions over.

One ring of 16-byte descriptors `{addr, len, id, flags}` that both sides write, plus two 4-byte
event suppression areas: the driver's (read by the device: when to interrupt) and the
device's (when to kick). Positions wrap by comparison (the size need not be a power of two);
each side keeps a wrap counter, starting at 1, that flips when its position passes the end.
"""

from __future__ import annotations

import os
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import DeviceError
from .vring import (
    DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    Dma,
    GuestMemory,
    wait_used,
)

PDESC = struct.Struct("<QIHH")        # addr, len, id, flags
EVENT = struct.Struct("<HH")          # off_wrap, flags
F_AVAIL = 1 << 7
F_USED = 1 << 15
EVENT_ENABLE, EVENT_DISABLE, EVENT_DESC = 0, 1, 2
WRAP_BIT = 15
BASE_RESET = 0x80008000               # GET/SET_VRING_BASE of a reset packed ring
assert DESC.size == PDESC.size


def avail_bits(wrap: int) -> int:
    """The AVAIL/USED bits of a descriptor made available on wrap counter `wrap`."""
    return F_AVAIL if wrap else F_USED


def used_bits(wrap: int) -> int:
    return F_AVAIL | F_USED if wrap else 0


def is_used(flags: int, wrap: int) -> bool:
    return bool(flags & F_AVAIL) == bool(wrap) and bool(flags & F_USED) == bool(wrap)


def need_event(off_wrap: int, wrap: int, new: int, old: int, num: int) -> bool:
    """vring_need_event() on a packed ring (old may be new - count, mod 2^16)."""
    off = off_wrap & 0x7FFF
    if (off_wrap >> WRAP_BIT) != wrap:
        off -= num
    return ((new - off - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


def encode_position(idx: int, wrap: int) -> int:
    return idx | (wrap << WRAP_BIT)


@dataclass
class PackedVring:
    """Driver side of a packed virtqueue living in GuestMemory. `desc` is the descriptor ring,
    `avail` the driver event area and `used` the device event area: the addresses
    SET_VRING_ADDR carries in those fields for a packed ring."""

    mem: GuestMemory
    index: int
    num: int
    event_idx: bool = True
    desc: int = 0
    avail: int = 0
    used: int = 0
    kick_fd: int = -1
    call_fd: int = -1
    next_avail: int = 0
    avail_wrap: int = 1
    next_used: int = 0
    used_wrap: int = 1
    base: int = BASE_RESET            # what a front end last knew of the device's position
    free_ids: deque[int] = field(default_factory=deque)
    chains: dict[int, list[int]] = field(default_factory=dict)   # id -> indirect tables (negative)
    ndesc: dict[int, int] = field(default_factory=dict)          # id -> ring slots of its list
    unexpected_used: list[tuple[int, int]] = field(default_factory=list)
    pending: dict[int, tuple[int, int]] = field(default_factory=dict)   # id -> (head slot, flags)
    in_ring: int = 0                  # ring slots of lists not used yet
    published: int = 0                # slots made available so far (kick decisions)
    kicked_at: int = 0                # `published` at the last kick decision
    used_seen: int = 0                # used descriptors consumed so far

    def __post_init__(self) -> None:
        self.desc = self.mem.alloc(16 * self.num, 16)
        self.avail = self.mem.alloc(EVENT.size, 4096)
        self.used = self.mem.alloc(EVENT.size, 4096)
        self.mem.write(self.desc, bytes(16 * self.num))
        self.mem.write(self.used, bytes(EVENT.size))
        self.set_driver_event(encode_position(0, 1), EVENT_DESC if self.event_idx else EVENT_ENABLE)
        self.free_ids = deque(range(self.num))
        self.kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    # -- positions, as the C driver threads take them over (bit 15: the wrap counter) --

    @property
    def avail_idx(self) -> int:
        return encode_position(self.next_avail, self.avail_wrap)

    @avail_idx.setter
    def avail_idx(self, value: int) -> None:
        self.next_avail, self.avail_wrap = value & 0x7FFF, (value >> WRAP_BIT) & 1
        self.kicked_at = self.published

    @property
    def last_used_idx(self) -> int:
        return encode_position(self.next_used, self.used_wrap)

    @last_used_idx.setter
    def last_used_idx(self, value: int) -> None:
        self.next_used, self.used_wrap = value & 0x7FFF, (value >> WRAP_BIT) & 1

    def reconnect_base(self) -> int:
        """What QEMU re-sends as SET_VRING_BASE after the backend died: the last base it knew
        (nothing in shared memory tells it more for a packed ring)."""
        return self.base

    # -- raw access (tests of hostile chains write whatever they like) --

    def write_desc(self, slot: int, addr: int, length: int, flags: int, id_: int = 0) -> None:
        self.mem.write(self.desc + 16 * slot, PDESC.pack(addr, length, id_, flags))

    def read_desc(self, slot: int) -> tuple[int, int, int, int]:
        """(addr, len, id, flags) of a ring slot."""
        return PDESC.unpack(self.mem.read(self.desc + 16 * slot, 16))

    def set_driver_event(self, off_wrap: int, flags: int) -> None:
        self.mem.write(self.avail, EVENT.pack(off_wrap, flags))

    def device_event(self) -> tuple[int, int]:
        return EVENT.unpack(self.mem.read(self.used, EVENT.size))

    def advance(self, slots: int = 1) -> None:
        """Move the avail position on (past descriptors written, published or not)."""
        for _ in range(slots):
            self.next_avail += 1
            if self.next_avail == self.num:
                self.next_avail, self.avail_wrap = 0, self.avail_wrap ^ 1

    def kick(self, old_avail_idx: int | None = None) -> bool:
        """Notify the device. With old_avail_idx (any value: the ring counts what was published
        since the last decision), only when its event area asks for it; without, always."""
        count = self.published - self.kicked_at
        self.kicked_at = self.published
        if old_avail_idx is not None:
            off_wrap, flags = self.device_event()
            if flags & 3 == EVENT_DISABLE:
                return False
            if flags & 3 == EVENT_DESC and self.event_idx and not need_event(
                    off_wrap, self.avail_wrap, self.next_avail, self.next_avail - count, self.num):
                return False
        os.eventfd_write(self.kick_fd, 1)
        return True

    # -- lists --

    def add_chain(self, bufs: Sequence[tuple[int, int, bool]], indirect: bool = False,
                  dma: Dma | None = None) -> int:
        """Write a list of (gpa, len, device_writable) buffers into the ring at the avail
        position; returns its buffer id. The head's flags wait for publish(id). dma: as for
        the split ring's add_chain."""
        if dma is not None:
            bufs = [(dma(addr, length, writable), length, writable) for addr, length, writable in bufs]
        if not self.free_ids:
            raise DeviceError(f"queue {self.index}: no free buffer id")
        slots = 1 if indirect else len(bufs)
        if self.in_ring + slots > self.num:
            raise DeviceError(f"queue {self.index}: {slots} descriptors wanted, "
                              f"{self.num - self.in_ring} free")
        id_ = self.free_ids.popleft()
        owned: list[int] = []
        if indirect:
            table = self.mem.alloc(16 * len(bufs), 16)
            for i, (addr, length, writable) in enumerate(bufs):
                self.mem.write(table + 16 * i, PDESC.pack(addr, length, 0,
                                                          VRING_DESC_F_WRITE if writable else 0))
            owned.append(-table)
            table_addr = dma(table, 16 * len(bufs), False) if dma is not None else table
            descs = [(table_addr, 16 * len(bufs), VRING_DESC_F_INDIRECT)]
        else:
            descs = [(addr, length, (VRING_DESC_F_WRITE if writable else 0)
                      | (VRING_DESC_F_NEXT if i + 1 < len(bufs) else 0))
                     for i, (addr, length, writable) in enumerate(bufs)]
        head_slot = self.next_avail
        for i, (addr, length, flags) in enumerate(descs):
            bits = flags | avail_bits(self.avail_wrap)
            if i == 0:
                self.write_desc(self.next_avail, addr, length, 0, id_)   # not available yet
                self.pending[id_] = (head_slot, bits)
            else:
                self.write_desc(self.next_avail, addr, length, bits, id_)
            self.advance()
        self.chains[id_] = owned
        self.ndesc[id_] = slots
        self.in_ring += slots
        return id_

    def publish(self, id_: int) -> None:
        """Make a list added by add_chain the device's: its head's flags, written last."""
        slot, flags = self.pending.pop(id_)
        self.mem.write(self.desc + 16 * slot + 14, struct.pack("<H", flags))
        self.published += self.ndesc[id_]

    def _used_at(self, slot: int, wrap: int) -> tuple[int, int] | None:
        _addr, length, id_, flags = self.read_desc(slot)
        return (id_, length) if is_used(flags, wrap) else None

    def used_idx(self) -> int:
        """Used descriptors the device has written so far (consumed or not)."""
        n, slot, wrap = 0, self.next_used, self.used_wrap
        while n < self.num and (got := self._used_at(slot, wrap)) is not None:
            n += 1
            for _ in range(self.ndesc.get(got[0], 1)):
                slot += 1
                if slot == self.num:
                    slot, wrap = 0, wrap ^ 1
        return self.used_seen + n

    def pop_used(self) -> list[tuple[int, int]]:
        """Collect used descriptors (id, len) and recycle their ids, tables and slots."""
        out = []
        while (got := self._used_at(self.next_used, self.used_wrap)) is not None:
            id_, length = got
            self.used_seen += 1
            slots = 1
            if id_ in self.chains:
                for d in self.chains.pop(id_):
                    self.mem.free(-d)
                slots = self.ndesc.pop(id_)
                self.free_ids.append(id_)
                self.in_ring -= slots
            else:   # completed twice, or never given: what a broken backend does
                self.unexpected_used.append((id_, length))
            for _ in range(slots):
                self.next_used += 1
                if self.next_used == self.num:
                    self.next_used, self.used_wrap = 0, self.used_wrap ^ 1
            out.append((id_, length))
        if self.event_idx:   # interrupt on the next used descriptor
            self.set_driver_event(encode_position(self.next_used, self.used_wrap), EVENT_DESC)
        return out

    def wait_used(self, timeout: float) -> list[tuple[int, int]]:
        return wait_used(self, timeout)

    def reset(self) -> None:
        """Both sides back at the start (what a driver does after a ring reset)."""
        self.mem.write(self.desc, bytes(16 * self.num))
        self.mem.write(self.used, bytes(EVENT.size))
        self.set_driver_event(encode_position(0, 1), EVENT_DESC if self.event_idx else EVENT_ENABLE)
        self.next_avail = self.next_used = 0
        self.avail_wrap = self.used_wrap = 1
        self.base = BASE_RESET
        for tables in self.chains.values():
            for d in tables:
                self.mem.free(-d)
        self.free_ids = deque(range(self.num))
        self.chains, self.ndesc, self.pending = {}, {}, {}
        self.in_ring = self.published = self.kicked_at = self.used_seen = 0

    def close(self) -> None:
        for fd in (self.kick_fd, self.call_fd):
            if fd >= 0:
                os.close(fd)
        self.kick_fd = self.call_fd = -1
