"""The record every trace reader yields: one I/O as a row of a numpy structured array.

Readers hand out batches (arrays of RECORD_DTYPE) rather than Python objects so that a
multi-GB trace streams in flat memory and a batch can be passed to C as one buffer.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from ..errors import ConfigError


class Op(enum.IntEnum):
    """What a record asks the device to do (the `op` field)."""

    READ = 0
    WRITE = 1
    FLUSH = 2  # also fio's sync/datasync and blktrace's empty PREFLUSH requests
    TRIM = 3  # discard


OP_NAMES = {Op.READ: "read", Op.WRITE: "write", Op.FLUSH: "flush", Op.TRIM: "trim"}

# C layout (align=True), 32 bytes a record, for the replayer's loader:
#   struct dp_trace_rec { int64_t time_ns; uint64_t offset; uint32_t length;
#                         uint32_t stream; uint8_t op; uint8_t pad[7]; };
RECORD_DTYPE = np.dtype(
    [
        ("time_ns", "<i8"),  # since the first record the reader yielded (may go negative if unsorted)
        ("offset", "<u8"),  # bytes; 0 for FLUSH
        ("length", "<u4"),  # bytes; 0 for FLUSH
        ("stream", "<u4"),  # CPU / host+disk / device / file: see each reader's stream_names
        ("op", "u1"),  # Op
        ("pad", "u1", (7,)),  # a named field, so copies (np.concatenate) keep it zero
    ],
    align=True,
)
assert RECORD_DTYPE.itemsize == 32

BATCH_RECORDS = 65536


def empty_records(n: int = 0) -> np.ndarray:
    return np.zeros(n, dtype=RECORD_DTYPE)


def records_from_rows(rows: list[tuple[int, int, int, int, int]]) -> np.ndarray:
    """Rows of (time, offset, length, stream, op), the field order of RECORD_DTYPE."""
    out = np.zeros(len(rows), dtype=RECORD_DTYPE)
    if rows:
        for name, column in zip(("time_ns", "offset", "length", "stream", "op"), zip(*rows, strict=True),
                                strict=True):
            out[name] = column
    return out


def rebatch(chunks: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Re-cut arrays of any lengths into arrays of exactly `size` rows (the last may be shorter)."""
    pending: list[np.ndarray] = []
    held = 0
    for chunk in chunks:
        if not len(chunk):
            continue
        pending.append(chunk)
        held += len(chunk)
        if held < size:
            continue
        joined = np.concatenate(pending) if len(pending) > 1 else pending[0]
        cut = held - held % size
        for start in range(0, cut, size):
            yield joined[start:start + size]
        rest = joined[cut:]
        pending = [rest] if len(rest) else []
        held = len(rest)
    if held:
        yield np.concatenate(pending) if len(pending) > 1 else pending[0]


class TraceFormatError(ConfigError):
    """Malformed trace input: names the file and the line (or, for binary traces, the record)."""

    def __init__(self, file: str | Path, line: int, message: str, *, unit: str = "line") -> None:
        self.file = str(file)
        self.line = line
        self.message = message
        self.unit = unit
        where = f"{self.file}:{line}" if unit == "line" else f"{self.file}: {unit} {line}"
        super().__init__(f"{where}: {message}")


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, element-wise: a well-spread 64-bit hash of record keys (offsets
    for --queue-map hash, blocks for the footprint estimate of `trace stats`)."""
    x = x.astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def make_records(time_ns: np.ndarray, offset: np.ndarray, length: np.ndarray,
                 stream: np.ndarray | int, op: np.ndarray | int) -> np.ndarray:
    """A record array from columns (each cast to its field's type)."""
    out = np.zeros(len(time_ns), dtype=RECORD_DTYPE)
    out["time_ns"] = time_ns
    out["offset"] = offset
    out["length"] = length
    out["stream"] = stream
    out["op"] = op
    return out
