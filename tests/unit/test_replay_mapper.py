"""The replay's record mapping (dataplane.replay.engine.RecordMapper) and report helpers, on
numpy arrays and dicts: no device, no thread."""

from __future__ import annotations

import numpy as np
import pytest

from dataplane.errors import ConfigError
from dataplane.replay.engine import (
    Geometry,
    RecordMapper,
    ReplayOptions,
    buffer_size,
    hash_queue,
    ring_size,
    scan_trace,
)
from dataplane.replay.records import Op, make_records
from dataplane.replay.results import compare_reports, format_compare, report_summary

MiB = 1 << 20


def records(rows: list[tuple[int, int, int, int, int]]) -> np.ndarray:
    """rows of (time_ns, offset, length, stream, op)"""
    cols = list(zip(*rows, strict=True))
    return make_records(np.array(cols[0]), np.array(cols[1], np.uint64), np.array(cols[2]),
                        np.array(cols[3]), np.array(cols[4]))


def mapper(batch: np.ndarray, capacity: int = 64 * MiB, queues: int = 2, block: int = 512,
           discard: bool = True, flush: bool = True, max_discard: int = 1 << 30, **opts) -> RecordMapper:
    options = ReplayOptions(**opts)
    scan = scan_trace([batch])
    geometry = Geometry(capacity, block, discard, flush, max_discard)
    return RecordMapper(scan, geometry, queues, options, buffer_size(scan, geometry, options))


