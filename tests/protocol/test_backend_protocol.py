"""The backend over a real UNIX socket, driven by dataplane's own frontend.

Each test starts an in-process server (see conftest.start_backend) and talks vhost-user to
it: negotiation, config space, virtio-blk requests on one and several queues, and the
control-plane corner cases (unknown messages, malformed payloads, memory table changes
while queues run, a second front end).
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import pytest

from dataplane.driver import Device, GuestMemory, VhostUserClient
from dataplane.driver.device import OUTHDR
from dataplane.errors import DeviceError, ProtocolError
from dataplane.protocol import virtio_blk as vb
from dataplane.protocol.vhost_user import (
    CONFIG_HEADER,
    HEADER,
    MEMORY_HEADER,
    MEMORY_REGION,
    U64,
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_VERSION,
    VHOST_USER_VRING_NOFD_MASK,
    VRING_STATE,
    ProtocolFeature,
    Request,
    recv_message,
)

MiB = 1 << 20


def pattern(seed: int, n: int) -> bytes:
    return (struct.pack("<Q", seed) * (n // 8 + 1))[:n]


def wait_for(pred, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


# ---- negotiation and config ----

def test_negotiation_and_config_space(start_backend, disk_file):
    backend = start_backend(str(disk_file), queues=3, serial="SN-1234")
    with Device.connect(backend.socket, queues=2) as dev:
        cfg = dev.config
        assert cfg["capacity"] == 64 * MiB // 512
        assert cfg["num_queues"] == 3
        assert cfg["seg_max"] == 254
        assert cfg["blk_size"] == 512
        assert cfg["writeback"] == 1
        assert cfg["max_discard_seg"] >= 1 and cfg["max_write_zeroes_sectors"] > 0
        assert cfg["write_zeroes_may_unmap"] == 1
        for bit in (vb.VIRTIO_F_VERSION_1, vb.VIRTIO_RING_F_EVENT_IDX,
                    vb.VIRTIO_RING_F_INDIRECT_DESC, vb.VIRTIO_BLK_F_MQ, vb.VIRTIO_BLK_F_FLUSH,
                    vb.VIRTIO_BLK_F_DISCARD, vb.VIRTIO_BLK_F_WRITE_ZEROES,
                    vb.VIRTIO_BLK_F_CONFIG_WCE, vb.VIRTIO_BLK_F_SEG_MAX,
                    vb.VIRTIO_BLK_F_BLK_SIZE, vb.VIRTIO_BLK_F_TOPOLOGY):
            assert dev.features & (1 << bit), vb.feature_names(1 << bit)
        assert not dev.features & (1 << vb.VIRTIO_BLK_F_RO)
        assert dev.get_id() == b"SN-1234"


def test_protocol_features_and_queue_num(start_backend):
    backend = start_backend("null:16M", queues=4)
    client = VhostUserClient(backend.socket)
    try:
        proto = client.get_u64(Request.GET_PROTOCOL_FEATURES)
        for f in (ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK, ProtocolFeature.CONFIG):
            assert proto & (1 << f)
        client.set_u64(Request.SET_PROTOCOL_FEATURES, proto)
        assert client.get_u64(Request.GET_QUEUE_NUM) == 4
    finally:
        client.close()


def test_read_only_disk_advertises_ro_and_fails_writes(start_backend, disk_file):
    disk_file.write_bytes(pattern(7, 64 * MiB))
    backend = start_backend(str(disk_file), read_only=True)
    with Device.connect(backend.socket) as dev:
        assert dev.features & (1 << vb.VIRTIO_BLK_F_RO)
        assert not dev.features & (1 << vb.VIRTIO_BLK_F_DISCARD)
        assert dev.read(4096, 4096) == pattern(7, 64 * MiB)[4096:8192]
        with pytest.raises(DeviceError, match="IOERR"):
            dev.write(0, b"\1" * 4096)
        dev.flush()
    assert disk_file.read_bytes()[:4096] == pattern(7, 64 * MiB)[:4096]


# ---- I/O ----

@pytest.mark.parametrize("cache", ["none", "writeback"])
def test_write_read_roundtrip_lands_at_the_right_offset(start_backend, disk_file, cache):
    backend = start_backend(str(disk_file), cache=cache)
    data = pattern(0xABCDEF, 64 * 1024)
    with Device.connect(backend.socket) as dev:
        dev.write(1 * MiB, data)
        dev.flush()
        assert dev.read(1 * MiB, len(data)) == data
        assert dev.read(0, 4096) == bytes(4096)
    with open(disk_file, "rb") as f:
        f.seek(1 * MiB)
        assert f.read(len(data)) == data


def test_null_disk_reads_zeroes_and_accepts_everything(start_backend):
    backend = start_backend("null:1G")
    with Device.connect(backend.socket) as dev:
        assert dev.capacity == 1 << 30
        dev.write(0, b"\xee" * 8192)
        assert dev.read(0, 8192) == bytes(8192)
        dev.flush()
        dev.discard(0, 1 * MiB)
        dev.write_zeroes(0, 1 * MiB)


def test_discard_and_write_zeroes_reach_the_file(start_backend, disk_file):
    disk_file.write_bytes(b"\x5a" * (64 * MiB))
    backend = start_backend(str(disk_file))
    with Device.connect(backend.socket) as dev:
        dev.discard(1 * MiB, 1 * MiB)
        dev.write_zeroes(4 * MiB, 256 * 1024)
        dev.write_zeroes(8 * MiB, 256 * 1024, unmap=True)
        assert dev.read(1 * MiB, 4096) == bytes(4096)
        assert dev.read(4 * MiB + 4096, 4096) == bytes(4096)
    content = disk_file.read_bytes()
    assert content[1 * MiB: 2 * MiB] == bytes(MiB)
    assert content[4 * MiB: 4 * MiB + 256 * 1024] == bytes(256 * 1024)
    assert content[8 * MiB: 8 * MiB + 256 * 1024] == bytes(256 * 1024)
    assert content[2 * MiB: 2 * MiB + 16] == b"\x5a" * 16
    assert content[4 * MiB - 16: 4 * MiB] == b"\x5a" * 16
    # A punched hole: the file has fewer blocks than its size.
    assert os.stat(disk_file).st_blocks * 512 < 64 * MiB


def test_discard_with_unmap_flag_is_unsupported(start_backend, disk_file):
    backend = start_backend(str(disk_file))
    with Device.connect(backend.socket) as dev:
        status = dev._ranges(vb.ReqType.DISCARD, [(0, 4096)], True, 0)
        assert status == vb.Status.UNSUPP


def test_out_of_range_and_unaligned_requests_get_ioerr(start_backend):
    backend = start_backend("null:1M")
    with Device.connect(backend.socket) as dev:
        with pytest.raises(DeviceError, match="IOERR"):
            dev.read(1 * MiB, 4096)                 # starts at capacity
        with pytest.raises(DeviceError, match="IOERR"):
            dev.read(1 * MiB - 512, 1024)           # runs past capacity
        with pytest.raises(DeviceError, match="IOERR"):
            dev.write(0, b"x" * 100)                # not a multiple of 512
        req = dev.submit(vb.ReqType.IN, (1 << 63) // 256, read_len=512)   # sector*512 overflows
        assert dev.wait([req])[id(req)][0] == vb.Status.IOERR
        dev.release(req)
        assert dev.read(0, 512) == bytes(512)       # the queue still serves


def test_unknown_request_type_is_unsupp(start_backend):
    backend = start_backend("null:1M")
    with Device.connect(backend.socket) as dev:
        for type_ in (2, 3, 10, 14, 99, 0xFFFFFFFF):
            status, _ = dev._run(type_, read_len=512)
            assert status == vb.Status.UNSUPP, type_


def test_indirect_chains_and_any_layout(start_backend, disk_file):
    backend = start_backend(str(disk_file))
    data = pattern(42, 16384)
    with Device.connect(backend.socket) as dev:
        req = dev.submit(vb.ReqType.OUT, 2048, data=data, indirect=True)
        assert dev.wait([req])[id(req)][0] == vb.Status.OK
        dev.release(req)
        # any_layout: header, data and status in ONE device-writable... no: header readable,
        # then data and status sharing the last writable descriptor.
        ring = dev.rings[0]
        hdr = dev.mem.alloc(16)
        dev.mem.write(hdr, OUTHDR.pack(vb.ReqType.IN, 0, 2048))
        buf = dev.mem.alloc(16384 + 1)
        head = ring.add_chain([(hdr, 16, False), (buf, 16384 + 1, True)])
        ring.publish(head)
        ring.kick()
        assert ring.wait_used(5) == [(head, 16385)]
        assert dev.mem.read(buf, 16384) == data
        assert dev.mem.read(buf + 16384, 1) == b"\0"


def test_batched_requests_on_two_queues_are_served_by_two_threads(start_backend, disk_file):
    backend = start_backend(str(disk_file), queues=2)
    with Device.connect(backend.socket, queues=2) as dev:
        reqs = []
        for i in range(64):
            q = i % 2
            reqs.append(dev.submit(vb.ReqType.OUT, i * 8, data=pattern(i, 4096), queue=q))
        results = dev.wait(reqs)
        assert all(status == vb.Status.OK for status, _ in results.values())
        for r in reqs:
            dev.release(r)
        for i in range(64):
            assert dev.read(i * 4096, 4096, queue=(i + 1) % 2) == pattern(i, 4096)
        stats = backend.device.stats()
        assert stats[0]["writes"] == 32 and stats[1]["writes"] == 32
        assert stats[0]["reads"] == 32 and stats[1]["reads"] == 32
        names = backend.server.engines.thread_ids()
        assert set(names) == {"dp-vq0", "dp-vq1"}
        for name, tid in names.items():
            with open(f"/proc/self/task/{tid}/comm") as f:
                assert f.read().strip() == name


def test_fewer_queues_than_offered(start_backend):
    backend = start_backend("null:16M", queues=4)
    with Device.connect(backend.socket, queues=1) as dev:
        assert dev.config["num_queues"] == 4
        assert dev.read(0, 4096) == bytes(4096)
        assert set(backend.server.engines.thread_ids()) == {"dp-vq0"}


def test_polling_queue_without_kick_fd(start_backend):
    """SET_VRING_KICK with the 'no fd' bit: the backend polls the ring."""
    backend = start_backend("null:16M", queues=1)
    with Device.connect(backend.socket) as dev:
        dev.client.get_vring_base(0)
        dev.client.call(Request.SET_VRING_KICK, U64.pack(0 | VHOST_USER_VRING_NOFD_MASK))
        ring = dev.rings[0]
        os.close(ring.kick_fd)
        ring.kick_fd = os.eventfd(0)   # kicks now go nowhere
        assert dev.read(0, 4096) == bytes(4096)


# ---- control-plane robustness ----

def test_unknown_message_gets_an_error_ack_and_the_connection_survives(start_backend, caplog):
    backend = start_backend("null:16M")
    with Device.connect(backend.socket) as dev:
        with pytest.raises(DeviceError, match="REPLY_ACK"):
            dev.client.call(99, b"\0" * 8)
        with pytest.raises(DeviceError, match="REPLY_ACK"):
            dev.client.call(Request.SET_LOG_BASE, b"\0" * 16)
        assert dev.read(0, 512) == bytes(512)
    assert "request#99" in caplog.text


@pytest.mark.parametrize("request_, payload", [
    (Request.SET_VRING_NUM, b"\0" * 4),                       # short payload
    (Request.SET_VRING_NUM, VRING_STATE.pack(7, 128)),         # queue index out of range
    (Request.SET_VRING_NUM, VRING_STATE.pack(0, 100)),         # not a power of two
    (Request.SET_VRING_BASE, VRING_STATE.pack(0, 70000)),      # base beyond u16
    (Request.SET_VRING_ENABLE, VRING_STATE.pack(0, 2)),
    (Request.SET_FEATURES, U64.pack(1 << 60)),                 # feature never offered
    (Request.SET_PROTOCOL_FEATURES, U64.pack(1 << 40)),
    (Request.SET_MEM_TABLE, MEMORY_HEADER.pack(0, 0)),         # no regions
    (Request.SET_MEM_TABLE, MEMORY_HEADER.pack(9, 0)),         # too many regions
    (Request.SET_CONFIG, CONFIG_HEADER.pack(0, 8, 0) + bytes(8)),   # capacity is read-only
])
def test_malformed_messages_fail_cleanly(start_backend, request_, payload):
    backend = start_backend("null:16M", queues=2)
    client = VhostUserClient(backend.socket)
    try:
        client.set_u64(Request.SET_PROTOCOL_FEATURES, 1 << ProtocolFeature.REPLY_ACK)
        client.reply_ack = True
        with pytest.raises(DeviceError, match="REPLY_ACK status 1"):
            client.call(request_, payload)
        assert client.get_u64(Request.GET_QUEUE_NUM) == 2   # still talking
    finally:
        client.close()


def test_wrong_fd_counts_are_refused_without_leaking(start_backend):
    backend = start_backend("null:16M", queues=1)
    client = VhostUserClient(backend.socket)
    before = len(os.listdir("/proc/self/fd"))
    try:
        client.set_u64(Request.SET_PROTOCOL_FEATURES, 1 << ProtocolFeature.REPLY_ACK)
        client.reply_ack = True
        r1, r2 = os.eventfd(0), os.eventfd(0)
        for _ in range(20):
            with pytest.raises(DeviceError):
                client.set_u64(Request.SET_VRING_KICK, 0, [r1, r2])   # two fds, one expected
            with pytest.raises(DeviceError):
                client.set_u64(Request.SET_VRING_CALL, 0)              # no fd, no NOFD bit
            gm = GuestMemory(1 * MiB)
            with pytest.raises(DeviceError):
                client.call(Request.SET_MEM_TABLE, MEMORY_HEADER.pack(2, 0) +
                            MEMORY_REGION.pack(0, MiB, gm.user_addr, 0) * 2, [gm.fd])
            gm.close()
        os.close(r1)
        os.close(r2)
    finally:
        client.close()
    assert wait_for(lambda: len(os.listdir("/proc/self/fd")) <= before)


def test_vring_fds_must_be_eventfds(start_backend):
    backend = start_backend("null:16M", queues=1)
    client = VhostUserClient(backend.socket)
    devnull = os.open("/dev/null", os.O_RDONLY)
    try:
        client.set_u64(Request.SET_PROTOCOL_FEATURES, 1 << ProtocolFeature.REPLY_ACK)
        client.reply_ack = True
        for request in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
            with pytest.raises(DeviceError):
                client.set_u64(request, 0, [devnull])
    finally:
        os.close(devnull)
        client.close()


def test_overlapping_or_unmappable_memory_regions_are_refused(start_backend):
    backend = start_backend("null:16M", queues=1)
    client = VhostUserClient(backend.socket)
    gm = GuestMemory(1 * MiB)
    try:
        client.set_u64(Request.SET_PROTOCOL_FEATURES, 1 << ProtocolFeature.REPLY_ACK)
        client.reply_ack = True
        overlapping = (MEMORY_HEADER.pack(2, 0) + MEMORY_REGION.pack(0, MiB, gm.user_addr, 0)
                       + MEMORY_REGION.pack(MiB // 2, MiB, gm.user_addr + 2 * MiB, 0))
        with pytest.raises(DeviceError):
            client.call(Request.SET_MEM_TABLE, overlapping, [gm.fd, gm.fd])
        not_memory = os.open("/dev/null", os.O_RDONLY)
        try:
            with pytest.raises(DeviceError):
                client.call(Request.SET_MEM_TABLE, MEMORY_HEADER.pack(1, 0)
                            + MEMORY_REGION.pack(0, MiB, gm.user_addr, 0), [not_memory])
        finally:
            os.close(not_memory)
        client.set_mem_table([(0, MiB, gm.user_addr, 0, gm.fd)])   # a good one still works
    finally:
        client.close()
        gm.close()


def test_ring_addresses_outside_the_memory_table_are_refused(start_backend):
    backend = start_backend("null:16M", queues=1)
    with Device.connect(backend.socket) as dev:
        from dataplane.protocol.vhost_user import VRING_ADDR
        dev.client.get_vring_base(0)
        with pytest.raises(DeviceError):
            dev.client.call(Request.SET_VRING_ADDR, VRING_ADDR.pack(
                0, 0, dev.mem.user_addr + dev.mem.size, dev.mem.user_addr, dev.mem.user_addr, 0))


def test_bad_version_and_oversized_messages(start_backend):
    backend = start_backend("null:16M", queues=1)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(backend.socket)
    # Wrong version with need_reply: refused with an ack of 1.
    sock.sendall(HEADER.pack(Request.SET_OWNER, 0x2 | VHOST_USER_NEED_REPLY_MASK, 0))
    reply = recv_message(sock)
    assert reply is not None and U64.unpack(reply.payload)[0] == 1
    # A size no message may have: the stream cannot be resynchronised, so it is dropped...
    sock.sendall(HEADER.pack(Request.SET_OWNER, VHOST_USER_VERSION, 1 << 30))
    assert sock.recv(1) == b""
    sock.close()
    # ...and the server carries on with the next front end.
    with Device.connect(backend.socket) as dev:
        assert dev.read(0, 512) == bytes(512)


def test_truncated_message_then_eof_is_handled(start_backend):
    backend = start_backend("null:16M", queues=1)
    for junk in (b"\x01\x00", HEADER.pack(Request.SET_FEATURES, 1, 8) + b"\0\0"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(backend.socket)
        sock.sendall(junk)
        sock.close()
    with Device.connect(backend.socket) as dev:
        assert dev.read(0, 512) == bytes(512)


def test_second_front_end_is_refused_while_one_is_attached(start_backend, caplog):
    backend = start_backend("null:16M", queues=1)
    with Device.connect(backend.socket) as dev:
        with pytest.raises((DeviceError, ProtocolError, OSError)):
            Device.connect(backend.socket, timeout=2)
        assert dev.read(0, 512) == bytes(512)
    assert "refused a second front end" in caplog.text
    with Device.connect(backend.socket) as dev:   # free again once the first left
        assert dev.read(0, 512) == bytes(512)


def test_get_vring_base_stops_the_queue_and_returns_its_index(start_backend):
    backend = start_backend("null:16M", queues=1)
    with Device.connect(backend.socket) as dev:
        for _ in range(5):
            dev.read(0, 512)
        assert dev.client.get_vring_base(0) == 5
        assert not backend.device.vrings[0].running
        # Restart from the same index, as QEMU does after a stop/start cycle.
        ring = dev.rings[0]
        dev.client.call(Request.SET_VRING_BASE, VRING_STATE.pack(0, 5))
        dev.client.set_u64(Request.SET_VRING_KICK, 0, [ring.kick_fd])
        assert dev.read(0, 512) == bytes(512)
        assert backend.device.vrings[0].running


def test_disable_and_enable_a_ring(start_backend):
    backend = start_backend("null:16M", queues=1)
    with Device.connect(backend.socket) as dev:
        dev.client.call(Request.SET_VRING_ENABLE, VRING_STATE.pack(0, 0))
        req = dev.submit(vb.ReqType.IN, 0, read_len=512)
        time.sleep(0.2)
        assert dev.rings[0].pop_used() == []       # a disabled ring is not served
        dev.client.call(Request.SET_VRING_ENABLE, VRING_STATE.pack(0, 1))
        assert dev.wait([req])[id(req)][0] == vb.Status.OK


def test_set_config_toggles_the_write_cache(start_backend, disk_file):
    backend = start_backend(str(disk_file))
    with Device.connect(backend.socket) as dev:
        off = vb.CONFIG_WRITEBACK_OFFSET
        dev.client.call(Request.SET_CONFIG, CONFIG_HEADER.pack(off, 1, 0) + b"\0")
        assert backend.disk.writeback is False
        assert vb.parse_config(dev.client.get_config())["writeback"] == 0
        dev.write(0, b"w" * 4096)   # write-through (RWF_DSYNC) path
        dev.client.call(Request.SET_CONFIG, CONFIG_HEADER.pack(off, 1, 0) + b"\1")
        assert backend.disk.writeback is True
    assert disk_file.read_bytes()[:4096] == b"w" * 4096


def test_mem_table_resent_while_queues_run(start_backend, disk_file):
    """QEMU re-sends SET_MEM_TABLE when the guest's memory layout changes under running
    queues: the backend quiesces them, remaps and resumes, losing nothing in flight."""
    backend = start_backend(str(disk_file), queues=2)
    with Device.connect(backend.socket, queues=2) as dev:
        stop = threading.Event()
        errors: list[BaseException] = []

        def resend() -> None:
            try:
                while not stop.is_set():
                    # Same memory, a fresh fd each time (QEMU sends new fds too).
                    fd = os.open(f"/proc/self/fd/{dev.mem.fd}", os.O_RDWR)
                    try:
                        dev.client.set_mem_table([(0, dev.mem.size, dev.mem.user_addr, 0, fd)])
                    finally:
                        os.close(fd)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        t = threading.Thread(target=resend)
        t.start()
        try:
            for round_ in range(30):
                reqs = [dev.submit(vb.ReqType.OUT, (round_ * 16 + i) * 8,
                                   data=pattern(round_ * 16 + i, 4096), queue=i % 2)
                        for i in range(16)]
                assert all(s == vb.Status.OK for s, _ in dev.wait(reqs).values())
                for r in reqs:
                    dev.release(r)
        finally:
            stop.set()
            t.join()
        assert not errors
        for i in range(30 * 16):
            assert dev.read(i * 4096, 4096, queue=i % 2) == pattern(i, 4096)


def test_reset_owner_disables_rings_and_reset_device_starts_afresh(start_backend):
    backend = start_backend("null:16M", queues=1)
    with Device.connect(backend.socket) as dev:
        dev.read(0, 512)
        dev.client.call(Request.RESET_OWNER)
        assert not backend.device.vrings[0].running
        assert backend.device.mem is not None        # RESET_OWNER keeps the session
        assert backend.device.features != 0
        dev.client.call(Request.SET_VRING_ENABLE, VRING_STATE.pack(0, 1))
        assert dev.read(0, 512) == bytes(512)
        dev.client.call(Request.RESET_DEVICE)
        assert not backend.device.vrings[0].running
        assert backend.device.mem is None
        assert backend.device.features == 0


def test_a_message_cut_off_mid_way_does_not_hold_the_server(start_backend, monkeypatch):
    """Half a header and then silence: the peer is dropped after the message timeout, and a
    queued second front end is served once the first is gone."""
    import dataplane.backend.server as server

    monkeypatch.setattr(server, "MESSAGE_TIMEOUT_S", 0.5)
    backend = start_backend("null:16M", queues=1)
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stalled.connect(backend.socket)
    stalled.sendall(b"\x01\x00\x00\x00\x01\x00")
    try:
        assert wait_for(lambda: backend.device is None, timeout=5)
        with Device.connect(backend.socket) as dev:
            assert dev.read(0, 512) == bytes(512)
    finally:
        stalled.close()


def test_a_front_end_that_left_with_messages_queued_frees_the_slot(start_backend):
    backend = start_backend("null:16M", queues=1)
    for _ in range(5):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(backend.socket)
        sock.sendall(HEADER.pack(Request.GET_FEATURES, 1, 0) * 3)   # replies never read
        sock.close()
        with Device.connect(backend.socket) as dev:
            assert dev.read(0, 512) == bytes(512)


def test_poll_window_shrinks_on_a_slow_device_and_grows_on_a_fast_one(start_backend):
    """The spin window adapts (like QEMU's iothreads): sleeps longer than poll_us (a 1 ms
    device) halve it down to 0, so no CPU is spun in vain; short ones (a null disk under load)
    grow it back."""
    from dataplane.driver.load import Job, run_load

    slow = start_backend("null:16M,latency=fixed:1ms", queues=1, poll_us=50)
    with Device.connect(slow.socket, queues=1) as dev:
        # Every wait long: for the 1 ms device, and for the next request 2 ms later (a kick
        # that came within 50 us of a completion would rightly reopen the window).
        for i in range(20):
            assert dev.read(i * 4096, 4096) == bytes(4096)
            time.sleep(0.002)
        assert slow.server.engines.poll_windows_ns() == {"dp-vq0": 0}

    # A window of 200 us: the driver's wake-up and turnaround between two requests at QD1
    # can take longer than 50 us on this VM (a full CI run ended three QD1 runs at 0 with 50).
    fast = start_backend("null:16M", queues=1, poll_us=200)
    with Device.connect(fast.socket, queues=1, memory=Job().memory_needed(1)) as dev:
        for i in range(20):      # a slow front end first: one request at a time, 2 ms apart
            dev.read(i * 4096, 4096)
            time.sleep(0.002)
        assert fast.server.engines.poll_windows_ns()["dp-vq0"] < 200_000
        # read while the thread waits for the next request: its last sleeps were short. At
        # QD1 the thread sleeps between any two requests, for the driver's turnaround; at QD32
        # a backend slower than its driver (as under ASan) never sleeps, and the window stays
        # as it was, so the runs alternate between the two. On a loaded machine a run can end
        # on a long wait (the issuer preempted): up to 4 runs.
        for depth in (1, 32, 1, 32):
            result = run_load(dev, Job(rw="randread", iodepth=depth, runtime=0.3))
            assert result.error == 0
            if fast.server.engines.poll_windows_ns()["dp-vq0"] > 0:
                break
        assert fast.server.engines.poll_windows_ns()["dp-vq0"] > 0
