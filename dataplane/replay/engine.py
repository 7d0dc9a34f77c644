"""Trace replay: the records a TraceReader yields, issued by one C thread per queue
(csrc/driver/replay.c), in trace order within each queue, on the trace's schedule or as fast as
iodepth allows.

Python never touches an I/O: it reads the trace in numpy batches, maps each record to a queue
and to the target (fit, alignment, splits, unsupported ops) with array operations, and feeds
each queue's thread with arrays of records through a bounded feed, so a multi-GB trace
streams in flat memory. The same engine drives a vhost-user-blk device (through the frontend's
rings, `replay_device`) and a file with io_uring (`dataplane.replay.native`).

    reader = open_trace("hm_0.csv.gz")
    with Device.connect(sock, queues=2, memory=...) as dev:
        result = replay_device(dev, reader, ReplayOptions(mode="afap", iodepth=32))
    print(result.to_text())
"""

from __future__ import annotations

import errno
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core import check, ffi, lib
from ..driver.load import hand_over, take_back
from ..errors import ConfigError, DeviceError
from ..protocol import virtio_blk as vb
from .base import TraceReader
from .records import OP_NAMES, RECORD_DTYPE, Op, mix64

log = logging.getLogger("dataplane.replay")

MODES = ("timed", "afap")
QUEUE_MAPS = ("trace", "hash", "rr")
FITS = ("wrap", "scale", "fail")
MAX_REQUEST = 1 << 20          # data buffer cap per request; longer records are split
MAX_DISCARD = 1 << 30          # when the device names no limit
DEFAULT_DEPTH = {"afap": 32, "timed": 128}
DEFAULT_POLL_US = {"afap": 5, "timed": 0}
SECTOR = 512
PAGE = 4096
START_DELAY_NS = 20_000_000    # every queue starts at the same instant, this far ahead
FEED_MEMORY = 256 << 20        # a trace of up to 8 Mi records is loaded before the clock starts
MIN_FEED = 1 << 12
MAX_FEED = 1 << 30
WAIT_SLICE_MS = 100

# struct dp_replay_log_entry
LOG_DTYPE = np.dtype([("sched_ns", "<u8"), ("submit_ns", "<u8"), ("complete_ns", "<u8"),
                      ("tag", "<u8"), ("status", "<i4"), ("op", "<u4")])


@dataclass
class ReplayOptions:
    """How to replay. Per-queue numbers (iodepth) as in fio, where each queue is a job."""

    mode: str = "timed"            # timed: honour timestamps (open loop); afap: closed loop
    speed: float = 1.0             # timed: trace time is divided by this
    iodepth: int | None = None     # requests in flight per queue (None: 32 afap, 128 timed)
    queue_map: str = "trace"       # trace: by stream; hash: by offset; rr: round robin
    fit: str = "wrap"              # offsets past the target: wrap, scale or fail
    max_request: int = MAX_REQUEST  # longer reads/writes are split
    spin_us: int = 50              # timed: spin instead of sleeping this close to a record's time
    poll_us: int | None = None     # spin on completions before sleeping (None: 5 afap, 0 timed)
    timeout: float = 30.0          # no completion for this long ends the run
    cpus: Sequence[int] = ()       # pin queue i's thread to cpus[i % len(cpus)]
    stamp: bool = False            # writes carry (queue, record) stamps; reads report them
    keep_log: bool = False         # per-record timings and stamps (tests, small traces)
    feed_memory: int = FEED_MEMORY  # bytes of records the queues' feeds hold in all
    feed_records: int | None = None  # records per queue's feed (None: from feed_memory)
    name: str = "replay"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r}: expected one of {', '.join(MODES)}")
        if self.queue_map not in QUEUE_MAPS:
            raise ConfigError(f"queue map {self.queue_map!r}: expected one of {', '.join(QUEUE_MAPS)}")
        if self.fit not in FITS:
            raise ConfigError(f"fit {self.fit!r}: expected one of {', '.join(FITS)}")
        if not (self.speed > 0 and math.isfinite(self.speed)):
            raise ConfigError(f"speed={self.speed}: expected a positive number")
        if self.iodepth is not None and not 1 <= self.iodepth <= lib.DP_REPLAY_MAX_IODEPTH:
            raise ConfigError(f"iodepth={self.iodepth}: expected 1..{lib.DP_REPLAY_MAX_IODEPTH}")
        if self.max_request < PAGE or self.max_request % PAGE or self.max_request > lib.DP_REPLAY_MAX_BUF:
            raise ConfigError(f"max request {self.max_request}: expected a multiple of 4096 up to "
                              f"{lib.DP_REPLAY_MAX_BUF}")
        if self.spin_us < 0 or (self.poll_us or 0) < 0 or self.timeout <= 0:
            raise ConfigError("spin_us and poll_us cannot be negative, timeout must be positive")
        if self.feed_memory < MIN_FEED * RECORD_DTYPE.itemsize or (
                self.feed_records is not None and not MIN_FEED <= self.feed_records <= MAX_FEED):
            raise ConfigError(f"feed memory {self.feed_memory}: at least {MIN_FEED} records "
                              f"({MIN_FEED * RECORD_DTYPE.itemsize} bytes)")

    @property
    def depth(self) -> int:
        return self.iodepth if self.iodepth is not None else DEFAULT_DEPTH[self.mode]

    @property
    def poll(self) -> int:
        """Microseconds to spin on completions before sleeping. A closed loop that sleeps as
        soon as nothing has completed lets the device go idle between completions (a kick and
        an interrupt every few dozen requests against a fast backend): afap spins a little."""
        return self.poll_us if self.poll_us is not None else DEFAULT_POLL_US[self.mode]


