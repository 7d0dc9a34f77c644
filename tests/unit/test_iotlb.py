"""The C device IOTLB (csrc/vhost/iotlb.c): snapshots as QEMU's IOTLB_MSGs build them, and
both ring walkers translating IOVAs through one on a fake guest memory (no threads, no
engine): permissions by direction of access, buffers across entries, misses asked for on the
back-end channel, ring areas, and the debug switch that enforces nothing.

Guest memory (1 MiB at guest-physical 0) is one region; IOVA = guest-physical + BASE unless a
test maps otherwise. The waiting (a parked request, its timeout, invalidation drains) is the
engine's, tested over the protocol (tests/protocol/test_iommu.py, test_hostile.py).
"""

from __future__ import annotations

import errno
import socket
import struct

import pytest

from dataplane.core import ffi, lib
from dataplane.disks import open_disk
from dataplane.driver.packed import BASE_RESET, PackedVring
from dataplane.driver.vring import GuestMemory, Vring
from dataplane.protocol.vhost_user import IOTLB_MSG, IotlbType

BASE = 0x1_0000_0000
RO, WO, RW = 1, 2, 3
PAGE = 4096
MISS = -errno.ENOENT


class Tlb:
    """A chain of snapshots built like the backend does, one per message."""

    def __init__(self) -> None:
        self.t = lib.dp_iotlb_new()
        self.err = ffi.new("int *")

    def update(self, iova: int, size: int, uaddr: int, perm: int = RW, clip: bool = False) -> int:
        new = lib.dp_iotlb_update(self.t, iova, size, uaddr, perm, int(clip), self.err)
        if new == ffi.NULL:
            return self.err[0]
        lib.dp_iotlb_free(self.t)
        self.t = new
        return 0

    def invalidate(self, iova: int, size: int) -> int:
        new = lib.dp_iotlb_invalidate(self.t, iova, size, self.err)
        if new == ffi.NULL:
            return self.err[0]
        lib.dp_iotlb_free(self.t)
        self.t = new
        return 0

    def entries(self) -> list[tuple[int, int, int, int]]:
        out = []
        a = ffi.new("uint64_t[3]")
        perm = ffi.new("unsigned *")
        for i in range(lib.dp_iotlb_count(self.t)):
            assert lib.dp_iotlb_entry(self.t, i, a, a + 1, a + 2, perm) == 0
            out.append((a[0], a[1], a[2], perm[0]))
        return out

    def close(self) -> None:
        lib.dp_iotlb_free(self.t)


@pytest.fixture
def tlb():
    t = Tlb()
    yield t
    t.close()


# ---- snapshots ----

def test_adjacent_pages_merge_and_an_invalidation_cuts_one_out(tlb):
    for i in range(4):   # QEMU answers misses one page at a time
        assert tlb.update(BASE + i * PAGE, PAGE, 0x7000_0000 + i * PAGE) == 0
    assert tlb.entries() == [(BASE, BASE + 4 * PAGE - 1, 0x7000_0000, RW)]
    assert tlb.invalidate(BASE + PAGE, PAGE) == 0
    assert tlb.entries() == [(BASE, BASE + PAGE - 1, 0x7000_0000, RW),
                             (BASE + 2 * PAGE, BASE + 4 * PAGE - 1, 0x7000_0000 + 2 * PAGE, RW)]


def test_pages_that_do_not_continue_each_other_stay_apart(tlb):
    assert tlb.update(BASE, PAGE, 0x7000_0000) == 0
    assert tlb.update(BASE + PAGE, PAGE, 0x7000_9000) == 0          # user addresses apart
    assert tlb.update(BASE + 2 * PAGE, PAGE, 0x7000_a000, RO) == 0  # another permission
    assert len(tlb.entries()) == 3


def test_an_update_replaces_what_it_covers(tlb):
    assert tlb.update(BASE, 4 * PAGE, 0x7000_0000) == 0
    assert tlb.update(BASE + PAGE, PAGE, 0x7100_0000, RO) == 0
    assert tlb.entries() == [(BASE, BASE + PAGE - 1, 0x7000_0000, RW),
                             (BASE + PAGE, BASE + 2 * PAGE - 1, 0x7100_0000, RO),
                             (BASE + 2 * PAGE, BASE + 4 * PAGE - 1, 0x7000_2000, RW)]


