"""fio iologs, versions 2 and 3 (fio's HOWTO, "Trace file format"; read_iolog in fio's iolog.c).

    fio version 2 iolog                 fio version 3 iolog
    /dev/vda add                        0 /dev/vda add
    /dev/vda open                       2 /dev/vda open
    /dev/vda write 0 4096               15 /dev/vda write 0 4096
    /dev/vda wait 5 0                   (no wait in v3: every line carries its time)
    /dev/vda close                      98 /dev/vda close

fio reads five fields of a v3 I/O line and ignores the rest; so does this reader. dataplane's
own recordings (`serve --record FILE --record-format iolog`) use that room for three more (the
virtio-blk op, the status, the latency), and mark entries the recorder lost with a line
`TIME FILE dropped COUNT 0` (fio says "bad iolog file action" and goes on; this reader counts
them in `dropped`).

Each file named by an `add` line is a stream, numbered in order of `add`. v3 timestamps are
microseconds since the start of the run (fio writes them with utime_since_now and sleeps for
their differences in usec). v2 lines have no time: a record's time is set by the `wait` lines
before it, read one of two ways (`v2_wait`):

* "absolute-ms" (default, what fio's replay does): `wait N` holds the next I/O until N
  milliseconds after fio started (read_iolog_get compares N with mtime_since_genesis; fio
  3.33 replays "read, wait 300, read, wait 50, read, wait 600, read" at 0, 300, 300 and
  600 ms from its start);
* "relative-us" (what the HOWTO says): `wait N` delays by N microseconds after the previous
  wait; waits below 100 us are discarded.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np

from ._parse import (
    INT64_MAX,
    UINT32_MAX,
    Malformed,
    StreamTable,
    field_strings,
    first_appearance_unique,
    first_false,
    map_codes,
    parse_uint,
    show,
    token_codes,
    tokenize,
    uint_field,
)
from .base import Row, TextTraceReader
from .records import BATCH_RECORDS, Op, TraceFormatError, make_records

HEADERS = {b"fio version 2 iolog": 2, b"fio version 3 iolog": 3}
FILE_ACTIONS = (b"add", b"open", b"close")
V2_WAIT = ("absolute-ms", "relative-us")

_WAIT = 9  # not an Op: a v2 wait line
DROPPED = b"dropped"  # a dataplane recording's gap: entries its writer lost
RECORDING_FIELDS = 8  # a dataplane recording's v3 I/O line: fio's five and three of its own
_ACTIONS = {b"read": Op.READ, b"write": Op.WRITE, b"trim": Op.TRIM,
            b"sync": Op.FLUSH, b"datasync": Op.FLUSH, b"wait": _WAIT}
SPACE = ord(" ")


class FioIologReader(TextTraceReader):
    """fio `write_iolog` output, version 2 or 3 (told by its first line)."""

    format_name = "fio"

    def __init__(self, path: str | Path, *, on_error: str = "stop", batch_size: int = BATCH_RECORDS,
                 v2_wait: str = "absolute-ms") -> None:
        super().__init__(path, on_error=on_error, batch_size=batch_size)
        if v2_wait not in V2_WAIT:
            raise ValueError(f"v2_wait must be one of {V2_WAIT}")
        self.v2_wait = v2_wait
        self.version = 0
        self.dropped = 0  # entries a dataplane recording says it lost

    def _start(self) -> None:
        self.dropped = 0
        self._files = StreamTable()
        self.stream_names = self._files.names
        self._clock_ns = 0  # v2: the time the next I/O may start, set by wait lines

    def _read_preamble(self, f: BinaryIO) -> int:
        header = f.readline(256).rstrip(b"\r\n").rstrip()
        version = HEADERS.get(header)
        if version is None:
            hint = " (version 1 iologs, without a header, are not supported)" if b"," in header else ""
            raise TraceFormatError(self.path, 1, "not a fio iolog: the first line must be 'fio version "
                                   f"2 iolog' or 'fio version 3 iolog', not {show(header)}{hint}")
        self.version = version
        self.time_scale = 1000 if version == 3 else 1
        self._actions = dict(_ACTIONS)
        if version == 3:
            del self._actions[b"wait"]
        return 2

    # -- one line at a time: the reference behaviour ----------------------------------------

    def _parse_line(self, line: bytes, lineno: int) -> list[Row] | None:
        parts = line.split()
        if not parts:
            return None
        if self.version == 3:
            ts = uint_field(parts[0], "timestamp", INT64_MAX // 1000)
            parts = parts[1:]
            if len(parts) > 4:
                parts = parts[:4]  # fio reads no further (dataplane recordings put more there)
            if len(parts) == 4 and parts[1] == DROPPED:
                self.dropped += uint_field(parts[2], "dropped count")
                return None
        if len(parts) not in (2, 4):
            shape = "[timestamp] filename action [offset length]"
            raise Malformed(f"expected '{shape}', found {len(parts) + (self.version == 3)} fields")
        name, action = parts[0], parts[1]
        if action in FILE_ACTIONS:
            if len(parts) != 2:
                raise Malformed(f"file action {show(action)} takes no offset and length")
            if action == b"add":
                self._files.id_for(name, name.decode("utf-8", "replace"))
            elif name not in self._files.ids:
                raise Malformed(f"{show(action)} of {show(name)}, which no 'add' line introduced")
            return None
        op = self._actions.get(action)
        if op is None:
            if action == b"wait":
                raise Malformed("'wait' is not allowed in a version 3 iolog (fio ignores it)")
            raise Malformed(f"unknown action {show(action)}")
        if len(parts) == 2 and op != Op.FLUSH:
            raise Malformed(f"{show(action)} needs an offset and a length")
        stream = self._files.ids.get(name)
        if stream is None:
            raise Malformed(f"I/O on {show(name)}, which no 'add' line introduced")
        offset = length = 0
        if len(parts) == 4:
            offset = uint_field(parts[2], "offset")
            length = uint_field(parts[3], "length", UINT32_MAX)
        if op == _WAIT:
            self._wait(offset)
            return None
        if op == Op.FLUSH:
            offset = length = 0
        time = ts if self.version == 3 else self._clock_ns
        return [(time, offset, length, stream, op)]

    def _wait(self, value: int) -> None:
        if self.v2_wait == "absolute-ms":
            if value > INT64_MAX // 1_000_000:
                raise Malformed(f"wait {value} ms is out of range")
            self._clock_ns = max(self._clock_ns, value * 1_000_000)
        elif value >= 100:
            if value > (INT64_MAX - self._clock_ns) // 1000:
                raise Malformed(f"wait {value} us is out of range")
            self._clock_ns += value * 1000

    # -- many lines at once ------------------------------------------------------------------

    def _fast(self, a: np.ndarray) -> tuple[np.ndarray | None, int, int]:
        v3 = self.version == 3
        s, e, m = tokenize(a, SPACE, 5 if v3 else 4)
        if not m and v3:
            s, e, m = tokenize(a, SPACE, RECORDING_FIELDS)
        if not m:
            return None, 0, 0
        c = 1 if v3 else 0
        ok = np.ones(m, bool)
        if v3:
            ts, ts_ok = parse_uint(a, s[:, 0], e[:, 0])
            ok &= ts_ok & (ts <= INT64_MAX // 1000)
        op, op_ok = map_codes(token_codes(a, s[:, c + 1], e[:, c + 1])[0], self._actions)
        offset, offset_ok = parse_uint(a, s[:, c + 2], e[:, c + 2])
        length, length_ok = parse_uint(a, s[:, c + 3], e[:, c + 3])
        ok &= op_ok & offset_ok & length_ok & (length <= UINT32_MAX)
        is_wait = op == _WAIT
        if not v3 and is_wait.any():
            limit = INT64_MAX // 1_000_000 if self.v2_wait == "absolute-ms" else INT64_MAX // 1000 // m
            ok &= ~is_wait | (offset <= limit)
        stream = self._stream_ids(field_strings(a, s[:, c], e[:, c]))
        ok &= stream >= 0
        m = first_false(ok)
        if not m:
            return None, 0, 0
        op, offset, length, stream, is_wait = op[:m], offset[:m], length[:m], stream[:m], is_wait[:m]
        if v3:
            time = ts[:m].view(np.int64)
        else:
            time = self._advance_clock(is_wait, offset)
        flush = op == Op.FLUSH
        offset[flush] = 0
        length[flush] = 0
        keep = ~is_wait
        records = make_records(time[keep], offset[keep], length[keep], stream[keep], op[keep])
        self.ignored += m - len(records)
        return records, m, int(e[m - 1, -1]) + 1

    def _stream_ids(self, names: np.ndarray) -> np.ndarray:
        uniq, index = first_appearance_unique(names)
        lut = np.array([self._files.ids.get(bytes(u), -1) for u in uniq], dtype=np.int64)
        return lut[index]

    def _advance_clock(self, is_wait: np.ndarray, value: np.ndarray) -> np.ndarray:
        """v2: each line's clock after the waits up to it (vectorised `_wait`)."""
        if not is_wait.any():
            return np.full(len(is_wait), self._clock_ns, np.int64)
        value = value.astype(np.int64)
        if self.v2_wait == "absolute-ms":
            step = np.where(is_wait, value * 1_000_000, 0)
            step[0] = max(int(step[0]), self._clock_ns)
            clock = np.maximum.accumulate(step)
        else:
            step = np.where(is_wait & (value >= 100), value * 1000, 0)
            clock = self._clock_ns + np.cumsum(step)
        self._clock_ns = int(clock[-1])
        return clock
