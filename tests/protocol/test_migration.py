"""Dirty logging for live migration, driven by the frontend playing QEMU's part.

The frontend shares a dirty log (SET_LOG_BASE), turns VHOST_F_LOG_ALL on with SET_FEATURES and
sets VHOST_VRING_F_LOG on each ring while the rings run, as QEMU does when a migration starts,
then reads the log back. What the backend marks is compared with what it wrote: the pages of
the data a read put into guest memory (only as far as it wrote: GET_ID's 20 bytes, not its
whole buffer), the status byte's page, and the used ring's page; never a page it only read.
Under two queues the threads mark bits of the same log bytes at once; the log is also swapped
(a resize) and LOG_ALL toggled while the C load generator runs, and GET_VRING_BASE answers
only once what the drained requests wrote is in the log. With `--debug-no-dirty-log` the
features are offered and nothing is logged.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from dataplane.driver import BlkRequest, Device, VhostUserClient
from dataplane.driver.device import OUTHDR, DirtyLog
from dataplane.driver.load import Job, run_load
from dataplane.protocol import virtio_blk as vb
from dataplane.protocol.vhost_user import (
    LOG,
    U64,
    VHOST_F_LOG_ALL,
    VHOST_USER_REPLY_MASK,
    VHOST_USER_VERSION,
    Message,
    ProtocolFeature,
    Request,
    recv_message,
    send_message,
)

MiB = 1 << 20
PAGE = 4096
SECTOR = 512
SCRATCH = 32 * MiB          # raw guest-physical pages for the tests' buffers (never allocated)


def page(gpa: int) -> int:
    return gpa // PAGE


def pages(gpa: int, length: int) -> set[int]:
    return set(range(gpa // PAGE, (gpa + length - 1) // PAGE + 1))


def raw_request(dev: Device, queue: int, type_: int, sector: int, *, hdr: int, status: int,
                readable: list[tuple[int, int]] = (), writable: list[tuple[int, int]] = (),
                kick: bool = True) -> BlkRequest:
    """A request whose buffers sit at the given guest-physical addresses."""
    ring = dev.rings[queue]
    dev.mem.write(hdr, OUTHDR.pack(type_, 0, sector))
    dev.mem.write(status, b"\xff")
    bufs = [(hdr, OUTHDR.size, False)] + [(g, n, False) for g, n in readable] + \
        [(g, n, True) for g, n in writable] + [(status, 1, True)]
    head = ring.add_chain(bufs)
    old = ring.avail_idx
    ring.publish(head)
    if kick:
        ring.kick(old)
    return BlkRequest(queue, head, type_, hdr, 0, 0, status, [])


def run_one(dev: Device, queue: int, type_: int, sector: int = 0, **kw) -> int:
    req = raw_request(dev, queue, type_, sector, **kw)
    status, _ = dev.wait([req])[id(req)]
    return status


def used_page(dev: Device, queue: int) -> int:
    return page(dev.rings[queue].used)


@pytest.mark.parametrize("kind", ["null", "file"])
def test_the_log_marks_exactly_the_pages_the_device_wrote(start_backend, disk_file, kind):
    backend = start_backend("null:64M" if kind == "null" else str(disk_file), queues=2)
    with Device.connect(backend.socket, queues=2, regions=4) as dev:
        dev.write(0, os.urandom(64 * 1024))           # something to read back (file)
        log = dev.start_dirty_log()
        assert log.size == DirtyLog.size_for(64 * MiB)
        assert dev.take_dirty_pages() == set()        # starting the log writes nothing
        for q in (0, 1):
            base = SCRATCH + q * 256 * PAGE
            hdr, status = base, base + PAGE + 100
            used = used_page(dev, q)
            cases = [
                # a read of 8 KiB at an unaligned place: three pages
                (vb.ReqType.IN, 0, {"writable": [(base + 2 * PAGE + 512, 8192)]},
                 pages(base + 2 * PAGE + 512, 8192)),
                # a write only reads guest memory
                (vb.ReqType.OUT, 16, {"readable": [(base + 5 * PAGE, 8192)]}, set()),
                # GET_ID writes 20 bytes of a three-page buffer
                (vb.ReqType.GET_ID, 0, {"writable": [(base + 7 * PAGE, 3 * PAGE)]},
                 {page(base + 7 * PAGE)}),
                # two writable descriptors with an untouched page between them
                (vb.ReqType.IN, 8, {"writable": [(base + 10 * PAGE, PAGE), (base + 12 * PAGE, 512)]},
                 {page(base + 10 * PAGE), page(base + 12 * PAGE)}),
                # beyond the disk: IOERR, the device writes only the status byte
                (vb.ReqType.IN, 64 * MiB // SECTOR, {"writable": [(base + 14 * PAGE, PAGE)]}, set()),
                (vb.ReqType.FLUSH, 0, {}, set()),
                # a buffer across two regions of the memory table (16 MiB apart)
                (vb.ReqType.IN, 0, {"writable": [(16 * MiB - PAGE, 2 * PAGE)]},
                 {page(16 * MiB) - 1, page(16 * MiB)}),
            ]
            for type_, sector, bufs, data_pages in cases:
                st = run_one(dev, q, type_, sector, hdr=hdr, status=status, **bufs)
                expected_status = vb.Status.IOERR if sector == 64 * MiB // SECTOR else vb.Status.OK
                assert st == expected_status, (type_, sector)
                got = dev.take_dirty_pages()
                assert got == data_pages | {page(status), used}, (
                    f"queue {q} request {type_} sector {sector}: marked {sorted(got)}, wrote"
                    f" {sorted(data_pages | {page(status), used})}")


def test_a_packed_ring_logs_its_used_descriptors_and_device_area(start_backend):
    """A packed ring's used descriptors go into the descriptor ring, not a used ring: each
    completion marks the page of its slot (by the GPA of its region), beside the data and
    status; the device event area is the only other page marked."""
    backend = start_backend("null:64M", queues=1)
    with Device.connect(backend.socket, queues=1, queue_size=256, ring="packed") as dev:
        dev.start_dirty_log()
        ring = dev.rings[0]
        allowed = pages(ring.desc, 16 * ring.num) | {page(ring.used)}
        checked = 0
        for i in range(3 * ring.num // 2):           # past a wrap of the ring
            slot = ring.next_used                     # where the used descriptor lands
            req = dev.submit(vb.ReqType.IN, 8 * i, read_len=4096)
            dev.wait([req])
            got = dev.take_dirty_pages()
            wrote = pages(req.data, 4096) | {page(req.status)}
            assert wrote <= got, f"request {i}: {sorted(wrote - got)} not marked"
            assert got - wrote <= allowed, f"request {i}: marked {sorted(got - wrote - allowed)}"
            slot_page = page(ring.desc + 16 * slot)
            if slot_page not in wrote | {page(ring.used)}:
                assert slot_page in got, f"request {i}: the page of used slot {slot} is not marked"
                checked += 1
            dev.release(req)
        assert checked > ring.num


def test_two_queues_marking_the_same_log_bytes_lose_no_bit(start_backend):
    """Queue 0 reads into the even pages, queue 1 into the odd ones: every byte of the log is
    marked by both I/O threads at once (published together, kicked back to back)."""
    backend = start_backend("null:64M", queues=2)
    per_queue, rounds = 80, 25
    with Device.connect(backend.socket, queues=2, queue_size=256) as dev:
        dev.start_dirty_log()
        hdr = SCRATCH
        status_base = SCRATCH + PAGE
        data_base = SCRATCH + 16 * PAGE
        for r in range(rounds):
            reqs = []
            for i in range(per_queue):
                for q in (0, 1):
                    slot = 2 * i + q
                    reqs.append(raw_request(dev, q, vb.ReqType.IN, slot * 8, hdr=hdr,
                                            status=status_base + slot,
                                            writable=[(data_base + slot * PAGE, PAGE)], kick=False))
            for q in (0, 1):
                dev.rings[q].kick()
            done = dev.wait(reqs)
            assert all(st == vb.Status.OK for st, _ in done.values())
            expected = pages(data_base, 2 * per_queue * PAGE) | pages(status_base, 2 * per_queue) \
                | {used_page(dev, 0), used_page(dev, 1)}
            got = dev.take_dirty_pages()
            assert got == expected, (f"round {r}: lost {sorted(expected - got)},"
                                     f" extra {sorted(got - expected)}")


def test_log_swapped_while_two_queues_run_is_no_longer_written_after_the_reply(start_backend):
    """The log is resized (SET_LOG_BASE with a new memfd) while the load generator reads on
    both queues. Once the reply is in the front end frees the old log: the backend must not
    write into it any more, and keeps marking the new one."""
    backend = start_backend("null:64M", queues=2)
    job = Job(rw="randread", bs=4096, iodepth=16, runtime=2.0)
    with Device.connect(backend.socket, queues=2, memory=job.memory_needed(2)) as dev:
        dev.start_dirty_log()
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("r", run_load(dev, job)))
        t.start()
        swaps = 0
        try:
            time.sleep(0.2)
            while t.is_alive() and swaps < 8:
                old = dev.dirty_log
                new = DirtyLog(old.size + 8 * (swaps + 1))
                dev.client.set_log_base(new.fd, new.size)
                dev.dirty_log = new
                old.take()                              # what was marked before the reply
                time.sleep(0.05)
                assert old.take() == set(), "the backend wrote into the log it was told to drop"
                assert new.take(), "the backend does not mark the new log"
                old.close()
                swaps += 1
        finally:
            t.join()
        assert swaps == 8
        r = result["r"]
        assert r.error == 0 and r.io_errors == 0 and all(q.ios(0) > 0 for q in r.queues)


def test_log_all_toggled_while_the_rings_run_keeps_their_state(start_backend, disk_file):
    """Migrations started and cancelled under a verifying load: SET_FEATURES and
    SET_VRING_ADDR arrive while the rings run and must not reset them."""
    backend = start_backend(str(disk_file), queues=2)
    job = Job(rw="randrw", bs=4096, iodepth=8, runtime=2.0, verify=True, size=16 * MiB)
    with Device.connect(backend.socket, queues=2, memory=job.memory_needed(2)) as dev:
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("r", run_load(dev, job)))
        t.start()
        toggles = empty = 0
        try:
            time.sleep(0.1)
            while t.is_alive():
                dev.start_dirty_log()
                time.sleep(0.05)
                marked = dev.take_dirty_pages()
                dev.stop_dirty_log()
                if t.is_alive() and not marked:
                    empty += 1      # a window in which a loaded host ran no request
                toggles += 1
                time.sleep(0.05)
        finally:
            t.join()
        r = result["r"]
        assert toggles >= 5
        assert empty <= toggles // 2, f"nothing was logged under load in {empty} of {toggles} windows"
        assert r.error == 0 and r.io_errors == 0 and r.verify_failures == 0, r.summary_of_problems()
        assert sum(q.ios(0) + q.ios(1) for q in r.queues) > 500
        stats = backend.device.stats()
        assert not any(s["broken"] for s in stats)


def test_get_vring_base_answers_once_the_drained_requests_are_logged(start_backend):
    """QEMU reads the log right after the GET_VRING_BASE replies: requests still in flight
    then (here, held 300 ms by the latency layer) must be done and logged by the reply."""
    backend = start_backend("null:64M,latency=fixed:300ms", queues=2)
    with Device.connect(backend.socket, queues=2) as dev:
        dev.start_dirty_log()
        status_base = SCRATCH + PAGE
        data_base = SCRATCH + 16 * PAGE
        reqs = [raw_request(dev, 0, vb.ReqType.IN, i * 8, hdr=SCRATCH, status=status_base + i,
                            writable=[(data_base + i * PAGE, PAGE)]) for i in range(8)]
        t0 = time.monotonic()
        dev.client.get_vring_base(0)
        assert time.monotonic() - t0 > 0.2          # it waited for them
        got = dev.take_dirty_pages()
        assert pages(data_base, 8 * PAGE) | {page(status_base), used_page(dev, 0)} <= got
        assert dev.rings[0].used_idx() == 8
        done = dev.wait(reqs, timeout=1)
        assert all(st == vb.Status.OK for st, _ in done.values())
        # The frontend restarts the ring where it stopped, as QEMU after a failed migration.
        dev.client.setup_vring(dev.rings[0], base=8)
        dev.client.call(Request.SET_VRING_ENABLE, b"\0\0\0\0\1\0\0\0")
        assert dev.read(0, 4096) == bytes(4096)


def test_without_dirty_logging_the_features_are_offered_and_nothing_is_marked(start_backend):
    backend = start_backend("null:64M", queues=1, dirty_log=False)
    with Device.connect(backend.socket, queues=1) as dev:
        assert dev.offered & (1 << VHOST_F_LOG_ALL)
        assert dev.protocol_features & (1 << ProtocolFeature.LOG_SHMFD)
        dev.start_dirty_log()
        dev.read(0, 64 * 1024)
        assert dev.take_dirty_pages() == set()


def test_set_log_base_always_gets_its_reply(start_backend):
    """With LOG_SHMFD, QEMU waits for SET_LOG_BASE's reply with or without REPLY_ACK, and
    takes only header flags of exactly REPLY | version. A bad log still gets one."""
    backend = start_backend("null:16M", queues=1)
    client = VhostUserClient(backend.socket)
    try:
        client.get_u64(Request.GET_FEATURES)
        assert client.get_u64(Request.GET_PROTOCOL_FEATURES) & (1 << ProtocolFeature.LOG_SHMFD)
        client.set_u64(Request.SET_PROTOCOL_FEATURES, 1 << ProtocolFeature.LOG_SHMFD)   # no REPLY_ACK
        client.set_u64(Request.SET_FEATURES, 1 << VHOST_F_LOG_ALL)
        log = DirtyLog(4096)
        bad = os.memfd_create("t")
        try:
            for payload, fds, ok in ((LOG.pack(4096, 0), [log.fd], True),
                                     (LOG.pack(4096, 0), [], False),          # no fd
                                     (LOG.pack(0, 0), [log.fd], False),       # empty
                                     (LOG.pack(4096, 0), [bad], False),       # too small a file
                                     (LOG.pack(1 << 20, 4096), [log.fd], False)):
                send_message(client.sock, Message(Request.SET_LOG_BASE, VHOST_USER_VERSION, payload, fds))
                reply = recv_message(client.sock)
                assert reply is not None and reply.request == Request.SET_LOG_BASE
                assert reply.flags == VHOST_USER_VERSION | VHOST_USER_REPLY_MASK
                assert U64.unpack(reply.payload)[0] == (0 if ok else 1)
        finally:
            os.close(bad)
            log.close()
        assert client.get_u64(Request.GET_QUEUE_NUM) == 1   # the connection is fine
    finally:
        client.close()


def test_the_frontend_logs_against_qemu_storage_daemon(start_qsd_export, tmp_path):
    """The same frontend against libvhost-user: its reads show in the log too."""
    sock = start_qsd_export("driver=null-co,node-name=n0,size=67108864,read-zeroes=on", 1)
    with Device.connect(str(sock), queues=1, regions=2) as dev:
        dev.start_dirty_log()
        st = run_one(dev, 0, vb.ReqType.IN, 0, hdr=SCRATCH, status=SCRATCH + PAGE,
                     writable=[(SCRATCH + 4 * PAGE, 2 * PAGE)])
        assert st == vb.Status.OK
        got = dev.take_dirty_pages()
        assert pages(SCRATCH + 4 * PAGE, 2 * PAGE) | {used_page(dev, 0)} <= got