def test_qemus_invalidation_of_everything_reaches_two_to_the_64(tlb):
    """QEMU 7.2's global flush: [0, 0xfee00000) then iova 0xfef00000 with a size such that
    iova + size == 2^64 (a naive end computation wraps to 0)."""
    assert tlb.update(0x1000, PAGE, 0x7000_0000) == 0
    assert tlb.update(0xFFFF_F000, PAGE, 0x7000_1000) == 0
    assert tlb.update(2**64 - PAGE, PAGE, 0x7000_2000) == 0
    assert tlb.invalidate(0, 0xFEE0_0000) == 0
    assert tlb.invalidate(0xFEF0_0000, 0xFFFF_FFFF_0110_0000) == 0
    assert tlb.entries() == []


@pytest.mark.parametrize("iova,size,uaddr,perm", [
    (2**64 - PAGE, 2 * PAGE, 0x7000_0000, RW),      # past 2^64
    (BASE, 2 * PAGE, 2**64 - PAGE, RW),             # its user addresses wrap
    (BASE, 0, 0x7000_0000, RW),                     # empty
    (BASE, PAGE, 0x7000_0000, 0),                   # no permission
    (BASE, PAGE, 0x7000_0000, 4),                   # not a permission
])
def test_updates_that_wrap_or_mean_nothing_are_refused(tlb, iova, size, uaddr, perm):
    assert tlb.update(iova, size, uaddr, perm) == -errno.EINVAL
    assert tlb.entries() == []


def test_without_the_check_a_wrapping_update_is_cut_at_the_end(tlb):
    assert tlb.update(2**64 - PAGE, 2 * PAGE, 0x7000_0000, clip=True) == 0
    assert tlb.entries() == [(2**64 - PAGE, 2**64 - 1, 0x7000_0000, RW)]


@pytest.mark.parametrize("iova,size", [(BASE, 0), (2**64 - PAGE, 2 * PAGE)])
def test_invalidations_that_wrap_are_refused(tlb, iova, size):
    assert tlb.invalidate(iova, size) == -errno.EINVAL


def test_the_table_is_bounded_by_evicting(tlb):
    cap = lib.DP_IOTLB_MAX_ENTRIES
    for i in range(cap + 50):   # every other page: nothing merges
        assert tlb.update(BASE + 2 * i * PAGE, PAGE, 0x7000_0000 + 2 * i * PAGE) == 0
    assert lib.dp_iotlb_count(tlb.t) == cap
    index = ffi.new("unsigned *")
    assert lib.dp_iotlb_find(tlb.t, BASE + 2 * (cap + 49) * PAGE, index) == 0   # the newest stays


# ---- the walkers through an IOTLB ----

