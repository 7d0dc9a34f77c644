"""The C driver threads on packed rings: `dataplane load` and `dataplane replay` against the
backend (direct lists and indirect tables, verify, open loop, exact counts, the ring handed
back), the `--ring` option of both commands, and a backend that breaks the packed used ring
(an id out of range, an id completed twice, a length too long, silence).
"""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dataplane.driver import Device, Job
from dataplane.driver.device import DRIVER_FEATURES
from dataplane.driver.load import run_load
from dataplane.driver.packed import PackedVring, used_bits
from dataplane.driver.vring import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, GuestMemory
from dataplane.protocol import virtio_blk as vb
from dataplane.replay import open_trace
from dataplane.replay.engine import ReplayOptions, replay_device, replay_memory, ring_size

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent.parent
MiB = 1 << 20
PACKED = 1 << vb.VIRTIO_F_RING_PACKED


def connect(backend, job: Job, queues: int = 2, indirect: bool = True) -> Device:
    return Device.connect(backend.socket, queues=queues, queue_size=job.queue_size(indirect),
                          memory=job.memory_needed(queues), ring="packed")


def assert_clean(result) -> None:
    assert result.error == 0, result.summary_of_problems()
    assert result.io_errors == 0 and result.verify_failures == 0, result.summary_of_problems()
    assert all(q.stats.bad_used == 0 for q in result.queues)


@pytest.mark.parametrize("indirect", [True, False], ids=["indirect", "direct"])
def test_verify_on_packed_rings_of_a_file(start_backend, disk_file, indirect):
    backend = start_backend(str(disk_file), queues=2)
    job = Job(rw="randrw", iodepth=16, runtime=1.0, verify=True, indirect=indirect)
    with connect(backend, job, indirect=indirect) as dev:
        result = run_load(dev, job)
        assert_clean(result)
        assert result.ring == "packed"
        assert all(q.stats.verify_checked > 0 for q in result.queues)
        stats = backend.device.stats()
        assert [s["requests"] for s in stats] == [int(q.stats.issued) for q in result.queues]
        assert result.to_json()["jobs"][0]["dataplane"]["ring"] == "packed"
        # the rings were handed back: the Python frontend carries on where the thread stopped
        for q in range(2):
            dev.write(40 * MiB, b"\x5a" * 4096, queue=q)
            assert dev.read(40 * MiB, 4096, queue=q) == b"\x5a" * 4096
        again = run_load(dev, Job(rw="read", iodepth=8, runtime=0, number_ios=3000,
                                  indirect=indirect))
        assert_clean(again)
        assert [q.ios(0) for q in again.queues] == [3000, 3000]   # exactly, laps around the ring


def test_open_loop_on_a_packed_ring_hits_the_rate(start_backend):
    backend = start_backend("null:64M", queues=1)
    job = Job(rw="randread", iodepth=8, runtime=1.0, rate_iops=2000)
    with connect(backend, job, queues=1) as dev:
        result = run_load(dev, job)
    assert_clean(result)
    assert 1800 <= result.queues[0].ios(0) <= 2100


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "dataplane", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_load_ring_packed(start_backend, tmp_path, start_qsd_export):
    backend = start_backend("null:64M", queues=2)
    proc = run_cli("load", "--socket", backend.socket, "--ring", "packed", "--queues", "2",
                   "--iodepth", "8", "--runtime", "0", "--number-ios", "500")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("ring      : packed,") == 2
    proc = run_cli("load", "--socket", backend.socket, "--number-ios", "100", "--runtime", "0",
                   "--output-format", "json")
    assert json.loads(proc.stdout)["jobs"][0]["dataplane"]["ring"] == "split"   # the default
    image = tmp_path / "qsd.img"
    with open(image, "wb") as f:
        f.truncate(16 * MiB)
    sock = start_qsd_export(f"driver=file,node-name=n0,filename={image}", queues=1)
    proc = run_cli("load", "--socket", str(sock), "--ring", "packed", "--runtime", "0.2")
    assert proc.returncode == 2
    assert "does not offer packed rings" in proc.stderr and "Traceback" not in proc.stderr


