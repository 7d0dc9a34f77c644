"""`dataplane serve` as a user runs it: errors, signals, threads, socket permissions."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dataplane.driver import Device
from dataplane.protocol import virtio_blk as vb


def serve(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dataplane", "serve", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_socket(path: Path, proc: subprocess.Popen, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "socket never appeared"
        time.sleep(0.02)


def wait_listening(path: Path, proc: subprocess.Popen, timeout: float = 10) -> None:
    """Until a connection to path succeeds: a stale socket file refuses them."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "nobody ever listened on the socket"
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
            return
        except OSError:
            time.sleep(0.02)
        finally:
            probe.close()


def thread_names(pid: int) -> list[str]:
    names = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except FileNotFoundError:
            pass
    return sorted(names)


@pytest.mark.parametrize("args, message", [
    (["--disk", "/nonexistent/disk.img"], "does not exist"),
    (["--disk", "null:12x"], "bad size"),
    (["--disk", "null:0"], "at least 512"),
    (["--disk", "null:1G", "--serial", "x" * 21], "at most 20 bytes"),
])
def test_bad_disk_is_one_line_and_exit_2(tmp_path, args, message):
    proc = serve("--socket", str(tmp_path / "s.sock"), *args)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


def test_socket_in_use_is_exit_2_and_stale_socket_is_replaced(tmp_path):
    sock = tmp_path / "s.sock"
    first = serve("--socket", str(sock), "--disk", "null:16M", "--queues", "1")
    try:
        wait_socket(sock, first)
        second = serve("--socket", str(sock), "--disk", "null:16M")
        _, err = second.communicate(timeout=30)
        assert second.returncode == 2 and "in use" in err and len(err.strip().splitlines()) == 1
    finally:
        first.kill()   # SIGKILL leaves a stale socket file behind
        first.communicate()
    assert sock.exists()
    third = serve("--socket", str(sock), "--disk", "null:16M", "--queues", "1")
    try:
        wait_listening(sock, third)   # the stale file is there from the start
        time.sleep(0.3)
        assert third.poll() is None
    finally:
        third.send_signal(signal.SIGINT)
        assert third.wait(timeout=30) == 0


def test_sigterm_drains_and_exits_0_with_threads_per_queue(tmp_path, disk_file):
    sock = tmp_path / "s.sock"
    proc = serve("--socket", str(sock), "--disk", str(disk_file), "--queues", "2")
    try:
        _sigterm_while_serving(proc, sock, disk_file)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _sigterm_while_serving(proc: subprocess.Popen, sock: Path, disk_file: Path) -> None:
    wait_socket(sock, proc)
    mode = stat.S_IMODE(os.stat(sock).st_mode)
    assert mode == 0o600, oct(mode)
    dev = Device.connect(str(sock), queues=2)
    try:
        for q in range(2):
            dev.write(q * 4096, bytes([q + 1]) * 4096, queue=q)
        names = thread_names(proc.pid)
        assert names.count("dp-vq0") == 1 and names.count("dp-vq1") == 1, names
        # Requests the backend has popped are completed before it exits. (On this fast
        # disk most finish before the signal lands; a slow disk keeps them in flight.)
        reqs = [dev.submit(vb.ReqType.OUT, 64 + i * 8, data=b"\x77" * 4096, queue=i % 2)
                for i in range(32)]
        time.sleep(0.05)   # let both queue threads pop them
        proc.send_signal(signal.SIGTERM)
        results = dev.wait(reqs, timeout=20)
        assert all(s == vb.Status.OK for s, _ in results.values())
    finally:
        dev.client.close()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "exited cleanly" in err
    assert "front end connected" in err
    assert "vq0 started" in err and "vq1 started" in err
    assert "vq0 stopped" in err and "vq1 stopped" in err
    assert not sock.exists()
    data = disk_file.read_bytes()
    assert data[:4096] == b"\1" * 4096 and data[4096:8192] == b"\2" * 4096
    assert data[64 * 512: 64 * 512 + 32 * 4096] == b"\x77" * (32 * 4096)


def test_a_socket_path_too_long_for_sockaddr_un_is_one_line(tmp_path):
    long_dir = tmp_path / ("d" * 60) / ("e" * 40)
    long_dir.mkdir(parents=True)
    proc = serve("--socket", str(long_dir / "vm.sock"), "--disk", "null:1M")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and len(err.strip().splitlines()) == 1, err
    assert "bytes long; a UNIX socket path may have at most 107" in err