@dataclass
class TraceScan:
    """What a first pass over the trace learns: sizes for the buffer pool, the footprint for
    --fit scale and fail, the streams for --queue-map trace."""

    records: int = 0
    ops: dict[str, int] = field(default_factory=dict)
    max_length: int = 0            # longest read or write
    min_length: int = 0            # shortest read or write (0: none)
    max_end: int = 0               # footprint: max(offset + length) over reads, writes, trims
    streams: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))
    pieces: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # requests per stream
    duration_ns: int = 0

    def first_beyond(self, reader: TraceReader, capacity: int) -> str:
        """Describe the first record that ends past capacity (for --fit fail's error)."""
        index = 0
        for batch in reader:
            ends = batch["offset"].astype(np.uint64) + batch["length"].astype(np.uint64)
            bad = np.flatnonzero((batch["op"] != Op.FLUSH) & (ends > np.uint64(capacity)))
            if len(bad):
                i = int(bad[0])
                rec = batch[i]
                return (f"record {index + i + 1} ({OP_NAMES[Op(int(rec['op']))]} of {int(rec['length'])} "
                        f"bytes at offset {int(rec['offset'])}, time {int(rec['time_ns'])} ns)")
            index += len(batch)
        return "no record"


def scan_trace(reader: Iterable[np.ndarray], max_request: int = MAX_REQUEST) -> TraceScan:
    """One pass: counts, the longest request, the footprint, the streams (and about how many
    requests each becomes once split at max_request), the duration."""
    scan = TraceScan()
    ops = np.zeros(4, np.int64)
    streams: dict[int, int] = {}
    t_min = t_max = None
    min_len = None
    for batch in reader:
        if not len(batch):
            continue
        op = batch["op"]
        if (op > Op.TRIM).any():
            raise ConfigError("trace record with an unknown op")
        ops += np.bincount(op, minlength=4)[:4]
        data = (op == Op.READ) | (op == Op.WRITE)
        if data.any():
            lengths = batch["length"][data]
            scan.max_length = max(scan.max_length, int(lengths.max()))
            shortest = int(lengths.min())
            min_len = shortest if min_len is None else min(min_len, shortest)
        ranged = op != Op.FLUSH
        if ranged.any():
            ends = batch["offset"][ranged].astype(np.uint64) + batch["length"][ranged].astype(np.uint64)
            scan.max_end = max(scan.max_end, int(ends.max()))
        pieces = np.where(data, np.maximum(-(-batch["length"].astype(np.int64) // max_request), 1), 1)
        ids, inverse = np.unique(batch["stream"], return_inverse=True)
        for sid, n in zip(ids.tolist(), np.bincount(inverse, weights=pieces).tolist(), strict=True):
            streams[sid] = streams.get(sid, 0) + int(n)
        times = batch["time_ns"]
        lo, hi = int(times.min()), int(times.max())
        t_min = lo if t_min is None else min(t_min, lo)
        t_max = hi if t_max is None else max(t_max, hi)
    scan.records = int(ops.sum())
    scan.ops = {OP_NAMES[Op(i)]: int(ops[i]) for i in range(4)}
    scan.min_length = min_len or 0
    scan.streams = np.array(sorted(streams), dtype=np.uint32)
    scan.pieces = np.array([streams[sid] for sid in sorted(streams)], dtype=np.int64)
    scan.duration_ns = (t_max - t_min) if t_min is not None else 0
    return scan


@dataclass
class Geometry:
    """The target as the replay sees it."""

    capacity: int                  # bytes
    block_size: int                # logical block size: offsets align down, lengths round up
    discard: bool                  # trims become DISCARD (else they are skipped and counted)
    flush: bool                    # flush records become FLUSH (else skipped and counted)
    max_discard: int = MAX_DISCARD  # bytes per DISCARD; longer trims are split
    description: str = ""
    writable: bool = True           # else writes (and trims) are skipped and counted, as fio does

    @classmethod
    def of_device(cls, dev: Any) -> Geometry:
        features = dev.features
        discard = bool(features & (1 << vb.VIRTIO_BLK_F_DISCARD))
        max_discard = MAX_DISCARD
        if discard and dev.config.get("max_discard_sectors"):
            max_discard = min(MAX_DISCARD, int(dev.config["max_discard_sectors"]) * SECTOR)
        read_only = bool(features & (1 << vb.VIRTIO_BLK_F_RO))
        return cls(capacity=int(dev.capacity), block_size=max(int(dev.block_size), SECTOR),
                   discard=discard and not read_only, flush=bool(features & (1 << vb.VIRTIO_BLK_F_FLUSH)),
                   max_discard=max_discard, writable=not read_only)


def hash_queue(offsets: np.ndarray, queues: int) -> np.ndarray:
    """The queue --queue-map hash sends a (fitted, aligned) byte offset to."""
    return (mix64(np.asarray(offsets, np.uint64)) % np.uint64(queues)).astype(np.intp)


@dataclass
class MapCounters:
    records: int = 0               # read from the trace
    issued: int = 0                # handed to the queues (after splits and skips)
    split: int = 0                 # records longer than max_request (or max discard) split
    split_pieces: int = 0          # requests they became
    wrapped: int = 0               # fit wrap: records whose offset wrapped
    clipped: int = 0               # records cut at the end of the target
    empty: int = 0                 # reads/writes/trims of 0 bytes, skipped
    skipped_trims: int = 0         # the device did not offer DISCARD
    skipped_flushes: int = 0       # the device did not offer FLUSH
    skipped_writes: int = 0        # the target is read-only
    scale: float | None = None     # fit scale: the factor applied to offsets


class RecordMapper:
    """Turns trace batches into per-queue arrays the C threads can issue: the queue of each
    record, offsets fitted and aligned to the target, unsupported ops dropped, long requests
    split, times divided by the speed factor."""

    def __init__(self, scan: TraceScan, geometry: Geometry, queues: int, options: ReplayOptions,
                 buf_size: int) -> None:
        self.scan = scan
        self.geometry = geometry
        self.queues = queues
        self.options = options
        self.buf_size = buf_size
        self.counters = MapCounters()
        bs = geometry.block_size
        self.cap_aligned = geometry.capacity // bs * bs
        if self.cap_aligned < bs:
            raise ConfigError(f"the target ({geometry.capacity} bytes) holds no block of {bs} bytes")
        if options.fit == "fail" and scan.max_end > geometry.capacity:
            raise ConfigError("trace does not fit")   # the caller names the record
        if options.fit == "scale" and scan.max_end > geometry.capacity:
            self.counters.scale = geometry.capacity / scan.max_end
        self.max_discard = max(bs, geometry.max_discard // bs * bs)
        self._index = 0

    def map(self, batch: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        """Per-queue record arrays (and, with keep_log, each record's index in the trace)."""
        c = self.counters
        n = len(batch)
        first = self._index
        self._index += n
        c.records += n
        g, bs, nq = self.geometry, self.geometry.block_size, self.queues
        op = batch["op"].astype(np.uint8)
        off = batch["offset"].astype(np.uint64)
        length = batch["length"].astype(np.uint64)
        flush = op == Op.FLUSH

        keep = np.ones(n, bool)
        if not g.discard:
            trims = op == Op.TRIM
            c.skipped_trims += int(trims.sum())
            keep &= ~trims
        if not g.flush:
            c.skipped_flushes += int(flush.sum())
            keep &= ~flush
        if not g.writable:
            writes = op == Op.WRITE
            c.skipped_writes += int(writes.sum())
            keep &= ~writes
        empty = ~flush & (length == 0)
        c.empty += int((empty & keep).sum())
        keep &= ~empty

        # fit: wrap or scale into the target
        cap = np.uint64(self.cap_aligned)
        if self.options.fit == "wrap":
            wraps = ~flush & (off >= cap)
            c.wrapped += int((wraps & keep).sum())
            off = np.where(wraps, off % cap, off)
        elif c.scale is not None:
            off = np.floor(off.astype(np.float64) * c.scale).astype(np.uint64)
        # align: offset down, length up, clipped at the end
        ubs = np.uint64(bs)
        end = off + length
        off = off // ubs * ubs
        off = np.minimum(off, cap - ubs)
        length = (end - off + ubs - np.uint64(1)) // ubs * ubs
        limit = np.uint64(g.capacity) - off
        clipped = ~flush & (length > limit)
        c.clipped += int((clipped & keep).sum())
        length = np.where(clipped, limit // np.uint64(SECTOR) * np.uint64(SECTOR), length)
        off = np.where(flush, np.uint64(0), off)
        length = np.where(flush, np.uint64(0), length)

        # queue of each record
        if self.options.queue_map == "trace":
            q = np.searchsorted(self.scan.streams, batch["stream"]) % nq
        elif self.options.queue_map == "rr":
            q = (np.arange(first, first + n, dtype=np.int64) % nq).astype(np.intp)
        else:
            q = hash_queue(off, nq)

        if not keep.all():
            idx = np.flatnonzero(keep)
            op, off, length, q = op[idx], off[idx], length[idx], q[idx]
            times = batch["time_ns"][idx]
            origin = idx + first
        else:
            times = batch["time_ns"]
            origin = np.arange(first, first + n)

        # split: reads/writes at the buffer size, trims at the device's discard limit
        step = np.where(op == Op.TRIM, np.uint64(self.max_discard), np.uint64(self.buf_size))
        pieces = np.where(op == Op.FLUSH, np.uint64(1), np.maximum((length + step - np.uint64(1)) // step,
                                                                   np.uint64(1))).astype(np.int64)
        if len(pieces) and int(pieces.max()) > 1:
            c.split += int((pieces > 1).sum())
            c.split_pieces += int(pieces[pieces > 1].sum())
            rep = np.repeat(np.arange(len(op)), pieces)
            k = (np.arange(len(rep)) - np.repeat(np.cumsum(pieces) - pieces, pieces)).astype(np.uint64)
            step_r = step[rep]
            new_off = off[rep] + k * step_r
            length = np.minimum(step_r, length[rep] - k * step_r)
            off = new_off
            op, q, times, origin = op[rep], q[rep], times[rep], origin[rep]

        out = np.zeros(len(op), dtype=RECORD_DTYPE)
        scaled = times if self.options.speed == 1.0 else (times / self.options.speed).astype(np.int64)
        out["time_ns"] = np.maximum(scaled, 0)
        out["offset"] = off
        out["length"] = length
        out["op"] = op
        out["stream"] = q
        c.issued += len(out)
        order = np.argsort(q, kind="stable")
        counts = np.bincount(q, minlength=nq)
        bounds = np.concatenate(([0], np.cumsum(counts)))
        ordered = out[order]
        per_queue = [np.ascontiguousarray(ordered[bounds[i]:bounds[i + 1]]) for i in range(nq)]
        origins = None
        if self.options.keep_log:
            o = origin[order]
            origins = [o[bounds[i]:bounds[i + 1]].copy() for i in range(nq)]
        return per_queue, origins


def buffer_size(scan: TraceScan, geometry: Geometry, options: ReplayOptions) -> int:
    """Each slot's data buffer: the longest request (after alignment), capped at max_request."""
    bs = geometry.block_size
    longest = -(-scan.max_length // bs) * bs + bs    # alignment can add a block
    return max(PAGE, min(options.max_request, -(-longest // PAGE) * PAGE))


# ---- the run ----


@dataclass
class QueueRun:
    """One queue's thread: its C handle's results once it has ended."""

    queue: int
    tid: int = 0
    counters: Any = None           # struct dp_replay_counters *
    ops: list[Any] = field(default_factory=list)   # struct dp_load_dir_stats *, by Op
    seconds: dict[int, tuple[list[int], list[int]]] = field(default_factory=dict)   # ios, bytes by op
    log: np.ndarray | None = None  # LOG_DTYPE, with keep_log
    origin: np.ndarray | None = None   # trace record index of each log entry

    @property
    def error(self) -> int:
        return -int(self.counters.error) if self.counters is not None else 0


class SeriesCollector:
    """Per-second rows from every queue, merged: a second is final once every queue's thread
    has moved past it. Keeps only the unfinished seconds' histograms."""

    def __init__(self, runs: Sequence[QueueRun]) -> None:
        self.runs = runs
        self._row = ffi.new("struct dp_replay_second *")
        self._hists = ffi.new(f"struct dp_hist[{lib.DP_REPLAY_SERIES_HISTS}]")
        self._pending: dict[int, tuple[np.ndarray, np.ndarray, Any]] = {}
        self.rows: list[dict[str, float]] = []

    def drain(self, handles: Sequence[Any], final: bool = False) -> None:
        horizon = min((int(lib.dp_replay_series_horizon(h)) for h in handles), default=0)
        for run, h in zip(self.runs, handles, strict=True):
            while lib.dp_replay_take_second(h, self._row, self._hists):
                self._merge(run)
        limit = None if final else horizon
        for second in sorted(self._pending):
            if limit is not None and second >= limit:
                break
            self._finish(second)

    def _merge(self, run: QueueRun) -> None:
        row = self._row
        second = int(row.second)
        ios = [int(row.ios[i]) for i in range(4)]
        nbytes = [int(row.bytes[i]) for i in range(4)]
        mine = run.seconds.setdefault(second, ([0] * 4, [0] * 4))
        for i in range(4):
            mine[0][i] += ios[i]
            mine[1][i] += nbytes[i]
        if second not in self._pending:
            self._pending[second] = (np.zeros(4, np.int64), np.zeros(4, np.int64),
                                     ffi.new(f"struct dp_hist[{lib.DP_REPLAY_SERIES_HISTS}]"))
        p_ios, p_bytes, hists = self._pending[second]
        p_ios += ios
        p_bytes += nbytes
        for i in range(lib.DP_REPLAY_SERIES_HISTS):
            lib.dp_hist_merge(ffi.addressof(hists, i), ffi.addressof(self._hists, i))

    def _finish(self, second: int) -> None:
        ios, nbytes, hists = self._pending.pop(second)

        def lat(i: int) -> tuple[float, float]:
            h = ffi.addressof(hists, i)
            if not h.n:
                return 0.0, 0.0
            return h.sum / h.n / 1000.0, lib.dp_hist_percentile(h, 99.0) / 1000.0

        r_mean, r_p99 = lat(0)
        w_mean, w_p99 = lat(1)
        _, lag_p99 = lat(2)
        self.rows.append({
            "second": second,
            "read_iops": int(ios[Op.READ]), "write_iops": int(ios[Op.WRITE]),
            "read_mbps": nbytes[Op.READ] / 1e6, "write_mbps": nbytes[Op.WRITE] / 1e6,
            "read_lat_mean_us": r_mean, "read_lat_p99_us": r_p99,
            "write_lat_mean_us": w_mean, "write_lat_p99_us": w_p99,
            "trim_iops": int(ios[Op.TRIM]), "flush_iops": int(ios[Op.FLUSH]),
            "issue_lag_p99_us": lag_p99,
        })


class _Feeder(threading.Thread):
    """Reads the trace, maps it and keeps every queue's feed topped up; blocks (in C, without
    the GIL) when all feeds are full."""

    def __init__(self, reader: Iterable[np.ndarray], mapper: RecordMapper, handles: Sequence[Any],
                 runs: Sequence[QueueRun]) -> None:
        super().__init__(name="dp-replay-feeder", daemon=True)
        self.reader = reader
        self.mapper = mapper
        self.handles = handles
        self.runs = runs
        self.primed = threading.Event()
        self.halt = threading.Event()
        self.error: BaseException | None = None
        self.origins: list[list[np.ndarray]] = [[] for _ in handles]

    def run(self) -> None:
        try:
            for batch in self.reader:
                if self.halt.is_set():
                    break
                if not len(batch):
                    continue
                per_queue, origins = self.mapper.map(batch)
                if origins is not None:
                    for q, o in enumerate(origins):
                        self.origins[q].append(o)
                self._push(per_queue)
        except BaseException as exc:   # handed to the main thread, which stops the run
            self.error = exc
        finally:
            self.primed.set()
            for h in self.handles:
                lib.dp_replay_feed_end(h)

    def _push(self, per_queue: list[np.ndarray]) -> None:
        pending = []
        for q, arr in enumerate(per_queue):
            if len(arr):
                pending.append([q, arr, ffi.cast("struct dp_replay_rec *", ffi.from_buffer(arr)), 0])
        while pending and not self.halt.is_set():
            progressed = False
            for item in pending:
                q, arr, ptr, pos = item
                n = lib.dp_replay_feed(self.handles[q], ptr + pos, len(arr) - pos, 0)
                if n < 0:
                    self._fed_error(q, n)
                    item[3] = len(arr)
                    continue
                item[3] += n
                progressed = progressed or n > 0
            pending = [item for item in pending if item[3] < len(item[1])]
            if pending and not progressed:
                self.primed.set()              # the feeds are as full as they get: start
                q, arr, ptr, pos = pending[0]
                n = lib.dp_replay_feed(self.handles[q], ptr + pos, len(arr) - pos, 50)
                if n < 0:
                    self._fed_error(q, n)
                    pending.pop(0)
                else:
                    pending[0][3] += n

    def _fed_error(self, queue: int, rc: int) -> None:
        if rc == -errno.EPIPE:
            return                              # the thread ended (error or stop): its report says why
        check(rc, f"queue {queue}: feeding records")


@dataclass
class EngineRun:
    """What run_engine hands back."""

    runs: list[QueueRun]
    series: list[dict[str, float]]
    started: float
    interrupted: bool = False


def run_engine(params: Sequence[Any], reader: TraceReader, mapper: RecordMapper,
               options: ReplayOptions, on_done: Callable[[int, Any], None] | None = None) -> EngineRun:
    """Start one thread per params (struct dp_replay_params *), feed them the mapped trace,
    collect the per-second rows, and return every queue's results. on_done(queue index,
    counters) runs for each queue after its thread ended (the vring caller takes its ring back)."""
    runs = [QueueRun(int(p.queue)) for p in params]
    logs: list[np.ndarray | None] = [None] * len(params)
    handles: list[Any] = []
    err = ffi.new("int *")
    series = SeriesCollector(runs)
    started = time.time()
    interrupted = False
    feeder: _Feeder | None = None
    try:
        for p, size in zip(params, feed_sizes(mapper.scan, options, len(params)), strict=True):
            p.feed_records = size
        if options.keep_log:
            counts = _dry_counts(reader, mapper, len(params))
            for i, p in enumerate(params):
                logs[i] = np.zeros(max(counts[i], 1), LOG_DTYPE)
                p.log = ffi.cast("struct dp_replay_log_entry *", ffi.from_buffer(logs[i]))
                p.log_len = counts[i]
        for i, p in enumerate(params):
            h = lib.dp_replay_new(p, err)
            if h == ffi.NULL:
                check(err[0], f"queue {int(p.queue)}: starting the replay thread")
            handles.append(h)
            runs[i].tid = lib.dp_replay_thread_id(h)
        feeder = _Feeder(reader, mapper, handles, runs)
        feeder.start()
        feeder.primed.wait()
        start_ns = time.monotonic_ns() + START_DELAY_NS      # CLOCK_MONOTONIC, as in C
        started = time.time() + START_DELAY_NS / 1e9
        for h in handles:
            check(lib.dp_replay_begin(h, start_ns), "starting the replay")
        pending = list(handles)
        while pending:
            try:
                pending = [h for h in pending if not lib.dp_replay_wait(h, WAIT_SLICE_MS)]
                series.drain(handles)
                if feeder.error is not None:
                    for h in handles:
                        lib.dp_replay_stop(h)
            except KeyboardInterrupt:
                log.warning("interrupted: stopping the replay threads")
                interrupted = True
                feeder.halt.set()
                for h in handles:
                    lib.dp_replay_stop(h)
    finally:
        if feeder is not None:
            feeder.halt.set()
        for i, h in enumerate(handles):
            lib.dp_replay_stop(h)
            while not lib.dp_replay_wait(h, 1000):
                log.warning("queue %d: waiting for the replay thread to drain", runs[i].queue)
        if feeder is not None:
            feeder.join()
        if handles:
            series.drain(handles, final=True)
        for i, h in enumerate(handles):
            run = runs[i]
            run.counters = ffi.new("struct dp_replay_counters *")
            check(lib.dp_replay_get_counters(h, run.counters), f"queue {run.queue}: replay counters")
            for op in range(lib.DP_REPLAY_OPS):
                ds = ffi.new("struct dp_load_dir_stats *")
                check(lib.dp_replay_get_op(h, op, ds), f"queue {run.queue}: replay stats")
                run.ops.append(ds)
            lib.dp_replay_free(h)
            if run.counters.error:
                log.error("queue %d: replay ended early: %s", run.queue,
                          os.strerror(-int(run.counters.error)))
            if on_done is not None:
                on_done(i, run.counters)
            if logs[i] is not None and feeder is not None:
                run.log = logs[i][: int(params[i].log_len)]
                parts = feeder.origins[i]
                run.origin = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if feeder is not None and feeder.error is not None:
        raise feeder.error
    return EngineRun(runs, series.rows, started, interrupted)


def _dry_counts(reader: TraceReader, mapper: RecordMapper, queues: int) -> list[int]:
    """Records per queue, for sizing the per-record logs (a mapping pass that issues nothing)."""
    probe = RecordMapper(mapper.scan, mapper.geometry, queues,
                         ReplayOptions(**{**mapper.options.__dict__, "keep_log": False}), mapper.buf_size)
    counts = [0] * queues
    for batch in reader:
        per_queue, _ = probe.map(batch)
        for q, arr in enumerate(per_queue):
            counts[q] += len(arr)
    return counts


def feed_sizes(scan: TraceScan, options: ReplayOptions, queues: int) -> list[int]:
    """Records each queue's feed holds: room for all of the queue's records when the trace fits
    in options.feed_memory (then it is loaded before the clock starts and Python does nothing
    during the run), else an even share of that memory, streamed."""
    if options.feed_records is not None:
        return [options.feed_records] * queues
    share = options.feed_memory // RECORD_DTYPE.itemsize // queues
    total = int(scan.pieces.sum()) if len(scan.pieces) else scan.records
    if options.queue_map == "trace" and len(scan.pieces):
        want = [int(scan.pieces[q::queues].sum()) for q in range(queues)]
    elif options.queue_map == "rr":
        want = [-(-total // queues)] * queues
    else:
        want = [total] * queues                     # hash: any queue may get them all
    sizes = []
    for w in want:
        n = MIN_FEED
        while n < w + w // 16 + 64 and n < MAX_FEED:   # slack for trims split at the device's limit
            n *= 2
        sizes.append(max(MIN_FEED, min(n, share)))
    return sizes


def base_params(queue: int, options: ReplayOptions, geometry: Geometry, buf_size: int,
                index: int) -> Any:
    """The transport-independent part of a queue's struct dp_replay_params."""
    p = ffi.new("struct dp_replay_params *")
    p.queue = queue
    p.mode = lib.DP_REPLAY_TIMED if options.mode == "timed" else lib.DP_REPLAY_AFAP
    p.iodepth = options.depth
    p.buf_size = buf_size
    p.capacity = geometry.capacity
    p.spin_ns = options.spin_us * 1000
    p.poll_ns = options.poll * 1000
    p.timeout_ns = int(options.timeout * 1e9)
    p.stamp = int(options.stamp)
    p.cpu = options.cpus[index % len(options.cpus)] if options.cpus else -1
    return p


def prepare(reader: TraceReader, geometry: Geometry, queues: int, options: ReplayOptions,
            scan: TraceScan | None = None) -> tuple[TraceScan, RecordMapper, int]:
    """Scan the trace (unless given), check it fits, size the buffers; the mapper to feed with."""
    scan = scan or scan_trace(reader, options.max_request)
    if not scan.records:
        raise ConfigError(f"{reader.path}: no I/O in the trace")
    if options.fit == "fail" and scan.max_end > geometry.capacity:
        raise ConfigError(f"{reader.path}: {scan.first_beyond(reader, geometry.capacity)} ends past the "
                          f"end of the target ({geometry.capacity} bytes); use --fit wrap or --fit scale")
    if options.queue_map == "trace" and len(scan.streams) < queues:
        log.warning("%s has %d stream(s) for %d queues: --queue-map trace keeps each stream on one "
                    "queue, so %d queue(s) get no records; --queue-map rr or hash spread the trace "
                    "over every queue", reader.path, len(scan.streams), queues,
                    queues - len(scan.streams))
    size = buffer_size(scan, geometry, options)
    return scan, RecordMapper(scan, geometry, queues, options, size), size


def replay_memory(queues: int, options: ReplayOptions, buf_size: int) -> int:
    """Guest memory Device.connect needs for a replay's buffers, rings and its own requests."""
    arena = lib.dp_replay_arena_size(buf_size, options.depth)
    return queues * (arena + 64 * 1024) + (16 << 20)


def ring_size(depth: int, indirect: bool) -> int:
    need = depth if indirect else 3 * depth
    size = 128
    while size < need:
        size *= 2
    if size > 1024:
        raise ConfigError(f"iodepth={depth} needs a ring of {size} entries; virtio-blk rings hold "
                          f"at most 1024 ({'1024' if indirect else '341'} requests)")
    return size


def replay_device(dev: Any, reader: TraceReader, options: ReplayOptions,
                  queues: Sequence[int] | None = None, scan: TraceScan | None = None,
                  target: str = "vhost-user-blk"):
    """Replay the trace through a connected Device's rings (all queues by default). The C
    threads take the rings over and give them back, so the Device keeps working afterwards."""
    from .results import ReplayResult

    queue_list = list(range(len(dev.rings))) if queues is None else list(queues)
    if not queue_list:
        raise ConfigError("no queue to replay on")
    geometry = Geometry.of_device(dev)
    scan, mapper, buf = prepare(reader, geometry, len(queue_list), options, scan)
    indirect = bool(dev.features & (1 << vb.VIRTIO_RING_F_INDIRECT_DESC))
    depth = options.depth
    arena_size = lib.dp_replay_arena_size(buf, depth)
    arenas: list[int] = []
    params = []
    for i, q in enumerate(queue_list):
        ring = dev.rings[q]
        if ring.chains:
            raise DeviceError(f"queue {q}: {len(ring.chains)} request(s) of the frontend in flight")
        room = ring.num if indirect else ring.num // 3
        if depth > room:
            raise ConfigError(f"iodepth={depth} needs a ring of {ring_size(depth, indirect)} entries "
                              f"(queue {q} has {ring.num})")
        try:
            arena = dev.mem.alloc(arena_size, PAGE)
        except DeviceError:
            for a in arenas:
                dev.mem.free(a)
            raise DeviceError(f"queue {q}: no room for {arena_size} bytes of request buffers in guest "
                              f"memory; connect with memory=replay_memory(...)") from None
        arenas.append(arena)
        p = base_params(q, options, geometry, buf, i)
        p.kind = lib.DP_REPLAY_VRING
        hand_over(dev, q, p.ring, arena, arena_size, indirect)
        p.fd = -1
        params.append(p)

    handed_back: set[int] = set()

    def give_back(i: int, counters: Any) -> None:
        take_back(dev, queue_list[i], counters)
        handed_back.add(i)
        if not counters.error:
            dev.mem.free(arenas[i])    # a ring left mid-flight may still point into it

    try:
        engine = run_engine(params, reader, mapper, options, give_back)
    finally:
        for i, arena in enumerate(arenas):
            if i not in handed_back:   # its thread never started
                dev.mem.free(arena)
    return ReplayResult.build(engine, reader, scan, mapper, geometry, options, target=target,
                              native=False, ring=dev.ring)
