"""The C packed-ring walker (csrc/vhost/packed.c) against a fake guest memory, and its
inflight region (QueueRegionPacked) with a back end "killed" between any two steps.

The driver side is dataplane.driver.packed.PackedVring writing into a memfd; the device side
is the C core's dp_vq_pop_chain / dp_vq_push_used / dp_vq_need_notify / dp_vq_enable_notify
(no threads), and for resubmission a real I/O thread on a null disk.
"""

from __future__ import annotations

import errno
import os
import struct
import time

import pytest

from dataplane.core import ffi, lib
from dataplane.disks import open_disk
from dataplane.driver.packed import (
    BASE_RESET,
    EVENT_DESC,
    EVENT_DISABLE,
    EVENT_ENABLE,
    F_AVAIL,
    F_USED,
    PackedVring,
    avail_bits,
    encode_position,
    used_bits,
)
from dataplane.driver.vring import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, GuestMemory

INDIRECT, EVENT_IDX, PACKED = lib.DP_VQ_F_INDIRECT, lib.DP_VQ_F_EVENT_IDX, lib.DP_VQ_F_PACKED
HDR, DATA, STATUS = 0x10000, 0x20000, 0x30000
REGION_HEADER = struct.Struct("<QHHHHHHBB10x")  # QueueRegionPacked: 32 bytes, 7 of padding + 3 of alignment
ENTRY = struct.Struct("<BxHHHQHHIQ")           # DescStatePacked: 32 bytes
assert REGION_HEADER.size == 32 and ENTRY.size == 32


class Harness:
    def __init__(self, num: int = 8, flags: int = INDIRECT, event_idx: bool = False,
                 gmem: GuestMemory | None = None, ring: PackedVring | None = None) -> None:
        self.gmem = gmem or GuestMemory(1 << 20)
        self.mem = lib.dp_mem_new()
        assert lib.dp_mem_add_region(self.mem, 0, self.gmem.size, self.gmem.user_addr,
                                     ffi.cast("void *", self.gmem.user_addr)) == 0
        self.disk = open_disk("null:1M")
        self.ring = ring or PackedVring(self.gmem, 0, num, event_idx=event_idx)
        self.vq = lib.dp_vq_new(self.disk.blk, 0)
        assert lib.dp_vq_set_flags(self.vq, flags | PACKED) == 0
        assert lib.dp_vq_set_num(self.vq, self.ring.num) == 0
        assert lib.dp_vq_set_packed_base(self.vq, BASE_RESET) == 0
        assert lib.dp_vq_set_addr(self.vq, self.mem, self.gmem.uva(self.ring.desc),
                                  self.gmem.uva(self.ring.avail), self.gmem.uva(self.ring.used)) == 0
        self.segs = ffi.new("struct dp_seg[64]")
        self.head = ffi.new("uint16_t *")
        self.region: object | None = None

    def pop(self) -> tuple[int, list[tuple[int, int, bool]] | int]:
        rc = lib.dp_vq_pop_chain(self.vq, self.head, self.segs, 64)
        if rc < 0:
            return self.head[0], rc
        return self.head[0], [(self.segs[i].host_addr - self.gmem.user_addr, self.segs[i].len,
                               bool(self.segs[i].writable)) for i in range(rc)]

    def submit(self, bufs=None, indirect: bool = False) -> int:
        id_ = self.ring.add_chain(bufs or [(HDR, 16, False), (DATA, 4096, True), (STATUS, 1, True)],
                                  indirect=indirect)
        self.ring.publish(id_)
        return id_

    def base(self) -> int:
        return lib.dp_vq_packed_base(self.vq)

    def broken(self) -> bool:
        return bool(lib.dp_vq_broken(self.vq))

    def close(self, keep_memory: bool = False) -> None:
        lib.dp_vq_free(self.vq)
        lib.dp_mem_free(self.mem)
        self.disk.close()
        if not keep_memory:
            self.ring.close()
            self.gmem.close()


@pytest.fixture
def h():
    harness = Harness()
    yield harness
    harness.close()


def desc_bits(ring: PackedVring, slot: int) -> int:
    return ring.read_desc(slot)[3] & (F_AVAIL | F_USED)


