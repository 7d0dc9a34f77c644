"""What to do with a trace besides replaying it: rewrite it as a fio iolog (so real fio can
replay it with read_iolog= inside a guest) and summarise it."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

import numpy as np

from ..errors import ConfigError
from .base import TraceReader
from .records import Op, mix64

BLOCK = 4096
_FIO_ACTION = {Op.READ: "read", Op.WRITE: "write", Op.TRIM: "trim", Op.FLUSH: "sync"}


def write_fio_v3(batches: Iterable[np.ndarray], out: TextIO, *, device: str = "/dev/vda") -> int:
    """Write the records as a fio version 3 iolog aimed at one `device`; return the I/O count.

    Every stream goes to `device`; flushes become `sync`. Timestamps are microseconds, shifted
    by 1 us because fio does not delay the line after one stamped 0 (delay_since_ttime treats
    a last time of 0 as "none yet"), which would swallow the first gap. Times are truncated to
    the microsecond; a negative time (an unsorted trace) is written as the start.
    """
    if not device or any(c.isspace() for c in device) or len(device) > 256:
        raise ConfigError(f"fio needs a device name without blanks, of at most 256 bytes: {device!r}")
    out.write(f"fio version 3 iolog\n0 {device} add\n0 {device} open\n")
    actions = [_FIO_ACTION[Op(i)] for i in range(len(_FIO_ACTION))]
    count = 0
    last_us = 1
    for batch in batches:
        if not len(batch):
            continue
        us = np.maximum(batch["time_ns"] // 1000, 0) + 1
        lines = [
            f"{t} {device} {actions[o]} {off} {n}\n"
            for t, o, off, n in zip(us.tolist(), batch["op"].tolist(), batch["offset"].tolist(),
                                    batch["length"].tolist(), strict=True)
        ]
        out.write("".join(lines))
        count += len(batch)
        last_us = max(last_us, int(us.max()))
    out.write(f"{last_us} {device} close\n")
    return count


# ---------------------------------------------------------------------------------------------


class Footprint:
    """Distinct (stream, 4 KiB block) pairs touched: exact (a sorted set) up to `exact_limit`
    pairs (8 bytes each, so some 100 MB at the limit), then a HyperLogLog estimate (2**14
    registers, about 0.8 % standard error)."""

    P = 14
    EXPAND = 1 << 22  # blocks expanded at once

    def __init__(self, exact_limit: int = 1 << 22) -> None:
        self.exact_limit = exact_limit
        self.known: np.ndarray | None = np.zeros(0, np.uint64)
        self.pending: list[np.ndarray] = []
        self.pending_len = 0
        self.registers = np.zeros(1 << self.P, np.uint8)

    def add(self, stream: np.ndarray, offset: np.ndarray, length: np.ndarray) -> None:
        touched = length > 0
        if not touched.any():
            return
        stream = stream[touched].astype(np.uint64)
        first = offset[touched] // BLOCK
        count = ((offset[touched] + length[touched].astype(np.uint64) - 1) // BLOCK - first + 1)
        narrow = bool((stream < 4096).all())
        for blocks, streams in _expand(first, count, stream, self.EXPAND):
            keys = blocks | (streams << np.uint64(52)) if narrow else mix64(blocks) ^ streams
            self._hll(keys)
            if self.known is not None:
                self._remember(_sorted_unique(keys))

    def _hll(self, keys: np.ndarray) -> None:
        h = mix64(keys)
        index = (h >> np.uint64(64 - self.P)).astype(np.intp)
        rest = (h << np.uint64(self.P)) >> np.uint64(self.P)  # 50 bits, exact as float64
        rho = (64 - self.P + 1 - np.frexp(rest.astype(np.float64))[1]).astype(np.uint8)
        np.maximum.at(self.registers, index, rho)

    def _remember(self, keys: np.ndarray) -> None:
        self.pending.append(keys)
        self.pending_len += len(keys)
        if self.pending_len >= max(len(self.known), 1 << 20):
            self._merge()

    def _merge(self) -> None:
        if self.known is None or not self.pending:
            return
        merged = _sorted_unique(np.concatenate([self.known, *self.pending]))
        self.pending, self.pending_len = [], 0
        self.known = merged if len(merged) <= self.exact_limit else None

    def result(self) -> tuple[int, bool]:
        """(distinct pairs, exact?)"""
        self._merge()
        if self.known is not None:
            return len(self.known), True
        m = float(len(self.registers))
        alpha = 0.7213 / (1 + 1.079 / m)
        estimate = alpha * m * m / float(np.sum(np.ldexp(1.0, -self.registers.astype(np.int64))))
        zeros = int(np.count_nonzero(self.registers == 0))
        if estimate <= 2.5 * m and zeros:
            estimate = m * math.log(m / zeros)
        return round(estimate), False


def _sorted_unique(keys: np.ndarray) -> np.ndarray:
    """np.unique by sorting: a stable sort merges the already-sorted runs it is given, and
    numpy 2's hash-based unique is far slower on tens of millions of keys."""
    keys = np.sort(keys, kind="stable")
    if len(keys) < 2:
        return keys
    fresh = np.empty(len(keys), bool)
    fresh[0] = True
    np.not_equal(keys[1:], keys[:-1], out=fresh[1:])
    return keys[fresh]


