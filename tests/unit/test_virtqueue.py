"""The C split-ring walker against a fake guest memory (no threads, no sockets).

The driver side is dataplane.driver.Vring writing into a memfd; the device side is the C
core's dp_vq_pop_chain / dp_vq_push_used / dp_vq_need_notify / dp_vq_enable_notify.
"""

from __future__ import annotations

import errno
import struct

import pytest

from dataplane.core import ffi, lib
from dataplane.disks import open_disk
from dataplane.driver.vring import (
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    GuestMemory,
    Vring,
)


class Harness:
    def __init__(self, num: int = 8, flags: int = 0, event_idx: bool = False) -> None:
        self.gmem = GuestMemory(1 << 20)
        self.mem = lib.dp_mem_new()
        assert lib.dp_mem_add_region(self.mem, 0, self.gmem.size, self.gmem.user_addr,
                                     ffi.cast("void *", self.gmem.user_addr)) == 0
        self.disk = open_disk("null:1M")
        self.ring = Vring(self.gmem, 0, num, event_idx=event_idx)
        self.vq = lib.dp_vq_new(self.disk.blk, 0)
        assert lib.dp_vq_set_num(self.vq, num) == 0
        assert lib.dp_vq_set_flags(self.vq, flags) == 0
        assert lib.dp_vq_set_addr(self.vq, self.mem, self.gmem.uva(self.ring.desc),
                                  self.gmem.uva(self.ring.avail), self.gmem.uva(self.ring.used)) == 0
        self.segs = ffi.new("struct dp_seg[64]")
        self.head = ffi.new("uint16_t *")

    def pop(self) -> tuple[int, list[tuple[int, int, bool]] | int]:
        rc = lib.dp_vq_pop_chain(self.vq, self.head, self.segs, 64)
        if rc < 0:
            return self.head[0], rc
        segs = [(self.segs[i].host_addr - self.gmem.user_addr, self.segs[i].len,
                 bool(self.segs[i].writable)) for i in range(rc)]
        return self.head[0], segs

    def close(self) -> None:
        lib.dp_vq_free(self.vq)
        lib.dp_mem_free(self.mem)
        self.disk.close()
        self.ring.close()
        self.gmem.close()


@pytest.fixture
def h():
    harness = Harness(flags=lib.DP_VQ_F_INDIRECT)
    yield harness
    harness.close()


def test_empty_ring_pops_nothing(h):
    assert lib.dp_vq_pop_chain(h.vq, h.head, h.segs, 64) == -errno.EAGAIN


def test_direct_chain_is_translated_in_order(h):
    bufs = [(0x10000, 16, False), (0x20000, 4096, True), (0x30000, 1, True)]
    head = h.ring.add_chain(bufs)
    h.ring.publish(head)
    got_head, segs = h.pop()
    assert got_head == head
    assert segs == bufs
    assert lib.dp_vq_pop_chain(h.vq, h.head, h.segs, 64) == -errno.EAGAIN


def test_indirect_table_is_followed(h):
    bufs = [(0x10000, 16, False), (0x11000, 512, False), (0x12000, 512, False), (0x13000, 1, True)]
    head = h.ring.add_chain(bufs, indirect=True)
    h.ring.publish(head)
    got_head, segs = h.pop()
    assert got_head == head
    assert segs == bufs


def test_indirect_refused_when_not_negotiated():
    harness = Harness(flags=0)
    try:
        head = harness.ring.add_chain([(0x10000, 16, False), (0x13000, 1, True)], indirect=True)
        harness.ring.publish(head)
        assert harness.pop()[1] == -errno.EIO
        assert lib.dp_vq_broken(harness.vq)
    finally:
        harness.close()