# ---- lists, ids, used descriptors ----

def test_empty_ring_pops_nothing(h):
    assert h.pop()[1] == -errno.EAGAIN
    assert not h.broken()


def test_direct_list_is_translated_in_order_and_its_id_is_the_last_descriptors(h):
    bufs = [(HDR, 16, False), (DATA, 4096, True), (STATUS, 1, True)]
    id_ = h.ring.add_chain(bufs)
    # Linux writes the id into every descriptor; the spec puts it in the last one (2.8.6).
    for slot in (0, 1):
        addr, length, _, flags = h.ring.read_desc(slot)
        h.ring.write_desc(slot, addr, length, flags, 5)
    h.ring.publish(id_)
    assert h.pop() == (id_, bufs)
    assert h.pop()[1] == -errno.EAGAIN
    assert h.base() == encode_position(3, 1) | BASE_RESET & 0xFFFF0000


def test_indirect_table_is_followed_and_takes_one_slot(h):
    bufs = [(HDR, 16, False), (DATA, 512, False), (DATA + 512, 512, False), (STATUS, 1, True)]
    id_ = h.submit(bufs, indirect=True)
    assert h.pop() == (id_, bufs)
    assert h.base() & 0xFFFF == encode_position(1, 1)


def test_a_used_descriptor_goes_to_the_used_position_with_id_len_and_flags(h):
    id_ = h.submit()
    h.pop()
    lib.dp_vq_push_used(h.vq, id_, 4097)
    addr, length, got_id, flags = h.ring.read_desc(0)
    assert (got_id, length) == (id_, 4097)
    assert flags == used_bits(1) | VRING_DESC_F_WRITE   # WRITE: len counts written bytes
    assert h.ring.pop_used() == [(id_, 4097)]
    assert h.base() == 0x80038003   # 3 slots read, the used position moved by the list's 3


def test_out_of_order_completion_writes_used_descriptors_in_completion_order(h):
    a = h.submit()                                   # slots 0-2
    b = h.submit([(HDR, 16, False), (STATUS, 1, True)], indirect=True)   # slot 3
    assert h.pop()[0] == a and h.pop()[0] == b
    lib.dp_vq_push_used(h.vq, b, 1)                  # b first: at slot 0, used position 1
    assert h.ring.read_desc(0)[2] == b
    lib.dp_vq_push_used(h.vq, a, 1)                  # then a at slot 1, position 1 + 3
    assert h.ring.read_desc(1)[2] == a
    assert desc_bits(h.ring, 2) == avail_bits(1)     # slots 2 and 3 are skipped, not written
    assert h.ring.pop_used() == [(b, 1), (a, 1)]
    assert (h.base() >> 16) == encode_position(4, 1)


def test_both_wrap_counters_flip_and_the_base_encodes_them():
    """A ring of 6 (packed rings need not be a power of two): lists of 1 and 2 slots, laps
    and laps around; the wrap counters flip when each position passes the end."""
    harness = Harness(num=6)
    try:
        ring = harness.ring
        for i in range(40):
            bufs = [(HDR, 16, False), (STATUS, 1, True)]
            id_ = harness.submit(bufs, indirect=i % 3 == 0)
            assert harness.pop() == (id_, bufs)
            lib.dp_vq_push_used(harness.vq, id_, 1)
            assert ring.pop_used() == [(id_, 1)]
            assert harness.base() == ring.avail_idx | ring.last_used_idx << 16
        assert ring.avail_wrap in (0, 1) and ring.published > 2 * ring.num
        assert harness.base() & 0x7FFF < 6
    finally:
        harness.close()


def test_split_rings_still_need_a_power_of_two_packed_rings_do_not(h):
    vq = lib.dp_vq_new(h.disk.blk, 1)
    try:
        assert lib.dp_vq_set_num(vq, 6) == -errno.EINVAL
        lib.dp_vq_set_flags(vq, PACKED)
        assert lib.dp_vq_set_num(vq, 6) == 0
        assert lib.dp_vq_set_num(vq, 1025) == -errno.EINVAL
    finally:
        lib.dp_vq_free(vq)


