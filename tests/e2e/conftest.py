"""Fixtures for the end-to-end tests: the cached QEMU guest image and a `dataplane serve`
subprocess (parametrized over disk kind and queue count; an RBD disk is an image of the
session's Ceph cluster, tests/conftest.py's `ceph`)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from ceph_cluster import RbdImage

from dataplane.guest import GuestImage, build_guest

DISK_SIZE = 256 << 20
SECTOR = 512
START_TIMEOUT = 20.0      # seconds for `dataplane serve` to listen
SHUTDOWN_TIMEOUT = 15.0   # seconds for SIGTERM -> exit 0

_STOP_RE = re.compile(
    r"vq(?P<index>\d+) stopped at avail_idx (?P<avail_idx>\d+): (?P<requests>\d+) requests "
    r"\((?P<reads>\d+) reads, (?P<writes>\d+) writes, (?P<flushes>\d+) flushes, "
    r"(?P<discards>\d+) discards, (?P<write_zeroes>\d+) write-zeroes\), (?P<errors>\d+) errors"
    r"(?P<broken>, ring broken)?"
)


@dataclass(frozen=True)
class QueueStop:
    """One `vqN stopped at ...` log line (the counters are cumulative per connection)."""

    index: int
    avail_idx: int
    requests: int
    reads: int
    writes: int
    flushes: int
    discards: int
    write_zeroes: int
    errors: int
    broken: bool
    line: str


def parse_stop_lines(log: str) -> list[QueueStop]:
    stops = []
    for line in log.splitlines():
        m = _STOP_RE.search(line)
        if m:
            fields = {k: int(v) for k, v in m.groupdict().items() if k != "broken"}
            stops.append(QueueStop(broken=m.group("broken") is not None, line=line, **fields))
    return stops


@dataclass
class Backend:
    """A running `dataplane serve` process."""

    process: subprocess.Popen[bytes]
    log_path: Path
    socket: Path
    kind: str                 # "file", "null" or "rbd"
    disk_spec: str            # what --disk got
    disk_path: Path | None    # the backing file (file disks only)
    disk_size: int
    queues: int
    rbd: RbdImage | None = None   # the image (rbd disks only)

    def disk_bytes(self) -> bytes:
        """The whole disk as the host sees it: the backing file, or the image by `rbd export`."""
        if self.rbd is not None:
            return self.rbd.export()
        assert self.disk_path is not None, f"a {self.kind} disk has no content to read"
        return self.disk_path.read_bytes()

    @property
    def pid(self) -> int:
        return self.process.pid

    def read_log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.read_log().splitlines()[-lines:])

    def wait_for_log(self, text: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if text in self.read_log():
                return True
            if time.monotonic() > deadline or self.process.poll() is not None:
                return text in self.read_log()
            time.sleep(0.05)

    def thread_names(self) -> list[str]:
        """The comm of every thread of the backend process (from /proc/PID/task/*/comm)."""
        names = []
        for task in sorted(Path(f"/proc/{self.pid}/task").iterdir()):
            try:
                names.append((task / "comm").read_text().strip())
            except (FileNotFoundError, ProcessLookupError):
                continue   # the thread exited while we listed
        return names

    def queue_stops(self) -> list[QueueStop]:
        return parse_stop_lines(self.read_log())

    def final_queue_stats(self) -> dict[int, QueueStop]:
        """The last stop line of each queue: its cumulative counters for the connection."""
        return {stop.index: stop for stop in self.queue_stops()}


BACKEND_PARAMS = [
    pytest.param(("file", 1), id="file-q1"),
    pytest.param(("file", 2), id="file-q2"),
    pytest.param(("null", 1), id="null-q1"),
    pytest.param(("null", 2), id="null-q2"),
]


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    return build_guest()


def _stop_backend(backend: Backend) -> None:
    """SIGTERM, then insist on exit status 0 and a final `exited cleanly` line."""
    proc = backend.process
    if proc.poll() is not None:
        pytest.fail(f"dataplane serve died during the test (exit status {proc.returncode});"
                    f" log:\n{backend.log_tail()}")
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(SHUTDOWN_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"dataplane serve did not exit within {SHUTDOWN_TIMEOUT}s of SIGTERM"
                    f" (killed); log:\n{backend.log_tail()}")
    log = backend.read_log()
    assert rc == 0, f"dataplane serve exited with status {rc}; log:\n{backend.log_tail()}"
    lines = [line for line in log.splitlines() if line.strip()]
    assert lines and lines[-1].endswith("exited cleanly"), (
        f"log does not end with 'exited cleanly':\n{backend.log_tail()}")
    bad = [line for line in lines if " ERROR " in line or " CRITICAL " in line
           or "Traceback" in line or ", ring broken" in line]
    assert not bad, "backend logged errors:\n" + "\n".join(bad)
    assert not backend.socket.exists(), f"socket {backend.socket} left behind after exit"


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """`dataplane serve` on a socket in tmp_path; param: (disk kind, queue count)."""
    kind, queues = request.param
    sock = tmp_path / "vub.sock"
    log_path = tmp_path / "serve.log"
    disk_path: Path | None = None
    rbd = None
    if kind == "file":
        disk_path = tmp_path / "disk.img"
        subprocess.run(["truncate", "-s", str(DISK_SIZE), str(disk_path)], check=True)
        disk_spec = str(disk_path)
    elif kind == "rbd":
        rbd = request.getfixturevalue("ceph").new_image(request.node.name, DISK_SIZE)
        disk_spec = rbd.disk()
    else:
        disk_spec = f"null:{DISK_SIZE >> 20}M"
    cmd = [sys.executable, "-m", "dataplane", "serve", "--socket", str(sock),
           "--disk", disk_spec, "--queues", str(queues)]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
    backend = Backend(proc, log_path, sock, kind, disk_spec, disk_path, DISK_SIZE, queues, rbd)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        # The socket is bound before listen(); the "listening on" line comes after listen().
        while not (sock.exists() and "listening on" in backend.read_log()):
            if proc.poll() is not None:
                pytest.fail(f"{' '.join(cmd)} exited with {proc.returncode} before listening:"
                            f"\n{backend.read_log()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{sock} did not appear within {START_TIMEOUT}s:"
                            f"\n{backend.read_log()}")
            time.sleep(0.05)
    except BaseException:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    yield backend
    _stop_backend(backend)


@pytest.fixture(scope="session")
def libvirtd(tmp_path_factory: pytest.TempPathFactory):
    """One private libvirtd (system mode, QEMU as libvirt-qemu) for the whole run; skipped,
    with the reason, only where it cannot start (not root, libvirt not installed, no mount
    namespace). At the end no test may have left a domain defined."""
    from libvirt_daemon import LibvirtDaemon, LibvirtUnavailable

    daemon = LibvirtDaemon(tmp_path_factory.mktemp("libvirtd"))
    try:
        daemon.start()
    except LibvirtUnavailable as exc:
        pytest.skip(f"libvirtd cannot run here: {exc}")
    yield daemon
    left = daemon.domains()
    daemon.stop()
    assert not left, f"domains left defined by a test: {left}"
