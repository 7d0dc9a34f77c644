"""Trace replay (`dataplane replay`, csrc/driver/replay.c) against real backends over a socket, and
`--native` against a file.

Every sample trace replays against this backend; timed replay keeps a trace's gaps; AFAP keeps
trace order within a stream (a read after a write of the same block sees the write); streams,
offset hashes and round robin land on the expected virtqueues (the backend's own per-queue
counters); offsets are wrapped, scaled or refused; malformed traces stop or are skipped; the
JSON report reads back through fio-plot's parser; --compare sets two reports side by side.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from dataplane.driver import Device
from dataplane.driver.device import DRIVER_FEATURES
from dataplane.driver.load import Job
from dataplane.errors import ConfigError
from dataplane.protocol import virtio_blk as vb
from dataplane.replay import Op, open_trace
from dataplane.replay.cli import main as replay_main
from dataplane.replay.engine import (
    ReplayOptions,
    hash_queue,
    replay_device,
    replay_memory,
    ring_size,
)
from dataplane.replay.native import replay_native
from dataplane.replay.results import compare_reports, load_report, report_summary

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent.parent
TRACES = ROOT / "traces"
MiB = 1 << 20
STAMP = struct.Struct("<IIQQ")      # struct replay_stamp: magic, queue, record + 1, offset
STAMP_MAGIC = 0x50525044

SAMPLES = ["fio_v2.iolog", "fio_v3.iolog", "sample_le.blktrace.0", "sample_be.blktrace.0",
           "sample.blkparse.txt", "msr_sample.csv", "msr_sample.csv.gz", "spc_sample.spc",
           "alibaba_sample.csv"]


def fio_v3(path: Path, rows: list[tuple[int, int, str, int, int]], files: int = 1) -> Path:
    """A fio v3 iolog: rows of (time_us, file index, action, offset, length)."""
    names = [f"/dev/vd{chr(ord('a') + i)}" for i in range(files)]
    lines = ["fio version 3 iolog"] + [f"0 {n} add" for n in names] + [f"0 {n} open" for n in names]
    for t, f, action, off, length in rows:
        lines.append(f"{t} {names[f]} {action} {off} {length}")
    lines += [f"{rows[-1][0] + 1} {n} close" for n in names]
    path.write_text("\n".join(lines) + "\n")
    return path


def connect(backend, queues: int = 2, options: ReplayOptions | None = None, **kw) -> Device:
    depth = (options or ReplayOptions()).depth
    return Device.connect(backend.socket, queues=queues, queue_size=ring_size(depth, True),
                          memory=replay_memory(queues, options or ReplayOptions(), 1 * MiB), **kw)


def replay(backend, trace: Path | str, queues: int = 2, **opts):
    options = ReplayOptions(**opts)
    with connect(backend, queues, options) as dev:
        result = replay_device(dev, open_trace(trace), options, target=backend.socket)
        stats = backend.device.stats()
    return result, stats


def assert_clean(result) -> None:
    assert not result.error, result.summary_of_problems()
    assert not result.io_errors, result.summary_of_problems()


def op_counts(trace: Path | str) -> dict[int, int]:
    counts = dict.fromkeys(Op, 0)
    for batch in open_trace(trace):
        for op, n in zip(*np.unique(batch["op"], return_counts=True), strict=True):
            counts[Op(int(op))] += int(n)
    return counts


# ---- every format's sample ----

@pytest.mark.parametrize("sample", SAMPLES)
def test_sample_trace_replays(start_backend, sample: str) -> None:
    """Every I/O of the sample reaches the backend as the request its op names."""
    backend = start_backend("null:1G", queues=2)
    result, stats = replay(backend, TRACES / sample, mode="timed", speed=8)
    assert_clean(result)
    want = op_counts(TRACES / sample)
    records = sum(want.values())
    assert result.mapping.records == records and result.mapping.issued == records
    assert result.total("completed") == records
    got = {Op.READ: sum(s["reads"] for s in stats), Op.WRITE: sum(s["writes"] for s in stats),
           Op.FLUSH: sum(s["flushes"] for s in stats), Op.TRIM: sum(s["discards"] for s in stats)}
    assert got == want
    assert sum(s["errors"] for s in stats) == 0
    data = result.to_json()
    assert data["dataplane_replay"]["skipped_lines"] == 0
    assert sum(j["read"]["total_ios"] for j in data["jobs"]) == want[Op.READ]
    assert sum(j["trim"]["total_ios"] for j in data["jobs"]) == want[Op.TRIM]
    assert sum(j["sync"]["total_ios"] for j in data["jobs"]) == want[Op.FLUSH]


def test_sample_against_qemu_storage_daemon(tmp_path: Path, start_qsd_export) -> None:
    """Any vhost-user-blk backend: QEMU's storage daemon on a file."""
    image = tmp_path / "qsd.img"
    with open(image, "wb") as f:
        f.truncate(256 * MiB)
    sock = start_qsd_export(f"driver=file,node-name=n0,filename={image},cache.direct=on")
    options = ReplayOptions(mode="afap", iodepth=16)
    with Device.connect(str(sock), queues=2, queue_size=ring_size(16, True),
                        memory=replay_memory(2, options, MiB)) as dev:
        result = replay_device(dev, open_trace(TRACES / "fio_v3.iolog"), options)
    assert_clean(result)
    assert result.total("completed") == 200