def test_used_ring_and_index_wrap_around():
    """avail/used indices are free-running u16: start near 65535 and cross zero, and the ring
    slots (num=4) wrap several times."""
    harness = Harness(num=4)
    try:
        start = 0xFFFE
        lib.dp_vq_set_base(harness.vq, start)
        harness.ring.set_avail_idx(start)
        harness.gmem.write(harness.ring.used + 2, struct.pack("<H", start))
        harness.ring.last_used_idx = start
        # SET_VRING_ADDR takes the device's used index from the ring, as vhost-user expects.
        assert lib.dp_vq_set_addr(harness.vq, harness.mem, harness.gmem.uva(harness.ring.desc),
                                  harness.gmem.uva(harness.ring.avail),
                                  harness.gmem.uva(harness.ring.used)) == 0
        for round_ in range(10):
            head = harness.ring.add_chain([(0x40000 + round_ * 0x1000, 64, True)])
            harness.ring.publish(head)
            got, segs = harness.pop()
            assert got == head and segs == [(0x40000 + round_ * 0x1000, 64, True)]
            lib.dp_vq_push_used(harness.vq, head, 64)
            assert harness.ring.pop_used() == [(head, 64)]
        assert harness.ring.avail_idx == (start + 10) & 0xFFFF
        assert lib.dp_vq_last_avail_idx(harness.vq) == (start + 10) & 0xFFFF
        assert harness.ring.used_idx() == (start + 10) & 0xFFFF
    finally:
        harness.close()


def test_event_idx_notification_decisions():
    harness = Harness(flags=lib.DP_VQ_F_EVENT_IDX, event_idx=True)
    try:
        ring = harness.ring

        def push_one() -> None:
            head = ring.add_chain([(0x50000, 8, True)])
            ring.publish(head)
            assert harness.pop()[0] == head
            lib.dp_vq_push_used(harness.vq, head, 8)

        def set_used_event(value: int) -> None:
            harness.gmem.write(ring.avail + 4 + 2 * ring.num, struct.pack("<H", value))

        push_one()                      # used idx 1; first decision always notifies
        assert lib.dp_vq_need_notify(harness.vq) == 1
        set_used_event(5)               # driver wants to hear when used idx passes 5
        push_one()                      # used idx 2
        assert lib.dp_vq_need_notify(harness.vq) == 0
        for _ in range(3):              # used idx 5: not yet past used_event
            push_one()
        assert lib.dp_vq_need_notify(harness.vq) == 0
        push_one()                      # used idx 6 crosses used_event 5
        assert lib.dp_vq_need_notify(harness.vq) == 1
        assert lib.dp_vq_need_notify(harness.vq) == 0   # nothing new since
        ring.pop_used()

        # enable_notify publishes avail_event = last_avail_idx and reports late arrivals.
        assert lib.dp_vq_enable_notify(harness.vq) == 0
        avail_event = struct.unpack("<H", harness.gmem.read(ring.used + 4 + 8 * ring.num, 2))[0]
        assert avail_event == lib.dp_vq_last_avail_idx(harness.vq) == 6
        head = ring.add_chain([(0x50000, 8, True)])
        old = ring.avail_idx
        ring.publish(head)
        assert lib.dp_vq_enable_notify(harness.vq) == 1
        assert ring.kick(old) is True   # the driver's side of the same rule: it must kick
    finally:
        harness.close()


def test_no_interrupt_flag_without_event_idx(h):
    head = h.ring.add_chain([(0x50000, 8, True)])
    h.ring.publish(head)
    h.pop()
    lib.dp_vq_push_used(h.vq, head, 8)
    h.gmem.write(h.ring.avail, struct.pack("<H", 1))   # VRING_AVAIL_F_NO_INTERRUPT
    assert lib.dp_vq_need_notify(h.vq) == 0
    h.gmem.write(h.ring.avail, struct.pack("<H", 0))
    assert lib.dp_vq_need_notify(h.vq) == 1


# ---- chains a hostile or buggy driver could write ----