def joined(per_queue: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(per_queue)


def test_scan_counts_sizes_footprint_streams() -> None:
    batch = records([(5, 0, 4096, 3, Op.READ), (9, 8192, 512, 1, Op.WRITE), (12, 0, 0, 3, Op.FLUSH),
                     (20, 100 * MiB, MiB, 7, Op.TRIM)])
    scan = scan_trace([batch[:2], batch[2:]])
    assert scan.records == 4
    assert scan.ops == {"read": 1, "write": 1, "flush": 1, "trim": 1}
    assert (scan.max_length, scan.min_length) == (4096, 512)
    assert scan.max_end == 101 * MiB
    assert scan.streams.tolist() == [1, 3, 7]
    assert scan.duration_ns == 15


def test_wrap_aligns_and_clips() -> None:
    cap = 64 * MiB
    batch = records([(0, cap + 1000, 100, 0, Op.READ),        # wraps to 1000, grows to [512, 1536)
                     (1, cap - 512, 4096, 0, Op.WRITE),       # clipped at the end
                     (2, 3 * cap + 8192, 4096, 0, Op.READ)])
    m = mapper(batch, block=512, fit="wrap", queue_map="rr", queues=1)
    out = joined(m.map(batch)[0])
    assert out["offset"].tolist() == [512, cap - 512, 8192]
    assert out["length"].tolist() == [1024, 512, 4096]
    assert m.counters.wrapped == 2 and m.counters.clipped == 1


def test_block_size_4k_alignment() -> None:
    batch = records([(0, 4096 + 512, 512, 0, Op.READ), (1, 8191, 2, 0, Op.WRITE)])
    out = joined(mapper(batch, block=4096, queues=1).map(batch)[0])
    assert out["offset"].tolist() == [4096, 4096]
    assert out["length"].tolist() == [4096, 8192]


def test_scale_shrinks_the_footprint() -> None:
    cap = 64 * MiB
    batch = records([(0, 0, 4096, 0, Op.READ), (1, 128 * MiB, 4096, 0, Op.READ),
                     (2, 256 * MiB - 4096, 4096, 0, Op.WRITE)])
    m = mapper(batch, fit="scale", queues=1)
    out = joined(m.map(batch)[0])
    assert m.counters.scale == pytest.approx(0.25)
    assert out["offset"].tolist() == [0, 32 * MiB, 64 * MiB - 1024]
    assert (out["offset"] + out["length"] <= cap).all()


def test_scale_leaves_a_fitting_trace_alone() -> None:
    batch = records([(0, 4096, 4096, 0, Op.READ), (1, 8 * MiB, 4096, 0, Op.READ)])
    m = mapper(batch, fit="scale", queues=1)
    assert m.counters.scale is None
    assert joined(m.map(batch)[0])["offset"].tolist() == [4096, 8 * MiB]


def test_fail_refuses_a_trace_that_does_not_fit() -> None:
    batch = records([(0, 65 * MiB, 4096, 0, Op.READ)])
    with pytest.raises(ConfigError):
        mapper(batch, fit="fail")


def test_splits_long_requests_and_trims() -> None:
    batch = records([(0, 0, 3 * MiB + 4096, 0, Op.READ), (1, 0, 5 * MiB, 0, Op.TRIM),
                     (2, 0, 0, 0, Op.FLUSH)])
    m = mapper(batch, max_discard=2 * MiB, queues=1)
    assert m.buf_size == MiB
    out = joined(m.map(batch)[0])
    assert out["op"].tolist() == [Op.READ] * 4 + [Op.TRIM] * 3 + [Op.FLUSH]
    assert out["offset"].tolist() == [0, MiB, 2 * MiB, 3 * MiB, 0, 2 * MiB, 4 * MiB, 0]
    assert out["length"].tolist() == [MiB, MiB, MiB, 4096, 2 * MiB, 2 * MiB, MiB, 0]
    assert (m.counters.split, m.counters.split_pieces) == (2, 7)
    assert (out["time_ns"] == np.array([0] * 4 + [1] * 3 + [2])).all()


def test_unsupported_ops_and_empty_records_are_counted() -> None:
    batch = records([(0, 0, 4096, 0, Op.TRIM), (1, 0, 0, 0, Op.FLUSH), (2, 0, 0, 0, Op.READ),
                     (3, 0, 4096, 0, Op.WRITE)])
    m = mapper(batch, discard=False, flush=False, queues=1)
    out = joined(m.map(batch)[0])
    assert out["op"].tolist() == [Op.WRITE]
    c = m.counters
    assert (c.skipped_trims, c.skipped_flushes, c.empty, c.issued, c.records) == (1, 1, 1, 1, 4)


def test_queue_maps() -> None:
    batch = records([(i, i * 4096, 4096, [40, 7, 9][i % 3], Op.READ) for i in range(12)])
    per_q, _ = mapper(batch, queue_map="trace", queues=2).map(batch)
    # streams sorted: 7 -> rank 0, 9 -> 1, 40 -> 2; rank % 2 picks the queue
    assert [len(a) for a in per_q] == [8, 4]
    assert (per_q[1]["offset"] // 4096 % 3 == 2).all()
    per_q, _ = mapper(batch, queue_map="rr", queues=3).map(batch)
    assert [a["offset"].tolist() for a in per_q] == [[i * 4096 for i in range(q, 12, 3)] for q in range(3)]
    per_q, _ = mapper(batch, queue_map="hash", queues=2).map(batch)
    q = hash_queue(batch["offset"], 2)
    assert [len(a) for a in per_q] == [int((q == 0).sum()), int((q == 1).sum())]
    assert hash_queue(np.array([4096], np.uint64), 2)[0] == hash_queue(np.array([4096], np.uint64), 2)[0]


def test_round_robin_continues_across_batches() -> None:
    batch = records([(i, i * 4096, 4096, 0, Op.READ) for i in range(5)])
    m = mapper(batch, queue_map="rr", queues=2)
    first, _ = m.map(batch)
    second, _ = m.map(batch)
    assert [len(a) for a in first] == [3, 2] and [len(a) for a in second] == [2, 3]


def test_queue_order_is_trace_order_and_origins() -> None:
    batch = records([(i, i * 4096, 4096, i % 2, Op.WRITE) for i in range(10)])
    per_q, origins = mapper(batch, keep_log=True).map(batch)
    assert origins[0].tolist() == [0, 2, 4, 6, 8] and origins[1].tolist() == [1, 3, 5, 7, 9]
    assert (np.diff(per_q[0]["time_ns"]) > 0).all()


def test_speed_divides_time_and_negative_times_start_at_zero() -> None:
    batch = records([(-50, 0, 4096, 0, Op.READ), (1000, 0, 4096, 0, Op.READ)])
    out = joined(mapper(batch, speed=4, queues=1).map(batch)[0])
    assert out["time_ns"].tolist() == [0, 250]


def test_options_are_checked() -> None:
    for bad in ({"mode": "fast"}, {"speed": 0}, {"iodepth": 0}, {"queue_map": "cpu"}, {"fit": "clip"},
                {"max_request": 1000}):
        with pytest.raises(ConfigError):
            ReplayOptions(**bad)
    assert ReplayOptions(mode="afap").depth == 32 and ReplayOptions().depth == 128
    assert ring_size(32, True) == 128 and ring_size(200, True) == 256 and ring_size(100, False) == 512
    with pytest.raises(ConfigError):
        ring_size(2000, True)


def fio_job(iops: float, n: int, p99: int, name: str = "j") -> dict:
    pct = {"50.000000": p99 // 2, "99.000000": p99, "99.900000": p99 * 2}
    d = {"total_ios": n, "iops": iops, "bw_bytes": int(iops * 4096), "clat_ns": {"mean": p99 / 3, "N": n,
                                                                                  "percentile": pct}}
    empty = {"total_ios": 0, "iops": 0.0, "bw_bytes": 0, "clat_ns": {"mean": 0, "N": 0}}
    return {"jobname": name, "read": d, "write": empty, "trim": empty, "sync": {"total_ios": 0}}


def test_compare_fio_reports() -> None:
    a = {"jobs": [fio_job(1000.0, 100, 300)]}
    b = {"jobs": [fio_job(1500.0, 100, 600), fio_job(500.0, 300, 200)]}
    sb = report_summary(b)
    assert sb["read"]["iops"] == 2000.0 and sb["read"]["total_ios"] == 400
    assert sb["read"]["clat_ns"]["p99"] == pytest.approx((600 * 100 + 200 * 300) / 400)
    assert sb["read"]["approximate"]
    rows = compare_reports(a, b)
    iops = next(r for r in rows if r["metric"] == "IOPS")
    assert (iops["a"], iops["b"], iops["ratio"]) == (1000.0, 2000.0, 2.0)
    assert {r["dir"] for r in rows} == {"read"}
    text = format_compare(rows, "a.json", "b.json")
    assert "read   IOPS" in text and "2.000" in text and "~" in text


def test_feed_sizes_hold_the_trace_or_share_the_budget() -> None:
    from dataplane.replay.engine import MIN_FEED, feed_sizes

    batch = records([(i, i * 4096, 4096, i % 3, Op.READ) for i in range(3000)] +
                    [(3000, 0, 3 * MiB, 0, Op.READ)])
    scan = scan_trace([batch])
    assert scan.pieces.tolist() == [1000 + 3, 1000, 1000]      # the 3 MiB read is 3 requests
    # fits: room for each queue's records (streams 0 and 2 share queue 0)
    assert feed_sizes(scan, ReplayOptions(queue_map="trace"), 2) == [MIN_FEED, MIN_FEED]
    big = scan_trace([records([(i, 0, 4096, i % 2, Op.READ) for i in range(20000)])])
    assert feed_sizes(big, ReplayOptions(queue_map="trace"), 2) == [16384, 16384]
    assert feed_sizes(big, ReplayOptions(queue_map="hash"), 2) == [32768, 32768]
    # does not fit: an even share of the budget
    small = ReplayOptions(queue_map="rr", feed_memory=MIN_FEED * 32 * 2)
    assert feed_sizes(big, small, 2) == [MIN_FEED, MIN_FEED]
    assert feed_sizes(big, ReplayOptions(feed_records=8192), 3) == [8192] * 3