def test_replay_through_packed_rings(start_backend, tmp_path):
    backend = start_backend("null:1G", queues=2)
    options = ReplayOptions(mode="afap", iodepth=16)
    for features in (DRIVER_FEATURES, DRIVER_FEATURES & ~(1 << vb.VIRTIO_RING_F_INDIRECT_DESC)):
        with Device.connect(backend.socket, queues=2, queue_size=ring_size(16, True),
                            memory=replay_memory(2, options, MiB), ring="packed",
                            features=features) as dev:
            result = replay_device(dev, open_trace(ROOT / "traces" / "fio_v3.iolog"), options)
            stats = backend.device.stats()
            dev.write(0, b"z" * 4096)                 # the frontend has its rings back
            assert len(dev.read(0, 4096)) == 4096
        assert not result.error and not result.io_errors, result.summary_of_problems()
        assert result.total("completed") == 200 == sum(s["requests"] for s in stats)
        data = result.to_json()["dataplane_replay"]
        assert data["ring"] == "packed"
    out = tmp_path / "r.json"
    proc = run_cli("replay", str(ROOT / "traces" / "fio_v2.iolog"), "--socket", backend.socket,
                   "--ring", "packed", "--mode", "afap", "--output-format", "json", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["dataplane_replay"]["ring"] == "packed"
    proc = run_cli("replay", str(ROOT / "traces" / "fio_v2.iolog"), "--native", str(out),
                   "--ring", "packed")
    assert proc.returncode == 2 and "--ring" in proc.stderr


# ---- a backend that breaks the packed used ring ----

class FakePackedDevice:
    """A device in Python on the frontend's own packed ring: answers every list with what
    answer(id) says: used descriptors (id, len) to write at the used position, the last one
    first so that the driver finds them all at once. Only for hostile-backend tests."""

    def __init__(self, answer) -> None:
        self.mem = GuestMemory(8 * MiB)
        self.rings = [PackedVring(self.mem, 0, 128, event_idx=True)]
        self.features = (1 << vb.VIRTIO_RING_F_INDIRECT_DESC) | (1 << vb.VIRTIO_RING_F_EVENT_IDX) | PACKED
        self.capacity = 4 * MiB
        self.answer = answer
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def status_gpa(self, slot: int) -> tuple[int, int]:
        """The list at slot: its status byte's address and its ring slots."""
        ring = self.rings[0]
        addr, _len, _id, flags = ring.read_desc(slot)
        if flags & VRING_DESC_F_INDIRECT:   # header, data, status: the third entry's address
            return struct.unpack("<Q", self.mem.read(addr + 32, 8))[0], 1
        n = 1
        while flags & VRING_DESC_F_NEXT:
            addr, _len, _id, flags = ring.read_desc((slot + n) % ring.num)
            n += 1
        return addr, n

    def serve(self) -> None:
        ring = self.rings[0]
        avail, avail_wrap, used, used_wrap = 0, 1, 0, 1
        while not self.stop.is_set():
            flags = ring.read_desc(avail)[3]
            if not (bool(flags & 0x80) == bool(avail_wrap) != bool(flags & 0x8000)):
                time.sleep(0.0002)
                continue
            id_ = ring.read_desc(avail)[2]
            status, n = self.status_gpa(avail)
            avail += n
            if avail >= ring.num:
                avail, avail_wrap = avail - ring.num, avail_wrap ^ 1
            replies = self.answer(id_)
            if not replies:
                continue
            self.mem.write(status, b"\0")
            slots = []
            for _ in replies:
                slots.append((used, used_wrap))
                used += n
                if used >= ring.num:
                    used, used_wrap = used - ring.num, used_wrap ^ 1
            for (slot, wrap), (rid, length) in reversed(list(zip(slots, replies, strict=True))):
                ring.write_desc(slot, 0, length, used_bits(wrap), rid)
            os.eventfd_write(ring.call_fd, 1)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.rings[0].close()
        self.mem.close()


@pytest.mark.parametrize("indirect", [True, False], ids=["indirect", "direct"])
def test_an_id_out_of_range_ends_the_run_with_eproto(indirect):
    dev = FakePackedDevice(lambda id_: [(id_ + 1000, 1)])
    try:
        result = run_load(dev, Job(rw="randread", iodepth=4, runtime=0, number_ios=20,
                                   timeout=5, indirect=indirect))
    finally:
        dev.close()
    assert result.error == errno.EPROTO
    assert result.queues[0].stats.bad_used == 1


def test_an_id_completed_twice_ends_the_run_with_eproto():
    dev = FakePackedDevice(lambda id_: [(id_, 1), (id_, 1)])
    try:
        result = run_load(dev, Job(rw="randread", iodepth=4, runtime=0, number_ios=20, timeout=5))
    finally:
        dev.close()
    assert result.error == errno.EPROTO
    assert result.queues[0].stats.bad_used == 1
    assert result.queues[0].stats.completed == 1


def test_a_used_length_beyond_the_buffers_is_an_error_not_a_crash():
    dev = FakePackedDevice(lambda id_: [(id_, 1 << 20)])
    try:
        result = run_load(dev, Job(rw="randread", iodepth=4, runtime=0, number_ios=50, timeout=5))
    finally:
        dev.close()
    q = result.queues[0]
    assert result.error == 0
    assert q.stats.bad_used == 50 and q.stats.dir[0].err_other == 50 and q.ios(0) == 0


def test_a_packed_backend_that_never_answers_times_out():
    dev = FakePackedDevice(lambda id_: [])
    try:
        t0 = time.monotonic()
        result = run_load(dev, Job(rw="randread", iodepth=4, runtime=5, timeout=0.3))
        elapsed = time.monotonic() - t0
    finally:
        dev.close()
    assert result.error == errno.ETIMEDOUT
    assert elapsed < 3
