"""Recording at the backend (`serve --record`): every request type sent through dataplane's
frontend shows up in the recording with its queue, op, offset, length and status, in both
formats; blkparse reads the blktrace files without complaint and counts what `dataplane stats`
counts; recording starts and stops while queues run; a writer that cannot keep up drops
entries (counted in stats and in the file) and never stalls the I/O.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dataplane.backend import fetch_stats
from dataplane.driver import Device
from dataplane.driver.load import Job
from dataplane.errors import ConfigError, DeviceError
from dataplane.protocol import virtio_blk as vb
from dataplane.protocol.vhost_user import CONFIG_HEADER, Request
from dataplane.replay import open_trace
from dataplane.replay.recording import read_recording

KiB, MiB = 1 << 10, 1 << 20
FORMATS = ["blktrace", "iolog"]
IOS = 60000   # requests of the load the slow writer records


def drive_every_request_type(dev: Device) -> list[tuple]:
    """One of each request the frontend can send, on two queues; returns what the recording
    must hold: (queue, op, offset, length, status, fua), in order per queue."""
    want = []
    dev.write(1 * MiB, b"w" * 8 * KiB)
    want.append((0, "write", 1 * MiB, 8 * KiB, "ok", False))
    assert dev.read(1 * MiB, 4 * KiB, queue=1) == b"w" * 4 * KiB
    want.append((1, "read", 1 * MiB, 4 * KiB, "ok", False))
    dev.read(2 * MiB, 64 * KiB)
    want.append((0, "read", 2 * MiB, 64 * KiB, "ok", False))
    dev.flush(queue=1)
    want.append((1, "flush", 0, 0, "ok", False))
    dev.discard(4 * MiB, 1 * MiB)
    want.append((0, "discard", 4 * MiB, 1 * MiB, "ok", False))
    # Two ranges in one request: the first's offset, the bytes of both.
    assert dev._ranges(vb.ReqType.DISCARD, [(8 * MiB, 64 * KiB), (9 * MiB, 128 * KiB)], False, 0) == 0
    want.append((0, "discard", 8 * MiB, 192 * KiB, "ok", False))
    dev.write_zeroes(12 * MiB, 256 * KiB, queue=1)
    want.append((1, "write-zeroes", 12 * MiB, 256 * KiB, "ok", False))
    dev.write_zeroes(13 * MiB, 64 * KiB, unmap=True)
    want.append((0, "write-zeroes", 13 * MiB, 64 * KiB, "ok", False))
    assert dev._ranges(vb.ReqType.DISCARD, [(0, 4 * KiB)], True, 1) == vb.Status.UNSUPP
    want.append((1, "discard", 0, 4 * KiB, "unsupp", False))
    with pytest.raises(DeviceError, match="IOERR"):
        dev.read(64 * MiB - 4 * KiB, 8 * KiB)                      # runs past the end
    want.append((0, "read", 64 * MiB - 4 * KiB, 8 * KiB, "ioerr", False))
    assert dev.get_id() == b"dp-test"                               # not block I/O: not recorded
    assert dev._run(99, read_len=512)[0] == vb.Status.UNSUPP        # unknown type: not recorded
    # Write-through (the guest turned its write cache off): the write is FUA.
    off = vb.CONFIG_WRITEBACK_OFFSET
    dev.client.call(Request.SET_CONFIG, CONFIG_HEADER.pack(off, 1, 0) + b"\0")
    dev.write(20 * MiB, b"f" * 4 * KiB, queue=1)
    want.append((1, "write", 20 * MiB, 4 * KiB, "ok", True))
    dev.client.call(Request.SET_CONFIG, CONFIG_HEADER.pack(off, 1, 0) + b"\1")
    return want


def blkparse_totals(prefix: Path, piped: bool = False) -> tuple[dict[str, int], str]:
    """blkparse -i PREFIX (piped: `blkparse -i - < PREFIX.blktrace.0`, the mode in which it
    checks sequence numbers and counts gaps as skips): its Total block's counts, and what it
    complained about (must be nothing)."""
    if piped:
        with open(prefix.with_name(prefix.name + ".blktrace.0"), "rb") as f:
            proc = subprocess.run(["blkparse", "-i", "-"], stdin=f, capture_output=True, text=True,
                                  timeout=60)
    else:
        proc = subprocess.run(["blkparse", "-i", str(prefix)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    total = proc.stdout[proc.stdout.rindex("Total ("):] if "Total (" in proc.stdout else \
        proc.stdout[proc.stdout.rindex("CPU"):]
    counts = {}
    for what in ("Reads Queued", "Writes Queued", "Reads Completed", "Writes Completed"):
        m = re.search(rf"{what}:\s+([\d,]+),\s+([\d,]+)([KMG])iB", total)
        assert m, f"no {what} in blkparse's output:\n{proc.stdout[-2000:]}"
        counts[what] = int(m.group(1).replace(",", ""))
        counts[what + " KiB"] = int(m.group(2).replace(",", "")) << {"K": 0, "M": 10, "G": 20}[m.group(3)]
    m = re.search(r"Skips: ([\d,]+) forward \(([\d,]+)", proc.stdout)
    assert m, proc.stdout[-500:]
    counts["skips"] = int(m.group(2).replace(",", ""))
    events = re.search(r"Events \(.*\): ([\d,]+) entries", proc.stdout)
    counts["events"] = int(events.group(1).replace(",", ""))
    return counts, proc.stderr + "".join(line + "\n" for line in proc.stdout.splitlines()
                                         if "Unknown" in line or "skipping" in line)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_request_type_is_recorded(start_backend, disk_file, tmp_path: Path, fmt: str) -> None:
    backend = start_backend(str(disk_file), queues=2)
    record = tmp_path / "rec"
    info = backend.server.call_in_loop(lambda: backend.server.start_recording(record, fmt))
    assert info["format"] == fmt
    t0 = time.monotonic_ns()
    with Device.connect(backend.socket, queues=2) as dev:
        want = drive_every_request_type(dev)
    elapsed = time.monotonic_ns() - t0
    stats = fetch_stats(backend.socket)
    summary = backend.server.call_in_loop(backend.server.stop_recording)
    assert summary["error"] is None and summary["dropped"] == 0
    assert summary["requests"] == len(want)

    got = read_recording(record, fmt)
    assert got.dropped == 0
    for q in (0, 1):
        rows = got.by_queue(q)
        assert [(r.queue, r.op, r.offset, r.length, r.status) for r in rows] == \
            [w[:5] for w in want if w[0] == q], f"queue {q}"
        if fmt == "blktrace":   # the iolog has no FUA column
            assert [r.fua for r in rows] == [w[5] for w in want if w[0] == q]
        for r in rows:
            assert r.submit_ns is not None and r.complete_ns is not None
            assert 0 <= r.submit_ns <= r.complete_ns <= r.submit_ns + elapsed, r
        submits = [r.submit_ns for r in rows]
        assert submits == sorted(submits)

    # What the stats say was served is what the recording holds: GET_ID and the unknown type
    # are the only requests it leaves out.
    served = {k: sum(q[k] for q in stats["queues"]) for k in
              ("requests", "reads", "writes", "flushes", "discards", "write_zeroes", "get_ids",
               "unsupported", "recorded", "record_dropped")}
    assert served["recorded"] == len(want) == served["requests"] - served["get_ids"] - served["unsupported"]
    assert served["record_dropped"] == 0
    count = {op: sum(1 for w in want if w[1] == op) for op in ("read", "write", "flush", "discard",
                                                               "write-zeroes")}
    assert (served["reads"], served["writes"], served["flushes"], served["discards"],
            served["write_zeroes"]) == tuple(count.values())

    # The replay readers take the recording as it is (write-zeroes replays as a write).
    records = open_trace(record if fmt == "iolog" else record.with_name("rec.blktrace.0")).read_all()
    assert len(records) == len(want)

    if fmt == "blktrace":
        assert shutil.which("blkparse"), "blkparse missing (Debian package blktrace)"
        counts, complaints = blkparse_totals(record)
        assert not complaints.strip(), complaints
        # blkparse's directions are the kernel's: a flush is a read without data; discards and
        # write-zeroes are writes.
        reads = served["reads"] + served["flushes"]
        writes = served["writes"] + served["discards"] + served["write_zeroes"]
        assert counts["Reads Queued"] == counts["Reads Completed"] == reads
        assert counts["Writes Queued"] == counts["Writes Completed"] == writes
        assert counts["events"] == 2 * len(want) and counts["skips"] == 0
        assert counts["Reads Queued KiB"] == sum(w[3] for w in want if w[1] == "read") // KiB
        assert counts["Writes Queued KiB"] == sum(w[3] for w in want if w[1] in
                                                  ("write", "discard", "write-zeroes")) // KiB


def test_recording_starts_and_stops_while_queues_run(start_backend, tmp_path: Path) -> None:
    """Start and stop under load (twice, both formats): the I/O never fails, every file is
    whole, blkparse takes it, and the stats add the recordings up."""
    backend = start_backend("null:64M", queues=2)
    server = backend.server
    job = Job(rw="randread", bs=4096, iodepth=16, runtime=3.0, rate_iops=20000)
    result: dict = {}
    with Device.connect(backend.socket, queues=2, queue_size=job.queue_size(False),
                        memory=job.memory_needed(2)) as dev:
        worker = threading.Thread(target=lambda: result.setdefault("load", dev.load(job, queues=[0, 1])))
        worker.start()
        summaries = []
        for i, fmt in enumerate(("blktrace", "iolog")):
            time.sleep(0.5)
            server.call_in_loop(lambda fmt=fmt, i=i: server.start_recording(tmp_path / f"rec{i}", fmt))
            time.sleep(0.5)
            summaries.append(server.call_in_loop(server.stop_recording))
        worker.join(30)
        assert not worker.is_alive()
    load = result["load"]
    assert not load.error and not load.io_errors and sum(q.ios(0) for q in load.queues) > 0
    for s in summaries:
        assert s["error"] is None and s["requests"] > 100, s
    blk = read_recording(tmp_path / "rec0", "blktrace")
    iol = read_recording(tmp_path / "rec1", "iolog")
    for contents, s in ((blk, summaries[0]), (iol, summaries[1])):
        done = [r for r in contents.requests if r.complete_ns is not None]
        # Requests in flight at the start have no Q (iolog: no line), those at the stop no C.
        assert abs(len(done) - s["requests"]) <= 2 * 16 and all(r.op == "read" and r.length == 4096
                                                                for r in contents.requests)
    counts, complaints = blkparse_totals(tmp_path / "rec0")
    assert not complaints.strip(), complaints
    assert counts["Reads Completed"] == summaries[0]["requests"]
    stats = fetch_stats(backend.socket)
    assert sum(q["recorded"] for q in stats["queues"]) == sum(s["requests"] for s in summaries)
    assert stats["recording"] is None
    with pytest.raises(ConfigError, match="not recording"):
        server.call_in_loop(server.stop_recording)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_writer_that_cannot_keep_up_drops_and_counts(start_backend, tmp_path: Path, fmt: str) -> None:
    """The output is a pipe nobody reads (until the end): the writer fills it, stops taking
    entries, the small ring fills and entries are dropped; the I/O goes on at full speed. The
    drops are in the stats and in the file (blkparse counts them as skips), and what was
    written plus what was dropped is everything."""
    backend = start_backend("null:64M", queues=1)
    server = backend.server
    record = tmp_path / "slow"
    fifo = record.with_name("slow.blktrace.0") if fmt == "blktrace" else record
    os.mkfifo(fifo)
    reader_fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)   # opened, never read (yet)
    try:
        server.call_in_loop(lambda: server.start_recording(record, fmt, ring_entries=4096, hold_lines=4096))
        job = Job(rw="randread", bs=4096, iodepth=16, runtime=0, number_ios=IOS)
        with Device.connect(backend.socket, queues=1, queue_size=job.queue_size(False),
                            memory=job.memory_needed(1)) as dev:
            t0 = time.monotonic()
            load = dev.load(job)
            elapsed = time.monotonic() - t0
        assert not load.error and not load.io_errors and load.queues[0].ios(0) == IOS
        assert elapsed < 20, f"the I/O stalled behind the recording ({elapsed:.1f} s)"
        stats = fetch_stats(backend.socket)["queues"][0]
        assert stats["record_dropped"] > 0, stats
        # Now read the pipe, slowly still (so the writer's last lines wait for room too), and
        # the writer can finish; the file holds a message per gap.
        chunks: list[bytes] = []

        def drain() -> None:
            os.set_blocking(reader_fd, True)
            while True:
                data = os.read(reader_fd, 1 << 14)
                if not data:
                    return
                chunks.append(data)
                time.sleep(0.002)

        reader = threading.Thread(target=drain)
        reader.start()
        summary = server.call_in_loop(server.stop_recording)
        reader.join(30)
    finally:
        os.close(reader_fd)
    assert summary["error"] is None, summary
    assert summary["dropped"] == stats["record_dropped"] > 0
    copy = tmp_path / ("copy.blktrace.0" if fmt == "blktrace" else "copy")
    copy.write_bytes(b"".join(chunks))
    got = read_recording(tmp_path / "copy", fmt)
    assert got.dropped == summary["dropped"]
    # Every entry (a Q and a C per request) was either written or dropped, and every completion
    # the writer took is in the file.
    assert summary["queues"][0]["written"] + summary["dropped"] == 2 * IOS
    assert sum(1 for r in got.requests if r.complete_ns is not None) == summary["requests"] < IOS
    if fmt == "iolog":
        return
    assert got.messages
    counts, complaints = blkparse_totals(tmp_path / "copy", piped=True)
    # blkparse sees the gaps itself (all but one after the last event, which only the message tells).
    assert counts["skips"] == summary["dropped"] - got.dropped_at_end


def test_a_failing_output_is_reported_and_the_io_goes_on(start_backend, tmp_path: Path) -> None:
    backend = start_backend("null:64M", queues=1)
    server = backend.server
    server.call_in_loop(lambda: server.start_recording("/dev/full", "iolog"))
    with Device.connect(backend.socket, queues=1) as dev:
        for i in range(200):
            dev.write(i * 4096, b"x" * 4096)
    summary = server.call_in_loop(server.stop_recording)
    assert summary["error"] and "space" in summary["error"], summary
    assert summary["requests"] == 200


def test_bad_recording_requests_are_one_clear_error(start_backend, tmp_path: Path) -> None:
    backend = start_backend("null:64M", queues=1)
    server = backend.server
    with pytest.raises(ConfigError, match="cannot record to .*No such file"):
        server.call_in_loop(lambda: server.start_recording(tmp_path / "no" / "such" / "dir", "iolog"))
    with pytest.raises(ConfigError, match="format must be one of"):
        server.call_in_loop(lambda: server.start_recording(tmp_path / "x", "csv"))
    with pytest.raises(ConfigError, match="power of two"):
        server.call_in_loop(lambda: server.start_recording(tmp_path / "x", "iolog", ring_entries=100))
    server.call_in_loop(lambda: server.start_recording(tmp_path / "x", "iolog"))
    with pytest.raises(ConfigError, match="already recording"):
        server.call_in_loop(lambda: server.start_recording(tmp_path / "y", "iolog"))
    server.call_in_loop(server.stop_recording)


def test_serve_record_flag_and_stats(tmp_path: Path) -> None:
    """`dataplane serve --record FILE --record-format iolog`: the file is complete after
    SIGTERM, and `dataplane stats` shows the recording."""
    sock = tmp_path / "s.sock"
    record = tmp_path / "served.iolog"
    proc = subprocess.Popen([sys.executable, "-m", "dataplane", "serve", "--socket", str(sock),
                             "--disk", "null:16M", "--queues", "1", "--record", str(record),
                             "--record-format", "iolog"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        with Device.connect(str(sock)) as dev:
            for i in range(10):
                dev.write(i * 4096, b"y" * 4096)
        stats = fetch_stats(str(sock))
        assert stats["queues"][0]["recorded"] == 10 and stats["recording"]["files"] == [str(record)]
        table = subprocess.run([sys.executable, "-m", "dataplane", "stats", "--socket", str(sock)],
                               capture_output=True, text=True, check=True).stdout
        assert f"recording to {record} (iolog): 10 requests, 0 entries dropped" in table
    finally:
        proc.terminate()
        out, _ = proc.communicate(20)
    assert proc.returncode == 0, out
    got = read_recording(record, "iolog")
    assert [(r.op, r.offset, r.length, r.status) for r in got.requests] == \
        [("write", i * 4096, 4096, "ok") for i in range(10)]
    assert "recorded 10 request(s)" in out


def test_metrics_expose_the_recording_counters(start_backend, tmp_path: Path) -> None:
    from dataplane.observe.prometheus import exposition

    backend = start_backend("null:16M", queues=1)
    server = backend.server
    server.call_in_loop(lambda: server.start_recording(tmp_path / "m", "iolog"))
    with Device.connect(backend.socket) as dev:
        dev.read(0, 4096)
    body, _ = server.call_in_loop(lambda: exposition(server.snapshot))
    assert re.search(rb'dataplane_recorded_total\{export="",queue="0",thread="dp-vq0"\} 1\.0', body), body
    assert b"dataplane_record_dropped_total" in body
    server.call_in_loop(server.stop_recording)


def test_config_file_record_keys(tmp_path: Path) -> None:
    from dataplane.config import load_config, merge

    cfg = tmp_path / "serve.toml"
    cfg.write_text('disk = "null:1M"\nsocket = "s.sock"\nrecord = "out/trace"\nrecord-format = "iolog"\n')
    config = merge(load_config(cfg), {})
    assert config.record == tmp_path / "out" / "trace" and config.record_format == "iolog"
    cfg.write_text('disk = "null:1M"\nsocket = "s.sock"\nrecord_format = "csv"\n')
    with pytest.raises(ConfigError, match="record_format: expected blktrace or iolog"):
        merge(load_config(cfg), {})
