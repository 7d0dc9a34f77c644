"""A dataplane recording (`serve --record`) read in full: one row per request with everything
the backend wrote down, which the replay readers (blktrace.py, fio.py) partly leave out (the
status, the completion time, write-zeroes as such). For tests, `bench.patterns` and a look by
hand; replaying a recording goes through the ordinary readers.

blktrace (FILE.blktrace.<q>): a request is a Q event and its C event, paired per queue file in
order (the oldest Q of the same sector, size and kind takes the next C). The payload
"write-zeroes" marks a write-zeroes; a C event's error (-errno in 16 bits) is the status.
Message events saying "N events lost" are the drops.

iolog (FILE): fio's five fields, then the op, the status and the latency in ns.
"""

from __future__ import annotations

import re
import struct
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from .blktrace import (
    BLK_IO_TRACE_MAGIC,
    BLK_IO_TRACE_VERSION,
    BLK_TA_COMPLETE,
    BLK_TA_QUEUE,
    BLK_TC_DISCARD,
    BLK_TC_FLUSH,
    BLK_TC_FUA,
    BLK_TC_NOTIFY,
    BLK_TC_WRITE,
    TRACE_SIZE,
    per_cpu_files,
)

OPS = ("read", "write", "flush", "discard", "write-zeroes")
STATUSES = ("ok", "ioerr", "unsupp", "unknown")
WRITE_ZEROES_PDU = b"write-zeroes"
_ERRORS = {0: "ok", (-5) & 0xFFFF: "ioerr", (-95) & 0xFFFF: "unsupp"}
_LOST = re.compile(rb"dataplane: (\d+) events lost")
_FIELDS = ("magic", "sequence", "time", "sector", "bytes", "action", "pid", "device", "cpu", "error",
           "pdu_len")


@dataclass(frozen=True)
class Recorded:
    """One request as the backend served it (times in ns since the recording began)."""

    queue: int
    op: str
    offset: int
    length: int
    status: str
    submit_ns: int | None        # None: its Q entry was lost (or came before the recording)
    complete_ns: int | None      # None: its completion was not recorded
    fua: bool = False


@dataclass
class RecordingContents:
    requests: list[Recorded] = field(default_factory=list)
    dropped: int = 0             # entries the recorder lost (ring full)
    dropped_at_end: int = 0      # of those, lost after a queue's last event (blktrace: no gap
                                 # in the sequence numbers shows them, only the message)
    messages: list[str] = field(default_factory=list)

    def by_queue(self, queue: int) -> list[Recorded]:
        return [r for r in self.requests if r.queue == queue]


def detect(path: str | Path) -> str:
    files = per_cpu_files(path)
    if any(".blktrace." in f.name for f in files) and files[0].exists():
        return "blktrace"
    if Path(path).exists():
        return "iolog"
    raise ConfigError(f"no recording at {path}")


def read_recording(path: str | Path, fmt: str | None = None) -> RecordingContents:
    """Every request of the recording at `path` (the FILE given to --record)."""
    fmt = fmt or detect(path)
    if fmt == "blktrace":
        return _read_blktrace(path)
    if fmt == "iolog":
        return _read_iolog(Path(path))
    raise ConfigError(f"unknown recording format {fmt!r}")


def _op_of(category: int, pdu: bytes) -> str:
    if category & BLK_TC_DISCARD:
        return "discard"
    if category & BLK_TC_FLUSH:
        return "flush"
    if category & BLK_TC_WRITE:
        return "write-zeroes" if pdu == WRITE_ZEROES_PDU else "write"
    return "read"


def _events(path: Path):
    data = path.read_bytes()
    if len(data) < 4:
        return
    order = "<" if struct.unpack_from("<I", data)[0] == BLK_IO_TRACE_MAGIC | BLK_IO_TRACE_VERSION else ">"
    layout = struct.Struct(order + "IIQQIIIIIHH")
    pos = 0
    while pos + TRACE_SIZE <= len(data):
        t = dict(zip(_FIELDS, layout.unpack_from(data, pos), strict=True))
        if t["magic"] != BLK_IO_TRACE_MAGIC | BLK_IO_TRACE_VERSION:
            raise ConfigError(f"{path}: bad magic at byte {pos}")
        pdu = data[pos + TRACE_SIZE: pos + TRACE_SIZE + t["pdu_len"]]
        pos += TRACE_SIZE + t["pdu_len"]
        yield t, pdu
    if pos != len(data):
        raise ConfigError(f"{path}: {len(data) - pos} bytes of a truncated record at the end")