def test_long_trace_streams_through_small_feeds(start_backend, tmp_path: Path) -> None:
    """60k records through feeds of 4096 each: Python keeps refilling while the threads run,
    nothing is lost or reordered."""
    n = 60_000
    rng = np.random.default_rng(3)
    lines = "".join(f"{i},hm,{i % 2},{'Write' if w else 'Read'},{off},4096,100\n"
                    for i, (w, off) in enumerate(zip((rng.random(n) < 0.3).tolist(),
                                                     (rng.integers(0, 16384, n) * 4096).tolist(),
                                                     strict=True)))
    trace = tmp_path / "long.csv"
    trace.write_text(lines)
    backend = start_backend("null:64M", queues=2)
    result, stats = replay(backend, trace, mode="afap", iodepth=16, feed_records=4096, keep_log=True)
    assert_clean(result)
    assert result.total("completed") == n and sum(s["requests"] for s in stats) == n
    for run in result.runs:
        assert np.all(np.diff(run.origin) > 0)               # each queue in trace order
        assert np.all(np.diff(run.log["submit_ns"].astype(np.int64)) >= 0)


def test_direct_descriptor_chains(start_backend) -> None:
    """Without VIRTIO_RING_F_INDIRECT_DESC every request is a chain of 2 or 3 descriptors in
    the ring itself; slots switch between all four ops."""
    backend = start_backend("null:1G", queues=1)
    options = ReplayOptions(mode="afap", iodepth=8)
    features = DRIVER_FEATURES & ~(1 << vb.VIRTIO_RING_F_INDIRECT_DESC)
    with connect(backend, 1, options, features=features) as dev:
        assert not dev.features & (1 << vb.VIRTIO_RING_F_INDIRECT_DESC)
        result = replay_device(dev, open_trace(TRACES / "fio_v2.iolog"), options)
        stats = backend.device.stats()
        dev.write(0, b"z" * 4096)                # the frontend has its ring back
        assert len(dev.read(0, 4096)) == 4096
    assert_clean(result)
    want = op_counts(TRACES / "fio_v2.iolog")
    assert (stats[0]["reads"], stats[0]["writes"]) == (want[Op.READ], want[Op.WRITE])
    assert (stats[0]["flushes"], stats[0]["discards"]) == (want[Op.FLUSH], want[Op.TRIM])