def test_descriptor_loop_breaks_the_ring(h):
    h.ring.write_desc(0, 0x10000, 16, VRING_DESC_F_NEXT, 1)
    h.ring.write_desc(1, 0x11000, 16, VRING_DESC_F_NEXT, 0)
    h.ring.publish(0)
    assert h.pop()[1] == -errno.EIO
    assert lib.dp_vq_broken(h.vq)
    h.ring.publish(0)
    assert h.pop()[1] == -errno.EIO   # stays broken until the queue is reset


def test_head_index_out_of_range_breaks_the_ring(h):
    h.ring.publish(h.ring.num)
    assert h.pop()[1] == -errno.EIO


def test_next_index_out_of_range_breaks_the_ring(h):
    h.ring.write_desc(0, 0x10000, 16, VRING_DESC_F_NEXT, 200)
    h.ring.publish(0)
    assert h.pop()[1] == -errno.EIO


def test_avail_index_jumping_past_ring_size_breaks_the_ring(h):
    h.ring.set_avail_idx(h.ring.num + 1)
    assert h.pop()[1] == -errno.EIO


def test_nested_indirect_breaks_the_ring(h):
    inner = h.gmem.alloc(16, 16)
    outer = h.gmem.alloc(16, 16)
    h.gmem.write(inner, struct.pack("<QIHH", 0x10000, 16, 0, 0))
    h.gmem.write(outer, struct.pack("<QIHH", inner, 16, VRING_DESC_F_INDIRECT, 0))
    h.ring.write_desc(0, outer, 16, VRING_DESC_F_INDIRECT)
    h.ring.publish(0)
    assert h.pop()[1] == -errno.EIO


def test_indirect_with_next_breaks_the_ring(h):
    table = h.gmem.alloc(16, 16)
    h.gmem.write(table, struct.pack("<QIHH", 0x10000, 16, 0, 0))
    h.ring.write_desc(0, table, 16, VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, 1)
    h.ring.publish(0)
    assert h.pop()[1] == -errno.EIO


def test_indirect_table_of_bad_length_breaks_the_ring(h):
    table = h.gmem.alloc(32, 16)
    h.ring.write_desc(0, table, 24, VRING_DESC_F_INDIRECT)
    h.ring.publish(0)
    assert h.pop()[1] == -errno.EIO


def test_buffer_outside_memory_is_a_bad_request_not_a_broken_ring(h):
    head = h.ring.add_chain([(0x10000, 16, False), (h.gmem.size - 100, 4096, True)])
    h.ring.publish(head)
    got, rc = h.pop()
    assert (got, rc) == (head, -errno.EFAULT)
    assert not lib.dp_vq_broken(h.vq)
    head2 = h.ring.add_chain([(0x10000, 16, False), (0x20000, 1, True)])
    h.ring.publish(head2)
    assert h.pop() == (head2, [(0x10000, 16, False), (0x20000, 1, True)])


def test_address_plus_length_overflow_is_refused(h):
    head = h.ring.add_chain([(0xFFFF_FFFF_FFFF_F000, 0x2000, True)])
    h.ring.publish(head)
    assert h.pop()[1] == -errno.EFAULT


def test_readable_after_writable_is_refused(h):
    head = h.ring.add_chain([(0x10000, 16, True), (0x11000, 16, False)])
    h.ring.publish(head)
    assert h.pop()[1] == -errno.EINVAL


def test_zero_length_descriptors_are_skipped(h):
    head = h.ring.add_chain([(0x10000, 16, False), (0x90000, 0, False), (0x20000, 1, True)])
    h.ring.publish(head)
    assert h.pop() == (head, [(0x10000, 16, False), (0x20000, 1, True)])


