"""Packed virtqueues over a real socket: negotiation, I/O, QEMU's GET/SET_VRING_BASE encoding,
a connection that goes from split to packed and back (SeaBIOS, then Linux), sizes that are not
powers of two, out-of-order completion, a memory table re-sent under load, and
qemu-storage-daemon, which has no packed rings.
"""

from __future__ import annotations

import logging
import os
import struct

import pytest

from dataplane.driver import Device
from dataplane.driver.packed import PackedVring, encode_position
from dataplane.driver.vring import Vring
from dataplane.errors import DeviceError, ProtocolError
from dataplane.protocol import virtio_blk as vb
from dataplane.protocol.vhost_user import VRING_STATE, Request

MiB = 1 << 20
PACKED = 1 << vb.VIRTIO_F_RING_PACKED


def pattern(seed: int, n: int) -> bytes:
    return (struct.pack("<Q", seed) * (n // 8 + 1))[:n]


def test_packed_rings_are_offered_and_serve_every_request_type(start_backend, disk_file, caplog):
    caplog.set_level(logging.INFO, logger="dataplane")
    backend = start_backend(str(disk_file), queues=2)
    with Device.connect(backend.socket, queues=2, ring="packed") as dev:
        assert dev.ring == "packed" and isinstance(dev.rings[0], PackedVring)
        assert dev.features & PACKED
        for i in range(40):
            data = pattern(i, 4096 * (1 + i % 3))
            dev.write(i * 65536, data, queue=i % 2)
            assert dev.read(i * 65536, len(data), queue=(i + 1) % 2) == data
        # direct lists of 3 slots and indirect tables of 1, on the same ring
        reqs = [dev.submit(vb.ReqType.IN, 8 * i, read_len=4096, queue=0, indirect=i % 2 == 1)
                for i in range(16)]
        assert {s for s, _ in dev.wait(reqs).values()} == {vb.Status.OK}
        for r in reqs:
            dev.release(r)
        dev.flush()
        dev.discard(0, 65536)
        dev.write_zeroes(65536, 65536)
        assert dev.read(0, 131072) == bytes(131072)
        assert dev.get_id() == b"dp-test"
    assert "VIRTIO_F_RING_PACKED" in caplog.text
    assert "packed ring, base 0x80008000" in caplog.text
    with open(disk_file, "rb") as f:
        assert os.pread(f.fileno(), 4096, 2 * 65536) == pattern(2, 4096 * 3)[:4096]


def test_split_stays_the_default_and_does_not_ack_packed(start_backend):
    backend = start_backend("null:16M", queues=1)
    with Device.connect(backend.socket) as dev:
        assert dev.ring == "split" and isinstance(dev.rings[0], Vring)
        assert not dev.features & PACKED
        assert dev.read(0, 512) == bytes(512)


def test_get_and_set_vring_base_use_qemus_packed_encoding(start_backend):
    """bits 0-14 the next descriptor to read, 15 its wrap counter, 16-30 the next used slot, 31
    its wrap counter; drained first, so both halves agree."""
    backend = start_backend("null:16M", queues=1)
    with Device.connect(backend.socket, ring="packed", queue_size=8) as dev:
        for _ in range(2):
            dev.read(0, 512)                      # 3 slots each: position 6, first lap
        assert dev.client.get_vring_base(0) == encode_position(6, 1) | encode_position(6, 1) << 16
        assert not backend.device.vrings[0].running
        ring = dev.rings[0]
        base = ring.avail_idx | ring.last_used_idx << 16
        dev.client.call(Request.SET_VRING_BASE, VRING_STATE.pack(0, base))
        dev.client.set_u64(Request.SET_VRING_KICK, 0, [ring.kick_fd])
        for _ in range(3):
            assert dev.read(0, 512) == bytes(512)   # 9 slots more: past the end, wrap 0
        assert dev.client.get_vring_base(0) == encode_position(7, 0) | encode_position(7, 0) << 16


def test_a_packed_base_beyond_the_ring_is_refused(start_backend):
    backend = start_backend("null:16M", queues=1)
    with Device.connect(backend.socket, ring="packed") as dev:
        dev.client.get_vring_base(0)
        with pytest.raises(DeviceError, match="SET_VRING_BASE failed"):
            dev.client.call(Request.SET_VRING_BASE, VRING_STATE.pack(0, 0x80008000 | 200))


def _restart_rings(dev: Device, features: int, kind: type) -> None:
    """What QEMU does when the guest resets the device and starts it again with other features:
    stop every ring, SET_FEATURES, a new inflight buffer, the rings from scratch."""
    for ring in dev.rings:
        dev.client.get_vring_base(ring.index)
        ring.close()
    dev.client.set_u64(Request.SET_FEATURES, features)
    dev.features = features
    if dev.inflight is not None:
        dev.inflight.close()
        dev.inflight = dev.client.get_inflight_fd(len(dev.rings), 128, kind is PackedVring)
        dev.client.set_inflight_fd(dev.inflight)
    dev.client.set_mem_table([(dev.mem.gpa_base, dev.mem.size, dev.mem.user_addr, 0, dev.mem.fd)])
    rings = []
    for i in range(len(dev.rings)):
        ring = kind(dev.mem, i, 128)
        dev.client.setup_vring(ring, base=ring.reconnect_base())
        dev.client.call(Request.SET_VRING_ENABLE, VRING_STATE.pack(i, 1))
        rings.append(ring)
    dev.rings = rings


def test_one_connection_goes_from_split_to_packed_and_back(start_backend, disk_file, caplog):
    """SeaBIOS drives the disk over a split ring, then Linux resets it and starts it with
    packed rings: the ring format is chosen at every start, and so is the inflight layout."""
    caplog.set_level(logging.INFO, logger="dataplane")
    backend = start_backend(str(disk_file), queues=2)
    with Device.connect(backend.socket, queues=2) as dev:
        split_features = dev.features
        dev.write(0, pattern(1, 4096))
        _restart_rings(dev, split_features | PACKED, PackedVring)
        assert dev.ring == "packed"
        assert dev.read(0, 4096) == pattern(1, 4096)
        dev.write(4096, pattern(2, 4096), queue=1)
        assert "(packed rings)" in caplog.text
        _restart_rings(dev, split_features, Vring)
        assert dev.read(4096, 4096, queue=1) == pattern(2, 4096)


def test_a_packed_ring_need_not_be_a_power_of_two(start_backend):
    backend = start_backend("null:16M", queues=1)
    with Device.connect(backend.socket, ring="packed", queue_size=100) as dev:
        reqs = [dev.submit(vb.ReqType.IN, 0, read_len=512) for _ in range(30)]   # 90 slots
        assert {s for s, _ in dev.wait(reqs).values()} == {vb.Status.OK}
        for _ in range(40):
            dev.read(0, 512)                   # laps around the 100 slots
    with pytest.raises((DeviceError, ProtocolError)):
        Device.connect(backend.socket, ring="split", queue_size=100)


def test_requests_overtaking_each_other_complete_once_each(start_backend):
    backend = start_backend("null:64M,latency=uniform:1ms-30ms", queues=2)
    with Device.connect(backend.socket, queues=2, ring="packed") as dev:
        for _ in range(3):
            reqs = [dev.submit(vb.ReqType.IN, 8 * i, read_len=4096, queue=i % 2, indirect=i % 3 == 0)
                    for i in range(60)]
            assert {s for s, _ in dev.wait(reqs).values()} == {vb.Status.OK}
            for r in reqs:
                dev.release(r)
        assert all(ring.unexpected_used == [] for ring in dev.rings)
        assert sum(s["out_of_order"] for s in backend.device.stats()) > 0


def test_memory_table_resent_while_packed_queues_run(start_backend, disk_file):
    """Queues quiesce (drained), the table is swapped, they resume where they stood: the
    region is this session's, so the position is the queue's own, not a stale base."""
    backend = start_backend(f"{disk_file},latency=uniform:1ms-10ms", queues=2)
    with Device.connect(backend.socket, queues=2, ring="packed") as dev:
        reqs = [dev.submit(vb.ReqType.OUT, 8 * i, data=pattern(i, 4096), queue=i % 2)
                for i in range(20)]
        dev.client.set_mem_table([(dev.mem.gpa_base, dev.mem.size, dev.mem.user_addr, 0, dev.mem.fd)])
        assert {s for s, _ in dev.wait(reqs).values()} == {vb.Status.OK}
        for i in range(20):
            assert dev.read(4096 * i, 4096, queue=(i + 1) % 2) == pattern(i, 4096)
        assert all(ring.unexpected_used == [] for ring in dev.rings)


def test_qemu_storage_daemon_offers_no_packed_rings(tmp_path, start_qsd_export):
    """qemu-storage-daemon 7.2 (libvhost-user) has no packed rings: --ring packed says so."""
    image = tmp_path / "qsd.img"
    with open(image, "wb") as f:
        f.truncate(16 * MiB)
    sock = start_qsd_export(f"driver=file,node-name=n0,filename={image}", queues=1)
    with pytest.raises(DeviceError, match="does not offer packed rings"):
        Device.connect(str(sock), ring="packed")
    with Device.connect(str(sock)) as dev:
        assert dev.ring == "split" and dev.read(0, 512) == bytes(512)
