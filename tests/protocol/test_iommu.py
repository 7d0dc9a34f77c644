"""VIRTIO_F_IOMMU_PLATFORM over vhost-user, with the frontend playing QEMU's intel-iommu
(dataplane.driver.iommu): the negotiation QEMU insists on, rings and buffers addressed by
IOVA and fetched through misses on the back-end channel, invalidations of one page and of
everything (QEMU's global flush) while the load generator runs, each request mapped and
unmapped (a guest in strict mode), dirty logging by guest-physical page, memory hot-plug and
a backend restart behind the vIOMMU. The hostile cases are in test_hostile.py.
"""

from __future__ import annotations

import threading
import time

import pytest

from dataplane.driver import BlkRequest, Device
from dataplane.driver.device import OUTHDR
from dataplane.driver.iommu import IOVA_BASE, PAGE, RW
from dataplane.driver.load import Job, run_load
from dataplane.errors import DeviceError
from dataplane.observe.metrics import format_table
from dataplane.observe.prometheus import exposition
from dataplane.protocol import virtio_blk as vb
from dataplane.protocol.vhost_user import (
    IOTLB_MSG,
    U64,
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_VERSION,
    IotlbType,
    ProtocolFeature,
    Request,
)

MiB = 1 << 20
IOMMU = 1 << vb.VIRTIO_F_IOMMU_PLATFORM
RINGS = ["split", "packed"]


def backend_stats(backend) -> dict[str, int]:
    totals: dict[str, int] = {}
    for q in backend.device.stats():
        for k, v in q.items():
            totals[k] = totals.get(k, 0) + v
    return totals


def iotlb_entries(backend) -> list[tuple[int, int]]:
    from dataplane.core import ffi, lib

    t = backend.device.iotlb
    a = ffi.new("uint64_t[3]")
    perm = ffi.new("unsigned *")
    out = []
    for i in range(lib.dp_iotlb_count(t)):
        lib.dp_iotlb_entry(t, i, a, a + 1, a + 2, perm)
        out.append((a[0], a[1]))
    return out