def test_a_base_beyond_the_ring_is_refused(h):
    lib.dp_vq_set_packed_base(h.vq, 0x80008000 | 9)        # next avail 9 in a ring of 8
    assert h.pop()[1] == -errno.EINVAL
    lib.dp_vq_set_packed_base(h.vq, 0x80008000 | (8 << 16))
    assert lib.dp_vq_prepare(h.vq) == -errno.EINVAL


def test_a_list_in_flight_survives_its_slots_being_reused_by_the_next_lap(h):
    """Out of order: the slots of a finished list are the driver's again while an older one
    is still in flight; the device copied what it needed at fetch time."""
    slow = h.submit([(HDR, 16, False), (STATUS, 1, True)], indirect=True)
    assert h.pop()[0] == slow
    for _ in range(20):
        id_ = h.submit([(HDR, 16, False), (STATUS, 1, True)], indirect=True)
        assert h.pop()[0] == id_
        lib.dp_vq_push_used(h.vq, id_, 1)
        assert h.ring.pop_used() == [(id_, 1)]
    lib.dp_vq_push_used(h.vq, slow, 1)
    assert h.ring.pop_used() == [(slow, 1)]


# ---- event suppression ----

def test_interrupts_follow_the_driver_area_flags(h):
    def complete_one() -> None:
        id_ = h.submit([(HDR, 16, False), (STATUS, 1, True)], indirect=True)
        h.pop()
        lib.dp_vq_push_used(h.vq, id_, 1)

    complete_one()
    h.ring.set_driver_event(0, EVENT_DISABLE)
    assert lib.dp_vq_need_notify(h.vq) == 0
    complete_one()
    h.ring.set_driver_event(0, EVENT_ENABLE)
    assert lib.dp_vq_need_notify(h.vq) == 1
    complete_one()
    h.ring.set_driver_event(0, EVENT_DESC)   # DESC without EVENT_IDX means nothing: interrupt
    assert lib.dp_vq_need_notify(h.vq) == 1


def test_event_idx_offsets_decide_interrupts_across_laps():
    # The test sets the driver area itself (the Python ring leaves it alone without event_idx).
    harness = Harness(num=8, event_idx=False, flags=INDIRECT | EVENT_IDX)
    try:
        ring = harness.ring

        def complete(n: int = 1) -> None:
            for _ in range(n):
                id_ = harness.submit([(HDR, 16, False), (STATUS, 1, True)], indirect=True)
                harness.pop()
                lib.dp_vq_push_used(harness.vq, id_, 1)
                assert ring.pop_used() == [(id_, 1)]

        complete()                                       # used position 1
        assert lib.dp_vq_need_notify(harness.vq) == 1    # the first decision always signals
        ring.set_driver_event(encode_position(4, 1), EVENT_DESC)   # wake me past slot 4
        complete(3)                                      # position 4: not past it yet
        assert lib.dp_vq_need_notify(harness.vq) == 0
        complete()                                       # position 5: passed slot 4
        assert lib.dp_vq_need_notify(harness.vq) == 1
        ring.set_driver_event(encode_position(1, 0), EVENT_DESC)   # slot 1 of the next lap
        complete(3)                                      # position 0 of lap 0: wrapped
        assert lib.dp_vq_need_notify(harness.vq) == 1    # a wrap signals once
        complete()                                       # position 1: not past slot 1
        assert lib.dp_vq_need_notify(harness.vq) == 0
        complete()
        assert lib.dp_vq_need_notify(harness.vq) == 1
        ring.set_driver_event(encode_position(7, 0), EVENT_DISABLE)
        complete(6)
        assert lib.dp_vq_need_notify(harness.vq) == 0
    finally:
        harness.close()