@pytest.mark.parametrize("layout", ["split-indirect", "split-direct", "packed-direct", "packed-indirect"])
def test_slots_switch_between_reads_and_writes(start_backend, tmp_path: Path, layout: str) -> None:
    """A slot whose next record is a write after a read (or the reverse) keeps its chain and
    flips the header's type and the data descriptor's WRITE flag: the backend sees each record
    as the op it is, writes land with their stamps, and each read finds the stamp of the last
    write to its block before it."""
    rng = np.random.default_rng(5)
    blocks = rng.integers(0, 64, 600)
    ops = np.where(rng.random(600) < 0.5, "read", "write")
    rows = [(0, 0, str(op), int(b) * 4096, 4096) for op, b in zip(ops, blocks, strict=True)]
    trace = fio_v3(tmp_path / "mix.iolog", rows)
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(16 * MiB)
    backend = start_backend(str(image), queues=1)
    ring, indirect = layout.split("-")
    features = DRIVER_FEATURES
    if indirect == "direct":
        features &= ~(1 << vb.VIRTIO_RING_F_INDIRECT_DESC)
    options = ReplayOptions(mode="afap", iodepth=4, keep_log=True, stamp=True)
    with connect(backend, 1, options, features=features, ring=ring) as dev:
        result = replay_device(dev, open_trace(trace), options)
        stats = backend.device.stats()
    assert_clean(result)
    want = (int((ops == "read").sum()), int((ops == "write").sum()))
    assert (stats[0]["reads"], stats[0]["writes"]) == want
    log = result.runs[0].log
    last_write: dict[int, int] = {}
    for i, (op, b) in enumerate(zip(ops, blocks, strict=True)):
        if op == "write":
            last_write[int(b)] = i
        elif int(b) in last_write:
            assert log["tag"][i] == log["tag"][last_write[int(b)]], f"record {i}: read of block {b}"
        else:
            assert log["tag"][i] == 0
    for b, i in last_write.items():
        magic, _, seq, where = _stamp_at(image, b * 4096)
        assert (magic, seq, where) == (STAMP_MAGIC, i + 1, b * 4096)


def test_stamps_are_asked_for(start_backend, tmp_path: Path) -> None:
    """Off by default (a cache miss per write against a fast backend); --stamp writes them."""
    rows = [(i, 0, "write", i * 4096, 4096) for i in range(8)]
    trace = fio_v3(tmp_path / "w.iolog", rows)
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(16 * MiB)
    backend = start_backend(str(image), queues=1)
    for flags, stamped in ((["--stamp"], True), (["--no-stamp"], False), ([], False)):
        rc = replay_main(["replay", str(trace), "--socket", backend.socket, "--mode", "afap", *flags,
                          "--output", str(tmp_path / "out.txt")])
        assert rc == 0
        for i in range(8):
            assert (_stamp_at(image, i * 4096)[0] == STAMP_MAGIC) == stamped, (flags, i)
        with open(image, "r+b") as f:
            f.write(bytes(8 * 4096))


# ---- timed mode ----

def test_timed_replay_keeps_the_gaps(start_backend, tmp_path: Path) -> None:
    """Bursts of 8 I/Os 50 ms apart are issued 50 ms apart (and 25 ms at speed 2)."""
    rows = [(b * 50_000 + i * 10, 0, "read" if i % 2 else "write", (b * 8 + i) * 4096, 4096)
            for b in range(10) for i in range(8)]
    trace = fio_v3(tmp_path / "bursts.iolog", rows)
    backend = start_backend("null:64M", queues=1)
    for speed, gap_ms in ((1.0, 50.0), (2.0, 25.0)):
        result, _ = replay(backend, trace, queues=1, mode="timed", speed=speed, keep_log=True)
        assert_clean(result)
        log = result.runs[0].log
        assert len(log) == 80
        submit = log["submit_ns"].astype(np.int64)
        firsts = submit[::8]
        # On a shared machine the thread can be descheduled for a few ms now and then: most
        # gaps must be right, none grossly wrong (ignoring the times, or the speed, is off by
        # the whole gap).
        gaps = np.diff(firsts) / 1e6
        err = np.abs(gaps - gap_ms)
        assert np.median(err) < 2.0 and (err < 3.0).sum() >= 6 and err.max() < 20, (
            f"burst gaps {gaps} ms, want {gap_ms}")
        # each burst leaves together (its records are 10 us apart)
        spread = (submit.reshape(10, 8).max(axis=1) - firsts) / 1e6
        assert np.median(spread) < 2.0 and spread.max() < 20, f"burst spreads {spread} ms"
        # and on time: submit minus due time
        lag = (log["submit_ns"].astype(np.int64) - log["sched_ns"].astype(np.int64)) / 1e6
        assert np.median(lag) < 2.0 and lag.min() >= 0
        assert (log["sched_ns"][8] - log["sched_ns"][0]) / 1e6 == pytest.approx(gap_ms, abs=0.05)
        lag_json = result.to_json()["dataplane_replay"]["issue_lag_ns"]
        assert lag_json["N"] == 80 and set(lag_json) >= {"p50", "p90", "p99", "p99.9", "max"}
        rows_ts = result.timeseries_rows()
        assert sum(r["read_iops"] + r["write_iops"] for r in rows_ts) == 80


