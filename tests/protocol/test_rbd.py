"""RBD exports against a real Ceph cluster (tests/ceph_cluster.py: one monitor, one memstore
OSD, cephx, started once per session by conftest's `ceph` fixture; images per test).

What goes through the backend is checked by a client that is not the code under test:
`rbd export` (and `rbd diff` for what is allocated). A hung OSD is SIGSTOPped on the session
cluster (it keeps its data); a killed OSD gets a cluster of its own (memstore loses all).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from serve_process import ServeProcess

from dataplane.driver import Device
from dataplane.errors import DeviceError
from dataplane.protocol import virtio_blk as vb
from dataplane.protocol.vhost_user import CONFIG_HEADER, Request

MiB = 1 << 20
OBJ = 4 * MiB          # RBD's default object size
ETIMEDOUT = 110


def pattern(seed: int, n: int) -> bytes:
    return (seed.to_bytes(8, "little") * (n // 8 + 1))[:n]


def allocated(img) -> list[tuple[int, int]]:
    """(offset, length) of the image's allocated extents, as `rbd diff` reports them (adjacent
    ones merged)."""
    out = img.cluster.rbd("diff", "--format", "json", img.spec)
    merged: list[tuple[int, int]] = []
    for e in sorted(json.loads(out), key=lambda e: int(e["offset"])):
        if e.get("exists", "true") not in ("true", True):
            continue
        off, n = int(e["offset"]), int(e["length"])
        if merged and merged[-1][0] + merged[-1][1] == off:
            merged[-1] = (merged[-1][0], merged[-1][1] + n)
        else:
            merged.append((off, n))
    return merged


def covers(extents: list[tuple[int, int]], off: int, length: int) -> bool:
    return any(o <= off and off + length <= o + n for o, n in extents)


def overlaps(extents: list[tuple[int, int]], off: int, length: int) -> bool:
    return any(o < off + length and off < o + n for o, n in extents)


def set_wce(dev: Device, on: bool) -> None:
    dev.client.call(Request.SET_CONFIG, CONFIG_HEADER.pack(vb.CONFIG_WRITEBACK_OFFSET, 1, 0)
                    + bytes([int(on)]))


# ---- every request type, read back by rbd export ----

def test_every_request_type_lands_where_rbd_export_sees_it(start_backend, rbd_image):
    img = rbd_image(size=6 * OBJ)
    backend = start_backend(img.disk(), queues=2, serial="rbd-serial")
    model = bytearray(img.size)
    with Device.connect(backend.socket, queues=2) as dev:
        cfg = dev.config
        assert cfg["capacity"] == img.size // 512          # the image's size is the capacity
        for bit in (vb.VIRTIO_BLK_F_FLUSH, vb.VIRTIO_BLK_F_CONFIG_WCE, vb.VIRTIO_BLK_F_DISCARD,
                    vb.VIRTIO_BLK_F_WRITE_ZEROES, vb.VIRTIO_BLK_F_MQ):
            assert dev.features & (1 << bit), vb.feature_names(1 << bit)
        assert not dev.features & (1 << vb.VIRTIO_BLK_F_RO)
        assert dev.get_id() == b"rbd-serial"                # GET_ID

        # OUT on both queues: object-aligned, across an object boundary, sector-granular, the end
        writes = [(0, pattern(1, 4096)), (OBJ - 2048, pattern(2, 8192)),
                  (OBJ + 65536 + 9 * 512, pattern(3, 3 * 512)), (img.size - 4096, pattern(4, 4096))]
        for i, (off, data) in enumerate(writes):
            dev.write(off, data, queue=i % 2)
            model[off: off + len(data)] = data
        for i, (off, data) in enumerate(writes):             # IN, from the other queue
            assert dev.read(off, len(data), queue=(i + 1) % 2) == data
        dev.flush(queue=0)                                   # FLUSH
        dev.flush(queue=1)

        # Objects 2 and 3 filled, then WRITE_ZEROES over each whole object: with UNMAP the
        # object may go, without it the extent stays allocated (THICK_PROVISION), both read 0.
        for obj in (2, 3):
            for k in range(4):
                off = obj * OBJ + k * MiB
                data = pattern(10 * obj + k, MiB)
                dev.write(off, data, queue=k % 2)
                model[off: off + MiB] = data
        assert covers(allocated(img), 2 * OBJ, 2 * OBJ)
        dev.write_zeroes(2 * OBJ, OBJ, unmap=True)
        dev.write_zeroes(3 * OBJ, OBJ, unmap=False, queue=1)
        model[2 * OBJ: 4 * OBJ] = bytes(2 * OBJ)
        assert dev.read(2 * OBJ, MiB) == bytes(MiB) and dev.read(4 * OBJ - MiB, MiB) == bytes(MiB)
        extents = allocated(img)
        assert not overlaps(extents, 2 * OBJ, OBJ), f"UNMAP left object 2 allocated: {extents}"
        assert covers(extents, 3 * OBJ, OBJ), f"no UNMAP deallocated object 3: {extents}"

        # Sector-granular WRITE_ZEROES inside data, two ranges in one request
        dev.write(4 * OBJ, pattern(40, MiB))
        model[4 * OBJ: 4 * OBJ + MiB] = pattern(40, MiB)
        ranges = [(4 * OBJ + 512, 1024), (4 * OBJ + 8192, 4096)]
        assert dev._ranges(vb.ReqType.WRITE_ZEROES, ranges, False, 0) == vb.Status.OK
        for off, n in ranges:
            model[off: off + n] = bytes(n)
        assert dev.read(4 * OBJ, 16384) == bytes(model[4 * OBJ: 4 * OBJ + 16384])

        # DISCARD promises nothing about the data (librbd skips partial objects): a whole
        # object goes, the device and rbd export must agree on what reads back elsewhere.
        dev.write(5 * OBJ, pattern(50, MiB))
        assert dev._ranges(vb.ReqType.DISCARD, [(5 * OBJ, OBJ), (0, 4096)], False, 1) == vb.Status.OK
        model[5 * OBJ: 6 * OBJ] = bytes(OBJ)
        model[0:4096] = dev.read(0, 4096)
        assert dev.read(5 * OBJ, MiB) == bytes(MiB)

        # Beyond the capacity: IOERR, nothing written
        req = dev.submit(vb.ReqType.OUT, img.size // 512, data=b"x" * 512)
        assert dev.wait([req])[id(req)][0] == vb.Status.IOERR
        dev.release(req)
        dev.flush()
    assert img.export() == bytes(model)


def test_two_queues_under_load_verify(start_backend, rbd_image):
    img = rbd_image(size=32 * MiB)
    backend = start_backend(img.disk(), queues=2)
    out = subprocess.run(
        [sys.executable, "-m", "dataplane", "load", "--socket", backend.socket, "--queues", "2",
         "--rw", "randrw", "--bs", "4k", "--iodepth", "16", "--runtime", "3", "--verify",
         "--size", "16M"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("err= 0") == 2, out.stdout
    ios = [int(m) for m in re.findall(r"issued rwts: total=(\d+)", out.stdout)]
    assert len(ios) == 2 and all(n > 100 for n in ios), out.stdout


def test_a_snapshot_is_a_read_only_disk(start_backend, rbd_image):
    img = rbd_image(size=8 * MiB)
    img.cluster.write_image(img.name, MiB, pattern(7, 8192))
    img.cluster.rbd("snap", "create", f"{img.spec}@s1")
    img.cluster.write_image(img.name, MiB, pattern(8, 8192))     # the head moves on
    c = img.cluster
    spec = (f"rbd:{img.spec}@s1,conf={c.conf_path},id={c.client_id},keyring={c.keyring_path},"
            "timeout=10")
    backend = start_backend(spec, queues=1)
    with Device.connect(backend.socket) as dev:
        assert dev.features & (1 << vb.VIRTIO_BLK_F_RO)
        assert dev.read(MiB, 8192) == pattern(7, 8192)
        req = dev.submit(vb.ReqType.OUT, 0, data=b"w" * 4096)
        assert dev.wait([req])[id(req)][0] == vb.Status.IOERR
        dev.flush()
    assert img.export()[MiB: MiB + 8192] == pattern(8, 8192)


def test_read_only_opens_the_image_read_only(start_backend, rbd_image):
    """--read-only: rbd_open_read_only, so no write can take the exclusive lock, and no
    owner record is kept."""
    img = rbd_image(size=4 * MiB)
    img.cluster.write_image(img.name, 0, pattern(6, 4096))
    backend = start_backend(img.disk(), queues=1, read_only=True)
    with Device.connect(backend.socket) as dev:
        assert dev.features & (1 << vb.VIRTIO_BLK_F_RO)
        assert dev.read(0, 4096) == pattern(6, 4096)
        req = dev.submit(vb.ReqType.OUT, 0, data=b"w" * 4096)
        assert dev.wait([req])[id(req)][0] == vb.Status.IOERR
    assert backend.disk.rbd.lock_owner() is None and backend.disk.rbd.record is None
    assert img.export()[:4096] == pattern(6, 4096)


# ---- durability and the write cache ----

def test_a_flushed_write_survives_a_sigkill_of_the_backend(rbd_image, start_serve, tmp_path):
    img = rbd_image(size=16 * MiB)
    serve = start_serve("serve", tmp_path / "v.sock", img.disk(), "--queues", "2",
                        "--cache", "writeback")
    assert "rbd_cache=true" in serve.log()
    expected = {}
    with Device.connect(str(tmp_path / "v.sock"), queues=2) as dev:
        reqs = []
        for i in range(32):
            off = (i * 997 % 4096) * 4096
            data = pattern(100 + i, 4096)
            expected[off] = data
            reqs.append(dev.submit(vb.ReqType.OUT, off // 512, data=data, queue=i % 2))
        assert all(s == vb.Status.OK for s, _ in dev.wait(reqs).values())
        dev.flush(queue=0)
        dev.flush(queue=1)
        serve.proc.send_signal(signal.SIGKILL)
        serve.proc.wait(10)
    image = img.export()
    for off, data in expected.items():
        assert image[off: off + 4096] == data, f"acknowledged write at {off} lost"


def test_writeback_acknowledges_early_and_fua_waits_for_the_osds(start_backend, rbd_image):
    """--cache=writeback is librbd's cache: after the guest's first flush, a write completes
    while the OSD is stopped (the cache is volatile, hence FLUSH -> rbd_aio_flush); with the
    guest's write cache off (WCE=0) the same write waits for the OSD (it is flushed first).
    --cache=none (rbd_cache=false): a write always waits for the OSD."""
    img = rbd_image(size=8 * MiB)
    wb = start_backend(img.disk(), queues=1, cache="writeback")
    img2 = rbd_image(size=8 * MiB)
    nc = start_backend(img2.disk(), queues=1, cache="none")
    assert wb.disk.rbd.cache and wb.disk.rbd.volatile_cache
    assert not nc.disk.rbd.cache and not nc.disk.rbd.volatile_cache
    with Device.connect(wb.socket) as dev, Device.connect(nc.socket) as dev2:
        for d in (dev, dev2):
            d.write(0, pattern(1, 4096))
            d.flush()
        img.cluster.pause_osd()
        try:
            early = dev.submit(vb.ReqType.OUT, 8, data=pattern(2, 4096))
            assert dev.wait([early], timeout=5)[id(early)][0] == vb.Status.OK
            direct = dev2.submit(vb.ReqType.OUT, 8, data=pattern(2, 4096))
            with pytest.raises(DeviceError, match="did not complete"):
                dev2.wait([direct], timeout=1.5)
            set_wce(dev, False)
            fua = dev.submit(vb.ReqType.OUT, 16, data=pattern(3, 4096))
            with pytest.raises(DeviceError, match="did not complete"):
                dev.wait([fua], timeout=1.5)
        finally:
            img.cluster.resume_osd()
        assert dev.wait([fua], timeout=10)[id(fua)][0] == vb.Status.OK
        assert dev2.wait([direct], timeout=10)[id(direct)][0] == vb.Status.OK
        dev.flush()
    assert img.export()[4096:12288] == pattern(2, 4096) + pattern(3, 4096)


def test_the_image_metadata_decides_the_cache(start_backend, rbd_image, caplog):
    img = rbd_image(size=4 * MiB)
    img.cluster.rbd("config", "image", "set", img.spec, "rbd_cache", "true")
    with caplog.at_level("WARNING", logger="dataplane.disk"):
        backend = start_backend(img.disk(), queues=1, cache="none")
    rbd = backend.disk.rbd
    assert (rbd.cache, rbd.cache_source, rbd.volatile_cache) == (True, "image", True)
    assert "image's metadata sets true" in caplog.text


def test_timeouts_default_to_30_s_and_are_overridable(start_backend, rbd_image):
    img = rbd_image(size=4 * MiB)
    c = img.cluster
    base = f"rbd:{img.spec},conf={c.conf_path},id={c.client_id}"
    default = start_backend(base, queues=1).disk.rbd
    assert [default.conf_get(o) for o in ("rados_osd_op_timeout", "rados_mon_op_timeout",
                                          "client_mount_timeout")] == ["30", "30", "30"]
    mixed = start_backend(base + ",timeout=5,rados_osd_op_timeout=7", queues=1).disk.rbd
    assert [mixed.conf_get(o) for o in ("rados_osd_op_timeout", "rados_mon_op_timeout",
                                        "client_mount_timeout")] == ["7", "5", "5"]
    conf = c.write_client_conf("slowops", {"rados osd op timeout": "11"})
    from_conf = start_backend(f"rbd:{img.spec},conf={conf},id={c.client_id}", queues=1).disk.rbd
    assert from_conf.conf_get("rados_osd_op_timeout") == "11"     # the conf's value is kept


# ---- what goes wrong says what ----

def test_open_errors_name_the_cause(ceph, tmp_path):
    from dataplane.disks import open_disk
    from dataplane.errors import ConfigError

    name = ceph.new_image("errors", 4 * MiB).name
    base = f"conf={ceph.conf_path},id={ceph.client_id},timeout=3"
    wrong_key = tmp_path / "wrong.keyring"
    wrong_key.write_text(f"[client.{ceph.client_id}]\n\tkey = AQBfkUBmAAAAABAAxIWWvp6fkGs37jt8v69Ajg==\n")
    cases = [
        (f"rbd:nopool/x,{base}", "pool 'nopool' does not exist"),
        (f"rbd:rbd/nosuchimage,{base}", "image 'nosuchimage' does not exist in pool 'rbd'"),
        (f"rbd:rbd/{name}@nosnap,{base}", "snapshot 'nosnap' does not exist"),
        (f"rbd:rbd/{name},{base},keyring={tmp_path}/none", "no key for this client"),
        (f"rbd:rbd/{name},{base},keyring={wrong_key}", "authentication refused"),
        (f"rbd:rbd/{name},{base},no_such_option=1", "no_such_option=1: librados has no such option"),
        (f"rbd:rbd/{name},conf={tmp_path}/missing.conf", f"cannot read the Ceph configuration {tmp_path}"),
    ]
    for spec, message in cases:
        t0 = time.monotonic()
        with pytest.raises(ConfigError, match=re.escape(message)):
            open_disk(spec)
        assert time.monotonic() - t0 < 10, spec


def test_a_dead_monitor_or_a_hung_osd_bounds_the_open(ceph):
    from dataplane.disks import open_disk
    from dataplane.errors import ConfigError

    img = ceph.new_image("deadmon", 4 * MiB)
    import socket

    with socket.socket() as s:      # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"client_mount_timeout 2 s\): no monitor answered"):
        open_disk(img.disk(f"mon_host=v2:127.0.0.1:{port}", timeout=2))
    assert time.monotonic() - t0 < 8
    ceph.pause_osd()
    try:
        t0 = time.monotonic()
        with pytest.raises(ConfigError, match=r"no answer from the OSDs within rados_osd_op_timeout"):
            open_disk(img.disk(timeout=2))
        assert time.monotonic() - t0 < 8
    finally:
        ceph.resume_osd()


# ---- a cluster that goes away ----

def test_a_hung_osd_gives_bounded_errors_and_the_export_recovers(start_backend, rbd_image, disk_file):
    """SIGSTOP of the OSD: requests end in IOERR after rados_osd_op_timeout (3 s here), the
    export's control plane and GET_ID still answer, another export in the same process keeps
    serving; after SIGCONT the same export serves again without a reopen."""
    img = rbd_image(size=8 * MiB)
    rbd = start_backend(img.disk(timeout=3), queues=2)
    other = start_backend(str(disk_file), queues=2)
    with Device.connect(rbd.socket, queues=2) as dev, Device.connect(other.socket, queues=2) as odev:
        dev.write(0, pattern(1, 8192))
        img.cluster.pause_osd()
        try:
            t0 = time.monotonic()
            reqs = [dev.submit(vb.ReqType.IN, 16 * i, read_len=4096, queue=i % 2) for i in range(8)]
            reqs += [dev.submit(vb.ReqType.OUT, 16 * i, data=pattern(i, 4096), queue=i % 2)
                     for i in range(8, 12)]
            served = 0
            while time.monotonic() - t0 < 2.5:        # the other export, meanwhile
                odev.write(served * 4096 % (1 << 20), pattern(served, 4096), queue=served % 2)
                served += 1
            assert dev.get_id() == b"dp-test"           # answered without the cluster
            assert vb.parse_config(dev.client.get_config())["capacity"] == img.size // 512
            results = dev.wait(reqs, timeout=15)
            waited = time.monotonic() - t0
            assert all(s == vb.Status.IOERR for s, _ in results.values()), results
            assert 2.5 <= waited < 12, waited
            assert served > 20
            assert rbd.disk.rbd.errors() == (12, -ETIMEDOUT)
        finally:
            img.cluster.resume_osd()
        dev.write(4096, pattern(9, 4096), queue=1)
        assert dev.read(0, 8192) == pattern(1, 4096) + pattern(9, 4096)


def test_a_killed_osd_ends_in_errors_and_the_other_export_keeps_serving(start_backend, disk_file,
                                                                        tmp_path):
    """`dataplane load` on 2 queues of an RBD export when the OSD is SIGKILLed mid-run: its
    requests end in IOERR within the timeout and the load ends; a file export in the same
    backend process serves throughout; the RBD export then closes in bounded time."""
    from ceph_cluster import CephCluster

    cluster = CephCluster(tmp_path / "c").start()
    try:
        img = cluster.new_image("killed", 16 * MiB)
        rbd = start_backend(img.disk(timeout=3), queues=2)
        other = start_backend(str(disk_file), queues=2)
        load = subprocess.Popen(
            [sys.executable, "-m", "dataplane", "load", "--socket", rbd.socket, "--queues", "2",
             "--rw", "randrw", "--iodepth", "8", "--runtime", "6", "--size", "8M"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(1.5)
        cluster.kill_osd()
        killed = time.monotonic()
        served = 0
        with Device.connect(other.socket, queues=2) as odev:
            while load.poll() is None and time.monotonic() - killed < 30:
                odev.write(served * 4096 % (1 << 20), pattern(served, 4096), queue=served % 2)
                served += 1
        out, _ = load.communicate(timeout=30)
        assert time.monotonic() - killed < 15, out
        assert load.returncode == 1 and "error" in out.lower(), out
        assert served > 50, served
        errors, last = rbd.disk.rbd.errors()
        assert errors > 0 and last == -ETIMEDOUT
        t0 = time.monotonic()
        rbd.stop()                                         # drain, detach, close the image
        assert time.monotonic() - t0 < 12
    finally:
        cluster.stop()


# ---- the exclusive lock across a crash ----

def test_a_restarted_backend_reclaims_its_dead_predecessors_lock(rbd_image, tmp_path):
    """SIGKILL leaves the image's exclusive lock with a dead client; librbd would make the next
    writer wait ~30 s for the dead client's watch to expire. The restarted backend breaks a
    lock its dead predecessor held, and writes at once; with the reclaim off it waits."""
    img = rbd_image(size=8 * MiB)
    assert "exclusive-lock" in img.cluster.image_features(img.name)
    sock = tmp_path / "v.sock"
    serves = []

    def serve(*options: str) -> ServeProcess:
        s = ServeProcess(tmp_path / f"serve{len(serves)}.log", sock, img.disk(*options),
                         ("--queues", "1"))
        serves.append(s)
        return s

    def first_write(seed: int, timeout: float) -> float:
        with Device.connect(str(sock)) as dev:
            t0 = time.monotonic()
            req = dev.submit(vb.ReqType.OUT, 8 * seed, data=pattern(seed, 4096))
            assert dev.wait([req], timeout=timeout)[id(req)][0] == vb.Status.OK
            took = time.monotonic() - t0
            dev.flush()
            return took

    try:
        s0 = serve()
        first_write(1, 10)
        s0.kill()
        s1 = serve()
        assert "broke the exclusive lock our previous instance" in s1.log()
        assert first_write(2, 10) < 3
        s1.kill()
        s2 = serve("debug-no-lock-break")
        assert "broke the exclusive lock" not in s2.log()
        dev = Device.connect(str(sock))
        try:
            req = dev.submit(vb.ReqType.OUT, 24, data=pattern(3, 4096))
            with pytest.raises(DeviceError, match="did not complete"):
                dev.wait([req], timeout=5)     # librbd waits out the dead client's watch
        finally:
            s2.kill()                          # before the close, which would wait for it
            dev.close()
    finally:
        for s in serves:
            s.kill()
    assert img.export()[4096:3 * 4096] == pattern(1, 4096) + pattern(2, 4096)


# ---- placement, stacking, configuration ----

def test_librados_threads_keep_the_control_planes_cpus(rbd_image, start_serve, tmp_path):
    """Threads inherit the affinity of whoever creates them: librados's are made when the image
    is opened, on the unpinned control thread, before any I/O thread pins itself."""
    img = rbd_image(size=4 * MiB)
    serve = start_serve("serve", tmp_path / "v.sock", img.disk(), "--queues", "2")

    def cpus_of(task: Path) -> str:
        return re.search(r"Cpus_allowed_list:\s*(\S+)", (task / "status").read_text()).group(1)

    with Device.connect(str(tmp_path / "v.sock"), queues=2) as dev:
        dev.write(0, b"a" * 4096, queue=1)
        tasks = Path(f"/proc/{serve.proc.pid}/task")
        main = cpus_of(tasks / str(serve.proc.pid))            # the control plane's thread
        affinity: dict[str, set[str]] = {}
        for task in tasks.iterdir():
            affinity.setdefault((task / "comm").read_text().strip(), set()).add(cpus_of(task))
    ceph_threads = {n: c for n, c in affinity.items()
                    if n.startswith(("msgr-worker", "io_context_pool", "ms_dispatch", "safe_timer"))}
    assert len(ceph_threads) >= 3, affinity
    assert all(c == {main} for c in ceph_threads.values()), (main, ceph_threads)
    plan = subprocess.run([sys.executable, "-m", "dataplane", "plan", "--disk", img.disk(), "--queues",
                           "2", "--json"], capture_output=True, text=True, check=True)
    pinned = {f"dp-vq{r['virtqueue']}": r["host_cpu"] for r in json.loads(plan.stdout)["rows"]}
    for name, cpu in pinned.items():
        if cpu is not None and cpu >= 0:
            assert affinity[name] == {str(cpu)}, (name, affinity)
            assert {str(cpu)} != {main}   # so a librados thread made by it would show


def test_latency_options_stack_on_an_rbd_disk(start_backend, rbd_image):
    img = rbd_image(size=4 * MiB)
    backend = start_backend(img.disk("latency=fixed:30ms"), queues=1)
    assert "latency=fixed:30ms" in backend.disk.description
    with Device.connect(backend.socket) as dev:
        dev.write(0, pattern(5, 4096))
        t0 = time.monotonic()
        assert dev.read(0, 4096) == pattern(5, 4096)
        assert time.monotonic() - t0 >= 0.03
    assert img.export()[:4096] == pattern(5, 4096)


def test_a_toml_config_serves_an_rbd_disk(rbd_image, tmp_path):
    img = rbd_image(size=4 * MiB)
    config = tmp_path / "serve.toml"
    config.write_text(f'socket = "v.sock"\ndisk = "{img.disk()}"\nqueues = 2\n')
    log = tmp_path / "serve.log"
    with open(log, "wb") as out_file:
        proc = subprocess.Popen([sys.executable, "-m", "dataplane", "serve", "--config", str(config)],
                                stdout=out_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while "listening on" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        with Device.connect(str(tmp_path / "v.sock"), queues=2) as dev:
            dev.write(8192, pattern(3, 4096), queue=1)
            dev.flush()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    out = log.read_text()
    assert proc.returncode == 0, out
    assert "rbd rbd/" in out and "exited cleanly" in out
    assert img.export()[8192:12288] == pattern(3, 4096)


def test_the_librbd_callback_thread_is_not_the_submitting_one(start_backend, rbd_image):
    """Completions travel from librbd's threads to the queue's own: many small requests in
    flight on both queues at once all complete, in any order, with the right data."""
    img = rbd_image(size=8 * MiB)
    backend = start_backend(img.disk(), queues=2)
    with Device.connect(backend.socket, queues=2, queue_size=128) as dev:
        reqs = [dev.submit(vb.ReqType.OUT, 8 * i, data=pattern(i, 4096), queue=i % 2)
                for i in range(80)]
        assert all(s == vb.Status.OK for s, _ in dev.wait(reqs).values())
        for r in reqs:
            dev.release(r)
        reads = [dev.submit(vb.ReqType.IN, 8 * i, read_len=4096, queue=(i + 1) % 2) for i in range(80)]
        dev.wait(reads)
        for i, r in enumerate(reads):
            assert dev.mem.read(r.data, 4096) == pattern(i, 4096)
            dev.release(r)


def test_the_disk_checks_the_bounds_librbd_does_not(rbd_image):
    """The disk driven through its ops table (csrc/bench/disk_hooks.c, no virtio-blk parse in
    front): a request crossing the image's end fails whole. librbd itself would write the part
    inside and drop the rest without a word (a write crossing the end returns 0)."""
    import errno

    from dataplane.core import ffi, lib
    from dataplane.disks import open_disk

    img = rbd_image(size=4 * MiB)
    disk = open_disk(img.disk())
    result, first_close = ffi.new("int *"), ffi.new("int *")

    def run(op: int, offset: int, data: bytes = b"", length: int = 0) -> int:
        buf = ffi.new("char[]", data or length)
        rc = lib.dp_bench_disk_run(disk.handle, op, offset, buf, len(data) or length, 0, 10000,
                                   result, first_close)
        assert rc == 0 and first_close[0] in (0, -errno.EBUSY), (rc, first_close[0])
        if op == lib.DP_BENCH_IO_READ and result[0] == 0:
            run.data = ffi.buffer(buf, length)[:]
        return result[0]

    try:
        end = img.size
        assert run(lib.DP_BENCH_IO_WRITE, end - 4096, b"x" * 8192) == -errno.EIO
        assert run(lib.DP_BENCH_IO_READ, end - 4096, length=8192) == -errno.EIO
        assert run(lib.DP_BENCH_IO_WRITE_ZEROES, end - 4096, length=8192) == -errno.EIO
        assert run(lib.DP_BENCH_IO_DISCARD, end + 4096, length=4096) == -errno.EIO
        assert run(lib.DP_BENCH_IO_WRITE, end - 8192, b"y" * 8192) == 0
        assert run(lib.DP_BENCH_IO_READ, end - 8192, length=8192) == 0 and run.data == b"y" * 8192
        assert run(lib.DP_BENCH_IO_FLUSH, 0) == 0
        assert disk.rbd.errors()[0] == 4
    finally:
        disk.close()
    assert img.export()[-12288:] == bytes(4096) + b"y" * 8192


def test_rbd_exports_come_and_go_over_rpc_beside_a_file_export(rbd_image, disk_file, tmp_path):
    """The daemon: an [[export]] table on an RBD image next to a file export, and a second
    image added and removed over JSON-RPC while both serve; each sees its own data."""
    from serve_process import DaemonProcess

    first = rbd_image(size=8 * MiB)
    second = first.cluster.new_image(first.name + "-b", 4 * MiB)
    d = DaemonProcess(tmp_path, [
        {"name": "img", "disk": first.disk(), "socket": str(tmp_path / "img.sock"), "queues": 2},
        {"name": "file", "disk": str(disk_file), "socket": str(tmp_path / "file.sock"), "queues": 2}])
    try:
        with d.client() as c:
            info = c.export_add(name="img2", disk=second.disk(), socket=str(tmp_path / "img2.sock"),
                                queues=1)
            assert info["state"] == "listening", info
            for name, n in (("img", 2), ("file", 2), ("img2", 1)):
                with Device.connect(str(tmp_path / f"{name}.sock"), queues=n) as dev:
                    dev.write(4096, pattern(len(name), 4096), queue=n - 1)
                    dev.flush()
                    assert dev.read(4096, 4096) == pattern(len(name), 4096)
            assert c.export_remove("img2") == {"name": "img2", "removed": True}
            assert {e["name"] for e in c.export_list()} == {"img", "file"}
        assert d.terminate() == 0, d.log()
    finally:
        d.kill()
    assert first.export()[4096:8192] == pattern(3, 4096)
    assert second.export()[4096:8192] == pattern(4, 4096)
