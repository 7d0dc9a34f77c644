"""The C load generator (`dataplane load`) against real backends over a socket.

Targets: this backend in-process (null disk and a file disk) and QEMU's qemu-storage-daemon
(null-co and a file with cache.direct=on), both speaking vhost-user-blk. Plus a fake device
in Python that answers with broken used elements, which the load generator must survive.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from dataplane.driver import Device, GuestMemory, Vring
from dataplane.driver.load import Job, VerifyState, run_load, verify_regions
from dataplane.errors import ConfigError
from dataplane.protocol import virtio_blk as vb

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass
class Target:
    name: str
    socket: str
    image: Path | None = None
    backend: object = None          # conftest.RunningBackend for ours (request counters)

    def connect(self, job: Job, queues: int = 2) -> Device:
        return Device.connect(self.socket, queues=queues, queue_size=job.queue_size(False),
                              memory=job.memory_needed(queues))

    def requests(self) -> list[int] | None:
        if self.backend is None:
            return None
        return [s["requests"] for s in self.backend.device.stats()]


@pytest.fixture
def start_qsd(tmp_path, start_qsd_export):
    images: list[Path] = []

    def start(disk: str = "null", queues: int = 2, size: int = 64 * MiB) -> Target:
        image = None
        if disk == "null":
            blockdev = f"driver=null-co,node-name=n0,size={size},read-zeroes=on"
        else:
            image = tmp_path / f"qsd{len(images)}.img"
            images.append(image)
            with open(image, "wb") as f:
                f.truncate(size)
            blockdev = f"driver=file,node-name=n0,filename={image},cache.direct=on"
        sock = start_qsd_export(blockdev, queues)
        return Target(f"qsd-{disk}", str(sock), image)

    return start


@pytest.fixture
def target(request, start_backend, start_qsd, tmp_path) -> Target:
    impl, disk = request.param
    if impl == "qsd":
        return start_qsd(disk)
    if disk == "null":
        backend = start_backend("null:64M", queues=2)
        return Target("dataplane-null", backend.socket, None, backend)
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    backend = start_backend(str(image), queues=2)
    return Target("dataplane-file", backend.socket, image, backend)


ALL = [("dataplane", "null"), ("dataplane", "file"), ("qsd", "null"), ("qsd", "file")]
FILES = [("dataplane", "file"), ("qsd", "file")]
NULLS = [("dataplane", "null"), ("qsd", "null")]


def assert_clean(result) -> None:
    assert result.error == 0, result.summary_of_problems()
    assert result.io_errors == 0, result.summary_of_problems()
    assert result.verify_failures == 0, result.summary_of_problems()
    for q in result.queues:
        assert q.stats.bad_used == 0


# ---- closed loop ----

@pytest.mark.parametrize("target", ALL, indirect=True, ids=lambda p: "-".join(p))
@pytest.mark.parametrize("rw,indirect", [("randread", None), ("randwrite", False)])
def test_closed_loop_runs_for_runtime_at_iodepth(target, rw, indirect):
    job = Job(rw=rw, iodepth=16, runtime=1.0, indirect=indirect)
    with target.connect(job) as dev:
        result = run_load(dev, job)
        assert_clean(result)
        d = 0 if rw == "randread" else 1
        for q in result.queues:
            s = q.stats
            assert 0.95e9 <= s.runtime_ns <= 1.5e9
            assert q.ios(d) > 200 and q.ios(1 - d) == 0
            assert s.dir[d].clat.n == q.ios(d) and s.dir[d].bytes == 4096 * q.ios(d)
            assert s.depth_level[4] > 0            # reached depth 16 (fio's "16=" bucket)
            assert s.usr_ns + s.sys_ns > 0
        if target.requests() is not None:
            # Every published request reached the backend, nothing more.
            assert target.requests() == [int(q.stats.issued) for q in result.queues]
        # The rings were handed back in order: the Python frontend carries on.
        dev.write(8 * MiB, b"\x5a" * 4096, queue=1)
        got = dev.read(8 * MiB, 4096, queue=1)
        assert got == (b"\x5a" * 4096 if target.image else bytes(4096))


def test_load_threads_are_named_per_queue(start_backend):
    backend = start_backend("null:64M", queues=2)
    job = Job(rw="randread", iodepth=4, runtime=1.0)
    names: set[str] = set()
    with Device.connect(backend.socket, queues=2) as dev:
        runner = threading.Thread(target=run_load, args=(dev, job))
        runner.start()
        deadline = time.monotonic() + 0.8
        while time.monotonic() < deadline and len(names) < 2:
            for task in Path("/proc/self/task").iterdir():
                try:
                    names.add((task / "comm").read_text().strip())
                except OSError:
                    pass
            names &= {"dp-load0", "dp-load1"}
            time.sleep(0.02)
        runner.join()
    assert names == {"dp-load0", "dp-load1"}


# ---- verify ----

@pytest.mark.parametrize("target", FILES, indirect=True, ids=lambda p: "-".join(p))
def test_verify_two_queues_finds_no_error_on_a_file(target):
    mixed = Job(rw="randrw", iodepth=16, runtime=1.0, size=8 * MiB, verify=True)
    with target.connect(mixed) as dev:
        result = dev.load(mixed)
        assert_clean(result)
        regions = [q.region for q in result.queues]
        assert regions[0][0] + regions[0][1] <= regions[1][0]     # disjoint
        for q in result.queues:
            assert q.stats.verify_checked > 100
        # A write-only verify job is read back at the end, like fio's verify phase.
        writes = Job(rw="randwrite", iodepth=16, runtime=0.5, size=8 * MiB, verify=True)
        result = dev.load(writes)
        assert_clean(result)
        for q in result.queues:
            assert q.ios(1) > 0 and q.stats.verify_checked > 0


@pytest.mark.parametrize("target", FILES, indirect=True, ids=lambda p: "-".join(p))
def test_verify_reports_corruption_with_its_offset(target):
    bs, size = 4096, 2 * MiB
    state = VerifyState(bs, verify_regions(0, size, bs, [0, 1]))
    blocks = size // 2 // bs
    write = Job(rw="write", iodepth=8, runtime=0, number_ios=blocks, size=size, verify=True)
    read = Job(rw="read", iodepth=8, runtime=0, number_ios=blocks, size=size, verify=True)
    with target.connect(write) as dev:
        assert_clean(run_load(dev, write, verify_state=state))
        # Behind the load's back: flip one byte in sector 2 of q0's block 5 and sector 4 of
        # q1's block 7.
        bad = []
        for q, block, sector in ((0, 5, 2), (1, 7, 4)):
            block_off = state.regions[q][0] + block * bs
            data = bytearray(dev.read(block_off, bs))
            data[sector * 512 + 100] ^= 0xFF
            dev.write(block_off, bytes(data))
            bad.append(block_off + sector * 512)
        result = run_load(dev, read, verify_state=state)
    assert result.error == 0 and result.io_errors == 0
    assert result.verify_failures == 2
    assert [q.verify_fail_offsets for q in result.queues] == [[bad[0]], [bad[1]]]
    assert result.queues[0].stats.verify_checked == blocks * bs // 512
    job = result.to_json()["jobs"][0]
    assert job["error"] == errno.EILSEQ
    assert job["dataplane"]["verify_fail_offsets"] == [bad[0]]
    assert f"first at offset {bad[0]}" in result.to_text()


def test_verify_ignores_never_written_blocks(start_backend, disk_file):
    disk_file.write_bytes(b"\xee" * (64 * MiB))        # garbage, but never written by a load
    backend = start_backend(str(disk_file))
    job = Job(rw="randread", iodepth=8, runtime=0.3, size=4 * MiB, verify=True)
    with Device.connect(backend.socket, queues=1) as dev:
        result = run_load(dev, job)
    assert_clean(result)
    assert result.queues[0].ios(0) > 0 and result.queues[0].stats.verify_checked == 0


# ---- open loop, I/O count ----

@pytest.mark.parametrize("target", NULLS, indirect=True, ids=lambda p: "-".join(p))
def test_open_loop_hits_the_target_rate(target):
    rate = 2000
    job = Job(rw="randread", iodepth=16, runtime=1.5, rate_iops=rate)
    with target.connect(job) as dev:
        result = run_load(dev, job)
    assert_clean(result)
    for q in result.queues:
        iops = q.ios(0) / (q.stats.runtime_ns / 1e9)
        assert abs(iops - rate) / rate < 0.10, iops
        # Latency from the schedule is kept next to latency from the submit.
        assert q.stats.dir[0].slat.n == q.ios(0)
        assert q.stats.dir[0].lat.sum >= q.stats.dir[0].clat.sum
    read = result.to_json()["jobs"][0]["read"]
    assert "percentile" in read["lat_ns"] and "percentile" in read["clat_ns"]


@pytest.mark.parametrize("target", NULLS, indirect=True, ids=lambda p: "-".join(p))
@pytest.mark.parametrize("rw", ["randrw", "rw"])
def test_number_ios_stops_exactly(target, rw):
    job = Job(rw=rw, iodepth=32, runtime=30, number_ios=1000)
    with target.connect(job) as dev:
        t0 = time.monotonic()
        result = run_load(dev, job)
        assert time.monotonic() - t0 < 10
        requests = target.requests()     # while connected: the server drops them on disconnect
    assert_clean(result)
    for q in result.queues:
        assert q.ios(0) + q.ios(1) == 1000 and q.stats.issued == 1000
        assert 350 < q.ios(0) < 650          # rwmixread=50
    if requests is not None:
        assert requests == [1000, 1000]


def test_job_that_does_not_fit_the_ring_is_refused(start_backend):
    backend = start_backend("null:64M", queues=1)
    with Device.connect(backend.socket, queues=1, queue_size=16) as dev:
        with pytest.raises(ConfigError, match="iodepth"):
            run_load(dev, Job(iodepth=32, runtime=0.1))
        # Direct chains need 3 descriptors a request: iodepth 8 fits only with indirect.
        with pytest.raises(ConfigError, match="iodepth"):
            run_load(dev, Job(iodepth=8, runtime=0.1, indirect=False))
        assert_clean(run_load(dev, Job(iodepth=8, runtime=0.1, indirect=True)))


# ---- fio's JSON layout and the CLI ----

def fio_reference_json(tmp_path: Path) -> dict:
    if shutil.which("fio") is None:
        pytest.skip("fio is not installed")
    image = tmp_path / "fio.img"
    with open(image, "wb") as f:
        f.truncate(MiB)
    out = subprocess.run(["fio", "--name=ref", f"--filename={image}", "--size=1M", "--rw=randread",
                          "--bs=4k", "--number_ios=64", "--ioengine=psync", "--output-format=json"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out[out.index("{"):])


def test_json_has_fios_layout(start_backend, tmp_path):
    ref = fio_reference_json(tmp_path)
    backend = start_backend("null:64M", queues=2)
    job = Job(rw="randread", iodepth=8, runtime=0.5)
    with Device.connect(backend.socket, queues=2) as dev:
        result = run_load(dev, job)
    ours = json.loads(json.dumps(result.to_json()))
    assert set(ref) - {"disk_util"} <= set(ours)
    assert [j["jobname"] for j in ours["jobs"]] == ["q0", "q1"]
    rj, oj = ref["jobs"][0], ours["jobs"][0]
    assert set(rj) <= set(oj)
    for key in ("read", "write", "trim"):
        assert set(rj[key]) <= set(oj[key]), key
        for lat in ("slat_ns", "clat_ns", "lat_ns"):
            assert set(rj[key][lat]) <= set(oj[key][lat]), (key, lat)
    assert set(oj["read"]["clat_ns"]["percentile"]) == set(rj["read"]["clat_ns"]["percentile"])
    for key in ("latency_ns", "latency_us", "latency_ms", "iodepth_level", "iodepth_submit",
                "iodepth_complete"):
        assert set(oj[key]) == set(rj[key]), key
    # Types as fio writes them (what fio-plot and friends index into).
    read = oj["read"]
    assert isinstance(read["iops"], float) and read["iops"] > 0
    assert isinstance(read["io_bytes"], int) and isinstance(read["runtime"], int)
    assert read["total_ios"] == read["clat_ns"]["N"] > 0
    pct = read["clat_ns"]["percentile"]
    assert pct["1.000000"] <= pct["50.000000"] <= pct["99.000000"] <= pct["99.990000"]
    assert read["lat_ns"]["mean"] >= read["clat_ns"]["mean"] > 0
    assert abs(sum(oj["latency_us"].values()) + sum(oj["latency_ns"].values())
               + sum(oj["latency_ms"].values()) - 100) < 0.01
    for name in ("iodepth", "numjobs", "bs", "rw"):          # fio-plot reads these
        assert name in oj["job options"]
    grouped = result.to_json(group_reporting=True)
    assert len(grouped["jobs"]) == 1
    assert grouped["jobs"][0]["read"]["total_ios"] == sum(j["read"]["total_ios"] for j in ours["jobs"])


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "dataplane", "load", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_json_output_parses(start_backend, tmp_path):
    backend = start_backend("null:64M", queues=2)
    proc = run_cli("--socket", backend.socket, "--queues", "2", "--rw", "randread", "--bs", "4k",
                   "--iodepth", "8", "--runtime", "500ms", "--output-format", "json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["jobs"][0]["read"]["iops"] > 0 and len(data["jobs"]) == 2
    assert data["jobs"][0]["job options"]["runtime"] == "0.5"
    out = tmp_path / "report.json"
    proc = run_cli("--socket", backend.socket, "--runtime", "0.3s", "--rw", "randwrite",
                   "--output-format", "json", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    with open(out) as f:
        assert json.load(f)["jobs"][0]["write"]["iops"] > 0


def test_cli_group_reporting_says_how_many_jobs_it_merged(start_backend):
    """fio writes the real numjobs with group_reporting (fio-plot tells 1 queue from 2 by it):
    the merged job stands for one job per queue."""
    backend = start_backend("null:64M", queues=3)
    args = ("--socket", backend.socket, "--queues", "3", "--iodepth", "4", "--runtime", "0",
            "--number-ios", "200", "--output-format", "json")
    proc = run_cli(*args, "--group-reporting")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert [j["jobname"] for j in data["jobs"]] == ["qall"]
    assert data["global options"]["numjobs"] == "3"
    assert data["jobs"][0]["job options"]["numjobs"] == "3"
    assert data["jobs"][0]["read"]["total_ios"] == 3 * 200
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert len(data["jobs"]) == 3 and data["global options"]["numjobs"] == "1"
    assert {j["job options"]["numjobs"] for j in data["jobs"]} == {"1"}


def test_cli_normal_output_and_exit_status(start_backend):
    backend = start_backend("null:64M", queues=1)
    proc = run_cli("--socket", backend.socket, "--number-ios", "500", "--runtime", "0",
                   "--rw", "randrw", "--rwmixread", "70")
    assert proc.returncode == 0, proc.stderr
    for text in ("q0: (groupid=0, jobs=1): err= 0", "read: IOPS=", "write: IOPS=",
                 "clat percentiles (", "Run status group 0 (all jobs):", "issued rwts: total="):
        assert text in proc.stdout
    # A null disk reads back zeroes: a verify job against it must fail, loudly.
    proc = run_cli("--socket", backend.socket, "--rw", "randrw", "--verify", "--runtime", "0.3",
                   "--size", "4m")
    assert proc.returncode == 1
    assert "failed verify" in proc.stderr and "err=84" in proc.stdout
    proc = run_cli("--socket", backend.socket, "--runtime", "ten")
    assert proc.returncode == 2 and "bad time" in proc.stderr


# ---- a backend that breaks the used ring ----

class FakeDevice:
    """A device in Python on the frontend's own rings: completes every request with whatever
    answer() says. Only for hostile-backend tests."""

    def __init__(self, answer) -> None:
        self.mem = GuestMemory(8 * MiB)
        self.ring = Vring(self.mem, 0, 128, event_idx=True)
        self.rings = [self.ring]
        self.features = (1 << vb.VIRTIO_RING_F_INDIRECT_DESC) | (1 << vb.VIRTIO_RING_F_EVENT_IDX)
        self.capacity = 4 * MiB
        self.answer = answer
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def status_gpa(self, head: int) -> int:
        addr, length, flags, next_ = struct.unpack("<QIHH", self.mem.read(self.ring.desc + 16 * head, 16))
        if flags & 4:    # indirect: header, data, status
            return struct.unpack("<Q", self.mem.read(addr + 32, 8))[0]
        for _ in range(2):
            desc = self.mem.read(self.ring.desc + 16 * next_, 16)
            addr, length, flags, next_ = struct.unpack("<QIHH", desc)
        return addr

    def serve(self) -> None:
        seen, used = 0, 0
        while not self.stop.is_set():
            avail = struct.unpack("<H", self.mem.read(self.ring.avail + 2, 2))[0]
            while seen != avail:
                head = struct.unpack("<H", self.mem.read(self.ring.avail + 4 + 2 * (seen % 128), 2))[0]
                seen = (seen + 1) & 0xFFFF
                reply = self.answer(head)
                if reply is None:
                    continue
                id_, length = reply
                self.mem.write(self.status_gpa(head), b"\0")
                self.mem.write(self.ring.used + 4 + 8 * (used % 128), struct.pack("<II", id_, length))
                used = (used + 1) & 0xFFFF
                self.mem.write(self.ring.used + 2, struct.pack("<H", used))
                os.eventfd_write(self.ring.call_fd, 1)
            time.sleep(0.0002)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.ring.close()
        self.mem.close()


@pytest.mark.parametrize("indirect", [True, False])
def test_bad_used_id_ends_the_run_with_eproto(indirect):
    dev = FakeDevice(lambda head: (head + 1000, 1))
    try:
        result = run_load(dev, Job(rw="randread", iodepth=4, runtime=0, number_ios=20,
                                   timeout=5, indirect=indirect))
    finally:
        dev.close()
    assert result.error == errno.EPROTO
    assert result.queues[0].stats.bad_used == 1
    assert result.to_json()["jobs"][0]["error"] == errno.EPROTO


def test_used_len_larger_than_the_buffers_is_an_error_not_a_crash():
    dev = FakeDevice(lambda head: (head, 1 << 20))
    try:
        result = run_load(dev, Job(rw="randread", iodepth=4, runtime=0, number_ios=50, timeout=5))
    finally:
        dev.close()
    q = result.queues[0]
    assert result.error == 0
    assert q.stats.bad_used == 50 and q.stats.dir[0].err_other == 50 and q.ios(0) == 0


def test_a_backend_that_never_answers_times_out():
    dev = FakeDevice(lambda head: None)
    try:
        t0 = time.monotonic()
        result = run_load(dev, Job(rw="randread", iodepth=4, runtime=5, timeout=0.3))
        elapsed = time.monotonic() - t0
    finally:
        dev.close()
    assert result.error == errno.ETIMEDOUT
    assert elapsed < 3