def test_timed_waits_when_iodepth_is_full(start_backend, tmp_path: Path) -> None:
    """A burst larger than iodepth: the excess waits for completions, which shows as lag."""
    rows = [(10, 0, "read", i * 4096, 4096) for i in range(64)]
    trace = fio_v3(tmp_path / "burst.iolog", rows)
    backend = start_backend("null:64M,latency=fixed:2ms", queues=1)
    result, _ = replay(backend, trace, queues=1, mode="timed", iodepth=4, keep_log=True)
    assert_clean(result)
    assert result.total("full_waits") >= 1
    lag = result.issue_lag()
    assert lag["max"] >= 2_000_000 * (64 // 4 - 2)      # the last ones waited ~15 rounds of 2 ms


# ---- AFAP ordering ----

def test_afap_keeps_trace_order_within_a_stream(start_backend, tmp_path: Path) -> None:
    """Write then read of the same block in one stream: the read sees the write (its stamp),
    is issued after the write completed, and the queue issues in trace order."""
    rows = []
    for i in range(200):
        block = (i * 7919 % 4096) * 4096
        rows.append((i, 0, "write", block, 4096))
        rows.append((i, 0, "read", block, 4096))
    trace = fio_v3(tmp_path / "wr.iolog", rows)
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    backend = start_backend(str(image), queues=1)
    result, _ = replay(backend, trace, queues=1, mode="afap", iodepth=32, keep_log=True, stamp=True)
    assert_clean(result)
    run = result.runs[0]
    log = run.log
    assert list(run.origin) == list(range(400))                    # trace order, nothing dropped
    assert np.all(np.diff(log["submit_ns"].astype(np.int64)) >= 0)   # issued in that order
    writes, reads = log[0::2], log[1::2]
    assert np.all(writes["op"] == Op.WRITE) and np.all(reads["op"] == Op.READ)
    assert np.all(writes["tag"] != 0)
    assert np.all(reads["tag"] == writes["tag"]), "a read did not see the write before it"
    assert np.all(reads["submit_ns"] >= writes["complete_ns"])
    assert result.total("hazard_waits") >= 1
    # deeper than 1: unrelated requests do overlap in flight
    assert result.runs[0].counters.depth_level[1] + result.runs[0].counters.depth_level[2] > 0


def test_flush_waits_for_writes_in_flight(start_backend, tmp_path: Path) -> None:
    rows = [(0, 0, "write", i * 4096, 4096) for i in range(16)] + [(0, 0, "sync", 0, 0)]
    trace = fio_v3(tmp_path / "wf.iolog", rows)
    backend = start_backend("null:64M,latency=fixed:1ms", queues=1)
    result, _ = replay(backend, trace, queues=1, mode="afap", iodepth=32, keep_log=True)
    assert_clean(result)
    log = result.runs[0].log
    assert log["op"][-1] == Op.FLUSH
    assert log["submit_ns"][-1] >= log["complete_ns"][:-1].max()


# ---- queue mapping ----

def _per_queue_requests(stats) -> list[int]:
    return [s["requests"] for s in stats]


def test_queue_map_trace_follows_the_streams(start_backend, tmp_path: Path) -> None:
    rows = [(i * 10, 0 if i % 3 else 1, "read", i * 4096, 4096) for i in range(90)]
    trace = fio_v3(tmp_path / "streams.iolog", rows, files=2)
    backend = start_backend("null:64M", queues=2)
    result, stats = replay(backend, trace, mode="afap", queue_map="trace")
    assert_clean(result)
    assert _per_queue_requests(stats) == [60, 30]
    assert [int(r.ops[Op.READ].ios) for r in result.runs] == [60, 30]


def test_queue_map_trace_wraps_streams_over_queues(start_backend) -> None:
    """Three Alibaba devices (streams 12, 407, 955) on two queues: ranks 0 and 2 share queue 0."""
    backend = start_backend("null:1G", queues=2)
    result, stats = replay(backend, TRACES / "alibaba_sample.csv", mode="afap", queue_map="trace")
    assert_clean(result)
    per_stream: dict[int, int] = {}
    for batch in open_trace(TRACES / "alibaba_sample.csv"):
        for sid, n in zip(*np.unique(batch["stream"], return_counts=True), strict=True):
            per_stream[int(sid)] = per_stream.get(int(sid), 0) + int(n)
    ids = sorted(per_stream)
    want = [sum(per_stream[s] for i, s in enumerate(ids) if i % 2 == q) for q in range(2)]
    assert _per_queue_requests(stats) == want


def test_single_stream_on_several_queues_warns(start_backend, tmp_path: Path, caplog) -> None:
    """--queue-map trace keeps a one-stream trace on one queue: said, and rr spreads it."""
    rows = [(i, 0, "read", i * 4096, 4096) for i in range(40)]
    trace = fio_v3(tmp_path / "one.iolog", rows)
    backend = start_backend("null:64M", queues=2)
    with caplog.at_level("WARNING", logger="dataplane.replay"):
        result, stats = replay(backend, trace, mode="afap", queue_map="trace")
    assert_clean(result)
    assert _per_queue_requests(stats) == [40, 0]
    assert "1 stream(s) for 2 queues" in caplog.text and "--queue-map rr or hash" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="dataplane.replay"):
        result, stats = replay(backend, trace, mode="afap", queue_map="rr")
    assert _per_queue_requests(stats) == [20, 20]
    assert "stream(s) for" not in caplog.text