def _expand(first: np.ndarray, count: np.ndarray, tag: np.ndarray,
            budget: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every block of every range [first, first + count), with its range's tag, `budget` at a time."""
    ends = np.cumsum(count)
    start, n = 0, len(first)
    while start < n:
        base = int(ends[start - 1]) if start else 0
        stop = max(int(np.searchsorted(ends, base + budget, side="right")), start + 1)
        if stop == start + 1 and int(count[start]) > budget:
            lo, total = int(first[start]), int(count[start])
            for s in range(0, total, budget):
                blocks = np.arange(lo + s, lo + min(s + budget, total), dtype=np.uint64)
                yield blocks, np.full(len(blocks), tag[start], np.uint64)
        else:
            c = count[start:stop].astype(np.int64)
            total = int(c.sum())
            offsets = np.arange(total, dtype=np.uint64) - np.repeat((np.cumsum(c) - c).astype(np.uint64), c)
            yield np.repeat(first[start:stop], c) + offsets, np.repeat(tag[start:stop], c)
        start = stop


def trace_stats(reader: Iterable[np.ndarray], *, exact_footprint_limit: int = 1 << 22) -> dict[str, Any]:
    """Summarise a trace in one pass: I/O count and mix, bytes, a power-of-two size histogram,
    duration and mean rates, footprint in 4 KiB blocks, per-stream counts.

    `reader` is a TraceReader (its counters and stream names are included) or any iterable of
    record batches.
    """
    ops = np.zeros(4, np.int64)
    nbytes = np.zeros(4, np.int64)
    hist = np.zeros((34, 4), np.int64)  # row 0: length 0; row b + 1: [2**b, 2**(b+1))
    per_stream: dict[int, int] = {}
    footprint = Footprint(exact_footprint_limit)
    first_ns = last_ns = None
    t_min = t_max = 0
    prev_t: int | None = None
    out_of_order = 0
    for batch in reader:
        if not len(batch):
            continue
        op = batch["op"].astype(np.intp)
        if (op > Op.TRIM).any():
            raise ConfigError("record with an unknown op")
        length = batch["length"]
        times = batch["time_ns"]
        ops += np.bincount(op, minlength=4)
        nbytes += np.bincount(op, weights=length, minlength=4).astype(np.int64)
        data = op != Op.FLUSH
        bucket = np.where(length > 0, np.frexp(length.astype(np.float64))[1], 0)
        np.add.at(hist, (bucket[data], op[data]), 1)
        sids, counts = np.unique(batch["stream"], return_counts=True)
        for sid, n in zip(sids.tolist(), counts.tolist(), strict=True):
            per_stream[sid] = per_stream.get(sid, 0) + n
        footprint.add(batch["stream"][data], batch["offset"][data], length[data])
        if first_ns is None:
            first_ns = t_min = t_max = int(times[0])
        last_ns = int(times[-1])
        t_min, t_max = min(t_min, int(times.min())), max(t_max, int(times.max()))
        out_of_order += int(np.count_nonzero(times[1:] < times[:-1]))
        if prev_t is not None and int(times[0]) < prev_t:
            out_of_order += 1
        prev_t = last_ns
    records = int(ops.sum())
    duration_ns = t_max - t_min
    seconds = duration_ns / 1e9
    blocks, exact = footprint.result()
    names = getattr(reader, "stream_names", {})
    rows = []
    for b in range(len(hist)):
        if hist[b].any():
            lo, hi = (0, 0) if b == 0 else (1 << (b - 1), (1 << b) - 1)
            row = {"min_bytes": lo, "max_bytes": hi, "count": int(hist[b].sum())}
            row.update({name: int(hist[b][op]) for op, name in _OPS if op != Op.FLUSH})
            rows.append(row)
    stats: dict[str, Any] = {
        "records": records,
        "ops": {name: int(ops[op]) for op, name in _OPS},
        "bytes": {name: int(nbytes[op]) for op, name in _OPS if op != Op.FLUSH},
        "size_histogram": rows,
        "first_ns": first_ns or 0,
        "last_ns": last_ns or 0,
        "duration_s": seconds,
        "iops": records / seconds if seconds > 0 else None,
        "bytes_per_s": int(nbytes[Op.READ] + nbytes[Op.WRITE]) / seconds if seconds > 0 else None,
        "out_of_order": out_of_order,
        "footprint_blocks": blocks,
        "footprint_bytes": blocks * BLOCK,
        "footprint_exact": exact,
        "streams": [{"id": sid, "name": names.get(sid, str(sid)), "records": per_stream[sid]}
                    for sid in sorted(per_stream)],
    }
    if isinstance(reader, TraceReader):
        stats.update({"path": str(reader.path), "format": reader.format_name,
                      "skipped": reader.skipped, "ignored": reader.ignored,
                      "skipped_examples": [str(e) for e in reader.skipped_errors]})
    return stats


_OPS = [(Op.READ, "read"), (Op.WRITE, "write"), (Op.TRIM, "trim"), (Op.FLUSH, "flush")]


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _size_label(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def format_stats(stats: dict[str, Any], *, max_streams: int = 20) -> str:
    """The text `dataplane trace stats` prints."""
    out = []
    if "path" in stats:
        out.append(f"trace: {stats['path']} ({stats['format']})")
    n = stats["records"]
    rate = f", {stats['iops']:.1f} IOPS, {human_bytes(stats['bytes_per_s'])}/s" if stats["iops"] else ""
    out.append(f"I/Os: {n} over {stats['duration_s']:.6f} s{rate}")
    mix = ", ".join(f"{name} {count} ({100 * count / n:.1f}%)" if n else f"{name} 0"
                    for name, count in stats["ops"].items())
    out.append(f"mix: {mix}")
    out.append("bytes: " + ", ".join(f"{name} {human_bytes(b)}" for name, b in stats["bytes"].items()))
    if stats["size_histogram"]:
        out.append("sizes (read/write/trim):")
        peak = max(row["count"] for row in stats["size_histogram"])
        for row in stats["size_histogram"]:
            label = "0 B" if row["max_bytes"] == 0 else f"{_size_label(row['min_bytes'])}+"
            bar = "#" * max(1, round(30 * row["count"] / peak))
            out.append(f"  {label:>10} {row['count']:>10}  {bar}  "
                       f"({row['read']}/{row['write']}/{row['trim']})")
    how = "exact" if stats["footprint_exact"] else "estimated, HyperLogLog ~0.8%"
    out.append(f"footprint: {stats['footprint_blocks']} distinct 4 KiB blocks "
               f"({human_bytes(stats['footprint_bytes'])}, {how})")
    if stats["out_of_order"]:
        out.append(f"out of order: {stats['out_of_order']} records earlier than the one before")
    streams = stats["streams"]
    out.append(f"streams: {len(streams)}")
    for s in streams[:max_streams]:
        out.append(f"  {s['id']:>6} {s['name']:<24} {s['records']}")
    if len(streams) > max_streams:
        out.append(f"  ... {len(streams) - max_streams} more")
    if stats.get("skipped"):
        out.append(f"skipped: {stats['skipped']} malformed lines, e.g. {stats['skipped_examples'][0]}")
    return "\n".join(out) + "\n"