def test_enable_notify_asks_for_a_kick_at_the_next_slot():
    harness = Harness(num=8, event_idx=True, flags=INDIRECT | EVENT_IDX)
    try:
        ring = harness.ring
        for _ in range(9):   # into the second lap
            id_ = harness.submit([(HDR, 16, False), (STATUS, 1, True)], indirect=True)
            harness.pop()
            lib.dp_vq_push_used(harness.vq, id_, 1)
            ring.pop_used()
        assert lib.dp_vq_enable_notify(harness.vq) == 0
        assert ring.device_event() == (encode_position(1, 0), EVENT_DESC)
        id_ = ring.add_chain([(HDR, 16, False), (STATUS, 1, True)], indirect=True)
        ring.publish(id_)
        assert lib.dp_vq_enable_notify(harness.vq) == 1   # arrived meanwhile
        assert ring.kick(0) is True                       # and the driver's rule says kick
    finally:
        harness.close()


def test_without_event_idx_kicks_stay_enabled(h):
    h.ring.mem.write(h.ring.used, struct.pack("<HH", 0, EVENT_DISABLE))
    assert lib.dp_vq_enable_notify(h.vq) == 0
    assert h.ring.device_event()[1] == EVENT_ENABLE


# ---- lists a hostile or buggy driver could write ----

def raw(h: Harness, descs: list[tuple[int, int, int, int]], wrap: int = 1) -> None:
    """Write (addr, len, flags, id) at slots 0.. with the AVAIL/USED bits of wrap; the head's
    flags last."""
    for i, (addr, length, flags, id_) in reversed(list(enumerate(descs))):
        h.ring.write_desc(i, addr, length, flags | avail_bits(wrap), id_)


def test_wrong_wrap_bits_are_not_available(h):
    raw(h, [(HDR, 16, 0, 0)], wrap=0)                          # the previous lap's avail bits
    assert h.pop()[1] == -errno.EAGAIN
    h.ring.write_desc(0, HDR, 16, F_AVAIL | F_USED, 0)          # AVAIL flipped, USED too: used
    assert h.pop()[1] == -errno.EAGAIN
    h.ring.write_desc(0, HDR, 16, 0, 0)                         # neither
    assert h.pop()[1] == -errno.EAGAIN
    assert not h.broken()
    raw(h, [(HDR, 16, VRING_DESC_F_NEXT, 0), (STATUS, 1, VRING_DESC_F_WRITE, 3)])
    assert h.pop() == (3, [(HDR, 16, False), (STATUS, 1, True)])


def test_an_id_out_of_range_breaks_the_ring(h):
    raw(h, [(STATUS, 1, VRING_DESC_F_WRITE, 8)])
    assert h.pop()[1] == -errno.EIO
    assert h.broken()


def test_an_id_still_in_flight_breaks_the_ring(h):
    raw(h, [(STATUS, 1, VRING_DESC_F_WRITE, 2), (STATUS, 1, VRING_DESC_F_WRITE, 2)])
    assert h.pop()[0] == 2
    assert h.pop()[1] == -errno.EIO   # completing 2 twice would kill a Linux guest


def test_a_list_longer_than_the_ring_breaks_it(h):
    for i in range(8):
        h.ring.write_desc(i, HDR, 16, VRING_DESC_F_NEXT | avail_bits(1), 0)
    # slot 0 again, one lap on: the walker would read the head of its own list
    assert h.pop()[1] == -errno.EIO


def test_a_list_longer_than_the_free_slots_breaks_the_ring(h):
    raw(h, [(STATUS, 1, VRING_DESC_F_WRITE, 0)] + [(HDR, 16, VRING_DESC_F_NEXT, 0)] * 6
        + [(STATUS, 1, VRING_DESC_F_WRITE, 1)])
    assert h.pop()[0] == 0                    # one slot in flight
    # the next lap's slot 0 looks available: 8 slots would be in flight in a ring of 8
    h.ring.write_desc(0, STATUS, 1, VRING_DESC_F_WRITE | avail_bits(0), 2)
    assert h.pop()[0] == 1
    assert h.pop()[1] == -errno.EIO


def test_a_published_list_whose_tail_is_not_available_breaks_the_ring(h):
    h.ring.write_desc(1, STATUS, 1, VRING_DESC_F_WRITE, 0)   # no AVAIL bits
    h.ring.write_desc(0, HDR, 16, VRING_DESC_F_NEXT | avail_bits(1), 0)
    assert h.pop()[1] == -errno.EIO