def test_queue_map_hash_and_round_robin(start_backend, tmp_path: Path) -> None:
    offsets = [((i * 2654435761) % 16384) * 4096 for i in range(101)]
    rows = [(i, 0, "read", off, 4096) for i, off in enumerate(offsets)]
    trace = fio_v3(tmp_path / "one-stream.iolog", rows)
    backend = start_backend("null:64M", queues=2)
    result, stats = replay(backend, trace, mode="afap", queue_map="hash")
    assert_clean(result)
    q = hash_queue(np.array(offsets, np.uint64), 2)
    assert _per_queue_requests(stats) == [int((q == 0).sum()), int((q == 1).sum())]
    assert 0 < int((q == 0).sum()) < 101

    backend = start_backend("null:64M", queues=3)
    result, stats = replay(backend, trace, queues=3, mode="afap", queue_map="rr")
    assert_clean(result)
    assert _per_queue_requests(stats) == [34, 34, 33]


# ---- fit ----

def _stamp_at(image: Path, offset: int) -> tuple[int, int, int, int]:
    with open(image, "rb") as f:
        f.seek(offset)
        return STAMP.unpack(f.read(STAMP.size))


def test_fit_wrap_scale_and_fail(start_backend, tmp_path: Path) -> None:
    capacity = 64 * MiB
    offsets = [5 * MiB, capacity + 8 * MiB, 3 * capacity + 12 * MiB + 4096, 255 * MiB]
    rows = [(i, 0, "write", off, 4096) for i, off in enumerate(offsets)]
    trace = fio_v3(tmp_path / "far.iolog", rows)
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(capacity)
    backend = start_backend(str(image), queues=1)

    result, _ = replay(backend, trace, queues=1, mode="afap", fit="wrap", stamp=True)
    assert_clean(result)
    assert result.mapping.wrapped == 3
    for i, off in enumerate(offsets):
        magic, _, seq, where = _stamp_at(image, off % capacity)
        assert (magic, seq, where) == (STAMP_MAGIC, i + 1, off % capacity)

    with open(image, "wb") as f:
        f.truncate(0)
        f.truncate(capacity)
    result, _ = replay(backend, trace, queues=1, mode="afap", fit="scale", stamp=True)
    assert_clean(result)
    footprint = max(offsets) + 4096
    for i, off in enumerate(offsets):
        want = int(off * capacity / footprint) // 512 * 512
        magic, _, seq, where = _stamp_at(image, want)
        assert (magic, seq, where) == (STAMP_MAGIC, i + 1, want), f"record {i} not at {want}"
    assert result.to_json()["dataplane_replay"]["scale"] == pytest.approx(capacity / footprint)

    with pytest.raises(ConfigError, match=r"record 2 \(write of 4096 bytes at offset 75497472.*--fit"):
        replay(backend, trace, queues=1, mode="afap", fit="fail")


