"""Shared fixtures: an in-process backend on a socket, QEMU's storage daemon as another
backend, one Ceph cluster for the session's RBD tests, and a rebuild of a stale C core."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _rebuild_if_stale() -> None:
    """In a source checkout, rebuild dataplane._core when csrc/ changed since the build
    (DATAPLANE_SKIP_REBUILD=1 keeps the current build)."""
    if os.environ.get("DATAPLANE_SKIP_REBUILD"):
        return
    built = sorted((ROOT / "dataplane").glob("_core*.so"), key=lambda p: p.stat().st_mtime)
    sources = list((ROOT / "csrc").rglob("*.[ch]")) + [ROOT / "dataplane" / "_build.py"]
    newest = max(p.stat().st_mtime for p in sources)
    if not built or built[-1].stat().st_mtime < newest:
        subprocess.run([sys.executable, "-m", "dataplane._build"], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)


_rebuild_if_stale()

from ceph_cluster import CephCluster, RbdImage  # noqa: E402  (tests/ is on sys.path, as for this file)
from serve_process import ServeProcess  # noqa: E402

from dataplane.backend import EnginePool, ServerOptions, VhostUserBlkServer  # noqa: E402
from dataplane.disks import open_disk  # noqa: E402


class RunningBackend:
    """A VhostUserBlkServer serving in a background thread of the test process."""

    def __init__(self, server: VhostUserBlkServer, thread: threading.Thread) -> None:
        self.server = server
        self.thread = thread
        self.socket = str(server.options.socket_path)
        self.disk = server.disk
        self.stopped = False

    @property
    def device(self):
        return self.server.device

    def stop(self) -> None:
        """Stop serving and close the disk (once: a test may stop it before teardown does)."""
        if self.stopped:
            return
        self.stopped = True
        self.server.stop()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "backend did not stop within 30 s"
        self.server.close()
        self.disk.close()


@pytest.fixture
def start_backend(tmp_path: Path) -> Iterator:
    """Factory: start_backend(disk='null:64M', queues=2, read_only=False, cache='none',
    poll_us=0, dirty_log=True, fixed='all', iotlb_check=True, iotlb_timeout_ms=None)."""
    started: list[RunningBackend] = []

    def start(disk: str = "null:64M", queues: int = 2, read_only: bool = False,
              cache: str = "none", serial: str = "dp-test", poll_us: int = 0,
              dirty_log: bool = True, fixed: str = "all", iotlb_check: bool = True,
              iotlb_timeout_ms: int | None = None) -> RunningBackend:
        d = open_disk(disk, read_only=read_only, cache=cache, serial=serial, fixed=fixed)
        sock = tmp_path / f"vhost{len(started)}.sock"
        extra = {} if iotlb_timeout_ms is None else {"iotlb_miss_timeout_ms": iotlb_timeout_ms}
        server = VhostUserBlkServer(d, ServerOptions(socket_path=sock, num_queues=queues,
                                                     dirty_log=dirty_log, iotlb_check=iotlb_check,
                                                     **extra),
                                    EnginePool(poll_ns=poll_us * 1000))
        thread = threading.Thread(target=server.serve_forever, name="vhost-server", daemon=True)
        thread.start()
        backend = RunningBackend(server, thread)
        started.append(backend)
        return backend

    yield start
    for backend in started:
        backend.stop()


@pytest.fixture
def start_qsd_export(tmp_path: Path) -> Iterator:
    """Factory: start_qsd_export(blockdev, queues=2) -> socket path. qemu-storage-daemon with
    the block node `n0` that blockdev (a --blockdev argument) defines, exported writable over
    vhost-user-blk, once it accepts connections (skips when qsd is not installed). Stopped at
    teardown."""
    qsd = shutil.which("qemu-storage-daemon")
    procs: list[subprocess.Popen] = []

    def start(blockdev: str, queues: int = 2) -> Path:
        if qsd is None:
            pytest.skip("qemu-storage-daemon is not installed")
        sock = tmp_path / f"qsd{len(procs)}.sock"
        proc = subprocess.Popen(
            [qsd, "--blockdev", blockdev, "--export",
             f"type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={sock},"
             f"writable=on,num-queues={queues}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(proc)
        # qsd creates the socket file before it listens: wait until a connection succeeds.
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                pytest.fail(f"qemu-storage-daemon exited: {proc.stderr.read().decode()}")
            assert time.monotonic() < deadline, "qemu-storage-daemon never accepted a connection"
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(sock))
                return sock
            except OSError:
                time.sleep(0.01)
            finally:
                probe.close()

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def start_serve(tmp_path: Path) -> Iterator:
    """Factory: start_serve(name, socket, disk, *args) -> ServeProcess (log: tmp_path/name.log);
    killed at teardown if still running."""
    started: list[ServeProcess] = []

    def start(name: str, socket: Path, disk: str, *args: str) -> ServeProcess:
        s = ServeProcess(tmp_path / f"{name}.log", socket, disk, args)
        started.append(s)
        return s

    yield start
    for s in started:
        s.kill()


@pytest.fixture(scope="session", autouse=True)
def runtime_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The backends' runtime records (RBD lock owners) go to a directory of this session,
    not /run/dataplane; subprocesses inherit it through the environment."""
    path = tmp_path_factory.mktemp("runtime")
    old = os.environ.get("DATAPLANE_RUNTIME_DIR")
    os.environ["DATAPLANE_RUNTIME_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("DATAPLANE_RUNTIME_DIR", None)
    else:
        os.environ["DATAPLANE_RUNTIME_DIR"] = old


@pytest.fixture(scope="session")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    """One single-node Ceph cluster (a monitor, a memstore OSD, pool `rbd`) for every RBD test
    of the session, started by the first one (~1.5 s). Tests make images of their own; a test
    that kills the OSD starts a cluster of its own. Missing Ceph packages fail (./dev installs
    them): a skipped RBD suite would be a suite that cannot fail."""
    cluster = CephCluster(tmp_path_factory.mktemp("ceph") / "c").start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def rbd_image(ceph: CephCluster, request: pytest.FixtureRequest):
    """Factory: rbd_image(size=64 MiB, features=None) -> an image of the session cluster, named
    after the test, with the `--disk rbd:...` spec that reaches it (ceph_cluster.RbdImage)."""

    def make(size: int = 64 << 20, features: list[str] | None = None) -> RbdImage:
        return ceph.new_image(request.node.name, size, features=features)

    return make


@pytest.fixture
def disk_file(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(64 << 20)
    return path


def pytest_terminal_summary(terminalreporter) -> None:
    """CI's log shows how much fuzzing ran and whether the C core was sanitized."""
    fuzz = sys.modules.get("tests.fuzz.test_vhost_fuzz") or sys.modules.get("test_vhost_fuzz")
    line = fuzz.campaign_summary() if fuzz is not None else None
    if line:
        terminalreporter.write_line(line)
    if os.environ.get("DATAPLANE_SANITIZE") not in (None, "", "0"):
        terminalreporter.write_line("C core built with AddressSanitizer + UndefinedBehaviorSanitizer")
