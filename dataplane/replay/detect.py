"""Which reader a trace needs: `detect_format` looks at the magic or the first lines, and
`open_trace` returns the reader."""

from __future__ import annotations

import re
import struct
from pathlib import Path

from ..errors import ConfigError
from ._parse import read_head
from .base import TraceReader
from .blktrace import BLK_IO_TRACE_MAGIC, BlkparseReader, BlktraceReader, per_cpu_files
from .csvtraces import AlibabaReader, MsrReader, SpcReader
from .fio import HEADERS, FioIologReader
from .records import BATCH_RECORDS

READERS: dict[str, type[TraceReader]] = {
    "fio": FioIologReader,
    "blktrace": BlktraceReader,
    "blkparse": BlkparseReader,
    "msr": MsrReader,
    "spc": SpcReader,
    "alibaba": AlibabaReader,
}
FORMATS = tuple(READERS)

_BLKPARSE_LINE = re.compile(rb"^\s*\d+,\d+\s+\d+\s+\d+\s+\d+\.\d+\s+\d+\s+\S+")
_UINT = re.compile(rb"^\s*\d+\s*$")
_DECIMAL = re.compile(rb"^\s*(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")
SNIFF_LINES = 20


def detect_format(path: str | Path) -> str:
    """The name (a key of READERS) of the format of the trace at `path`, gzip'd or not."""
    files = [f for f in per_cpu_files(path) if f.exists()]
    if not files:
        raise ConfigError(f"no trace at {path}")
    first = next((f for f in files if f.stat().st_size), files[0])  # a CPU may have logged nothing
    head = read_head(first)
    if len(head) >= 4:
        for order in "<>":
            if struct.unpack_from(order + "I", head)[0] & 0xFFFFFF00 == BLK_IO_TRACE_MAGIC:
                return "blktrace"
    lines = [line.strip() for line in head.split(b"\n")[:SNIFF_LINES]]
    if not head.endswith(b"\n") and len(lines) > 1:
        lines = lines[:-1]  # cut short by the sniff size
    lines = [line for line in lines if line]
    if not lines:
        raise ConfigError(f"cannot tell the format of {path}: it is empty")
    if lines[0] in HEADERS:
        return "fio"
    if b"\0" in head:
        raise ConfigError(f"cannot tell the format of {path}: binary, but not blktrace")
    if any(_BLKPARSE_LINE.match(line) for line in lines):
        return "blkparse"
    votes: dict[str, int] = {}
    for i, line in enumerate(lines):
        guess = _csv_guess(line, header=i == 0)
        if guess:
            votes[guess] = votes.get(guess, 0) + 1
    if votes:
        best = max(votes, key=votes.__getitem__)
        if votes[best] * 2 > len(lines):
            return best
    raise ConfigError(f"cannot tell the format of {path}; name it with --format ({', '.join(FORMATS)})")


def _csv_guess(line: bytes, header: bool) -> str | None:
    fields = [f.strip() for f in line.split(b",")]
    first = fields[0].lower()
    if header and first in (b"timestamp", b"asu", b"device_id"):
        return {b"timestamp": "msr", b"asu": "spc", b"device_id": "alibaba"}[first]
    if len(fields) == 7 and fields[3].lower() in (b"read", b"write") and _UINT.match(fields[0]):
        return "msr"
    if len(fields) == 5 and fields[1] in (b"R", b"W", b"r", b"w") and _UINT.match(fields[4]):
        return "alibaba"
    if len(fields) >= 5 and fields[3] in (b"r", b"w", b"R", b"W") and _DECIMAL.match(fields[4]):
        return "spc"
    return None


def open_trace(path: str | Path, format: str | None = None, *, on_error: str = "stop",
               batch_size: int = BATCH_RECORDS, events: str = "queue") -> TraceReader:
    """A reader for the trace at `path`; `format` None detects it. `events` ("queue" or
    "issue") picks the blktrace/blkparse events to read; other formats have one kind only."""
    if format is None:
        format = detect_format(path)
    reader_type = READERS.get(format)
    if reader_type is None:
        raise ConfigError(f"unknown trace format {format!r}; known: {', '.join(FORMATS)}")
    if reader_type in (BlktraceReader, BlkparseReader):
        return reader_type(path, on_error=on_error, batch_size=batch_size, events=events)
    return reader_type(path, on_error=on_error, batch_size=batch_size)
