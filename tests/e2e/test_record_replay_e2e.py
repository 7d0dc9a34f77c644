"""End-to-end: the recording round trip. A QEMU guest runs fio (sequential 128k writes, random
4k writes, random 16k reads, an fsync at the end) against `dataplane serve --record`; then
`dataplane replay` plays that recording against a second backend (itself recording, in the
other format), which must see the same number of requests of the same sizes and ops.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from serve_process import ServeProcess

from dataplane.guest import GuestImage, GuestTimeout, run_guest
from dataplane.replay.recording import read_recording

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]

ROOT = Path(__file__).resolve().parent.parent.parent
DISK_SIZE = 256 << 20
GUEST_SCRIPT = """
set -e
fio --ioengine=libaio --direct=1 --filename=/dev/vda --group_reporting --end_fsync=1 \\
    --name=seq --rw=write --bs=128k --offset=0 --size=16m --iodepth=4 \\
    --name=rand --rw=randwrite --bs=4k --offset=32m --size=32m --number_ios=600 --iodepth=8 \\
    --name=reads --rw=randread --bs=16k --offset=64m --size=64m --number_ios=300 --iodepth=4 \\
    > /tmp/fio.out 2>&1 || { tail -n 30 /tmp/fio.out; exit 1; }
grep -E 'issued rwts' /tmp/fio.out | sed 's/^ */DP-FIO /'
"""


def shape(requests) -> Counter:
    """(op, length) of each request; write-zeroes replay as writes of the same size."""
    return Counter(("write" if r.op == "write-zeroes" else r.op, r.length) for r in requests)


def test_a_recorded_guest_run_replays_as_the_same_requests(guest_image: GuestImage, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"")
    with open(disk, "r+b") as f:
        f.truncate(DISK_SIZE)
    first = ServeProcess(tmp_path / "serve-a.log", tmp_path / "a.sock", str(disk),
                         ["--queues", "2", "--record", str(tmp_path / "guest")])
    try:
        try:
            result = run_guest(guest_image, GUEST_SCRIPT, socket=first.socket, num_queues=2,
                               timeout=240, log_path=tmp_path / "console.log")
        except GuestTimeout as exc:
            pytest.fail(f"{exc}\n--- backend log ---\n{first.log()[-3000:]}")
        assert result.exit_status == 0, result.output[-3000:]
        assert first.wait_log("front end disconnected", 15), first.log()[-2000:]
    finally:
        assert first.terminate() == 0, first.log()[-2000:]
    assert "recorded" in first.log() and "dropped" not in first.log(), first.log()[-2000:]
    recorded = read_recording(tmp_path / "guest", "blktrace")
    assert recorded.dropped == 0
    ops = Counter(r.op for r in recorded.requests)
    assert ops["write"] >= 600 + 128 and ops["read"] >= 300 and ops["flush"] >= 1, ops
    assert {r.queue for r in recorded.requests} == {0, 1}, "the guest used one queue only"
    assert all(r.status == "ok" and r.complete_ns is not None for r in recorded.requests)

    second = ServeProcess(tmp_path / "serve-b.log", tmp_path / "b.sock", f"null:{DISK_SIZE >> 20}M",
                          ["--queues", "2", "--record", str(tmp_path / "replayed.iolog"),
                           "--record-format", "iolog"])
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "dataplane", "replay", str(tmp_path / "guest"), "--socket",
             str(second.socket), "--queues", "2", "--mode", "afap", "--output-format", "json",
             "--output", str(tmp_path / "replay.json")],
            capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert proc.returncode == 0, proc.stderr
    finally:
        assert second.terminate() == 0, second.log()[-2000:]
    report = json.loads((tmp_path / "replay.json").read_text())
    issued = sum(job[d]["total_ios"] for job in report["jobs"] for d in ("read", "write", "trim"))
    flushes = sum(job.get("sync", {}).get("total_ios", 0) for job in report["jobs"])
    assert issued + flushes == len(recorded.requests), report["jobs"][0].keys()

    replayed = read_recording(tmp_path / "replayed.iolog", "iolog")
    assert replayed.dropped == 0
    assert len(replayed.requests) == len(recorded.requests)
    assert shape(replayed.requests) == shape(recorded.requests)
    # Each queue replays its own requests (--queue-map trace: the blktrace file is the stream).
    for q in (0, 1):
        assert shape(replayed.by_queue(q)) == shape(recorded.by_queue(q)), f"queue {q}"
