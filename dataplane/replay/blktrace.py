"""blktrace: the binary per-CPU files (`DEV.blktrace.N`) and blkparse's default text output.

A binary file is a sequence of `struct blk_io_trace` (48 bytes, the byte order of the machine
that traced; see blktrace_api.h) each followed by `pdu_len` bytes of payload:

    u32 magic (0x65617400 | version 7)  u32 sequence  u64 time (ns)  u64 sector (512 B)
    u32 bytes  u32 action  u32 pid  u32 device  u32 cpu  u16 error  u16 pdu_len

`action` holds the event in its low 16 bits (__BLK_TA_QUEUE = 1, __BLK_TA_ISSUE = 7, ...,
plus the __BLK_TA_CGROUP flag 1 << 8) and the categories in its high 16 bits (BLK_TC_READ,
WRITE, FLUSH, SYNC, ... NOTIFY 1 << 10, DISCARD 1 << 13, FUA 1 << 15). Records come from
one kind of event: queue (Q) or issue (D) to replay, complete (C), merge (M, F) or requeue (R)
for the charts' queue depth. A request with data and the FLUSH category
(a REQ_PREFLUSH write: blkparse shows "FWS") becomes a flush record followed by the data
record, as the block layer would issue it; one without data is a flush; FUA is not kept.
The stream is the CPU that logged the event.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ._parse import (
    NEWLINE,
    UINT32_MAX,
    Malformed,
    decimal_ns_field,
    first_false,
    map_codes,
    open_input,
    parse_decimal_ns,
    parse_uint,
    read_block,
    show,
    token_codes,
    uint_field,
)
from .base import Row, TextTraceReader, TraceReader
from .records import BATCH_RECORDS, Op, TraceFormatError, make_records

BLK_IO_TRACE_MAGIC = 0x65617400
BLK_IO_TRACE_VERSION = 0x07
TRACE_SIZE = 48

# Event numbers (low byte of action) and category bits (action >> 16), from blktrace_api.h.
BLK_TA_QUEUE = 1
BLK_TA_BACKMERGE = 2
BLK_TA_FRONTMERGE = 3
BLK_TA_REQUEUE = 6
BLK_TA_ISSUE = 7
BLK_TA_COMPLETE = 8
BLK_TC_READ = 1 << 0
BLK_TC_WRITE = 1 << 1
BLK_TC_FLUSH = 1 << 2
BLK_TC_SYNC = 1 << 3
BLK_TC_PC = 1 << 9
BLK_TC_NOTIFY = 1 << 10
BLK_TC_AHEAD = 1 << 11
BLK_TC_META = 1 << 12
BLK_TC_DISCARD = 1 << 13
BLK_TC_FUA = 1 << 15

EVENTS = {"queue": (BLK_TA_QUEUE, b"Q"), "issue": (BLK_TA_ISSUE, b"D"),
          # not replayed; read by the charts (replay.profile) for queue depth over time
          "complete": (BLK_TA_COMPLETE, b"C"), "backmerge": (BLK_TA_BACKMERGE, b"M"),
          "frontmerge": (BLK_TA_FRONTMERGE, b"F"), "requeue": (BLK_TA_REQUEUE, b"R")}
_FIELDS = [("magic", "u4"), ("sequence", "u4"), ("time", "u8"), ("sector", "u8"), ("bytes", "u4"),
           ("action", "u4"), ("pid", "u4"), ("device", "u4"), ("cpu", "u4"), ("error", "u2"),
           ("pdu_len", "u2")]
TRACE_DTYPES = {order: np.dtype([(name, order + kind) for name, kind in _FIELDS]) for order in "<>"}
assert all(dt.itemsize == TRACE_SIZE for dt in TRACE_DTYPES.values())

READ_BYTES = 1 << 20
WALK_RECORDS = 1 << 16
STEP_RECORDS = 1 << 10
_PER_CPU = re.compile(r"^(?P<dev>.+)\.blktrace\.(?P<cpu>\d+)(?:\.gz)?$")


def _check_events(events: str) -> None:
    if events not in EVENTS:
        raise ConfigError(f"events must be one of {', '.join(EVENTS)}, not {events!r}")


def per_cpu_files(path: str | Path) -> list[Path]:
    """The per-CPU files of the trace `path` names: `DEV.blktrace.N` (any one of them, giving
    all its siblings), or the `DEV` prefix blkparse -i takes. Any other file stands alone."""
    path = Path(path)
    match = _PER_CPU.match(path.name)
    if match is None and not path.exists():
        candidates = [path.with_name(f"{path.name}.blktrace.0"), path.with_name(f"{path.name}.blktrace.0.gz")]
        if any(c.exists() for c in candidates):
            match = _PER_CPU.match(f"{path.name}.blktrace.0")
    if match is None:
        return [path]
    dev = match.group("dev")
    found: dict[int, Path] = {}
    for sibling in path.parent.glob(f"{glob_escape(dev)}.blktrace.*"):
        m = _PER_CPU.match(sibling.name)
        if m and m.group("dev") == dev:
            found.setdefault(int(m.group("cpu")), sibling)
    if not found:
        return [path]
    return [found[cpu] for cpu in sorted(found)]


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def decode_events(traces: np.ndarray, events: str, split_preflush: bool) -> tuple[np.ndarray, int]:
    """Records (raw ns times) for the Q or D events among `traces` (TRACE_DTYPES rows), and how
    many of the traces they came from."""
    action = traces["action"].astype(np.uint32)
    category = action >> 16
    wanted = (action & 0xFF) == EVENTS[events][0]
    wanted &= (category & (BLK_TC_NOTIFY | BLK_TC_PC)) == 0
    nbytes = traces["bytes"].astype(np.uint32)
    has_data = nbytes > 0
    flush = (category & BLK_TC_FLUSH) != 0
    keep = wanted & (has_data | flush)
    preflush = keep & has_data & flush if split_preflush else np.zeros(len(keep), bool)
    counts = keep.astype(np.int64) + preflush
    src = np.repeat(np.arange(len(traces)), counts)
    sel = traces[src]
    op = np.where((category[src] & BLK_TC_DISCARD) != 0, Op.TRIM,
                  np.where((category[src] & BLK_TC_WRITE) != 0, Op.WRITE, Op.READ))
    data = has_data[src]
    # The first of each (flush, data) pair is the flush.
    first = np.zeros(len(src), bool)
    starts = np.cumsum(counts) - counts
    first[starts[preflush]] = True
    is_flush = ~data | first
    op = np.where(is_flush, Op.FLUSH, op)
    offset = np.where(is_flush, 0, sel["sector"].astype(np.uint64) * np.uint64(512))
    length = np.where(is_flush, 0, sel["bytes"])
    records = make_records(sel["time"].astype(np.int64), offset, length, sel["cpu"], op)
    return records, int(np.count_nonzero(keep))


class BlktraceReader(TraceReader):
    """blktrace's binary output: every per-CPU file of one device, merged by timestamp."""

    format_name = "blktrace"
    unit = "record"
    stream_label = "cpu {}"

    def __init__(self, path: str | Path, *, on_error: str = "stop", batch_size: int = BATCH_RECORDS,
                 events: str = "queue", split_preflush: bool = True) -> None:
        super().__init__(path, on_error=on_error, batch_size=batch_size)
        _check_events(events)
        self.events = events
        self.split_preflush = split_preflush
        self.files = per_cpu_files(path)

    def _raw_chunks(self) -> Iterator[np.ndarray]:
        sources = [self._decoded(f) for f in self.files]
        if len(sources) == 1:
            yield from sources[0]
        else:
            yield from merge_by_time(sources)

    def _decoded(self, path: Path) -> Iterator[np.ndarray]:
        for traces in self._walk(path):
            records, used = decode_events(traces, self.events, self.split_preflush)
            self.ignored += len(traces) - used
            yield records

    def _walk(self, path: Path) -> Iterator[np.ndarray]:
        """Every trace record of one file, in order, in arrays; the payloads are stepped over."""
        with open_input(path) as f:
            buf = b""
            pos = 0  # start of the next record in buf
            base = 0  # file offset of buf[0]
            recno = 0  # records consumed before pos
            order = None
            eof = False
            while True:
                if not eof and len(buf) - pos < READ_BYTES:  # > the largest record (48 + 65535)
                    more = read_block(f, READ_BYTES, path, recno + 1, "record")
                    eof = not more
                    base += pos
                    buf, pos = buf[pos:] + more, 0
                if pos >= len(buf):
                    return
                if order is None:
                    order = self._byte_order(buf, path)
                    if order is None:
                        return
                    pdu_at = struct.Struct(order + "H")
                    magic_word = struct.pack(order + "I", BLK_IO_TRACE_MAGIC | BLK_IO_TRACE_VERSION)
                    dtype = TRACE_DTYPES[order]
                # Most records carry no payload: take a run of them in place.
                n = min((len(buf) - pos) // TRACE_SIZE, WALK_RECORDS)
                if n:
                    view = np.frombuffer(buf, dtype, count=n, offset=pos)
                    j = first_false((view["magic"] == BLK_IO_TRACE_MAGIC | BLK_IO_TRACE_VERSION)
                                    & (view["pdu_len"] == 0))
                    if j:
                        yield view[:j]
                        recno += j
                        pos += j * TRACE_SIZE
                        continue
                # Otherwise step from record to record, over payloads, for a while.
                offsets = []
                p, end = pos, len(buf)
                unpack = pdu_at.unpack_from
                while p + TRACE_SIZE <= end and len(offsets) < STEP_RECORDS:
                    nxt = p + TRACE_SIZE + unpack(buf, p + 46)[0]
                    if nxt > end:
                        break
                    offsets.append(p)
                    p = nxt
                if not offsets:
                    if not eof:
                        continue
                    self._bad(recno + 1, f"truncated record at byte offset {base + pos} "
                              f"({len(buf) - pos} bytes left)", path)
                    return
                at = np.array(offsets, dtype=np.int64)
                raw = np.frombuffer(buf, np.uint8)[at[:, None] + np.arange(TRACE_SIZE)]
                traces = raw.view(dtype).ravel()
                magic = traces["magic"]
                bad = magic != (BLK_IO_TRACE_MAGIC | BLK_IO_TRACE_VERSION)
                if not bad.any():
                    yield traces
                    recno += len(offsets)
                    pos = p
                    continue
                j = int(np.argmax(bad))
                if j:
                    yield traces[:j]
                word = int(magic[j])
                if word & 0xFFFFFF00 == BLK_IO_TRACE_MAGIC:
                    why = (f"unsupported blktrace version {word & 0xFF} "
                           f"(this reader knows {BLK_IO_TRACE_VERSION})")
                else:
                    why = f"bad magic 0x{word:08x}"
                self._bad(recno + j + 1, f"{why} at byte offset {base + offsets[j]}", path)
                # Skipping: resynchronise on the next valid magic word.
                recno += j + 1
                found = buf.find(magic_word, offsets[j] + 1)
                while found < 0 and not eof:
                    keep = len(buf) - 3
                    more = read_block(f, READ_BYTES, path, recno, "record")
                    eof = not more
                    base += keep
                    buf = buf[keep:] + more
                    found = buf.find(magic_word)
                if found < 0:
                    return
                pos = found

    def _byte_order(self, buf: bytes, path: Path) -> str | None:
        if len(buf) < 4:
            self._bad(1, f"truncated record at byte offset 0 ({len(buf)} bytes)", path)
            return None
        for order in "<>":
            word = struct.unpack_from(order + "I", buf)[0]
            if word & 0xFFFFFF00 == BLK_IO_TRACE_MAGIC:
                return order
        # Neither byte order: not a blktrace file, whatever the skip mode says.
        word = struct.unpack_from("<I", buf)[0]
        raise TraceFormatError(path, 1, f"not a blktrace file: bad magic 0x{word:08x} at byte offset 0",
                               unit=self.unit)


def merge_by_time(sources: list[Iterator[np.ndarray]]) -> Iterator[np.ndarray]:
    """Merge record streams, each sorted by time_ns, into one sorted stream (ties: source order).

    Holds one chunk per source: everything not later than the earliest of the sources' latest
    buffered times is safe to emit, since no source can still produce anything earlier.
    """
    held: list[np.ndarray] = [np.zeros(0, dtype=np.dtype([]))] * len(sources)
    live = [True] * len(sources)
    while True:
        for i, src in enumerate(sources):
            while live[i] and not len(held[i]):
                nxt = next(src, None)
                if nxt is None:
                    live[i] = False
                else:
                    held[i] = nxt
        pending = [h for h in held if len(h)]
        if not pending:
            return
        horizon = min((int(held[i]["time_ns"][-1]) for i in range(len(sources)) if live[i]), default=None)
        parts = []
        for i, h in enumerate(held):
            if not len(h):
                continue
            if horizon is None:
                cut = len(h)
            else:
                cut = int(np.searchsorted(h["time_ns"], horizon, side="right"))
            parts.append(h[:cut])
            held[i] = h[cut:]
        out = np.concatenate(parts)
        yield out[np.argsort(out["time_ns"], kind="stable")]


# ---------------------------------------------------------------------------------------------

_RWBS_TAIL = set(b"FASME")


class BlkparseReader(TextTraceReader):
    """blkparse's default output, one event a line:

        8,0    1        1     0.000000000  1234  Q  WS 2048 + 8 [fio]

    device, CPU, sequence, seconds.nanoseconds, pid, event, RWBS, then sector + sectors
    [process]. Lines that are not events (blkparse's per-CPU and total summaries) and events
    other than the chosen one are ignored.
    """

    format_name = "blkparse"
    stream_label = "cpu {}"

    def __init__(self, path: str | Path, *, on_error: str = "stop", batch_size: int = BATCH_RECORDS,
                 events: str = "queue", split_preflush: bool = True) -> None:
        super().__init__(path, on_error=on_error, batch_size=batch_size)
        _check_events(events)
        self.events = events
        self.split_preflush = split_preflush
        self._action = EVENTS[events][1]
        # C and R lines print a request without data as "SECTOR [error]"; on Q and D lines
        # "NUMBER [" is a passthrough request's byte count (blkparse_fmt.c, process_default).
        self._sector_only = events in ("complete", "requeue")

    def _fast(self, a: np.ndarray) -> tuple[np.ndarray | None, int, int]:
        """The leading lines that are blank, not events, other events, or well-formed wanted
        events, parsed with numpy; stops at the first line `_parse_line` has to look at."""
        nl = np.flatnonzero(a == NEWLINE)
        nlines = len(nl)
        is_sep = a <= 32
        if np.count_nonzero(a < 32) != np.count_nonzero((a >= 9) & (a <= 13)):
            is_sep = _WHITESPACE[a]  # control bytes that bytes.split() keeps inside tokens
        body = ~is_sep
        edge = np.ones(len(a) + 1, bool)
        edge[1:-1] = is_sep[:-1] != is_sep[1:]
        starts = np.flatnonzero(body & edge[:-1])
        ends = np.flatnonzero(body & edge[1:]) + 1
        if not len(starts):
            self.ignored += nlines
            return make_records(*([np.zeros(0, np.int64)] * 5)), nlines, len(a)
        first = np.zeros(nlines, np.int64)  # each line's first token (its count may be 0)
        first[1:] = np.searchsorted(starts, nl[:-1])
        count = np.diff(first, append=len(starts))
        last_token = len(starts) - 1
        end = len(a) - 1

        def token(k: int, rows: np.ndarray | slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
            i = np.minimum(first[rows] + k, last_token)
            return starts[i], ends[i]

        s5, e5 = token(5)
        is_event = (count >= 6) & (e5 - s5 == 1) & (a[np.minimum(s5, end)] == self._action[0])
        short = (count >= 1) & (count < 6)
        ignored = (count == 0) | ((count >= 6) & ~is_event)
        # Short lines and chosen events: which start with a device number "MAJOR,MINOR"?
        check = np.flatnonzero(short | is_event)
        devno, certain = _devno_mask(a, *token(0, check))
        ignored[check[certain & ~devno]] = True
        rows = check[certain & devno & is_event[check] & (count[check] >= 8)]
        # The chosen events' fields.
        cpu, ok = parse_uint(a, *token(1, rows))
        ok &= cpu <= UINT32_MAX
        ok &= parse_uint(a, *token(2, rows))[1] & parse_uint(a, *token(4, rows))[1]
        time, time_ok = parse_decimal_ns(a, *token(3, rows))
        rwbs, rwbs_ok = map_codes(token_codes(a, *token(6, rows))[0], _RWBS_TABLE)
        ok &= time_ok & rwbs_ok
        s7, e7 = token(7, rows)
        s8, e8 = token(8, rows)
        opener7 = _OPENERS[a[np.minimum(s7, end)]]
        opener8 = (count[rows] >= 9) & _OPENERS[a[np.minimum(s8, end)]]
        plus = (count[rows] >= 10) & (e8 - s8 == 1) & (a[np.minimum(s8, end)] == ord("+"))
        sector, sector_ok = parse_uint(a, s7, e7)
        nsect, nsect_ok = parse_uint(a, *token(9, rows))
        passthrough = ~plus & ~opener7 & sector_ok & opener8
        no_data = np.zeros(len(rows), bool)
        if self._sector_only:
            no_data, passthrough = passthrough, no_data
        ok &= np.where(plus, sector_ok & (sector < (1 << 55)) & nsect_ok & (nsect <= UINT32_MAX >> 9),
                       opener7 | passthrough | no_data)
        good = ignored
        good[rows[ok]] = True
        m = first_false(good)
        if not m:
            return None, 0, 0
        k = int(np.searchsorted(rows, m))  # the chosen events among the lines taken
        nbytes = np.where(plus, nsect, 0)[:k] * np.uint64(512)
        flush = (rwbs[:k] & 4) != 0
        take = ~passthrough[:k] & ((nbytes > 0) | flush)
        preflush = take & (nbytes > 0) & flush if self.split_preflush else np.zeros(k, bool)
        counts = take.astype(np.int64) + preflush
        src = np.repeat(np.arange(k), counts)
        lead = np.zeros(len(src), bool)
        lead[(np.cumsum(counts) - counts)[preflush]] = True
        is_flush = (nbytes[src] == 0) | lead
        op = np.where(is_flush, Op.FLUSH, _KIND_OP[(rwbs[:k] & 3)[src]])
        offset = np.where(is_flush, 0, sector[src] * np.uint64(512))
        length = np.where(is_flush, 0, nbytes[src])
        records = make_records(time[src], offset, length, cpu[src], op)
        self.ignored += m - int(np.count_nonzero(take))
        return records, m, int(nl[m - 1]) + 1

    def _parse_line(self, line: bytes, lineno: int) -> list[Row] | None:
        parts = line.split()
        if len(parts) < 6 or parts[5] != self._action:
            if parts and _is_devno(parts[0]) and len(parts) < 6:
                raise Malformed(f"event line with {len(parts)} fields "
                                "(device cpu sequence time pid event ...)")
            return None
        if not _is_devno(parts[0]):
            return None
        if len(parts) < 8:
            raise Malformed(f"{self._action.decode()} event without RWBS and payload")
        cpu, seq, pid = parts[1], parts[2], parts[4]
        if not (cpu.isdigit() and seq.isdigit() and pid.isdigit()) or int(cpu) > UINT32_MAX:
            uint_field(cpu, "CPU", UINT32_MAX)
            uint_field(seq, "sequence")
            uint_field(pid, "pid")
        sec, dot, nsec = parts[3].partition(b".")
        if dot and len(nsec) == 9 and sec.isdigit() and nsec.isdigit() and len(sec) < 10:
            time = int(sec) * 1_000_000_000 + int(nsec)
        else:
            time = decimal_ns_field(parts[3], "time")
        flush, kind = _parse_rwbs(parts[6])
        payload = parts[7:]
        if len(payload) >= 3 and payload[1] == b"+":
            sector = uint_field(payload[0], "sector", (1 << 55) - 1)
            nbytes = uint_field(payload[2], "sector count", UINT32_MAX >> 9) * 512
        elif payload[0][:1] in (b"[", b"("):
            sector = nbytes = 0
        elif len(payload) >= 2 and payload[0].isdigit() and payload[1][:1] in (b"[", b"("):
            if not self._sector_only:
                return None  # a passthrough (pc) request: bytes and a CDB, no sectors
            sector = nbytes = 0  # a completion without data
        else:
            found = show(b" ".join(payload))
            raise Malformed(f"expected 'sector + count' after the RWBS field, found {found}")
        cpu = int(cpu)
        if nbytes == 0:
            return [(time, 0, 0, cpu, Op.FLUSH)] if flush else None
        op = Op.TRIM if kind == b"D" else Op.WRITE if kind == b"W" else Op.READ
        if flush and self.split_preflush:
            return [(time, 0, 0, cpu, Op.FLUSH), (time, sector * 512, nbytes, cpu, op)]
        return [(time, sector * 512, nbytes, cpu, op)]


_WHITESPACE = np.zeros(256, bool)
_WHITESPACE[list(b" \t\n\r\x0b\x0c")] = True  # what bytes.split() splits on
_OPENERS = np.zeros(256, bool)
_OPENERS[list(b"[(")] = True
_KIND_OP = np.array([Op.TRIM, Op.WRITE, Op.READ, Op.READ], np.uint8)  # D W R N
_RWBS_TABLE = {
    (b"F" if pre else b"") + kind + (b"F" if fua else b"") + (b"A" if ahead else b"")
    + (b"S" if sync else b"") + (b"M" if meta else b""): i | (pre << 2)
    for pre in (0, 1) for i, kind in enumerate((b"D", b"W", b"R", b"N"))
    for fua in (0, 1) for ahead in (0, 1) for sync in (0, 1) for meta in (0, 1)
}


def _devno_mask(a: np.ndarray, s: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which tokens are "MAJOR,MINOR", and for which the answer is certain (up to 16 bytes)."""
    w = e - s
    cols = np.arange(min(int(w.max()), 16) if len(w) else 1)
    raw = a[np.minimum(s[:, None] + cols, len(a) - 1)]
    inside = cols < w[:, None]
    digit = (raw - 48 <= 9) & inside
    comma = (raw == 44) & inside
    last = raw[np.arange(len(s)), np.clip(w - 1, 0, len(cols) - 1)]
    devno = ((digit | comma | ~inside).all(axis=1) & (comma.sum(axis=1) == 1) & digit[:, 0]
             & (last - 48 <= 9))
    return devno, w <= 16


def _is_devno(token: bytes) -> bool:
    major, comma, minor = token.partition(b",")
    return bool(comma) and major.isdigit() and minor.isdigit()


def _parse_rwbs(rwbs: bytes) -> tuple[bool, bytes]:
    """blkparse's fill_rwbs: [F]{D|W|R|N}[F][A][S][M] -> (preflush, D/W/R/N)."""
    flush = len(rwbs) >= 2 and rwbs[:1] == b"F" and rwbs[1:2] in (b"D", b"W", b"R", b"N")
    body = rwbs[1:] if flush else rwbs
    if not body or body[:1] not in (b"D", b"W", b"R", b"N") or not set(body[1:]) <= _RWBS_TAIL:
        raise Malformed(f"bad RWBS field {show(rwbs)}")
    return flush, body[:1]