class Harness:
    """A queue (split or packed) behind a vIOMMU on a fake guest memory, its channel a socket
    pair whose other end the test reads misses from."""

    def __init__(self, packed: bool = False, indirect: bool = True, check: bool = True) -> None:
        self.gmem = GuestMemory(1 << 20)
        self.mem = lib.dp_mem_new()
        assert lib.dp_mem_add_region(self.mem, 0, self.gmem.size, self.gmem.user_addr,
                                     ffi.cast("void *", self.gmem.user_addr)) == 0
        self.disk = open_disk("null:1M")
        self.packed = packed
        self.ring = (PackedVring if packed else Vring)(self.gmem, 0, 8)
        self.vq = lib.dp_vq_new(self.disk.blk, 0)
        flags = (lib.DP_VQ_F_INDIRECT if indirect else 0) | (lib.DP_VQ_F_PACKED if packed else 0)
        assert lib.dp_vq_set_flags(self.vq, flags) == 0
        assert lib.dp_vq_set_num(self.vq, 8) == 0
        if packed:
            assert lib.dp_vq_set_packed_base(self.vq, BASE_RESET) == 0
        self.iommu = lib.dp_iommu_new()
        lib.dp_iommu_set_flags(self.iommu, 0 if check else lib.DP_IOMMU_F_NO_CHECK)
        self.channel, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.channel.setblocking(False)
        self._theirs = theirs
        lib.dp_iommu_set_channel(self.iommu, theirs.fileno())
        self.tlb = Tlb()
        self.publish()
        self.segs = ffi.new("struct dp_seg[64]")
        self.head = ffi.new("uint16_t *")

    def map(self, gpa: int, size: int, perm: int = RW, iova: int | None = None) -> int:
        iova = gpa + BASE if iova is None else iova
        assert self.tlb.update(iova, size, self.gmem.uva(gpa), perm) == 0
        self.publish()
        return iova

    def publish(self) -> None:
        """The new snapshot, as dp_vqs_set_iotlb gives it to a stopped queue."""
        assert lib.dp_vq_set_iommu(self.vq, self.iommu, self.tlb.t) == 0

    def set_rings(self) -> int:
        r = self.ring
        return lib.dp_vq_set_addr(self.vq, self.mem, r.desc + BASE, r.avail + BASE, r.used + BASE)

    def ring_areas(self) -> list[tuple[int, int]]:
        r, n = self.ring, self.ring.num
        if self.packed:
            return [(r.desc, 16 * n), (r.avail, 4), (r.used, 4)]
        return [(r.desc, 16 * n), (r.avail, 6 + 2 * n), (r.used, 6 + 8 * n)]

    def map_rings(self) -> None:
        for gpa, size in self.ring_areas():   # just the rings: the rest of their pages is not
            self.map(gpa, size)
        assert self.set_rings() == 0

    def submit(self, bufs, indirect: bool = False) -> int:
        """bufs: (iova, len, writable), as the descriptors carry them; an indirect table (a
        guest address, add_chain's) goes at its IOVA in the BASE window."""
        calls = iter(range(len(bufs) + 1))

        def dma(addr: int, length: int, writable: bool) -> int:
            return addr if next(calls) < len(bufs) else addr + BASE

        head = self.ring.add_chain(bufs, indirect=indirect, dma=dma)
        self.ring.publish(head)
        return head

    def pop(self):
        rc = lib.dp_vq_pop_chain(self.vq, self.head, self.segs, 64)
        if rc < 0:
            if rc != -errno.EAGAIN:   # consumed: hand it back, as the engine would in the end
                lib.dp_vq_push_used(self.vq, self.head[0], 1)
                self.ring.pop_used()
            return rc
        return [(self.segs[i].host_addr - self.gmem.user_addr, self.segs[i].len,
                 bool(self.segs[i].writable)) for i in range(rc)]

    def misses(self) -> list[tuple[int, int]]:
        """The misses sent so far: (iova, perm)."""
        out = []
        try:
            data = self.channel.recv(65536)
        except BlockingIOError:
            return out
        while data:
            request, flags, size = struct.unpack_from("<III", data)
            assert (request, flags, size) == (1, 1, IOTLB_MSG.size)   # BACKEND_IOTLB_MSG
            iova, _size, _uaddr, perm, type_ = IOTLB_MSG.unpack_from(data, 12)
            assert type_ == IotlbType.MISS
            out.append((iova, perm))
            data = data[12 + size:]
        return out

    def close(self) -> None:
        lib.dp_vq_free(self.vq)
        lib.dp_iommu_free(self.iommu)
        self.tlb.close()
        self.channel.close()
        self._theirs.close()
        lib.dp_mem_free(self.mem)
        self.disk.close()
        self.ring.close()
        self.gmem.close()


@pytest.fixture(params=["split", "packed"])
def h(request):
    harness = Harness(packed=request.param == "packed")
    yield harness
    harness.close()


HDR, DATA, STATUS = 0x10000, 0x20000, 0x30000