def test_iommu_is_offered_with_the_protocol_features_qemu_requires(start_backend):
    backend = start_backend("null:64M", queues=1)
    with Device.connect(backend.socket) as dev:   # a frontend without a vIOMMU: as before
        assert dev.offered & IOMMU and not dev.features & IOMMU
        proto = dev.client.get_u64(Request.GET_PROTOCOL_FEATURES)
        assert proto & (1 << ProtocolFeature.BACKEND_REQ) and proto & (1 << ProtocolFeature.REPLY_ACK)
        assert dev.read(0, 4096) == bytes(4096)


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
def test_round_trips_through_iovas_and_misses(start_backend, disk_file, ring, indirect):
    backend = start_backend(str(disk_file), queues=2)
    with Device.connect(backend.socket, queues=2, ring=ring, iommu=True) as dev:
        assert dev.features & IOMMU
        for q in (0, 1):
            for size in (512, 4096, 65536 + 512):   # the largest spans 18 pages, each missed
                data = bytes((q * 7 + i) % 251 for i in range(size))
                status, _ = dev._run(vb.ReqType.OUT, (q * 8 + size // 512) * 8, data=data, queue=q)
                assert status == vb.Status.OK
                req = dev.submit(vb.ReqType.IN, (q * 8 + size // 512) * 8, read_len=size, queue=q,
                                 indirect=indirect)
                assert dev.wait([req])[id(req)][0] == vb.Status.OK
                assert dev.mem.read(req.data, size) == data
                dev.release(req)
        s = backend_stats(backend)
        assert s["iotlb_misses"] > 0 and s["iotlb_timeouts"] == 0 and s["errors"] == 0, s
        assert dev.iommu.counters.refused == 0
        # The counters reach `dataplane stats` (table and JSON) and Prometheus.
        snap = backend.server.snapshot()
        assert sum(q["iotlb_misses"] for q in snap["queues"]) == s["iotlb_misses"]
        assert all(q["parked"] == 0 for q in snap["queues"]), snap["queues"]
        table = format_table(snap)
        assert f"vIOMMU: {s['iotlb_misses']} request(s) waited for an IOTLB entry (0 in vain" in table
        body, _ = exposition(backend.server.snapshot)
        misses = [float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
                  if line.startswith("dataplane_iotlb_misses_total{")]
        assert len(misses) == 2 and sum(misses) == s["iotlb_misses"], body.decode()


@pytest.mark.parametrize("ring", RINGS)
def test_rings_only_in_the_page_table_start_once_their_misses_are_answered(start_backend, ring):
    """iommu_push="none": not even the used ring is sent; every ring area arrives by a miss."""
    backend = start_backend("null:64M", queues=2)
    with Device.connect(backend.socket, queues=2, ring=ring, iommu=True, iommu_push="none") as dev:
        for q in (0, 1):
            assert dev.read(4096 * q, 4096, queue=q) == bytes(4096)
        # The frontend's channel thread counts an answer after sending its UPDATE, which the
        # backend may have used (and the read completed) before the count: let it catch up.
        dev.iommu.settle()
        assert dev.iommu.counters.answered >= 4   # desc and used of two queues at least


def test_a_miss_answered_late_still_completes_and_others_carry_on(start_backend):
    backend = start_backend("null:64M", queues=2)
    with Device.connect(backend.socket, queues=2, iommu=True) as dev:
        dev.iommu.push(IOVA_BASE, dev.mem.size, page=0)   # all guest memory: no legit misses
        buf = dev.mem.alloc(4096, 4096)
        late = dev.iommu.map(buf, 4096, RW)               # in the page table, not the IOTLB
        dev.iommu.settle()                                # the rings' misses: answered
        misses = dev.iommu.counters.misses
        with dev.iommu.hold():
            req = BlkRequest(0, 0, vb.ReqType.IN, 0, buf, 4096, 0, [])
            hdr, st = dev.mem.alloc(16, 16), dev.mem.alloc(1, 1)
            dev.mem.write(hdr, OUTHDR.pack(vb.ReqType.IN, 0, 0))
            dev.mem.write(st, b"\xee")
            ring = dev.rings[0]
            req.head = ring.add_chain([(dev.dma_addr(hdr), 16, False), (late, 4096, True),
                                       (dev.dma_addr(st), 1, True)])
            req.status = st
            ring.publish(req.head)
            ring.kick()
            time.sleep(0.2)
            # the same queue and the other one serve while that request waits
            assert dev.read(8192, 4096, queue=0) == bytes(4096)
            assert dev.read(8192, 4096, queue=1) == bytes(4096)
            assert dev.mem.read(st, 1) == b"\xee", "answered before its UPDATE came"
            assert backend_stats(backend)["parked"] == 1
            with pytest.raises(DeviceError, match="unanswered"):   # the miss waits on the thread
                dev.iommu.settle(timeout=0.2)
        assert dev.wait([req])[id(req)][0] == vb.Status.OK
        dev.iommu.settle()
        c = dev.iommu.counters
        assert c.answered == c.misses == misses + 1, c
        assert backend_stats(backend)["parked"] == 0


def test_strict_mode_maps_and_unmaps_every_request(start_backend, disk_file):
    backend = start_backend(str(disk_file), queues=2)
    with Device.connect(backend.socket, queues=2, iommu=True, iommu_strict=True) as dev:
        before = len(iotlb_entries(backend))
        for q in (0, 1):
            data = bytes(range(256)) * 32
            dev.write(q * MiB, data, queue=q)
            assert dev.read(q * MiB, len(data), queue=q) == data
        c = dev.iommu.counters
        assert c.invalidations >= 4 * 3 and c.refused == 0, c   # header, data, status each
        dynamic = [e for e in iotlb_entries(backend) if e[0] >= 1 << 44]
        assert dynamic == [], f"entries left of unmapped requests: {dynamic}"
        assert len(iotlb_entries(backend)) <= before


def flush_everything(dev: Device, stop: threading.Event, every: float, counts: list[int]) -> None:
    """QEMU's global device-IOTLB flush (a lazy guest behind ATS): two INVALIDATEs, the second
    reaching 2^64."""
    while not stop.wait(every):
        dev.iommu.invalidate(0, 0xFEE0_0000)
        dev.iommu.invalidate(0xFEF0_0000, 0xFFFF_FFFF_0110_0000)
        counts[0] += 1


@pytest.mark.parametrize("ring", RINGS)
def test_everything_invalidated_again_and_again_while_the_load_runs(start_backend, disk_file, ring):
    """Every 20 ms the whole IOTLB goes, rings included, under a verify job on two queues: the
    rings and buffers come back through misses, the completions that finished while a ring was
    away are published once it is back, and not a request is lost or fails."""
    backend = start_backend(str(disk_file), queues=2)
    job = Job(rw="randrw", bs=4096, iodepth=16, runtime=3, verify=True, size=32 * MiB)
    with Device.connect(backend.socket, queues=2, ring=ring, iommu=True,
                        memory=job.memory_needed(2)) as dev:
        stop, counts = threading.Event(), [0]
        flusher = threading.Thread(target=flush_everything, args=(dev, stop, 0.02, counts))
        flusher.start()
        try:
            result = run_load(dev, job)
        finally:
            stop.set()
            flusher.join()
        assert not result.error and not result.io_errors and not result.verify_failures, \
            result.summary_of_problems()
        assert counts[0] >= 10
        s = backend_stats(backend)
        assert s["iotlb_misses"] > counts[0] and s["iotlb_timeouts"] == 0 and s["errors"] == 0, s
        assert dev.read(0, 4096) is not None   # and the device goes on afterwards


@pytest.mark.parametrize("ring", RINGS)
def test_the_load_generator_maps_each_request(start_backend, disk_file, ring):
    backend = start_backend(str(disk_file), queues=2)
    job = Job(rw="randrw", bs=4096, iodepth=8, runtime=1, verify=True, size=16 * MiB,
              iommu="request")
    with Device.connect(backend.socket, queues=2, ring=ring, iommu=True,
                        memory=job.memory_needed(2)) as dev:
        result = run_load(dev, job)
        assert not result.error and not result.io_errors and not result.verify_failures, \
            result.summary_of_problems()
        ios = sum(q.ios(d) for q in result.queues for d in (0, 1))
        c = backend.device.iotlb_counters
        assert c.updates >= ios and c.invalidations >= ios, (c, ios)
        assert not [e for e in iotlb_entries(backend) if e[0] >= 1 << 44]


def test_dirty_log_behind_the_viommu_marks_guest_physical_pages(start_backend):
    """log_guest_addr is the used ring's IOVA; the log is read at guest-physical pages: the
    data, the status byte and the used ring are marked at their GPAs, never at an IOVA."""
    backend = start_backend("null:64M", queues=1)
    with Device.connect(backend.socket, queues=1, iommu=True) as dev:
        dev.iommu.push(IOVA_BASE, dev.mem.size, page=0)
        dev.start_dirty_log()
        dev.take_dirty_pages()
        ring = dev.rings[0]
        for i in range(4):
            req = dev.submit(vb.ReqType.IN, 8 * i, read_len=8192)
            assert dev.wait([req])[id(req)][0] == vb.Status.OK
            got = dev.take_dirty_pages()
            wrote = {req.data // PAGE, (req.data + 8191) // PAGE, req.status // PAGE,
                     ring.used // PAGE}
            assert got == wrote, (sorted(got), sorted(wrote))
            dev.release(req)


def test_hot_plugged_memory_behind_the_viommu(start_backend):
    backend = start_backend("null:64M", queues=2)
    with Device.connect(backend.socket, queues=2, iommu=True) as dev:
        area = dev.add_memory(4 * MiB)
        assert dev.read(0, 4096, queue=1, area=area) == bytes(4096)   # IOVA = its gpa + base
        dev.remove_memory(area)
        # an entry of the removed memory is left in the IOTLB: it faults, nothing is touched
        gone = IOVA_BASE + area.gpa
        assert any(first <= gone <= last for first, last in iotlb_entries(backend))
        hdr, st = dev.mem.alloc(16, 16), dev.mem.alloc(1, 1)
        dev.mem.write(hdr, OUTHDR.pack(vb.ReqType.IN, 0, 0))
        ring = dev.rings[1]
        head = ring.add_chain([(dev.dma_addr(hdr), 16, False), (gone, 4096, True),
                               (dev.dma_addr(st), 1, True)])
        ring.publish(head)
        ring.kick()
        assert ring.wait_used(5)
        assert dev.mem.read(st, 1)[0] == vb.Status.IOERR
        assert backend_stats(backend)["iotlb_faults"] >= 1


def test_a_new_backend_behind_the_same_viommu(start_backend):
    """The backend goes away and another takes its place (an empty IOTLB): the frontend
    reconnects as QEMU does, a new back-end channel, and the misses fill the new IOTLB."""
    a = start_backend("null:64M", queues=2)
    dev = Device.connect(a.socket, queues=2, iommu=True)
    try:
        assert dev.read(0, 4096, queue=1) == bytes(4096)
        a.server.stop()   # (the fixture closes it at the end)
        a.thread.join(30)
        b = start_backend("null:64M", queues=2)
        dev.reconnect(b.socket)
        for q in (0, 1):
            assert dev.read(0, 4096, queue=q) == bytes(4096)
        assert backend_stats(b)["iotlb_misses"] > 0
    finally:
        dev.close()


def test_iotlb_messages_need_the_feature_and_a_socket(start_backend):
    backend = start_backend("null:64M", queues=1)
    with Device.connect(backend.socket) as dev:
        update = IOTLB_MSG.pack(IOVA_BASE, PAGE, dev.mem.uva(0), RW, IotlbType.UPDATE)
        with pytest.raises(DeviceError):   # VIRTIO_F_IOMMU_PLATFORM not acked
            dev.client.call(Request.IOTLB_MSG, update,
                            flags=VHOST_USER_VERSION | VHOST_USER_NEED_REPLY_MASK)
        with pytest.raises(DeviceError):   # BACKEND_REQ not negotiated
            dev.client.call(Request.SET_BACKEND_REQ_FD, b"", [dev.rings[0].kick_fd])
        assert dev.read(0, 512) == bytes(512)
    with Device.connect(backend.socket, iommu=True) as dev:
        with pytest.raises(DeviceError):   # an eventfd is no back-end channel
            dev.client.call(Request.SET_BACKEND_REQ_FD, b"", [dev.rings[0].kick_fd])
        for type_ in (IotlbType.MISS, IotlbType.ACCESS_FAIL, IotlbType.BATCH_BEGIN, 99):
            with pytest.raises(DeviceError):
                dev.client.iotlb_msg(IOVA_BASE, PAGE, dev.mem.uva(0), RW, type_)
        assert dev.read(0, 512) == bytes(512)
        assert backend.device.iotlb_counters.refused >= 4
        assert U64.size == 8
