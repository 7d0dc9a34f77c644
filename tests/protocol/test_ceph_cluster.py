"""Tests of the single-node Ceph cluster helper (tests/ceph_cluster.py) the RBD tests run on,
against real daemons (Debian 12 ceph-mon/ceph-osd): what it sets up, and that every way it
can fail to start fails fast and says why. `ceph` is conftest's session cluster."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import ceph_cluster
import pytest
from ceph_cluster import CephCluster, CephClusterError, CephUnavailable


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_rbd_import_export_roundtrip(ceph: CephCluster) -> None:
    data = os.urandom(5 << 20) + b"tail"  # not a multiple of the object size nor of 4 KiB
    ceph.import_image("imported", data)
    assert ceph.image_size("imported") == len(data)
    assert ceph.export_image("imported") == data


def test_write_at_offsets_reads_back(ceph: CephCluster) -> None:
    size = 12 << 20  # spans three 4 MiB objects
    ceph.create_image("offsets", size)
    assert ceph.image_size("offsets") == size
    extents = [(0, os.urandom(4096)), ((4 << 20) - 100, os.urandom(300)), (size - 512, os.urandom(512))]
    for off, buf in extents:
        ceph.write_image("offsets", off, buf)
    ceph.write_image("offsets", 1000, bytes(96), zero=True)  # a zero extent inside the first write
    image = ceph.export_image("offsets")
    assert len(image) == size
    expect = bytearray(size)
    for off, buf in extents:
        expect[off : off + len(buf)] = buf
    expect[1000:1096] = bytes(96)
    assert image == bytes(expect)


def test_image_features(ceph: CephCluster) -> None:
    ceph.create_image("deffeat", 1 << 20)
    assert "exclusive-lock" in ceph.image_features("deffeat")
    ceph.create_image("layering", 1 << 20, features=["layering"])
    assert ceph.image_features("layering") == ["layering"]
    ceph.create_image("nofeat", 1 << 20, features=[])
    assert ceph.image_features("nofeat") == []
    with pytest.raises(ValueError):
        ceph.create_image("odd", 1000)


def test_rados_put_get(ceph: CephCluster, tmp_path: Path) -> None:
    src, dst = tmp_path / "in", tmp_path / "out"
    src.write_bytes(os.urandom(100_000))
    ceph.rados("-p", ceph.pool, "put", "obj1", str(src))
    ceph.rados("-p", ceph.pool, "get", "obj1", str(dst))
    assert dst.read_bytes() == src.read_bytes()
    ceph.rados("-p", ceph.pool, "rm", "obj1")


def test_restricted_client_uses_its_own_keyring(ceph: CephCluster) -> None:
    ceph.create_image("forclient", 1 << 20)
    # The client.<id> entity, with only `profile rbd` caps and only its own keyring, can use images.
    out = ceph.run(["rbd", "-c", str(ceph.conf_path), "--id", ceph.client_id,
                    "--keyring", str(ceph.keyring_path), "ls", ceph.pool])  # fmt: skip
    assert b"forclient" in out.stdout.split()
    assert "client.admin" not in ceph.keyring_path.read_text()
    # ...and cannot do admin things.
    with pytest.raises(CephClusterError, match="exit status"):
        ceph.run(["ceph", "-c", str(ceph.conf_path), "--id", ceph.client_id, "osd", "pool", "create", "nope"])


def test_client_conf_variant(ceph: CephCluster) -> None:
    conf = ceph.write_client_conf("nocache", {"rbd cache": "false"})
    assert conf.name == "nocache.conf"
    get = ["ceph-conf", "-c", str(conf), "-n", f"client.{ceph.client_id}", "--show-config-value", "rbd_cache"]
    assert ceph.run(get).stdout.strip() == b"false"
    # Ceph names the cluster after the conf file ("nocache"): the keyring must still be found.
    ceph.run(["rbd", "-c", str(conf), "--id", ceph.client_id, "ls", ceph.pool])


def test_all_state_is_under_the_base_dir(ceph: CephCluster) -> None:
    base = ceph.base_dir
    for path in (
        ceph.conf_path,
        ceph.keyring_path,
        ceph.mon_data,
        ceph.osd_data,
        ceph.mon_asok,
        ceph.osd_asok,
    ):
        assert path.exists() and path.is_relative_to(base), path
    assert (ceph.log_dir / "ceph-osd.0.log").stat().st_size > 0
    assert not Path("/etc/ceph/ceph.conf").exists()
    conf = ceph.conf_path.read_text()
    assert "/var/" not in conf and "/etc/" not in conf


def test_a_stalled_osd_gives_a_bounded_error_with_logs(ceph: CephCluster) -> None:
    ceph.create_image("stall", 1 << 20)
    ceph.pause_osd()
    try:
        t0 = time.monotonic()
        with pytest.raises(CephClusterError) as err:
            ceph.run(["rbd", "-c", str(ceph.conf_path), "export", "rbd/stall", "-"], timeout=3)
        assert time.monotonic() - t0 < 10
        assert "no answer in 3 s" in str(err.value)
        assert "ceph-osd.0.log (tail)" in str(err.value)
    finally:
        ceph.resume_osd()
    assert ceph.export_image("stall") == bytes(1 << 20)  # the OSD serves again, data kept


def test_missing_packages_name_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(CephUnavailable, match="apt-get install ceph-base ceph-common ceph-mon ceph-osd"):
        CephCluster(tmp_path / "c").start()


def test_a_rejected_option_is_caught(tmp_path: Path) -> None:
    # Ceph drops an invalid value with a warning and uses the default (bluestore): that must not pass.
    cluster = CephCluster(tmp_path / "c", extra_conf={"osd": {"osd objectstore": "nosuchstore"}})
    with pytest.raises(CephClusterError, match="made a 'bluestore' store, not 'nosuchstore'"):
        cluster.start()
    assert cluster.mon_proc is not None and not _alive(cluster.mon_proc.pid)


def test_a_daemon_that_cannot_start_fails_fast_with_its_log(tmp_path: Path) -> None:
    # 192.0.2.1 (TEST-NET-1) is not an address of this host: the OSD cannot bind and exits.
    bad = {"public addr": "192.0.2.1", "cluster addr": "192.0.2.1", "ms bind retry count": "1"}
    cluster = CephCluster(tmp_path / "c", extra_conf={"osd": bad}, timeout=20)
    t0 = time.monotonic()
    with pytest.raises(CephClusterError) as err:
        cluster.start()
    assert time.monotonic() - t0 < 20
    message = str(err.value)
    assert "ceph-osd exited with status" in message
    assert "ceph-osd.0.log (tail)" in message and "192.0.2.1" in message
    assert cluster.mon_proc is not None and not _alive(cluster.mon_proc.pid)
    assert cluster.osd_proc is not None and not _alive(cluster.osd_proc.pid)


def test_a_daemon_that_never_gets_ready_times_out_with_its_log(tmp_path: Path) -> None:
    # The OSD may only bind a port that is taken: it retries (3 x 5 s) and never boots; our wait is shorter.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        ports = {"ms bind port min": port, "ms bind port max": port}
        cluster = CephCluster(tmp_path / "c", extra_conf={"osd": ports}, timeout=5)
        t0 = time.monotonic()
        with pytest.raises(CephClusterError) as err:
            cluster.start()
        assert time.monotonic() - t0 < 15
    message = str(err.value)
    assert "ceph-osd not 'active' after 5 s" in message
    assert "unable to bind" in message  # the OSD's own words, from its log tail
    assert "AdminSocket: request" not in message  # our polling is filtered out of the tails
    assert cluster.osd_proc is not None and not _alive(cluster.osd_proc.pid)


def test_a_taken_monitor_port_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = iter([taken.getsockname()[1]])
        real = ceph_cluster._free_port
        monkeypatch.setattr(ceph_cluster, "_free_port", lambda: next(ports, None) or real())
        cluster = CephCluster(tmp_path / "c")
        try:
            cluster.start()
            assert cluster.mon_port != taken.getsockname()[1]
            assert (
                cluster.timings["mon"] < 5
            )  # the mon gives up on a taken port at once (ms bind retry count)
        finally:
            cluster.stop()


def test_second_cluster_alongside_then_stop_kills_and_removes(ceph: CephCluster, tmp_path: Path) -> None:
    other = CephCluster(tmp_path / "other").start()
    assert other.mon_port != ceph.mon_port
    assert other.mon_proc is not None and other.osd_proc is not None
    pids = [other.mon_proc.pid, other.osd_proc.pid]
    spec = other.create_image("x", 1 << 20)
    assert spec == "rbd/x"
    assert other.startup_s < 30
    other.stop()
    assert not any(_alive(pid) for pid in pids)
    assert not other.base_dir.exists()
    # The session cluster is untouched.
    assert b"x" not in ceph.rbd("ls", ceph.pool).split()


def test_daemons_die_with_their_parent(tmp_path: Path) -> None:
    script = (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from ceph_cluster import CephCluster;"
        "c = CephCluster(sys.argv[2]).start();"
        "print(c.mon_proc.pid, c.osd_proc.pid, flush=True); time.sleep(60)"
    )
    here = str(Path(__file__).parent.parent)   # tests/, where ceph_cluster.py is
    proc = subprocess.Popen(
        [sys.executable, "-c", script, here, str(tmp_path / "c")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)
    shutil.rmtree(tmp_path / "c")
