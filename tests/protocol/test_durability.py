"""An acknowledged FLUSH is durable, and the socket is guarded as configured.

The durability test kills the backend (SIGKILL, no chance to tidy up) right after the front
end saw its FLUSH complete, then reads the backing file from a fresh open: every write that
completed before the FLUSH must be there, in both cache modes.
"""

from __future__ import annotations

import grp
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from dataplane.driver import Device
from dataplane.protocol import virtio_blk as vb


def start(tmp_path, *args: str) -> tuple[subprocess.Popen, str]:
    sock = tmp_path / "vhost.sock"
    proc = subprocess.Popen([sys.executable, "-m", "dataplane", "serve", "--socket", str(sock), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 15
    while not sock.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return proc, str(sock)


@pytest.mark.parametrize("cache", ["none", "writeback"])
def test_writes_acknowledged_before_a_flush_survive_a_kill(tmp_path, disk_file, cache):
    proc, sock = start(tmp_path, "--disk", str(disk_file), "--queues", "2", "--cache", cache)
    expected = {}
    try:
        dev = Device.connect(sock, queues=2)
        for round_ in range(5):
            reqs = []
            for i in range(16):
                block = round_ * 16 + i
                data = (b"%08d" % block) * 512
                expected[block] = data
                reqs.append(dev.submit(vb.ReqType.OUT, block * 8, data=data, queue=i % 2))
            assert all(s == vb.Status.OK for s, _ in dev.wait(reqs).values())
            for q in range(2):
                dev.flush(queue=q)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        dev.client.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with open(disk_file, "rb") as f:   # a fresh open: what is on the file now
        for block, data in expected.items():
            f.seek(block * 4096)
            assert f.read(4096) == data, f"block {block} lost after an acknowledged flush"


def test_socket_mode_and_group_options(tmp_path):
    group = grp.getgrgid(os.getgid()).gr_name
    proc, sock = start(tmp_path, "--disk", "null:1M", "--socket-mode", "0660", "--socket-group", group)
    try:
        st = os.stat(sock)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == grp.getgrnam(group).gr_gid
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0


def test_unknown_socket_group_is_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dataplane", "serve", "--socket", str(tmp_path / "s.sock"),
                        "--disk", "null:1M", "--socket-group", "no-such-group-xyz"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "no-such-group-xyz" in r.stderr
    assert not (tmp_path / "s.sock").exists()