def test_rings_outside_the_iotlb_are_asked_for_and_the_queue_waits(h):
    assert h.set_rings() == -errno.EAGAIN
    asked = [(iova - BASE) // PAGE for iova, _ in h.misses()]
    pages = sorted({gpa // PAGE for gpa, _ in h.ring_areas()})
    assert sorted(asked) == pages, "every ring area's page asked for at once, each page once"
    h.map_rings()


def test_buffers_are_translated_with_the_access_their_direction_needs(h):
    h.map_rings()
    h.map(HDR, PAGE, RO)
    h.map(DATA, PAGE, WO)
    h.map(STATUS, PAGE, RW)
    bufs = [(HDR + BASE, 16, False), (DATA + BASE, 4096, True), (STATUS + BASE, 1, True)]
    h.submit(bufs)
    assert h.pop() == [(HDR, 16, False), (DATA, 4096, True), (STATUS, 1, True)]


@pytest.mark.parametrize("writable,perm", [(True, RO), (False, WO)])
def test_an_access_the_mapping_does_not_allow_is_refused(h, writable, perm):
    h.map_rings()
    h.map(HDR, PAGE, RO)
    h.map(DATA, PAGE, perm)
    h.map(STATUS, PAGE, RW)
    h.submit([(HDR + BASE, 16, False), (DATA + BASE, 4096, writable), (STATUS + BASE, 1, True)])
    assert h.pop() == -errno.EACCES
    assert not h.misses(), "a permission fault is not a miss"


def test_a_buffer_over_two_entries_contiguous_in_memory_is_one_piece(h):
    h.map_rings()
    h.map(HDR, PAGE, RO)
    h.map(STATUS, PAGE, RW)
    h.map(DATA, PAGE, RW)
    h.map(DATA + PAGE, PAGE, RO)   # another permission: two entries, adjacent memory
    h.submit([(HDR + BASE, 16, False), (DATA + BASE + 2048, 4096, False), (STATUS + BASE, 1, True)])
    assert h.pop() == [(HDR, 16, False), (DATA + 2048, 4096, False), (STATUS, 1, True)]


def test_a_writable_buffer_over_a_read_only_entry_is_refused_as_a_whole(h):
    h.map_rings()
    h.map(HDR, PAGE, RO)
    h.map(STATUS, PAGE, RW)
    h.map(DATA, PAGE, RW)
    h.map(DATA + PAGE, PAGE, RO)
    h.submit([(HDR + BASE, 16, False), (DATA + BASE + 2048, 4096, True), (STATUS + BASE, 1, True)])
    assert h.pop() == -errno.EACCES


def test_a_buffer_over_two_entries_apart_in_memory_is_two_pieces(h):
    h.map_rings()
    h.map(HDR, PAGE, RO)
    h.map(STATUS, PAGE, RW)
    iova = 2 * BASE
    h.map(DATA, PAGE, RW, iova=iova)
    h.map(DATA + 8 * PAGE, PAGE, RW, iova=iova + PAGE)   # the next IOVA page, elsewhere
    h.submit([(HDR + BASE, 16, False), (iova + 1024, 4096, True), (STATUS + BASE, 1, True)])
    assert h.pop() == [(HDR, 16, False), (DATA + 1024, 3072, True),
                       (DATA + 8 * PAGE, 1024, True), (STATUS, 1, True)]


def test_an_iova_without_entry_is_a_miss_asked_for_once(h):
    """The same page missed again is not asked for again while its answer may be on the way
    (another snapshot in between changes nothing): a second miss reaching QEMU after the
    request was done would be a DMA fault for the guest."""
    h.map_rings()
    h.map(HDR, PAGE, RO)
    h.map(STATUS, PAGE, RW)
    chain = [(HDR + BASE, 16, False), (DATA + BASE, 4096, True), (STATUS + BASE, 1, True)]
    for _ in range(2):
        h.submit(chain)
        assert h.pop() == MISS
    h.map(HDR + PAGE, PAGE)   # another snapshot, not of that page
    h.submit(chain)
    assert h.pop() == MISS
    assert h.misses() == [(DATA + BASE, WO)]


def test_a_walk_asks_for_every_page_it_misses_at_once(h):
    """A request needs all its pages at once: one round of misses, not one per page."""
    h.map_rings()
    h.map(HDR, PAGE, RO)
    h.submit([(HDR + BASE, 16, False), (DATA + BASE, 8192, True), (STATUS + BASE, 1, True)])
    assert h.pop() == MISS
    assert h.misses() == [(DATA + BASE, WO), (DATA + BASE + PAGE, WO), (STATUS + BASE, WO)]


def test_an_indirect_table_without_entry_is_a_miss(h):
    h.map_rings()
    for gpa in (HDR, DATA, STATUS):
        h.map(gpa, PAGE)
    table_gpa = h.gmem.alloc(64, 16)   # where add_chain will put the table
    h.gmem.free(table_gpa)
    h.submit([(HDR + BASE, 16, False), (DATA + BASE, 4096, True), (STATUS + BASE, 1, True)],
             indirect=True)
    assert h.pop() == MISS
    assert h.misses() == [(table_gpa + BASE, RO)]


def test_an_entry_whose_user_address_is_no_memory_faults(h):
    h.map_rings()
    h.map(HDR, PAGE, RO)
    h.map(STATUS, PAGE, RW)
    assert h.tlb.update(DATA + BASE, PAGE, 0x10, RW) == 0   # user address 0x10: no region
    h.publish()
    h.submit([(HDR + BASE, 16, False), (DATA + BASE, 4096, True), (STATUS + BASE, 1, True)])
    assert h.pop() == -errno.EFAULT


def test_a_ring_in_a_read_only_entry_is_refused():
    harness = Harness()
    try:
        r = harness.ring
        harness.map(r.desc // PAGE * PAGE, PAGE, RO)
        harness.map(r.avail // PAGE * PAGE, PAGE, RO)
        harness.map(r.used // PAGE * PAGE, PAGE, RO)   # the device writes the used ring
        assert harness.set_rings() == -errno.EFAULT
    finally:
        harness.close()


def test_without_the_check_addresses_are_guest_physical_and_permissions_ignored():
    harness = Harness(check=False)
    try:
        harness.map_rings()
        harness.map(HDR, PAGE, RO)
        harness.map(DATA, PAGE, RO)   # written by the device: not enforced
        harness.submit([(HDR + BASE, 16, False), (DATA + BASE, 4096, True), (STATUS, 1, True)])
        assert harness.pop() == [(HDR, 16, False), (DATA, 4096, True), (STATUS, 1, True)]
        assert not harness.misses()
    finally:
        harness.close()
