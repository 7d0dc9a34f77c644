"""The C replay threads (csrc/driver/replay.c) through the C API directly, on a temporary file with
io_uring: parameter checks, the feed's limits and hand-over, stop before start."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import numpy as np
import pytest

from dataplane.core import ffi, lib
from dataplane.replay.records import RECORD_DTYPE, Op

pytestmark = pytest.mark.timeout(60)
MiB = 1 << 20


@pytest.fixture
def target(tmp_path: Path):
    path = tmp_path / "t.img"
    with open(path, "wb") as f:
        f.truncate(16 * MiB)
    fd = os.open(path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
    yield fd
    os.close(fd)


def params(target_fd: int, **kw):
    p = ffi.new("struct dp_replay_params *")
    p.kind = lib.DP_REPLAY_URING
    p.fd = target_fd
    p.mode = lib.DP_REPLAY_AFAP
    p.iodepth = 4
    p.buf_size = 65536
    p.capacity = 16 * MiB
    p.feed_records = 16
    p.cpu = -1
    for k, v in kw.items():
        setattr(p, k, v)
    return p


def start(p):
    err = ffi.new("int *")
    h = lib.dp_replay_new(p, err)
    return h, err[0]


def recs(rows) -> np.ndarray:
    out = np.zeros(len(rows), RECORD_DTYPE)
    for i, (op, off, length) in enumerate(rows):
        out[i]["op"], out[i]["offset"], out[i]["length"] = op, off, length
    return out


def feed(h, arr: np.ndarray, timeout_ms: int = 0) -> int:
    return lib.dp_replay_feed(h, ffi.cast("struct dp_replay_rec *", ffi.from_buffer(arr)), len(arr),
                              timeout_ms)


def test_bad_params_are_refused(target: int) -> None:
    for kw in ({"iodepth": 0}, {"iodepth": lib.DP_REPLAY_MAX_IODEPTH + 1}, {"buf_size": 1000},
               {"buf_size": 2 * lib.DP_REPLAY_MAX_BUF}, {"mode": 7}, {"capacity": 0}, {"fd": -1},
               {"kind": 9}, {"log_len": 4}):
        h, err = start(params(target, **kw))
        assert h == ffi.NULL, kw
        assert err in (-errno.EINVAL, -errno.EBADF), kw
    # a vring replay without a ring
    h, err = start(params(target, kind=lib.DP_REPLAY_VRING))
    assert h == ffi.NULL and err == -errno.EINVAL


def test_feed_checks_records_and_reports_room(target: int) -> None:
    h, err = start(params(target))
    assert h != ffi.NULL, err
    try:
        for bad in ((Op.READ, 0, 0), (Op.READ, 100, 512), (Op.WRITE, 0, 1 << 17),
                    (Op.READ, 16 * MiB - 512, 1024), (9, 0, 512), (Op.TRIM, 0, 700)):
            assert feed(h, recs([(Op.READ, 0, 4096), bad])) == -errno.EINVAL, bad
        ok = recs([(Op.READ, i * 4096, 4096) for i in range(20)])
        assert feed(h, ok) == 16              # the feed holds 16; nothing is consumed before begin
        assert feed(h, ok[16:]) == 0          # full, no wait
        t0 = time.monotonic()
        assert feed(h, ok[16:], 50) == 0      # full, waited 50 ms
        assert time.monotonic() - t0 >= 0.04
        assert lib.dp_replay_begin(h, time.monotonic_ns()) == 0
        assert lib.dp_replay_begin(h, time.monotonic_ns()) == -errno.EALREADY
        assert feed(h, ok[16:], 5000) == 4    # room comes back as the thread issues
        lib.dp_replay_feed_end(h)
        assert feed(h, ok[:1]) == -errno.EINVAL     # nothing after the end
        assert lib.dp_replay_wait(h, 10000) == 1
        c = ffi.new("struct dp_replay_counters *")
        assert lib.dp_replay_get_counters(h, c) == 0
        assert (c.records, c.completed, c.error) == (20, 20, 0)
        ds = ffi.new("struct dp_load_dir_stats *")
        assert lib.dp_replay_get_op(h, Op.READ, ds) == 0
        assert ds.ios == 20 and ds.bytes == 20 * 4096
        assert lib.dp_replay_get_op(h, 4, ds) == -errno.EINVAL
    finally:
        lib.dp_replay_free(h)


def test_stop_before_begin_and_feed_after_the_end(target: int) -> None:
    h, err = start(params(target))
    assert h != ffi.NULL, err
    c = ffi.new("struct dp_replay_counters *")
    assert lib.dp_replay_get_counters(h, c) == -errno.EBUSY
    lib.dp_replay_stop(h)
    assert lib.dp_replay_wait(h, 5000) == 1
    assert feed(h, recs([(Op.READ, 0, 4096)])) == -errno.EPIPE
    assert lib.dp_replay_get_counters(h, c) == 0 and c.records == 0
    assert lib.dp_replay_series_horizon(h) == 2**64 - 1
    lib.dp_replay_free(h)


def test_per_second_rows_and_log(target: int) -> None:
    log = np.zeros(8, np.dtype([("sched_ns", "<u8"), ("submit_ns", "<u8"), ("complete_ns", "<u8"),
                                ("tag", "<u8"), ("status", "<i4"), ("op", "<u4")]))
    p = params(target, mode=lib.DP_REPLAY_TIMED, stamp=1, queue=3)
    p.log = ffi.cast("struct dp_replay_log_entry *", ffi.from_buffer(log))
    p.log_len = 8
    h, err = start(p)
    assert h != ffi.NULL, err
    rows = recs([(Op.WRITE, 0, 4096), (Op.READ, 0, 4096), (Op.FLUSH, 0, 0), (Op.TRIM, 8192, 4096)])
    rows["time_ns"] = [0, 20_000_000, 30_000_000, 1_100_000_000]     # the trim in second 1
    assert feed(h, rows) == 4
    lib.dp_replay_feed_end(h)
    assert lib.dp_replay_begin(h, time.monotonic_ns()) == 0
    assert lib.dp_replay_wait(h, 10000) == 1
    row = ffi.new("struct dp_replay_second *")
    hists = ffi.new(f"struct dp_hist[{lib.DP_REPLAY_SERIES_HISTS}]")
    seconds = []
    while lib.dp_replay_take_second(h, row, hists):
        seconds.append((int(row.second), list(row.ios)))
    assert seconds == [(0, [1, 1, 1, 0]), (1, [0, 0, 0, 1])]
    assert (log["op"][:4] == [Op.WRITE, Op.READ, Op.FLUSH, Op.TRIM]).all()
    assert (log["status"][:4] == [4096, 4096, 0, 0]).all()
    assert log["tag"][0] == (3 << 48) | 1 and log["tag"][1] == log["tag"][0]   # the read saw the write
    assert (log["submit_ns"][:4] >= log["sched_ns"][:4]).all()
    assert log["sched_ns"][3] - log["sched_ns"][0] == 1_100_000_000
    lib.dp_replay_free(h)