def test_indirect_in_indirect_breaks_the_ring(h):
    inner = h.gmem.alloc(16, 16)
    outer = h.gmem.alloc(16, 16)
    h.gmem.write(inner, struct.pack("<QIHH", STATUS, 1, 0, VRING_DESC_F_WRITE))
    h.gmem.write(outer, struct.pack("<QIHH", inner, 16, 0, VRING_DESC_F_INDIRECT))
    raw(h, [(outer, 16, VRING_DESC_F_INDIRECT, 0)])
    assert h.pop()[1] == -errno.EIO


def test_next_inside_an_indirect_table_breaks_the_ring(h):
    table = h.gmem.alloc(32, 16)
    h.gmem.write(table, struct.pack("<QIHH", HDR, 16, 0, VRING_DESC_F_NEXT)
                 + struct.pack("<QIHH", STATUS, 1, 0, VRING_DESC_F_WRITE))
    raw(h, [(table, 32, VRING_DESC_F_INDIRECT, 0)])
    assert h.pop()[1] == -errno.EIO


def test_indirect_with_next_or_inside_a_list_breaks_the_ring(h):
    table = h.gmem.alloc(16, 16)
    h.gmem.write(table, struct.pack("<QIHH", STATUS, 1, 0, VRING_DESC_F_WRITE))
    raw(h, [(table, 16, VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, 0), (STATUS, 1, VRING_DESC_F_WRITE, 0)])
    assert h.pop()[1] == -errno.EIO
    other = Harness()
    try:
        raw(other, [(HDR, 16, VRING_DESC_F_NEXT, 0), (table, 16, VRING_DESC_F_INDIRECT, 0)])
        assert other.pop()[1] == -errno.EIO
    finally:
        other.close()


@pytest.mark.parametrize("length", [0, 24, 16 * 1025])
def test_an_indirect_table_of_bad_length_breaks_the_ring(h, length):
    table = h.gmem.alloc(16 * 1025, 16)
    raw(h, [(table, length, VRING_DESC_F_INDIRECT, 0)])
    assert h.pop()[1] == -errno.EIO


def test_indirect_refused_when_not_negotiated():
    harness = Harness(flags=0)
    try:
        harness.submit([(HDR, 16, False), (STATUS, 1, True)], indirect=True)
        assert harness.pop()[1] == -errno.EIO
    finally:
        harness.close()


def test_bad_buffers_are_a_bad_request_not_a_broken_ring(h):
    id_ = h.submit([(HDR, 16, False), (h.gmem.size - 100, 4096, True)])
    assert h.pop() == (id_, -errno.EFAULT)
    id2 = h.submit([(HDR, 16, True), (DATA, 16, False)])
    assert h.pop() == (id2, -errno.EINVAL)   # readable after writable
    assert not h.broken()


# ---- inflight tracking: QueueRegionPacked across a back end's death ----

class Region:
    """One queue's QueueRegionPacked in a memfd, as a front end keeps it."""

    def __init__(self, num: int) -> None:
        self.num = num
        self.size = lib.dp_inflight_packed_queue_size(num)
        self.fd = os.memfd_create("inflight", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.size)
        self.maps: list[object] = []

    def map(self) -> object:
        addr = lib.dp_map_shared(self.fd, self.size, 0)
        assert addr != ffi.NULL
        self.maps.append(addr)
        return addr

    def header(self) -> dict[str, int]:
        names = ("features", "version", "desc_num", "free_head", "old_free_head", "used_idx",
                 "old_used_idx", "used_wrap", "old_used_wrap")
        return dict(zip(names, REGION_HEADER.unpack(os.pread(self.fd, 32, 0)), strict=True))

    def set(self, **fields: int) -> None:
        offsets = {"free_head": (12, "<H"), "old_free_head": (14, "<H"), "used_idx": (16, "<H"),
                   "old_used_idx": (18, "<H"), "used_wrap": (20, "<B"), "old_used_wrap": (21, "<B")}
        for name, value in fields.items():
            off, fmt = offsets[name]
            os.pwrite(self.fd, struct.pack(fmt, value), off)

    def entry(self, i: int) -> tuple:
        return ENTRY.unpack(os.pread(self.fd, 32, 32 + 32 * i))

    def close(self) -> None:
        for addr in self.maps:
            lib.dp_unmap_shared(addr, self.size)
        os.close(self.fd)