def test_alignment_and_splits(start_backend, tmp_path: Path) -> None:
    """An unaligned record grows to the blocks it touches ([1000, 1100) -> [512, 1536)); a
    3 MiB read is split in three."""
    rows = [(0, 0, "read", 1000, 100), (1, 0, "read", 0, 3 * MiB)]
    trace = fio_v3(tmp_path / "odd.iolog", rows)
    backend = start_backend("null:64M", queues=1)
    result, stats = replay(backend, trace, queues=1, mode="afap")
    assert_clean(result)
    assert result.mapping.split == 1 and result.mapping.split_pieces == 3
    assert stats[0]["reads"] == 4
    assert stats[0]["bytes_read"] == 1024 + 3 * MiB


def test_trims_skipped_without_discard(start_backend, tmp_path: Path) -> None:
    rows = [(0, 0, "trim", 0, MiB), (1, 0, "write", 0, 4096), (2, 0, "trim", MiB, MiB)]
    trace = fio_v3(tmp_path / "trims.iolog", rows)
    backend = start_backend("null:64M", queues=1)
    options = ReplayOptions(mode="afap")
    features = DRIVER_FEATURES & ~(1 << vb.VIRTIO_BLK_F_DISCARD)
    with connect(backend, 1, options, features=features) as dev:
        result = replay_device(dev, open_trace(trace), options)
        stats = backend.device.stats()
    assert_clean(result)
    assert result.mapping.skipped_trims == 2
    assert stats[0]["discards"] == 0 and stats[0]["writes"] == 1
    assert result.to_json()["dataplane_replay"]["skipped_trims"] == 2


# ---- malformed traces, through the command ----

