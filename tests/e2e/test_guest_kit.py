"""Smoke tests for the QEMU test-guest kit (dataplane.guest).

Boots the cached guest once without a disk and once with a vhost-user-blk disk served by
QEMU's own qemu-storage-daemon, so guest-kit problems are told apart from backend bugs. The
second boot also traces /dev/vda with the guest's blktrace and carries the trace out on the
scratch disk.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dataplane.guest import (
    BLKTRACE_START,
    BLKTRACE_STOP,
    GuestImage,
    build_guest,
    make_scratch,
    read_scratch,
    run_guest,
)
from dataplane.replay import Op, open_trace

pytestmark = pytest.mark.e2e

SECTOR = 512
MARKER_SECTOR = 2048


@pytest.fixture(scope="module")
def image() -> GuestImage:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    return build_guest()


def _supports_o_direct(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


@pytest.fixture
def qsd_socket(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A 64 MiB raw image exported over vhost-user-blk (2 queues) by qemu-storage-daemon."""
    if shutil.which("qemu-storage-daemon") is None:
        pytest.skip("qemu-storage-daemon is not installed (apt-get install qemu-storage-daemon)")
    img = tmp_path / "disk.img"
    sock = tmp_path / "vub.sock"
    with open(img, "wb") as fh:
        fh.truncate(64 << 20)
    direct = "on" if _supports_o_direct(img) else "off"
    cmd = [
        "qemu-storage-daemon",
        "--blockdev", f"driver=file,filename={img},node-name=disk,cache.direct={direct}",
        "--export", (
            "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix"
            f",addr.path={sock},writable=on,num-queues=2"
        ),
    ]  # fmt: skip
    daemon = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            if daemon.poll() is not None or time.monotonic() > deadline:
                out = daemon.stdout.read().decode(errors="replace") if daemon.stdout else ""
                pytest.fail(f"qemu-storage-daemon did not create {sock}: {out}")
            time.sleep(0.05)
        yield img, sock
    finally:
        daemon.terminate()
        try:
            daemon.wait(5)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


def test_guest_boots_without_disk(image: GuestImage, tmp_path: Path) -> None:
    script = """
set -e
echo "DP-UNAME $(uname -r)"
v=$(fio --version); echo "DP-FIO $v"
v=$(mkfs.ext4 -V 2>&1); echo "DP-MKFS $v" | head -n 1
echo DP-DONE
"""
    result = run_guest(image, script, socket=None, timeout=120, log_path=tmp_path / "console.log")
    assert result.exit_status == 0, result.output
    assert result.markers("DP-UNAME") == [f"DP-UNAME {image.kernel_version}"], result.output
    assert result.markers("DP-FIO")[0].startswith("DP-FIO fio-"), result.output
    assert "mke2fs" in result.markers("DP-MKFS")[0], result.output
    assert result.markers("DP-DONE") == ["DP-DONE"]
    assert not result.markers("DP-GUEST-WARN"), result.output


def test_guest_writes_through_vhost_user_blk(
    image: GuestImage, qsd_socket: tuple[Path, Path], tmp_path: Path
) -> None:
    img, sock = qsd_socket
    marker = f"DP-DISK-MARKER-{uuid.uuid4().hex}"
    scratch = make_scratch(tmp_path / "scratch.img")
    script = f"""
set -e
test -d /sys/block/vda/mq/0
test -d /sys/block/vda/mq/1
test ! -e /sys/block/vda/mq/2
echo "DP-MQ $(ls /sys/block/vda/mq | tr '\\n' ' ')"
printf '%s' '{marker}' > /tmp/marker
{BLKTRACE_START}
dd if=/tmp/marker of=/dev/vda bs={SECTOR} seek={MARKER_SECTOR} count=1 conv=sync oflag=direct
sync   # busybox dd writes through the page cache: the write leaves the guest here
{BLKTRACE_STOP}
echo DP-WROTE
"""
    result = run_guest(
        image, script, socket=sock, num_queues=2, timeout=120, log_path=tmp_path / "console.log",
        scratch=scratch,
    )
    assert result.exit_status == 0, result.output
    assert result.markers("DP-MQ") == ["DP-MQ 0 1"], result.output
    assert result.markers("DP-WROTE") == ["DP-WROTE"], result.output
    assert not result.markers("DP-GUEST-WARN"), result.output
    # The guest's block layer saw the write: a Q event of the page that holds the marker.
    files = read_scratch(scratch)
    assert "vda.blktrace.0" in files, sorted(files)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    writes = [r for r in open_trace(tmp_path / "vda.blktrace.0").read_all() if r["op"] == Op.WRITE]
    at = MARKER_SECTOR * SECTOR
    assert any(r["offset"] <= at < r["offset"] + r["length"] for r in writes), (writes, result.output)
    with open(img, "rb") as fh:
        fh.seek(MARKER_SECTOR * SECTOR)
        block = fh.read(SECTOR)
    assert block == marker.encode().ljust(SECTOR, b"\0")