def first_backend(num: int = 8) -> tuple[Harness, Region]:
    """A back end with a fresh region, started (region set up from the base)."""
    harness = Harness(num=num)
    region = Region(num)
    assert lib.dp_vq_set_inflight(harness.vq, region.map(), 1) == 0
    assert lib.dp_vq_prepare(harness.vq) == 0
    assert region.header()["version"] == 1
    return harness, region


def second_backend(first: Harness, region: Region, base: int = BASE_RESET) -> Harness:
    """The first one is gone (its queue never stopped); a new one gets the same ring memory, a
    stale base and the region."""
    first.close(keep_memory=True)
    harness = Harness(gmem=first.gmem, ring=first.ring)
    lib.dp_vq_set_packed_base(harness.vq, base)
    assert lib.dp_vq_set_inflight(harness.vq, region.map(), 1) == 0
    return harness


def resubmits(harness: Harness) -> list[int]:
    n = lib.dp_vq_prepare(harness.vq)
    assert n >= 0, os.strerror(-n)
    ids = ffi.new("uint16_t[]", max(n, 1))
    assert lib.dp_vq_resubmits(harness.vq, ids, n) == n
    return list(ids[0:n])


def test_the_ring_position_and_what_was_in_flight_come_back_from_the_region():
    """Lists of 3, 1 and 1 slots; the middle one completed out of order before the death.
    The second back end ignores the stale base: the used position is the region's, and the
    next slot to read lies past every list still in flight."""
    first, region = first_backend()
    a = first.submit()                                                     # slots 0-2
    b = first.submit([(HDR, 16, False), (STATUS, 1, True)], indirect=True)  # slot 3
    c = first.submit([(HDR, 16, False), (STATUS, 1, True)], indirect=True)  # slot 4
    assert [first.pop()[0] for _ in range(3)] == [a, b, c]
    lib.dp_vq_push_used(first.vq, b, 1)
    assert first.ring.pop_used() == [(b, 1)]
    second = second_backend(first, region)
    try:
        assert resubmits(second) == [a, c]                  # fetch order
        assert second.base() == encode_position(5, 1) | encode_position(1, 1) << 16
        stats = ffi.new("struct dp_vq_stats *")
        lib.dp_vq_get_stats(second.vq, stats)
        assert stats.recovered_out_of_order == 1            # a: older than b, which completed
    finally:
        second.close()
        region.close()


def test_a_kill_after_the_used_descriptor_landed_commits_the_completion():
    first, region = first_backend()
    a = first.submit([(HDR, 16, False), (STATUS, 1, True)], indirect=True)
    b = first.submit([(HDR, 16, False), (STATUS, 1, True)], indirect=True)
    first.pop()
    first.pop()
    before = region.header()
    lib.dp_vq_push_used(first.vq, a, 1)
    # Killed after the used descriptor and the inflight flag, before the commit point.
    region.set(old_free_head=before["old_free_head"], old_used_idx=before["old_used_idx"],
               old_used_wrap=before["old_used_wrap"])
    second = second_backend(first, region)
    try:
        assert resubmits(second) == [b]
        assert second.base() == encode_position(2, 1) | encode_position(1, 1) << 16
    finally:
        second.close()
        region.close()


def test_a_kill_before_the_used_descriptor_landed_rolls_the_completion_back():
    first, region = first_backend()
    a = first.submit([(HDR, 16, False), (STATUS, 1, True)], indirect=True)
    first.pop()
    before = region.header()
    slot0 = first.ring.read_desc(0)
    lib.dp_vq_push_used(first.vq, a, 1)
    # Killed after the region moved on, before the used descriptor reached the ring.
    first.ring.write_desc(0, slot0[0], slot0[1], slot0[3], slot0[2])
    region.set(old_free_head=before["old_free_head"], old_used_idx=before["old_used_idx"],
               old_used_wrap=before["old_used_wrap"])
    os.pwrite(region.fd, b"\x01", 32)   # and the inflight flag of its head entry (0) still set
    second = second_backend(first, region)
    try:
        assert resubmits(second) == [a]
        assert second.base() == encode_position(1, 1) | encode_position(0, 1) << 16
    finally:
        second.close()
        region.close()


