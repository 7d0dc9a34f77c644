"""What the charts of a block trace are drawn from: one streaming pass over the reader's record
batches into fixed-size accumulators (numpy only; matplotlib is not needed here).

Memory is bounded whatever the trace's length: time is cut into at most TIME_BINS bins whose
width doubles (merging neighbours) whenever a record falls past the end, offsets into at most
OFFSET_BINS bins that grow the same way, and individual points are kept for a scatter plot
only up to `scatter_limit` records. Everything `TraceProfile.summary()` reports is exact except
the inter-arrival percentiles (log bins, 20 a decade: within 12%).

Queue depth needs completions: for blktrace and blkparse traces the trace is read again for
its complete (C), merge (M, F), issue (D) and requeue (R) events, and two depths are kept,
as time-weighted means per bin (iostat's aqu-sz, per interval):

* block layer (Q -> C): +1 at each queued request, -1 when it is merged into another (M, F)
  or completes (C): requests the block layer holds, from submission to completion;
* device (D -> C): +1 at each issue, -1 at each completion or requeue: requests the driver
  holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .detect import open_trace
from .records import BATCH_RECORDS, OP_NAMES, Op

SCATTER_LIMIT = 200_000  # more records than this: offset x time is a 2-D density
TIME_BINS = 1024
OFFSET_BINS = 256
FIRST_TIME_WIDTH_NS = 1_000
FIRST_OFFSET_WIDTH = 1 << 20
SIZE_BUCKETS = 33  # ceil(log2(length)): 1 B .. 4 GiB
MAX_EXACT_SIZES = 4096  # distinct lengths per op counted exactly; more are only bucketed
IA_PER_DECADE = 20
IA_BINS = 12 * IA_PER_DECADE  # 1 ns .. 1000 s; longer gaps land in the last bin
DATA_OPS = (Op.READ, Op.WRITE, Op.TRIM)
TOP_SIZES = 10
COMPLETION_FORMATS = ("blktrace", "blkparse")
# events -> (channel, step): the depth passes over a blktrace; "q" block layer, "d" device.
DEPTH_STEPS = {"queue": ("q", +1), "backmerge": ("q", -1), "frontmerge": ("q", -1),
               "issue": ("d", +1), "requeue": ("d", -1)}


def size_label(nbytes: float) -> str:
    """4096 -> '4k', 1048576 -> '1m', 512 -> '512' (fio's units)."""
    for shift, unit in ((40, "t"), (30, "g"), (20, "m"), (10, "k")):
        if nbytes >= 1 << shift and nbytes % (1 << shift) == 0:
            return f"{int(nbytes) >> shift}{unit}"
    if nbytes >= 1 << 10:
        return f"{nbytes / 1024:.1f}k"
    return f"{int(nbytes)}"


@dataclass
class DepthChannel:
    """Requests in flight per time bin, from +1/-1 events: `delta` sums the steps in each bin,
    `moment` the steps times their distance from the bin's start (for the time-weighted mean)."""

    name: str
    delta: np.ndarray = field(default_factory=lambda: np.zeros(TIME_BINS, np.int64))
    moment: np.ndarray = field(default_factory=lambda: np.zeros(TIME_BINS, np.float64))
    events: int = 0


class TraceProfile:
    """Accumulates record batches (RECORD_DTYPE, time_ns from the trace's first record)."""

    def __init__(self, path: str | Path = "", *, label: str | None = None, format_name: str = "",
                 events: str = "queue", scatter_limit: int = SCATTER_LIMIT) -> None:
        self.path = str(path)
        self.label = label or Path(path).name or "trace"
        self.format_name = format_name
        self.events = events
        self.scatter_limit = scatter_limit
        self.records = 0
        self.op_counts = np.zeros(4, np.int64)
        self.op_bytes = np.zeros(4, np.int64)
        self.size_buckets = np.zeros((4, SIZE_BUCKETS), np.int64)
        self.sizes: list[dict[int, int]] = [{} for _ in range(4)]
        self.sizes_truncated = [False] * 4
        self.t_min: int | None = None
        self.t_max: int | None = None
        self.t_end = 0  # the latest time binned, depth events included
        self.width_ns = FIRST_TIME_WIDTH_NS
        self.counts = np.zeros((TIME_BINS, 4), np.int64)  # per time bin and op
        self.bytes = np.zeros((TIME_BINS, 4), np.float64)
        self.offset_width = FIRST_OFFSET_WIDTH
        self.density = np.zeros((TIME_BINS, OFFSET_BINS), np.int64)  # data requests only
        self.max_end = 0
        self._points: list[np.ndarray] | None = []
        self._kept = 0
        self.ia_hist = np.zeros(IA_BINS, np.int64)
        self.ia_zero = 0
        self.out_of_order = 0  # records earlier than the one before them
        self._last_time: int | None = None
        self._stream_end: dict[int, int] = {}
        # stream -> [data requests, those with a predecessor, sequential ones]
        self.stream_stats: dict[int, list[int]] = {}
        self.stream_names: dict[int, str] = {}
        self.depth: dict[str, DepthChannel] = {}
        self.skipped = 0
        self.ignored = 0

    # ---- time bins ----

    def _grow_time(self, t_max: int) -> None:
        while t_max >= TIME_BINS * self.width_ns:
            half = TIME_BINS // 2
            self.counts = _fold(self.counts)
            self.bytes = _fold(self.bytes)
            self.density = _fold(self.density)
            for ch in self.depth.values():
                # A step in the right half of a merged pair is `width` further from its start.
                pair = ch.delta.reshape(half, 2)
                moment = ch.moment.reshape(half, 2).sum(axis=1) + pair[:, 1] * float(self.width_ns)
                ch.delta = _fold(ch.delta)
                ch.moment = np.concatenate([moment, np.zeros(half)])
            self.width_ns *= 2

    def _grow_offsets(self, end: int) -> None:
        while end > OFFSET_BINS * self.offset_width:
            half = OFFSET_BINS // 2
            self.density = np.concatenate(
                [self.density.reshape(TIME_BINS, half, 2).sum(axis=2),
                 np.zeros((TIME_BINS, half), np.int64)], axis=1)
            self.offset_width *= 2

    def _time_bins(self, times: np.ndarray) -> np.ndarray:
        clamped = np.maximum(times, 0)
        if len(clamped):
            latest = int(clamped.max())
            self._grow_time(latest)
            self.t_end = max(self.t_end, latest)
        return clamped // self.width_ns

    # ---- records ----

    def add(self, batch: np.ndarray) -> None:
        n = len(batch)
        if not n:
            return
        times = batch["time_ns"].astype(np.int64)
        ops = batch["op"].astype(np.int64)
        lengths = batch["length"].astype(np.int64)
        offsets = batch["offset"].astype(np.uint64)
        self.records += n
        lo, hi = int(times.min()), int(times.max())
        self.t_min = lo if self.t_min is None else min(self.t_min, lo)
        self.t_max = hi if self.t_max is None else max(self.t_max, hi)
        self.op_counts += np.bincount(ops, minlength=4)[:4]
        self.op_bytes += np.bincount(ops, weights=lengths, minlength=4)[:4].astype(np.int64)

        bins = self._time_bins(times)
        cell = bins * 4 + ops
        self.counts += np.bincount(cell, minlength=TIME_BINS * 4).reshape(TIME_BINS, 4)
        self.bytes += np.bincount(cell, weights=lengths, minlength=TIME_BINS * 4).reshape(TIME_BINS, 4)

        self._interarrival(times)
        data = ops != Op.FLUSH
        if data.any():
            self._sizes(ops[data], lengths[data])
            self._offsets(bins[data], offsets[data], lengths[data])
            self._sequential(batch["stream"][data].astype(np.int64), offsets[data], lengths[data])
        if self._points is not None:
            if self._kept + n > self.scatter_limit:
                self._points = None  # the density takes over
            else:
                self._points.append(np.rec.fromarrays([times, offsets, ops], names="time_ns,offset,op"))
                self._kept += n

    def _interarrival(self, times: np.ndarray) -> None:
        prev = times[0] if self._last_time is None else self._last_time
        gaps = np.diff(times, prepend=prev)
        if self._last_time is None:
            gaps = gaps[1:]
        self._last_time = int(times[-1])
        self.out_of_order += int(np.count_nonzero(gaps < 0))
        self.ia_zero += int(np.count_nonzero(gaps == 0))
        pos = gaps[gaps > 0].astype(np.float64)
        if len(pos):
            idx = np.minimum((np.log10(pos) * IA_PER_DECADE).astype(np.int64), IA_BINS - 1)
            self.ia_hist += np.bincount(idx, minlength=IA_BINS)

    def _sizes(self, ops: np.ndarray, lengths: np.ndarray) -> None:
        nonzero = lengths > 0
        bucket = np.zeros(len(lengths), np.int64)
        bucket[nonzero] = np.ceil(np.log2(lengths[nonzero])).astype(np.int64)
        bucket = np.minimum(bucket, SIZE_BUCKETS - 1)
        self.size_buckets += np.bincount(ops * SIZE_BUCKETS + bucket,
                                         minlength=4 * SIZE_BUCKETS).reshape(4, SIZE_BUCKETS)
        for op in np.unique(ops).tolist():
            if self.sizes_truncated[op]:
                continue
            values, counts = np.unique(lengths[ops == op], return_counts=True)
            exact = self.sizes[op]
            for v, c in zip(values.tolist(), counts.tolist(), strict=True):
                exact[v] = exact.get(v, 0) + c
            if len(exact) > MAX_EXACT_SIZES:
                self.sizes_truncated[op] = True
                exact.clear()

    def _offsets(self, bins: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> None:
        end = int((offsets + lengths.astype(np.uint64)).max())
        self.max_end = max(self.max_end, end)
        self._grow_offsets(int(offsets.max()) + 1)
        obins = (offsets // np.uint64(self.offset_width)).astype(np.int64)
        self.density += np.bincount(bins * OFFSET_BINS + obins,
                                    minlength=TIME_BINS * OFFSET_BINS).reshape(TIME_BINS, OFFSET_BINS)

    def _sequential(self, streams: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> None:
        """A request is sequential when it starts where the previous data request of its stream
        ended (trace order); the first request of a stream has no predecessor and is not counted."""
        order = np.argsort(streams, kind="stable")
        s = streams[order]
        off = offsets[order]
        end = off + lengths[order].astype(np.uint64)
        ids, first, counts = np.unique(s, return_index=True, return_counts=True)
        prev_end = np.empty_like(end)
        prev_end[1:] = end[:-1]
        has_prev = np.ones(len(s), bool)
        for i, (sid, start) in enumerate(zip(ids.tolist(), first.tolist(), strict=True)):
            carried = self._stream_end.get(sid)
            if carried is None:
                has_prev[start] = False
            else:
                prev_end[start] = carried
            self._stream_end[sid] = int(end[start + counts[i] - 1])
        seq = has_prev & (off == prev_end)
        group = np.repeat(np.arange(len(ids)), counts)
        with_prev = np.bincount(group, weights=has_prev, minlength=len(ids))
        sequential = np.bincount(group, weights=seq, minlength=len(ids))
        for i, sid in enumerate(ids.tolist()):
            st = self.stream_stats.setdefault(sid, [0, 0, 0])
            st[0] += int(counts[i])
            st[1] += int(with_prev[i])
            st[2] += int(sequential[i])

    # ---- queue depth ----

    def add_depth_events(self, channel: str, times: np.ndarray, sign: int) -> None:
        """Steps of `sign` (+1 or -1) at `times` (ns on this profile's clock) in `channel`."""
        if not len(times):
            return
        ch = self.depth.get(channel)
        if ch is None:
            ch = self.depth[channel] = DepthChannel(channel)
        times = times.astype(np.int64)
        bins = self._time_bins(times)
        within = (np.maximum(times, 0) - bins * self.width_ns).astype(np.float64)
        ch.delta += np.bincount(bins, minlength=TIME_BINS) * sign
        ch.moment += np.bincount(bins, weights=within, minlength=TIME_BINS) * sign
        ch.events += len(times)

    # ---- what the charts show ----

    @property
    def duration_ns(self) -> int:
        if self.t_min is None or self.t_max is None:
            return 0
        return self.t_max - max(self.t_min, 0) if self.t_max > 0 else 0

    @property
    def used_bins(self) -> int:
        if self.t_max is None:
            return 0
        return int(self.t_end // self.width_ns) + 1

    @property
    def offset_mode(self) -> str:
        return "scatter" if self._points is not None else "density"

    def points(self) -> np.ndarray | None:
        """Every record as (time_ns, offset, op), or None once past scatter_limit."""
        if self._points is None:
            return None
        if not self._points:
            return np.rec.fromarrays([np.zeros(0, np.int64), np.zeros(0, np.uint64), np.zeros(0, np.int64)],
                                     names="time_ns,offset,op")
        return np.concatenate(self._points).view(np.recarray)

    def display_factor(self, target: int | None = None) -> int:
        """How many time bins to merge for display: about 20 records a bin, at most 200 bins."""
        used = self.used_bins
        if target is None:
            target = int(min(200, max(10, self.records // 20)))
        factor = 1
        while used / factor > target and factor < TIME_BINS:
            factor *= 2
        return factor

    def series(self, factor: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bin start in seconds, requests per op [bins, 4], bytes per op) at display width."""
        f = factor or self.display_factor()
        used = -(-self.used_bins // f)
        counts = merge_bins(self.counts, f)[:used]
        nbytes = merge_bins(self.bytes, f)[:used]
        starts = np.arange(used) * (self.width_ns * f) / 1e9
        return starts, counts, nbytes

    def depth_series(self, channel: str, factor: int | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        """(bin start in seconds, mean requests in flight) at display width, or None."""
        ch = self.depth.get(channel)
        if ch is None:
            return None
        f = factor or self.display_factor()
        width = float(self.width_ns * f)
        bins = -(-self.used_bins // f)
        half_idx = np.arange(TIME_BINS) % f  # a fine bin's place inside its display bin
        delta = merge_bins(ch.delta, f)
        moment = merge_bins(ch.moment + ch.delta * (half_idx * float(self.width_ns)), f)
        before = np.concatenate([[0], np.cumsum(delta)[:-1]])
        mean = before + delta - moment / width
        low = min(0.0, float(np.min(np.concatenate([before[:bins], [before[bins - 1] + delta[bins - 1]]]))))
        return np.arange(bins) * width / 1e9, mean[:bins] - low

    def interarrival_cdf(self) -> tuple[np.ndarray, np.ndarray, float]:
        """(gap upper edges in microseconds, cumulative share at each, share of zero gaps)."""
        total = int(self.ia_hist.sum()) + self.ia_zero
        edges_us = 10 ** ((np.arange(IA_BINS) + 1) / IA_PER_DECADE) / 1000
        if not total:
            return edges_us, np.zeros(IA_BINS), 0.0
        cdf = (np.cumsum(self.ia_hist) + self.ia_zero) / total
        return edges_us, cdf, self.ia_zero / total

    def mix_text(self) -> str:
        """'reads 63% (41% of bytes)' or what else the trace has."""
        reads, writes = int(self.op_counts[Op.READ]), int(self.op_counts[Op.WRITE])
        if not reads + writes:
            return "no reads or writes"
        rbytes, wbytes = int(self.op_bytes[Op.READ]), int(self.op_bytes[Op.WRITE])
        share = reads / (reads + writes)
        by_bytes = rbytes / (rbytes + wbytes) if rbytes + wbytes else 0.0
        return f"reads {100 * share:.0f}% ({100 * by_bytes:.0f}% of bytes)"

    def stream_name(self, sid: int) -> str:
        return self.stream_names.get(sid, str(sid))

    # ---- the numbers ----

    def summary(self) -> dict[str, Any]:
        reads, writes = int(self.op_counts[Op.READ]), int(self.op_counts[Op.WRITE])
        rbytes, wbytes = int(self.op_bytes[Op.READ]), int(self.op_bytes[Op.WRITE])
        secs = self.duration_ns / 1e9
        ops: dict[str, Any] = {}
        for op in Op:
            n = int(self.op_counts[op])
            entry: dict[str, Any] = {"count": n, "share": n / self.records if self.records else 0.0,
                                     "bytes": int(self.op_bytes[op])}
            if op in DATA_OPS and n:
                entry["mean_bytes"] = self.op_bytes[op] / n
                entry["sizes"] = self._top_sizes(op)
                entry["size_buckets"] = {size_label(1 << b): int(c)
                                         for b, c in enumerate(self.size_buckets[op]) if c}
            ops[OP_NAMES[op]] = entry
        streams = {}
        for sid, (n, with_prev, seq) in sorted(self.stream_stats.items(), key=lambda kv: -kv[1][0]):
            streams[self.stream_name(sid)] = {"requests": n, "with_predecessor": with_prev, "sequential": seq,
                                              "share": seq / with_prev if with_prev else None}
        with_prev = sum(v[1] for v in self.stream_stats.values())
        seq = sum(v[2] for v in self.stream_stats.values())
        edges, cdf, zero = self.interarrival_cdf()
        gaps = int(self.ia_hist.sum()) + self.ia_zero
        out: dict[str, Any] = {
            "trace": self.path, "label": self.label, "format": self.format_name, "events": self.events,
            "records": self.records, "skipped": self.skipped, "ignored": self.ignored,
            "duration_s": secs,
            "mean_iops": self.records / secs if secs else None,
            "mean_bw_bytes": (rbytes + wbytes) / secs if secs else None,
            "ops": ops,
            "read_share": reads / (reads + writes) if reads + writes else None,
            "read_share_bytes": rbytes / (rbytes + wbytes) if rbytes + wbytes else None,
            "sequential": {"share": seq / with_prev if with_prev else None, "requests": with_prev,
                           "sequential": seq, "streams": streams},
            "interarrival_us": {
                "mean": secs * 1e6 / gaps if gaps else None,
                "zero_share": zero,
                **{f"p{p}": _cdf_quantile(edges, cdf, p / 100, zero) if gaps else None
                   for p in (50, 90, 99)},
            },
            "out_of_order": self.out_of_order,
            "offset_max_bytes": self.max_end,
            "offset_time_chart": self.offset_mode,
            "queue_depth": self._depth_summary(),
        }
        return out

    def _top_sizes(self, op: int) -> list[list[int]] | None:
        if self.sizes_truncated[op]:
            return None
        ranked = sorted(self.sizes[op].items(), key=lambda kv: (-kv[1], kv[0]))
        return [[size, count] for size, count in ranked[:TOP_SIZES]]

    def _depth_summary(self) -> dict[str, Any] | None:
        if not self.depth:
            return None
        out: dict[str, Any] = {}
        for name, label in (("q", "block_layer"), ("d", "device")):
            s = self.depth_series(name, factor=1)
            if s is None:
                continue
            _, mean = s
            out[label] = {"mean": float(mean.mean()) if len(mean) else 0.0,
                          "max_bin_mean": float(mean.max()) if len(mean) else 0.0,
                          "bin_ms": self.width_ns / 1e6}
        return out or None


def _fold(a: np.ndarray) -> np.ndarray:
    """Merge neighbouring time bins (axis 0) pairwise; the upper half becomes empty."""
    half = a.shape[0] // 2
    merged = a.reshape(half, 2, *a.shape[1:]).sum(axis=1)
    return np.concatenate([merged, np.zeros_like(merged)])


def merge_bins(a: np.ndarray, factor: int) -> np.ndarray:
    """Sum each run of `factor` bins along axis 0 (its length is a multiple of factor)."""
    if factor == 1:
        return a
    return a.reshape(a.shape[0] // factor, factor, *a.shape[1:]).sum(axis=1)


def _cdf_quantile(edges: np.ndarray, cdf: np.ndarray, q: float, zero: float) -> float:
    if q <= zero:
        return 0.0
    i = int(np.searchsorted(cdf, q - 1e-12))
    return float(edges[min(i, len(edges) - 1)])


# ---- reading a trace ----


def profile_trace(path: str | Path, *, format: str | None = None, events: str = "queue",
                  on_error: str = "stop", label: str | None = None, scatter_limit: int = SCATTER_LIMIT,
                  batch_size: int = BATCH_RECORDS, depth: bool = True) -> TraceProfile:
    """Read the trace at `path` once for its records (and, for blktrace/blkparse with `depth`,
    again for the other events queue depth needs). A malformed trace raises TraceFormatError."""
    reader = open_trace(path, format, on_error=on_error, batch_size=batch_size, events=events)
    profile = TraceProfile(path, label=label, format_name=reader.format_name, events=events,
                           scatter_limit=scatter_limit)
    depth = depth and reader.format_name in COMPLETION_FORMATS
    step = DEPTH_STEPS.get(events) if depth else None
    for batch in reader:
        profile.add(batch)
        if step is not None:  # these records are also one of the depth passes
            profile.add_depth_events(step[0], batch["time_ns"], step[1])
    profile.stream_names = dict(reader.stream_names)
    profile.skipped = reader.skipped
    profile.ignored = reader.ignored
    if depth and reader.records:
        _read_depth(profile, path, reader, on_error, batch_size)
    return profile


def _read_depth(profile: TraceProfile, path: str | Path, main, on_error: str, batch_size: int) -> None:
    """The depth passes other than the records' own, on the records' clock."""

    def times_of(events: str):
        reader = open_trace(path, main.format_name, on_error=on_error, batch_size=batch_size,
                            events=events)
        for batch in reader:
            yield batch["time_ns"] + (reader.origin_ns - main.origin_ns)

    completions = 0
    for times in times_of("complete"):
        completions += len(times)
        profile.add_depth_events("q", times, -1)
        profile.add_depth_events("d", times, -1)
    if not completions:
        profile.depth.clear()
        return
    starts = {"q": 0, "d": 0}
    for events, (channel, sign) in DEPTH_STEPS.items():
        n = main.records if events == main.events else 0
        if events != main.events:
            for times in times_of(events):
                profile.add_depth_events(channel, times, sign)
                n += len(times)
        if sign > 0:
            starts[channel] += n
    for channel, n in starts.items():
        if not n:  # e.g. a trace of D and C events only: requests in the block layer are unknown
            profile.depth.pop(channel, None)