# blkparse's letters for the events (blktrace_api.h's __BLK_TA_* order, from 1).
EVENT_LETTERS = "QMFGSRDCPUTIXBAa"


def event_counts(path: str | Path) -> dict[str, int]:
    """How many events of each kind a blktrace holds (blkparse's letters: Q queued, M/F merged,
    X split, D issued, C completed...; notes and messages are left out), over every per-CPU
    file of `path`; any blktrace, not only a recording."""
    counts: dict[str, int] = {}
    for f in per_cpu_files(path):
        for t, _ in _events(f):
            if (t["action"] >> 16) & BLK_TC_NOTIFY:
                continue
            what = t["action"] & 0xFF
            letter = EVENT_LETTERS[what - 1] if 1 <= what <= len(EVENT_LETTERS) else f"#{what}"
            counts[letter] = counts.get(letter, 0) + 1
    return counts


def _read_blktrace(path: str | Path) -> RecordingContents:
    out = RecordingContents()
    for f in per_cpu_files(path):
        queue = int(f.name.rsplit(".", 1)[1])
        waiting: dict[tuple, deque] = {}
        rows: list[list] = []
        lost_since_event = 0
        for t, pdu in _events(f):
            category = t["action"] >> 16
            what = t["action"] & 0xFFFF
            if category & BLK_TC_NOTIFY:
                if what == 2:   # a message
                    out.messages.append(pdu.decode(errors="replace"))
                    m = _LOST.search(pdu)
                    if m:
                        out.dropped += int(m.group(1))
                        lost_since_event += int(m.group(1))
                continue
            lost_since_event = 0
            op = _op_of(category, pdu)
            key = (t["sector"], t["bytes"], op)
            if what == BLK_TA_QUEUE:
                row = [queue, op, t["sector"] * 512, t["bytes"], "unknown", t["time"], None,
                       bool(category & BLK_TC_FUA)]
                rows.append(row)
                waiting.setdefault(key, deque()).append(row)
            elif what == BLK_TA_COMPLETE:
                q = waiting.get(key)
                row = q.popleft() if q else None
                if row is None:
                    row = [queue, op, t["sector"] * 512, t["bytes"], "unknown", None, None,
                           bool(category & BLK_TC_FUA)]
                    rows.append(row)
                row[4] = _ERRORS.get(t["error"], "ioerr")
                row[6] = t["time"]
        out.requests += [Recorded(*r) for r in rows]
        out.dropped_at_end += lost_since_event
    out.requests.sort(key=lambda r: (r.submit_ns if r.submit_ns is not None else r.complete_ns or 0,
                                     r.queue))
    return out


def _read_iolog(path: Path) -> RecordingContents:
    out = RecordingContents()
    lines = path.read_text().splitlines()
    if not lines or lines[0].strip() != "fio version 3 iolog":
        raise ConfigError(f"{path}: not a fio version 3 iolog")
    for number, line in enumerate(lines[1:], 2):
        parts = line.split()
        if len(parts) == 3:
            continue   # add, open, close
        if len(parts) == 5 and parts[2] == "dropped":
            out.dropped += int(parts[3])
            continue
        if len(parts) != 8:
            raise ConfigError(f"{path}:{number}: not a line of a dataplane recording: {line!r}")
        us, name, _action, offset, length, op, status, latency = parts
        if op not in OPS or status not in STATUSES:
            raise ConfigError(f"{path}:{number}: unknown op or status in {line!r}")
        submit = int(us) * 1000
        done = status != "unknown"
        out.requests.append(Recorded(int(name.lstrip("vq")), op, int(offset), int(length), status,
                                     submit, submit + int(latency) if done else None))
    return out