def test_a_kill_in_the_middle_of_a_fetch_leaves_the_list_to_be_read_again():
    first, region = first_backend()
    a = first.submit()
    first.pop()
    # Killed while recording the next list: free_head moved, old_free_head did not.
    hdr = region.header()
    first.submit()
    region.set(free_head=(hdr["free_head"] + 2) % 8)
    os.pwrite(region.fd, b"\x01", 32 + 32 * hdr["free_head"])   # its head marked in flight
    second = second_backend(first, region)
    try:
        assert resubmits(second) == [a]
        assert second.base() & 0xFFFF == encode_position(3, 1)   # the second list: read again
        assert second.pop()[0] == 1
    finally:
        second.close()
        region.close()


def test_a_region_that_does_not_hold_together_fails_the_start():
    first, region = first_backend()
    first.submit()
    first.pop()
    region.set(free_head=1, old_free_head=1)   # points into the list in flight
    second = second_backend(first, region)
    try:
        assert lib.dp_vq_prepare(second.vq) == -errno.EBADMSG
    finally:
        second.close()
        region.close()


def test_a_region_of_this_session_takes_the_base_the_front_end_sends():
    """restored=0 (the back end started the queue from this region before, drained it since):
    the front end's base wins, it may have reset the ring."""
    first, region = first_backend()
    id_ = first.submit()
    first.pop()
    lib.dp_vq_push_used(first.vq, id_, 1)
    lib.dp_vq_set_packed_base(first.vq, BASE_RESET)
    assert lib.dp_vq_set_inflight(first.vq, region.maps[0], 0) == 0
    assert lib.dp_vq_prepare(first.vq) == 0
    assert first.base() == BASE_RESET
    assert region.header()["used_idx"] == 0 and region.header()["free_head"] == 0
    first.close()
    region.close()


def test_requests_in_flight_at_the_death_are_resubmitted_by_a_real_io_thread():
    """The second back end serves the ring: exactly the lists in flight complete, once each,
    and the ring goes on from where it stands."""
    first, region = first_backend()
    ids = [first.submit([(HDR, 16, False), (DATA + 4096 * i, 4096, True), (STATUS + i, 1, True)],
                        indirect=i % 2 == 0) for i in range(4)]
    hdr = struct.pack("<IIQ", 0, 0, 0)   # VIRTIO_BLK_T_IN, sector 0
    first.gmem.write(HDR, hdr)
    assert [first.pop()[0] for _ in range(4)] == ids
    for i in (1, 3):
        first.gmem.write(STATUS + i, b"\x00")
        lib.dp_vq_push_used(first.vq, ids[i], 4097)
    assert first.ring.pop_used() == [(ids[1], 4097), (ids[3], 4097)]
    second = second_backend(first, region)
    err = ffi.new("int *")
    engine = lib.dp_engine_new(b"t-packed", -1, 64, err)
    assert engine != ffi.NULL
    try:
        for i in (0, 2):
            second.gmem.write(STATUS + i, b"\xee")
        assert lib.dp_vq_start(second.vq, engine) == 0   # no kick fd: the thread polls
        deadline = time.monotonic() + 5
        got: list[tuple[int, int]] = []
        while len(got) < 2 and time.monotonic() < deadline:
            got += second.ring.pop_used()
            time.sleep(0.005)
        assert sorted(got) == sorted([(ids[0], 4097), (ids[2], 4097)])
        assert all(second.gmem.read(STATUS + i, 1) == b"\x00" for i in (0, 2))
        more = second.submit([(HDR, 16, False), (STATUS + 7, 1, True)], indirect=True)
        deadline = time.monotonic() + 5
        while not (got := second.ring.pop_used()) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert got == [(more, 1)] and second.ring.unexpected_used == []
        assert lib.dp_vq_stop(second.vq) >= 0
    finally:
        lib.dp_vq_stop(second.vq)
        second.close()
        lib.dp_engine_free(engine)
        region.close()
