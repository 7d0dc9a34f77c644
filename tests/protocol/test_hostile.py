"""A hostile guest, through the frontend's raw ring access: every chain below is written
by hand into the descriptor table of queue 0 while queue 1 keeps doing real I/O.

Each case gets the virtio spec's answer: IOERR in the status byte when the chain is
well-formed but its request is bad, or a broken ring (the vhost-user form of NEEDS_RESET:
the queue stops and its error eventfd fires) when the ring itself cannot be trusted.
The table in docs/hostile.md lists each case with the answer observed; keep them in step.
"""

from __future__ import annotations

import os
import select
import struct
import time

import pytest

from dataplane.driver import Device
from dataplane.driver.device import OUTHDR
from dataplane.driver.iommu import IOVA_BASE, IOVA_DYNAMIC, RO, RW
from dataplane.driver.packed import BASE_RESET, F_AVAIL, F_USED, PDESC, avail_bits
from dataplane.driver.vring import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE
from dataplane.errors import DeviceError
from dataplane.protocol import virtio_blk as vb
from dataplane.protocol.vhost_user import Request

R, W = 0, VRING_DESC_F_WRITE
MiB = 1 << 20


@pytest.fixture
def dev(start_backend, disk_file):
    backend = start_backend(str(disk_file), queues=2)
    device = Device.connect(backend.socket, queues=2)
    device.backend = backend
    device.err_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    device.client.set_u64(Request.SET_VRING_ERR, 0, [device.err_fd])
    yield device
    os.close(device.err_fd)
    device.client.close()   # no GET_VRING_BASE on a broken ring: just leave
    for ring in device.rings:
        ring.close()
    device.mem.close()


def header(dev: Device, type_: int, sector: int) -> int:
    gpa = dev.mem.alloc(16, 16)
    dev.mem.write(gpa, OUTHDR.pack(type_, 0, sector))
    return gpa


def status_buf(dev: Device) -> int:
    gpa = dev.mem.alloc(1, 1)
    dev.mem.write(gpa, b"\xee")
    return gpa


def raw(dev: Device, descs: list[tuple[int, int, int, int]], head: int = 0) -> None:
    """Write descriptors (addr, len, flags, next) at indices 0.. of queue 0 and publish head."""
    ring = dev.rings[0]
    for i, d in enumerate(descs):
        ring.write_desc(i, *d)
    ring.free_desc = [i for i in ring.free_desc if i >= len(descs)]
    ring.chains[head] = []
    ring.publish(head)
    ring.kick()


def answer(dev: Device, status_gpa: int, timeout: float = 5) -> int:
    used = dev.rings[0].wait_used(timeout)
    assert used, "no completion"
    return dev.mem.read(status_gpa, 1)[0]


def ring_broke(dev: Device, timeout: float = 5) -> bool:
    r, _, _ = select.select([dev.err_fd], [], [], timeout)
    return bool(r)


def other_queue_still_serves(dev: Device) -> None:
    data = bytes(range(256)) * 16
    dev.write(8 * MiB, data, queue=1)
    assert dev.read(8 * MiB, len(data), queue=1) == data


def test_buffer_outside_every_region_is_ioerr(dev):
    st = status_buf(dev)
    raw(dev, [(header(dev, vb.ReqType.IN, 0), 16, R | VRING_DESC_F_NEXT, 1),
              (dev.mem.size + 4096, 4096, W | VRING_DESC_F_NEXT, 2),
              (st, 1, W, 0)])
    assert answer(dev, st) == vb.Status.IOERR
    other_queue_still_serves(dev)
    assert dev.read(0, 512) == bytes(512)   # and queue 0 itself goes on


def test_address_plus_length_overflow_is_ioerr(dev):
    st = status_buf(dev)
    raw(dev, [(header(dev, vb.ReqType.IN, 0), 16, R | VRING_DESC_F_NEXT, 1),
              (2**64 - 2048, 4096, W | VRING_DESC_F_NEXT, 2), (st, 1, W, 0)])
    assert answer(dev, st) == vb.Status.IOERR
    other_queue_still_serves(dev)


def test_header_in_a_device_writable_buffer_is_ioerr(dev):
    st = status_buf(dev)
    raw(dev, [(header(dev, vb.ReqType.IN, 0), 16, W | VRING_DESC_F_NEXT, 1),
              (dev.mem.alloc(512, 512), 512, W | VRING_DESC_F_NEXT, 2), (st, 1, W, 0)])
    assert answer(dev, st) == vb.Status.IOERR