def test_buffer_straddling_two_adjacent_regions_is_split():
    """Two regions adjacent in guest-physical space but not in host memory."""
    a, b = GuestMemory(1 << 16), GuestMemory(1 << 16)
    mem = lib.dp_mem_new()
    disk = open_disk("null:1M")
    try:
        assert lib.dp_mem_add_region(mem, 0, a.size, a.user_addr, ffi.cast("void *", a.user_addr)) == 0
        assert lib.dp_mem_add_region(mem, a.size, b.size, b.user_addr,
                                     ffi.cast("void *", b.user_addr)) == 0
        host = lib.dp_mem_gpa_to_host(mem, a.size - 8, 16)
        assert host == ffi.NULL   # not contiguous in host memory
        assert int(ffi.cast("uintptr_t", lib.dp_mem_gpa_to_host(mem, a.size + 8, 8))) == b.user_addr + 8
        ring = Vring(a, 0, 8, event_idx=False)
        vq = lib.dp_vq_new(disk.blk, 0)
        lib.dp_vq_set_num(vq, 8)
        assert lib.dp_vq_set_addr(vq, mem, a.uva(ring.desc), a.uva(ring.avail), a.uva(ring.used)) == 0
        head = ring.add_chain([(a.size - 100, 200, True)])
        ring.publish(head)
        segs = ffi.new("struct dp_seg[8]")
        out = ffi.new("uint16_t *")
        assert lib.dp_vq_pop_chain(vq, out, segs, 8) == 2
        assert (segs[0].host_addr, segs[0].len) == (a.user_addr + a.size - 100, 100)
        assert (segs[1].host_addr, segs[1].len) == (b.user_addr, 100)
        lib.dp_vq_free(vq)
        ring.close()
    finally:
        lib.dp_mem_free(mem)
        disk.close()
        a.close()
        b.close()


def test_memory_table_rejects_overlap_overflow_and_empty_regions():
    mem = lib.dp_mem_new()
    buf = ffi.new("char[8192]")
    try:
        assert lib.dp_mem_add_region(mem, 0x1000, 0x1000, 0x1000, buf) == 0
        assert lib.dp_mem_add_region(mem, 0x1800, 0x1000, 0x9000, buf) == -errno.EEXIST
        assert lib.dp_mem_add_region(mem, 0x5000, 0x1000, 0x1800, buf) == -errno.EEXIST
        assert lib.dp_mem_add_region(mem, 0x5000, 0, 0x5000, buf) == -errno.EINVAL
        assert lib.dp_mem_add_region(mem, 0xFFFF_FFFF_FFFF_F000, 0x2000, 0x5000, buf) == -errno.EINVAL
        assert lib.dp_mem_region_count(mem) == 1
        assert lib.dp_mem_gpa_to_host(mem, 0x1FFF, 2) == ffi.NULL
        assert lib.dp_mem_uva_to_host(mem, 0xFFFF_FFFF_FFFF_FFFF, 2) == ffi.NULL
    finally:
        lib.dp_mem_free(mem)


def test_ring_addresses_outside_memory_are_refused(h):
    vq = lib.dp_vq_new(h.disk.blk, 1)
    try:
        lib.dp_vq_set_num(vq, 8)
        end = h.gmem.uva(h.gmem.size)
        assert lib.dp_vq_set_addr(vq, h.mem, end - 64, h.gmem.uva(h.ring.avail),
                                  h.gmem.uva(h.ring.used)) == -errno.EFAULT
        assert lib.dp_vq_set_addr(vq, h.mem, h.gmem.uva(h.ring.desc) + 8, h.gmem.uva(h.ring.avail),
                                  h.gmem.uva(h.ring.used)) == -errno.EINVAL   # misaligned
    finally:
        lib.dp_vq_free(vq)


def test_ring_size_must_be_a_power_of_two_within_limit(h):
    vq = lib.dp_vq_new(h.disk.blk, 1)
    try:
        for bad in (0, 3, 100, 2048):
            assert lib.dp_vq_set_num(vq, bad) == -errno.EINVAL
        assert lib.dp_vq_set_num(vq, 1024) == 0
    finally:
        lib.dp_vq_free(vq)

