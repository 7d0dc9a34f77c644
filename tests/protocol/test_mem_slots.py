"""Memory slots (CONFIGURE_MEM_SLOTS): the memory table region by region, while rings run.

The frontend plays QEMU: it sends the first table as ADD_MEM_REGs (here split into up to 64
regions of one memfd, as QEMU splits a RAMBlock), hot-plugs memfds with ADD_MEM_REG and takes
them away with REM_MEM_REG while the C load generator verifies data on two queues. A region
taken away under a request still in flight: the REM is answered once the request is done,
and a request into the region after that gets IOERR (this file also runs in the ASan pass:
a use of the unmapped region or of a freed table would abort it).
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from hotplug import hot_plug_under_load
from serve_process import ServeProcess

from dataplane.driver import Device, VhostUserClient
from dataplane.driver.load import Job, run_load
from dataplane.errors import DeviceError
from dataplane.protocol import virtio_blk as vb
from dataplane.protocol.vhost_user import MEM_REG, ProtocolFeature, Request

MiB = 1 << 20
PAGE = 4096


def assert_clean(result) -> None:
    assert result.error == 0, result.summary_of_problems()
    assert result.io_errors == 0, result.summary_of_problems()
    assert result.verify_failures == 0, result.summary_of_problems()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_slots_offered_and_the_first_table_arrives_region_by_region(start_backend, disk_file):
    backend = start_backend(str(disk_file), queues=2)
    job = Job(rw="randrw", bs=16384, iodepth=16, runtime=1.0, verify=True, size=32 * MiB)
    memory = job.memory_needed(2) // (64 * PAGE) * (64 * PAGE)
    with Device.connect(backend.socket, queues=2, memory=memory, regions=64) as dev:
        assert dev.protocol_features & (1 << ProtocolFeature.CONFIGURE_MEM_SLOTS)
        assert dev.max_mem_slots() >= 256
        assert len(dev.mem.table()) == 64
        # 16 KiB buffers in 64 regions of one memfd: some straddle two regions.
        assert_clean(run_load(dev, job))
        # One buffer across many regions at once.
        piece = dev.mem.table()[1][1]
        data = os.urandom(3 * piece)
        dev.write(0, data)
        assert dev.read(0, len(data)) == data


def test_hot_plug_and_unplug_under_load_on_two_queues(start_backend, disk_file):
    """Queues 0 and 1 verify writes and reads for 3 s; meanwhile memory comes and goes,
    and queue 2 does I/O through each piece of hot-plugged memory before it is removed."""
    backend = start_backend(str(disk_file), queues=3)
    job = Job(rw="randrw", bs=4096, iodepth=32, runtime=3.0, verify=True, size=32 * MiB)
    with Device.connect(backend.socket, queues=3, memory=job.memory_needed(3)) as dev:
        result, cycles = hot_plug_under_load(dev, job, areas=3, min_cycles=5, offset=48 * MiB)
        assert_clean(result)
        assert all(q.ios(0) > 100 and q.ios(1) > 100 for q in result.queues)
        assert cycles >= 5
        assert dev.mem.extra == []
        # Everything is as it was: the base table, the rings, data.
        assert dev.read(0, 4096, queue=2) is not None
        # Read while the session lives, through the server's lock: once the front end has
        # gone, the server's loop frees the queues.
        assert not any(q["broken"] for q in backend.server.snapshot()["queues"])


def test_region_removed_under_a_request_in_flight(start_backend):
    """The REM of a region a request still points into is answered only once that request is
    done (its data lands and is reported); afterwards the region is gone for new requests."""
    backend = start_backend("null:64M,latency=fixed:400ms", queues=1)
    with Device.connect(backend.socket, queues=1) as dev:
        area = dev.add_memory(1 * MiB)
        buf = area.gpa + 64 * 1024
        dev.mem.write(buf, b"\xaa" * 8192)
        req = dev.submit(vb.ReqType.IN, 0, read_len=8192, area=area)
        t0 = time.monotonic()
        dev.client.rem_mem_reg(area.gpa, area.size, area.user_addr)
        waited = time.monotonic() - t0
        assert waited > 0.25, f"REM answered after {waited:.3f} s, with a request in flight"
        # The request was complete before the REM was: status and data are in the region.
        status, used_len = dev.wait([req], timeout=0.5)[id(req)]
        assert (status, used_len) == (vb.Status.OK, 8193)
        assert dev.mem.read(req.data, 8192) == bytes(8192)
        # A new request whose data buffer is in the removed region: IOERR, nothing written.
        late = dev.submit(vb.ReqType.IN, 0, read_len=4096, buf=buf)
        status, _ = dev.wait([late], timeout=2)[id(late)]
        assert status == vb.Status.IOERR
        assert dev.mem.read(buf, 4096) == b"\xaa" * 4096
        for gpa in req.buffers:
            dev.mem.free(gpa)
        dev.mem.drop_area(area)
        assert dev.read(0, 4096) == bytes(4096)


def test_without_the_drain_the_backend_writes_into_the_unmapped_region(tmp_path):
    """The same with --debug-no-mem-drain: the REM is answered at once and the region unmapped;
    the request completes 400 ms later into it and the backend dies of it (SIGSEGV; SIGABRT
    from AddressSanitizer in the sanitized pass). What the test above guards against."""
    sock = tmp_path / "vub.sock"
    serve = ServeProcess(tmp_path / "serve.log", sock, "null:64M,latency=fixed:400ms",
                         ("--queues", "1", "--debug-no-mem-drain"))
    try:
        with Device.connect(str(sock), queues=1) as dev:
            area = dev.add_memory(1 * MiB)
            dev.submit(vb.ReqType.IN, 0, read_len=8192, area=area)
            t0 = time.monotonic()
            dev.client.rem_mem_reg(area.gpa, area.size, area.user_addr)
            assert time.monotonic() - t0 < 0.2
            rc = serve.proc.wait(10)
            assert rc in (-signal.SIGSEGV, -signal.SIGABRT), (rc, serve.log()[-2000:])
    finally:
        serve.kill()


def test_slots_fill_up_and_bad_regions_are_refused_without_leaking(start_backend):
    backend = start_backend("null:16M", queues=1)
    with Device.connect(backend.socket, queues=1, memory=16 * MiB) as dev:
        slots = dev.max_mem_slots()
        fd = os.memfd_create("slots", os.MFD_CLOEXEC)
        os.ftruncate(fd, slots * PAGE)
        fds_before = open_fds()
        base_gpa, base_uva = 1 << 32, 1 << 40
        try:
            for i in range(slots - 1):       # the base memory holds one slot
                dev.client.add_mem_reg(base_gpa + i * PAGE, PAGE, base_uva + i * PAGE, i * PAGE, fd)
            with pytest.raises(DeviceError):
                dev.client.add_mem_reg(base_gpa + slots * PAGE, PAGE, base_uva + slots * PAGE, 0, fd)
            assert dev.read(0, 4096) == bytes(4096)   # 512 regions: lookups still right
            for i in range(slots - 1):
                dev.client.rem_mem_reg(base_gpa + i * PAGE, PAGE, base_uva + i * PAGE)
        finally:
            os.close(fd)
        client = dev.client
        # ADD without an fd, overlapping, past the end of its file; REM of nothing, with an fd.
        with pytest.raises(DeviceError):
            client.call(Request.ADD_MEM_REG, MEM_REG.pack(0, 1 << 32, PAGE, 1 << 40, 0))
        with pytest.raises(DeviceError):
            client.add_mem_reg(0, PAGE, 1 << 40, 0, dev.mem.fd)
        with pytest.raises(DeviceError):
            client.add_mem_reg(1 << 32, 32 * MiB, 1 << 40, 0, dev.mem.fd)
        with pytest.raises(DeviceError):
            client.rem_mem_reg(1 << 32, PAGE, 1 << 40)
        extra = os.memfd_create("rem-fd", os.MFD_CLOEXEC)
        try:
            with pytest.raises(DeviceError):
                client.call(Request.REM_MEM_REG, MEM_REG.pack(0, 1 << 32, PAGE, 1 << 40, 0), [extra])
        finally:
            os.close(extra)
        assert open_fds() == fds_before - 1
        assert dev.read(0, 4096) == bytes(4096)


def test_mem_slot_messages_without_the_feature_are_refused(start_backend):
    backend = start_backend("null:16M", queues=1)
    client = VhostUserClient(backend.socket)
    try:
        client.get_u64(Request.GET_FEATURES)
        client.set_u64(Request.SET_PROTOCOL_FEATURES, 1 << ProtocolFeature.REPLY_ACK)
        client.reply_ack = True
        fd = os.memfd_create("m", os.MFD_CLOEXEC)
        os.ftruncate(fd, PAGE)
        try:
            with pytest.raises(DeviceError):
                client.add_mem_reg(0, PAGE, 1 << 40, 0, fd)
        finally:
            os.close(fd)
        assert client.get_u64(Request.GET_MAX_MEM_SLOTS) >= 256
    finally:
        client.close()