def test_sector_beyond_capacity_is_ioerr(dev):
    st = status_buf(dev)
    raw(dev, [(header(dev, vb.ReqType.IN, dev.capacity // 512), 16, R | VRING_DESC_F_NEXT, 1),
              (dev.mem.alloc(512, 512), 512, W | VRING_DESC_F_NEXT, 2), (st, 1, W, 0)])
    assert answer(dev, st) == vb.Status.IOERR


def test_data_not_a_multiple_of_512_is_ioerr(dev):
    st = status_buf(dev)
    raw(dev, [(header(dev, vb.ReqType.OUT, 0), 16, R | VRING_DESC_F_NEXT, 1),
              (dev.mem.alloc(700, 512), 700, R | VRING_DESC_F_NEXT, 2), (st, 1, W, 0)])
    assert answer(dev, st) == vb.Status.IOERR


def test_zero_length_and_misaligned_buffers_still_move_the_right_bytes(dev):
    """O_DIRECT cannot take a buffer at an odd address: the backend bounces it."""
    payload = bytes(range(256)) * 4
    buf = dev.mem.alloc(2048, 4096) + 3        # misaligned on purpose
    dev.mem.write(buf, payload)
    st = status_buf(dev)
    raw(dev, [(header(dev, vb.ReqType.OUT, 64), 16, R | VRING_DESC_F_NEXT, 1),
              (buf, 0, R | VRING_DESC_F_NEXT, 2),          # zero-length: skipped
              (buf, 1024, R | VRING_DESC_F_NEXT, 3), (st, 1, W, 0)])
    assert answer(dev, st) == vb.Status.OK
    assert dev.read(64 * 512, 1024, queue=1) == payload
    stats = dev.backend.device.stats()[0]
    assert stats["bounced"] >= 1


def test_status_byte_read_only_breaks_the_ring(dev):
    raw(dev, [(header(dev, vb.ReqType.IN, 0), 16, R | VRING_DESC_F_NEXT, 1),
              (status_buf(dev), 1, R, 0)])
    assert ring_broke(dev)
    other_queue_still_serves(dev)


def test_status_byte_missing_breaks_the_ring(dev):
    raw(dev, [(header(dev, vb.ReqType.FLUSH, 0), 16, R, 0)])
    assert ring_broke(dev)
    other_queue_still_serves(dev)


def test_descriptor_loop_breaks_the_ring(dev):
    h = header(dev, vb.ReqType.IN, 0)
    raw(dev, [(h, 16, R | VRING_DESC_F_NEXT, 1), (h, 16, R | VRING_DESC_F_NEXT, 0)])
    assert ring_broke(dev)
    other_queue_still_serves(dev)


def test_chain_longer_than_the_queue_breaks_the_ring(dev):
    h = header(dev, vb.ReqType.IN, 0)
    n = dev.rings[0].num
    raw(dev, [(h, 16, R | VRING_DESC_F_NEXT, (i + 1) % n) for i in range(n)])
    assert ring_broke(dev)
    other_queue_still_serves(dev)


def test_indirect_table_inside_indirect_breaks_the_ring(dev):
    inner = dev.mem.alloc(16, 16)
    dev.mem.write(inner, struct.pack("<QIHH", status_buf(dev), 1, W, 0))
    outer = dev.mem.alloc(16, 16)
    dev.mem.write(outer, struct.pack("<QIHH", inner, 16, VRING_DESC_F_INDIRECT, 0))
    raw(dev, [(outer, 16, VRING_DESC_F_INDIRECT, 0)])
    assert ring_broke(dev)
    other_queue_still_serves(dev)


def test_indirect_descriptor_with_next_breaks_the_ring(dev):
    table = dev.mem.alloc(16, 16)
    dev.mem.write(table, struct.pack("<QIHH", status_buf(dev), 1, W, 0))
    raw(dev, [(table, 16, VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, 1), (status_buf(dev), 1, W, 0)])
    assert ring_broke(dev)
    other_queue_still_serves(dev)


def test_avail_index_jumping_by_more_than_the_queue_size_breaks_the_ring(dev):
    ring = dev.rings[0]
    ring.set_avail_idx(ring.avail_idx + ring.num + 1)
    ring.kick()
    assert ring_broke(dev)
    other_queue_still_serves(dev)


def test_head_index_out_of_range_breaks_the_ring(dev):
    ring = dev.rings[0]
    ring.publish(ring.num + 5)
    ring.kick()
    assert ring_broke(dev)
    other_queue_still_serves(dev)


def test_next_index_out_of_range_breaks_the_ring(dev):
    raw(dev, [(header(dev, vb.ReqType.IN, 0), 16, R | VRING_DESC_F_NEXT, 4000)])
    assert ring_broke(dev)
    other_queue_still_serves(dev)


def test_a_broken_ring_is_served_again_after_the_front_end_resets_it(dev):
    raw(dev, [(header(dev, vb.ReqType.FLUSH, 0), 16, R, 0)])
    assert ring_broke(dev)
    ring = dev.rings[0]
    # What a driver does after NEEDS_RESET: stop the ring, rebuild it, start again.
    dev.client.get_vring_base(0)
    ring.mem.write(ring.avail, bytes(6 + 2 * ring.num))
    ring.mem.write(ring.used, bytes(6 + 8 * ring.num))
    ring.avail_idx = ring.last_used_idx = 0
    ring.free_desc, ring.chains = list(range(ring.num)), {}
    dev.client.call(Request.SET_VRING_BASE, struct.pack("<II", 0, 0))
    dev.client.set_u64(Request.SET_VRING_KICK, 0, [ring.kick_fd])
    assert dev.read(0, 4096) == bytes(4096)





# ---- packed rings: the same guest, the other ring format ----

@pytest.fixture
def pdev(start_backend, disk_file):
    backend = start_backend(str(disk_file), queues=2)
    device = Device.connect(backend.socket, queues=2, ring="packed")
    device.backend = backend
    device.err_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    device.client.set_u64(Request.SET_VRING_ERR, 0, [device.err_fd])
    yield device
    os.close(device.err_fd)
    device.client.close()
    for ring in device.rings:
        ring.close()
    device.mem.close()


def praw(dev: Device, descs: list[tuple[int, int, int, int]], wrap: int | None = None) -> None:
    """Write descriptors (addr, len, flags, id) at queue 0's avail position, with the AVAIL/USED
    bits of its wrap counter (or of `wrap`) unless flags carry their own, the head last; kick."""
    ring = dev.rings[0]
    start, lap = ring.next_avail, ring.avail_wrap
    slots = []
    for _ in descs:
        slots.append((ring.next_avail, ring.avail_wrap))
        ring.advance()
    for (slot, slot_wrap), (addr, length, flags, id_) in reversed(list(zip(slots, descs, strict=True))):
        if not flags & (F_AVAIL | F_USED):
            flags |= avail_bits(slot_wrap if wrap is None else wrap)
        ring.write_desc(slot, addr, length, flags, id_)
    ring.chains[descs[-1][3]] = []
    ring.ndesc[descs[-1][3]] = len(descs)
    ring.kick()
    assert (start, lap) != (ring.next_avail, ring.avail_wrap) or not descs


def read_chain(dev: Device, sector: int = 0) -> tuple[list[tuple[int, int, int]], int]:
    """A well-formed read of 4 KiB: (addr, len, flags) x 3, and its status byte's address."""
    st = status_buf(dev)
    return [(header(dev, vb.ReqType.IN, sector), 16, VRING_DESC_F_NEXT),
            (dev.mem.alloc(4096, 4096), 4096, W | VRING_DESC_F_NEXT), (st, 1, W)], st


def nothing_happens(dev: Device, status_gpa: int, wait: float = 0.3) -> bool:
    """The device neither took a request from queue 0 nor broke the ring."""
    before = dev.backend.device.stats()[0]["requests"]
    time.sleep(wait)
    return (dev.backend.device.stats()[0]["requests"] == before
            and dev.mem.read(status_gpa, 1) == b"\xee" and not ring_broke(dev, 0))


def test_packed_wrong_wrap_bits_are_not_available_and_the_ring_goes_on(pdev):
    chain, st = read_chain(pdev)
    ring = pdev.rings[0]
    praw(pdev, [(a, n, f, 0) for a, n, f in chain], wrap=0)          # last lap's bits
    assert nothing_happens(pdev, st)
    ring.write_desc(0, chain[0][0], 16, VRING_DESC_F_NEXT | F_AVAIL | F_USED, 0)
    ring.kick()                                  # AVAIL flipped, USED along with it: "used"
    assert nothing_happens(pdev, st)
    ring.write_desc(0, chain[0][0], 16, VRING_DESC_F_NEXT, 0)
    ring.kick()                                  # neither bit
    assert nothing_happens(pdev, st)
    for slot in (2, 1, 0):                       # now it is available, the head last
        addr, length, flags = chain[slot]
        ring.write_desc(slot, addr, length, flags | avail_bits(1), 0)
    ring.kick()
    assert answer(pdev, st) == vb.Status.OK
    assert pdev.read(0, 512) == bytes(512)
    other_queue_still_serves(pdev)


def test_packed_id_out_of_range_breaks_the_ring(pdev):
    chain, _ = read_chain(pdev)
    praw(pdev, [(a, n, f, pdev.rings[0].num) for a, n, f in chain])
    assert ring_broke(pdev)
    other_queue_still_serves(pdev)


def test_packed_id_made_available_twice_breaks_the_ring_before_it_completes_twice(start_backend, disk_file):
    """The id of a request still in flight (a slow disk holds it), published again: completing
    both would hand a Linux guest the same id twice ("id N is not a head!")."""
    backend = start_backend(f"{disk_file},latency=fixed:300ms", queues=2)
    dev = Device.connect(backend.socket, queues=2, ring="packed")
    dev.err_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        dev.client.set_u64(Request.SET_VRING_ERR, 0, [dev.err_fd])
        first, st1 = read_chain(dev)
        praw(dev, [(a, n, f, 5) for a, n, f in first])
        again, _ = read_chain(dev, 8)
        praw(dev, [(a, n, f, 5) for a, n, f in again])
        assert ring_broke(dev)
        time.sleep(0.5)
        used = dev.rings[0].pop_used()
        assert [id_ for id_, _ in used] == [5]          # the first one, once
        assert dev.mem.read(st1, 1)[0] == vb.Status.OK
        other_queue_still_serves(dev)
    finally:
        os.close(dev.err_fd)
        dev.client.close()
        for ring in dev.rings:
            ring.close()
        dev.mem.close()


def test_packed_list_longer_than_the_ring_breaks_it(pdev):
    h = header(pdev, vb.ReqType.IN, 0)
    n = pdev.rings[0].num
    praw(pdev, [(h, 16, VRING_DESC_F_NEXT, 0)] * n)
    assert ring_broke(pdev)
    other_queue_still_serves(pdev)


def test_packed_list_whose_tail_is_not_available_breaks_the_ring(pdev):
    chain, _ = read_chain(pdev)
    ring = pdev.rings[0]
    descs = [(a, n, f, 0) for a, n, f in chain]
    descs[2] = (*descs[2][:2], W | avail_bits(0), 0)   # the last lap's bits on the tail
    praw(pdev, descs)
    assert ring_broke(pdev)
    assert ring.next_avail == 3
    other_queue_still_serves(pdev)


def test_packed_indirect_in_indirect_breaks_the_ring(pdev):
    inner = pdev.mem.alloc(16, 16)
    pdev.mem.write(inner, PDESC.pack(status_buf(pdev), 1, 0, W))
    outer = pdev.mem.alloc(16, 16)
    pdev.mem.write(outer, PDESC.pack(inner, 16, 0, VRING_DESC_F_INDIRECT))
    praw(pdev, [(outer, 16, VRING_DESC_F_INDIRECT, 0)])
    assert ring_broke(pdev)
    other_queue_still_serves(pdev)


def test_packed_indirect_inside_a_list_breaks_the_ring(pdev):
    table = pdev.mem.alloc(16, 16)
    pdev.mem.write(table, PDESC.pack(status_buf(pdev), 1, 0, W))
    praw(pdev, [(header(pdev, vb.ReqType.IN, 0), 16, VRING_DESC_F_NEXT, 0),
                (table, 16, VRING_DESC_F_INDIRECT, 0)])
    assert ring_broke(pdev)
    other_queue_still_serves(pdev)


def test_packed_next_inside_an_indirect_table_breaks_the_ring(pdev):
    table = pdev.mem.alloc(32, 16)
    pdev.mem.write(table, PDESC.pack(header(pdev, vb.ReqType.IN, 0), 16, 0, VRING_DESC_F_NEXT)
                   + PDESC.pack(status_buf(pdev), 1, 0, W))
    praw(pdev, [(table, 32, VRING_DESC_F_INDIRECT, 0)])
    assert ring_broke(pdev)
    other_queue_still_serves(pdev)


def test_packed_buffer_outside_every_region_is_ioerr(pdev):
    st = status_buf(pdev)
    praw(pdev, [(header(pdev, vb.ReqType.IN, 0), 16, VRING_DESC_F_NEXT, 0),
                (pdev.mem.size + 4096, 4096, W | VRING_DESC_F_NEXT, 0), (st, 1, W, 0)])
    assert answer(pdev, st) == vb.Status.IOERR
    assert pdev.read(0, 512) == bytes(512)   # and queue 0 goes on
    other_queue_still_serves(pdev)


def test_packed_status_byte_missing_breaks_the_ring(pdev):
    praw(pdev, [(header(pdev, vb.ReqType.FLUSH, 0), 16, 0, 0)])
    assert ring_broke(pdev)
    other_queue_still_serves(pdev)


def test_a_broken_packed_ring_is_served_again_after_the_front_end_resets_it(pdev):
    praw(pdev, [(header(pdev, vb.ReqType.FLUSH, 0), 16, 0, 0)])
    assert ring_broke(pdev)
    ring = pdev.rings[0]
    pdev.client.get_vring_base(0)
    ring.reset()
    pdev.client.call(Request.SET_VRING_BASE, struct.pack("<II", 0, BASE_RESET))
    pdev.client.set_u64(Request.SET_VRING_KICK, 0, [ring.kick_fd])
    assert pdev.read(0, 4096) == bytes(4096)


# ---- behind a vIOMMU: every address an IOVA, every access checked against the IOTLB ----
#
# The frontend plays intel-iommu (dataplane.driver.iommu): guest memory is mapped in its
# static window and pushed whole into the backend's IOTLB first, so the well-behaved requests
# never miss; the hostile ones use IOVAs and mappings made for the case. Each test runs twice:
# "checked" is the backend as it is; with --debug-no-iotlb-check it enforces nothing (an IOVA
# without entry is taken as guest-physical, permissions and invalidations are ignored, updates
# are not validated) and the same test shows the damage that stops.

IOMMU_TIMEOUT_MS = 1000      # how long a miss waits here (serve's default is 10 s)
CHECK = pytest.mark.parametrize("checked", [True, False], ids=["checked", "debug-no-iotlb-check"])


def iommu_device(start_backend, disk: str, checked: bool, ring: str = "split") -> Device:
    backend = start_backend(disk, queues=2, iotlb_check=checked, iotlb_timeout_ms=IOMMU_TIMEOUT_MS)
    dev = Device.connect(backend.socket, queues=2, ring=ring, iommu=True, iommu_push="rings")
    dev.iommu.push(IOVA_BASE, dev.mem.size, page=0)   # all guest memory: no well-behaved misses
    dev.iommu.settle()   # the rings' misses from before the push answered: no late UPDATE
    dev.backend = backend
    dev.err_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    dev.client.set_u64(Request.SET_VRING_ERR, 0, [dev.err_fd])
    return dev


def iommu_close(dev: Device) -> None:
    os.close(dev.err_fd)
    dev.iommu.close()
    dev.client.close()   # no GET_VRING_BASE on a broken ring: just leave
    for ring in dev.rings:
        ring.close()
    dev.mem.close()


@pytest.fixture
def iodev(start_backend, disk_file, checked):
    dev = iommu_device(start_backend, str(disk_file), checked)
    yield dev
    iommu_close(dev)


def iommu_request(dev: Device, queue: int, type_: int, data: tuple[int, int, bool] | None,
                  sector: int = 0, status_iova: int | None = None) -> tuple[int, int]:
    """Publish header (static window), data (the IOVA given) and status: (head, status gpa)."""
    hdr, st = header(dev, type_, sector), status_buf(dev)
    bufs = [(dev.dma_addr(hdr), 16, False)] + ([data] if data else [])
    bufs.append((dev.dma_addr(st) if status_iova is None else status_iova, 1, True))
    ring = dev.rings[queue]
    head = ring.add_chain(bufs)
    old = ring.avail_idx
    ring.publish(head)
    ring.kick(old)
    return head, st


def collect(dev: Device, queue: int, heads: set[int], timeout: float = 10.0) -> dict[int, float]:
    """When each of the heads was seen in the used ring (what completes meanwhile goes by)."""
    seen: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    while heads - set(seen) and time.monotonic() < deadline:
        for head, _ in dev.rings[queue].wait_used(0.05):
            seen.setdefault(head, time.monotonic())
    assert not heads - set(seen), f"{len(heads - set(seen))} request(s) never completed"
    return seen


def victim(dev: Device, pages: int = 1) -> int:
    """Guest memory full of 0xaa the device has no business writing."""
    gpa = dev.mem.alloc(pages * 4096, 4096)
    dev.mem.write(gpa, b"\xaa" * pages * 4096)
    return gpa


def iotlb_stats(dev: Device) -> dict[str, int]:
    totals: dict[str, int] = {}
    for q in dev.backend.device.stats():
        for k, v in q.items():
            totals[k] = totals.get(k, 0) + v
    return totals


@CHECK
@pytest.mark.parametrize("ring", ["split", "packed"])
def test_iommu_descriptor_at_an_iova_never_mapped_is_ioerr(start_backend, disk_file, checked, ring):
    """A guest-physical address where an IOVA belongs (the guest never mapped it for the
    device): the request waits for an UPDATE the vIOMMU never sends, then gets IOERR; the same
    queue's next request and the other queue are served meanwhile."""
    dev = iommu_device(start_backend, str(disk_file), checked, ring)
    try:
        gpa = victim(dev)
        t0 = time.monotonic()
        head, st = iommu_request(dev, 0, vb.ReqType.IN, (gpa, 4096, True))
        other_queue_still_serves(dev)
        h2, st2 = iommu_request(dev, 0, vb.ReqType.IN, (dev.dma_addr(dev.mem.alloc(4096, 4096)), 4096, True))
        seen = collect(dev, 0, {head, h2})
        if checked:
            assert dev.mem.read(st, 1)[0] == vb.Status.IOERR
            assert dev.mem.read(gpa, 4096) == b"\xaa" * 4096, "the device wrote unmapped memory"
            assert seen[h2] < seen[head], "a later request of the same queue waited for the miss"
            assert seen[head] - t0 >= 0.5 * IOMMU_TIMEOUT_MS / 1000
            assert dev.iommu.counters.refused >= 1 and iotlb_stats(dev)["iotlb_timeouts"] == 1
        else:
            assert dev.mem.read(st, 1)[0] == vb.Status.OK
            assert dev.mem.read(gpa, 4096) == bytes(4096), "the check was off: it writes the GPA"
        assert dev.mem.read(st2, 1)[0] == vb.Status.OK
        assert iotlb_stats(dev)["parked"] == 0
        other_queue_still_serves(dev)
    finally:
        iommu_close(dev)


@CHECK
@pytest.mark.parametrize("ring", ["split", "packed"])
def test_iommu_mapping_invalidated_while_requests_use_it(start_backend, disk_file, checked, ring):
    """Reads in flight (a slow disk) into a mapping the guest invalidates: the INVALIDATE is
    acknowledged only once they are done with it (the guest may reuse the memory right after
    the ack: their status bytes are written by then); a request at the IOVA afterwards misses
    and fails."""
    dev = iommu_device(start_backend, f"{disk_file},latency=fixed:400ms", checked, ring)
    try:
        buf = victim(dev, 2)
        iova = dev.iommu.map(buf, 8192, RW, push=True)
        reqs = [iommu_request(dev, 0, vb.ReqType.IN, (iova + 4096 * (i % 2), 4096, True), 8 * i)
                for i in range(4)]
        time.sleep(0.1)                          # submitted, at the disk
        dev.iommu.unmap(iova)                    # INVALIDATE, acknowledged
        at_ack = [dev.mem.read(st, 1)[0] for _, st in reqs]
        collect(dev, 0, {h for h, _ in reqs})
        if checked:
            assert at_ack == [vb.Status.OK] * 4, "acknowledged before the requests were done"
            assert iotlb_stats(dev)["iotlb_drains"] >= 1
            late, st = iommu_request(dev, 0, vb.ReqType.IN, (iova, 4096, True))
            collect(dev, 0, {late})
            assert dev.mem.read(st, 1)[0] == vb.Status.IOERR, "served through the stale entry"
        else:
            assert 0xEE in at_ack, "the check was off: acknowledged with the requests in flight"
            assert [dev.mem.read(st, 1)[0] for _, st in reqs] == [vb.Status.OK] * 4   # later
        other_queue_still_serves(dev)
    finally:
        iommu_close(dev)


@CHECK
def test_iommu_device_write_into_a_read_only_mapping_is_ioerr(iodev, checked):
    gpa = victim(iodev)
    iova = iodev.iommu.map(gpa, 4096, RO, push=True)
    t0 = time.monotonic()
    head, st = iommu_request(iodev, 0, vb.ReqType.IN, (iova, 4096, True))
    collect(iodev, 0, {head})
    if checked:
        assert iodev.mem.read(st, 1)[0] == vb.Status.IOERR
        assert iodev.mem.read(gpa, 4096) == b"\xaa" * 4096
        assert time.monotonic() - t0 < IOMMU_TIMEOUT_MS / 1000, "a fault is no miss: at once"
        assert iotlb_stats(iodev)["iotlb_faults"] == 1
    else:
        assert iodev.mem.read(st, 1)[0] == vb.Status.OK
        assert iodev.mem.read(gpa, 4096) == bytes(4096)
    other_queue_still_serves(iodev)


@CHECK
def test_iommu_status_byte_in_a_read_only_mapping_breaks_the_ring(iodev, checked):
    """Nowhere to answer: the vhost-user NEEDS_RESET (as for a status byte the chain marks
    device-readable)."""
    st = status_buf(iodev)
    iova = iodev.iommu.map(st, 1, RO, push=True)
    head, _ = iommu_request(iodev, 0, vb.ReqType.FLUSH, None, status_iova=iova)
    if checked:
        assert ring_broke(iodev)
        assert iodev.mem.read(st, 1) == b"\xee"
    else:
        collect(iodev, 0, {head})
        assert iodev.mem.read(st, 1)[0] == vb.Status.OK
    other_queue_still_serves(iodev)


@CHECK
def test_iommu_range_straddling_two_mappings_with_different_permissions(iodev, checked):
    """8 KiB of IOVAs, the first page read-write, the second read-only (two guest pages apart):
    a buffer across both may be read by the device (and lands on disk in order), never
    written, not even the part it could write."""
    a, b = victim(iodev), victim(iodev, 2)
    iodev.mem.write(a, bytes(range(256)) * 16)
    iodev.mem.write(b, bytes(255 - i % 256 for i in range(4096)))
    iova = iodev.iommu.alloc_iova(8192)
    iodev.iommu.map(a, 4096, RW, iova=iova, push=True)
    iodev.iommu.map(b, 4096, RO, iova=iova + 4096, push=True)
    expected = iodev.mem.read(a + 2048, 2048) + iodev.mem.read(b, 2048)
    head, st = iommu_request(iodev, 0, vb.ReqType.OUT, (iova + 2048, 4096, False), 64)
    collect(iodev, 0, {head})
    assert iodev.mem.read(st, 1)[0] == vb.Status.OK
    assert iodev.read(64 * 512, 4096, queue=1) == expected
    before = iodev.mem.read(a, 4096), iodev.mem.read(b, 4096)
    head, st = iommu_request(iodev, 0, vb.ReqType.IN, (iova + 2048, 4096, True), 128)
    collect(iodev, 0, {head})
    after = iodev.mem.read(a, 4096), iodev.mem.read(b, 4096)
    if checked:
        assert iodev.mem.read(st, 1)[0] == vb.Status.IOERR
        assert after == before, "a part of the buffer was written"
    else:
        assert iodev.mem.read(st, 1)[0] == vb.Status.OK
        assert after[0][2048:] == bytes(2048) and after[1][:2048] == bytes(2048)
    other_queue_still_serves(iodev)


@CHECK
def test_iommu_updates_that_overflow_are_refused(iodev, checked):
    """Ranges past 2^64 (of IOVAs or user addresses), empty ones, no permission, and user
    addresses outside one memory region: refused (REPLY_ACK 1), the IOTLB unchanged. QEMU's
    invalidation of everything (iova + size == 2^64 exactly) is fine. Past the table's
    capacity the oldest translations give way, and the device goes on."""
    from dataplane.core import lib

    uva, size = iodev.mem.uva(0), iodev.mem.size
    bad = [(2**64 - 4096, 8192, uva, RW), (IOVA_DYNAMIC, 8192, 2**64 - 4096, RW),
           (IOVA_DYNAMIC, 0, uva, RW), (IOVA_DYNAMIC, 4096, uva, 0), (IOVA_DYNAMIC, 4096, uva, 9),
           (IOVA_DYNAMIC, size + 4096, uva, RW), (IOVA_DYNAMIC, 4096, 0x1000, RW)]
    entries = lib.dp_iotlb_count(iodev.backend.device.iotlb)
    refused = 0
    for iova, n, uaddr, perm in bad:
        try:
            iodev.iommu.update(iova, n, 0, perm, uaddr=uaddr)
        except DeviceError:
            refused += 1
    if checked:
        assert refused == len(bad)
        assert lib.dp_iotlb_count(iodev.backend.device.iotlb) == entries
    else:
        assert refused < len(bad), "the check was off: overflowing updates accepted"
    with pytest.raises(DeviceError):   # an invalidation past 2^64
        iodev.iommu.invalidate(2**64 - 4096, 8192)
    iodev.iommu.invalidate(0, 0xFEE0_0000)
    iodev.iommu.invalidate(0xFEF0_0000, 0xFFFF_FFFF_0110_0000)
    assert lib.dp_iotlb_count(iodev.backend.device.iotlb) == 0
    iodev.iommu.push(IOVA_BASE, size, page=0)
    if checked:
        cap = lib.DP_IOTLB_MAX_ENTRIES
        for i in range(cap + 64):   # every other page: nothing merges
            iodev.iommu.update(IOVA_DYNAMIC + 2 * 4096 * i, 4096, 0, RO)
        assert lib.dp_iotlb_count(iodev.backend.device.iotlb) == cap
    assert iodev.read(0, 4096) == bytes(4096)
    other_queue_still_serves(iodev)


@CHECK
def test_iommu_a_flood_of_misses_is_bounded(iodev, checked):
    """Queue 0 full of requests at IOVAs never mapped (each its own page): each waits, asking
    for each page once (again only after a second), and ends with IOERR; the other queue
    serves all along."""
    from dataplane.core import ffi, lib

    n = iodev.rings[0].num // 3 - 2            # as many as the ring holds
    pages = [victim(iodev) for _ in range(n)]
    st = ffi.new("struct dp_iommu_stats *")
    lib.dp_iommu_get_stats(iodev.backend.device.iommu, st)
    sent_before = st.misses_sent
    t0 = time.monotonic()
    heads = {iommu_request(iodev, 0, vb.ReqType.IN, (gpa, 4096, True), 8 * i)[0]
             for i, gpa in enumerate(pages)}
    served = 0
    while time.monotonic() - t0 < 0.8 * IOMMU_TIMEOUT_MS / 1000:
        other_queue_still_serves(iodev)
        served += 1
    collect(iodev, 0, heads)
    lib.dp_iommu_get_stats(iodev.backend.device.iommu, st)
    sent = st.misses_sent - sent_before
    statuses = {iodev.mem.read(gpa, 1) for gpa in pages}
    if checked:
        assert statuses == {b"\xaa"}, "unmapped memory written"
        assert iotlb_stats(iodev)["iotlb_timeouts"] == n and iotlb_stats(iodev)["parked"] == 0
        elapsed = time.monotonic() - t0
        assert n <= sent <= n * (elapsed / 1.0 + 1), (sent, n, elapsed)
        assert served >= 2
    else:
        assert statuses == {b"\0"}
        assert sent == 0
    assert iodev.read(0, 4096) == bytes(4096)   # and queue 0 serves again
    other_queue_still_serves(iodev)


@CHECK
def test_iommu_a_ring_at_an_iova_never_mapped_never_starts(iodev, checked):
    """Queue 0 restarted with its rings at guest-physical addresses where IOVAs belong: it
    waits for them (asking), queue 1 serves; without the check it runs on memory the guest
    never mapped."""
    ring = iodev.rings[0]
    ring.base = iodev.client.get_vring_base(0)
    iodev.client.ring_addr = lambda gpa: gpa
    iodev.client.set_vring_addr(ring)
    iodev.client.ring_addr = iodev.iommu.iova
    iodev.client.set_u64(Request.SET_VRING_KICK, 0, [ring.kick_fd])
    vring = iodev.backend.device.vrings[0]
    time.sleep(0.2)
    if checked:
        assert vring.waiting_iotlb and not vring.running
        assert iodev.iommu.counters.refused >= 1
    else:
        assert vring.running
    other_queue_still_serves(iodev)