def test_malformed_trace_stop_and_skip(start_backend, tmp_path: Path, capsys) -> None:
    backend = start_backend("null:1G", queues=1)
    bad = TRACES / "bad" / "msr_bad_number.csv"
    rc = replay_main(["replay", str(bad), "--socket", backend.socket, "--mode", "afap"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "msr_bad_number.csv:" in err and err.count("\n") == 1
    # the trace is read (and refused) before the backend is even connected to
    assert backend.device is None or sum(s["requests"] for s in backend.device.stats()) == 0

    out = tmp_path / "skip.json"
    rc = replay_main(["replay", str(bad), "--socket", backend.socket, "--mode", "afap",
                      "--on-error", "skip", "--output-format", "json", "--output", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    r = data["dataplane_replay"]
    assert r["skipped_lines"] == 1 and "msr_bad_number.csv:" in r["skipped_examples"][0]
    assert r["completed"] == r["issued"] > 0


def test_read_only_targets_skip_writes(start_backend, tmp_path: Path) -> None:
    """As fio does: a read-only device (VIRTIO_BLK_F_RO) or --native --read-only gets the reads
    and flushes, the writes and trims are counted as skipped."""
    trace = fio_v3(tmp_path / "rw.iolog", [(0, 0, "write", 0, 4096), (1, 0, "read", 0, 4096),
                                          (2, 0, "trim", 0, 4096), (3, 0, "read", 8192, 4096)])
    backend = start_backend("null:64M", queues=1, read_only=True)
    result, stats = replay(backend, trace, queues=1, mode="afap")
    assert_clean(result)
    assert (stats[0]["reads"], stats[0]["writes"], stats[0]["discards"]) == (2, 0, 0)
    assert (result.mapping.skipped_writes, result.mapping.skipped_trims) == (1, 1)
    image = tmp_path / "ro.img"
    with open(image, "wb") as f:
        f.truncate(MiB)
    result = replay_native(image, open_trace(trace), ReplayOptions(mode="afap"), read_only=True)
    assert_clean(result)
    assert result.ios(Op.READ) == 2 and result.mapping.skipped_writes == 1


def test_io_errors_exit_1(start_backend, tmp_path: Path, capsys, caplog, monkeypatch) -> None:
    """A backend that fails writes: the report says so and the command exits 1. (The driver does
    not acknowledge VIRTIO_BLK_F_RO here, so the writes reach the read-only backend.)"""
    backend = start_backend("null:64M", queues=1, read_only=True)
    connect_device = Device.connect.__func__

    def connect_without_ro(cls, *args, **kwargs):
        kwargs["features"] = DRIVER_FEATURES & ~(1 << vb.VIRTIO_BLK_F_RO)
        return connect_device(cls, *args, **kwargs)

    monkeypatch.setattr(Device, "connect", classmethod(connect_without_ro))
    trace = fio_v3(tmp_path / "w.iolog", [(0, 0, "write", 0, 4096), (1, 0, "read", 0, 4096)])
    rc = replay_main(["replay", str(trace), "--socket", backend.socket, "--mode", "afap"])
    assert rc == 1
    assert "1 I/O error" in caplog.text
    out = capsys.readouterr().out
    assert "err= 5" in out and "errors: write ioerr=1, unsupp=0, other=0" in out


# ---- reports ----

def test_json_reads_back_through_fio_plot(start_backend, tmp_path: Path) -> None:
    """The report as fio-plot parses it (fio_plot.fiolib), or with the keys fio-plot reads."""
    backend = start_backend("null:1G", queues=2)
    out_dir = tmp_path / "fio-plot"
    out_dir.mkdir()
    report = out_dir / "replay.json"
    rc = replay_main(["replay", str(TRACES / "msr_sample.csv"), "--socket", backend.socket,
                      "--queues", "2", "--mode", "afap", "--iodepth", "16", "--output-format", "json",
                      "--output", str(report)])
    assert rc == 0
    data = json.loads(report.read_text())
    try:
        from fio_plot.fiolib import jsonimport, jsonparsing
    except ImportError:
        jsonimport = None
    if jsonimport is not None:
        settings = {"input_directory": [str(out_dir)], "rw": "randrw", "iodepth": [16], "numjobs": [1],
                    "filter": ["read"], "include_hosts": None, "exclude_hosts": None,
                    "compare_graph": False}
        dataset = jsonimport.list_json_files(settings)
        assert dataset[0]["files"] == [str(report)]
        dataset = jsonimport.import_json_dataset(settings, dataset)
        parsed = jsonparsing.parse_json_data(settings, dataset)
        row = parsed[0]["data"][0]
        assert row["iops"] == pytest.approx(sum(j["read"]["iops"] for j in data["jobs"]))
        assert row["type"] == "read" and row["iodepth"] == "16" and row["rw"] == "randrw"
    else:   # the keys fio_plot.fiolib.jsonparsing_support.get_json_mapping reads
        for job in data["jobs"]:
            opts = {**job["job options"], **data["global options"]}
            assert {"iodepth", "numjobs", "bs", "rw"} <= set(opts)
            for mode in ("read", "write"):
                job[mode]["bw"], job[mode]["iops"], job[mode]["iops_stddev"]
                job[mode]["lat_ns"]["mean"], job[mode]["lat_ns"]["stddev"]
            job["latency_ms"], job["latency_us"], job["latency_ns"], job["usr_cpu"], job["sys_cpu"]
    # fio's types (what fio tooling indexes into)
    job = data["jobs"][0]
    assert isinstance(job["read"]["iops"], float) and isinstance(job["read"]["total_ios"], int)
    assert set(job["read"]["clat_ns"]["percentile"]) >= {"50.000000", "99.000000", "99.900000"}
    assert data["global options"]["replay_no_stall"] == "1"
    assert data["global options"]["read_iolog"].endswith("msr_sample.csv")


def test_timeseries_csv(start_backend, tmp_path: Path) -> None:
    rows = [(s * 400_000 + i * 1000, 0, "read" if i % 3 else "write", i * 4096, 4096)
            for s in range(4) for i in range(50)]
    trace = fio_v3(tmp_path / "slow.iolog", rows)
    backend = start_backend("null:64M", queues=2)
    csv_path = tmp_path / "ts.csv"
    rc = replay_main(["replay", str(trace), "--socket", backend.socket, "--queues", "2",
                      "--timeseries", str(csv_path), "--output", str(tmp_path / "out.txt")])
    assert rc == 0
    lines = csv_path.read_text().splitlines()
    header = lines[0].split(",")
    assert header[:9] == ["second", "read_iops", "write_iops", "read_mbps", "write_mbps",
                          "read_lat_mean_us", "read_lat_p99_us", "write_lat_mean_us", "write_lat_p99_us"]
    values = [dict(zip(header, line.split(","), strict=True)) for line in lines[1:]]
    assert [int(v["second"]) for v in values] == list(range(len(values)))
    assert len(values) == 2          # 1.2 s of trace
    assert sum(int(v["read_iops"]) + int(v["write_iops"]) for v in values) == 200
    assert all(float(v["read_lat_p99_us"]) > 0 for v in values)
    assert "issue lag (usec)" in (tmp_path / "out.txt").read_text()


# ---- native and compare ----

def test_native_replay_against_a_file(tmp_path: Path) -> None:
    image = tmp_path / "native.img"
    with open(image, "wb") as f:
        f.truncate(1 << 30)
    result = replay_native(image, open_trace(TRACES / "sample.blkparse.txt"),
                           ReplayOptions(mode="afap", iodepth=8, keep_log=True, stamp=True), queues=2)
    assert_clean(result)
    want = op_counts(TRACES / "sample.blkparse.txt")
    assert {op: result.ios(op) for op in Op} == want
    assert result.native and result.to_json()["global options"]["ioengine"] == "io_uring"
    # the writes landed where the trace put them, with their stamps
    for run in result.runs:
        log = run.log
        for entry in log[log["op"] == Op.WRITE][:5]:
            seq = int(entry["tag"]) & 0xFFFFFFFFFFFF
            queue = int(entry["tag"]) >> 48
            assert queue == run.queue
            i = seq - 1
            origin = int(run.origin[i])
            batch = open_trace(TRACES / "sample.blkparse.txt").read_all()
            off = int(batch["offset"][origin]) // 512 * 512
            magic, q, s, where = _stamp_at(image, off)
            assert magic == STAMP_MAGIC and where == off


def test_native_timed_and_compare(start_backend, tmp_path: Path, capsys) -> None:
    image = tmp_path / "native.img"
    with open(image, "wb") as f:
        f.truncate(1 << 30)
    backend = start_backend("null:1G", queues=1)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    trace = str(TRACES / "spc_sample.spc")
    assert replay_main(["replay", trace, "--socket", backend.socket, "--speed", "4",
                        "--output-format", "json", "--output", str(a)]) == 0
    assert replay_main(["replay", trace, "--native", str(image), "--speed", "4",
                        "--output-format", "json", "--output", str(b)]) == 0
    capsys.readouterr()
    assert replay_main(["replay", "--compare", str(a), str(b)]) == 0
    text = capsys.readouterr().out
    for needle in ("read   IOPS", "write  clat p99 us", "issue lag p99 us", "B/A"):
        assert needle in text
    assert replay_main(["replay", "--compare", str(a), str(b), "--output-format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    ra, rb = load_report(a), load_report(b)
    sa, sb = report_summary(ra), report_summary(rb)
    iops = next(r for r in rows if r["dir"] == "read" and r["metric"] == "IOPS")
    assert iops["a"] == pytest.approx(sa["read"]["iops"]) and iops["b"] == pytest.approx(sb["read"]["iops"])
    assert iops["ratio"] == pytest.approx(sb["read"]["iops"] / sa["read"]["iops"])
    assert sa["read"]["total_ios"] == sb["read"]["total_ios"] == 184
    assert compare_reports(ra, ra)[0]["ratio"] == pytest.approx(1.0)


def test_compare_reads_fio_and_load_reports(start_backend, tmp_path: Path, capsys) -> None:
    """--compare also takes `dataplane load` (and so fio's own) JSON: several jobs summed."""
    backend = start_backend("null:64M", queues=2)
    out = tmp_path / "load.json"
    job = Job(rw="randrw", runtime=0.3)
    with Device.connect(backend.socket, queues=2, queue_size=job.queue_size(True),
                        memory=job.memory_needed(2)) as dev:
        out.write_text(json.dumps(dev.load(job).to_json()))
    summary = report_summary(load_report(out))
    data = json.loads(out.read_text())
    assert summary["read"]["iops"] == pytest.approx(sum(j["read"]["iops"] for j in data["jobs"]))
    assert summary["read"]["approximate"]
    assert replay_main(["replay", "--compare", str(out), str(out)]) == 0
    assert "~ percentiles of several fio jobs" in capsys.readouterr().out


def test_compare_needs_reports(tmp_path: Path, capsys) -> None:
    bogus = tmp_path / "x.json"
    bogus.write_text("[1, 2]")
    assert replay_main(["replay", "--compare", str(bogus), str(bogus)]) == 2
    assert "not a fio-style JSON report" in capsys.readouterr().err
