"""The reader protocol every trace format implements, and the text-reader skeleton that runs a
vectorised fast path over whole chunks and a strict per-line parser over whatever it rejects.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, ClassVar

import numpy as np

from ..errors import ConfigError
from ._parse import Malformed, iter_line_chunks, open_input
from .records import BATCH_RECORDS, TraceFormatError, rebatch, records_from_rows

log = logging.getLogger("dataplane.replay")

ON_ERROR = ("stop", "skip")
KEEP_ERRORS = 10

Row = tuple[int, int, int, int, int]  # (time, offset, length, stream, op) in RECORD_DTYPE order


class TraceReader:
    """Iterate over a trace as batches of RECORD_DTYPE records (at most `batch_size` each).

    Each iteration reads the file afresh and resets the counters, which are complete once the
    iteration ends:

    * `records`: records yielded;
    * `skipped`: malformed lines (records, for binary traces) passed over with on_error="skip";
      `skipped_errors` keeps the first few as TraceFormatError;
    * `ignored`: well-formed input that carries no I/O (headers, blank lines, fio file actions,
      blktrace events of other kinds);
    * `stream_names`: stream id -> what it stands for in the trace (file, host/disk, CPU...).

    `time_ns` counts from the first record yielded.
    """

    format_name: ClassVar[str] = ""
    unit: ClassVar[str] = "line"  # what TraceFormatError.line counts
    stream_label: ClassVar[str | None] = None  # names numeric streams, e.g. "cpu {}"
    time_scale: int = 1  # the reader's raw time unit in nanoseconds

    def __init__(self, path: str | Path, *, on_error: str = "stop",
                 batch_size: int = BATCH_RECORDS) -> None:
        if on_error not in ON_ERROR:
            raise ConfigError(f"on_error must be one of {', '.join(ON_ERROR)}, not {on_error!r}")
        if batch_size < 1:
            raise ConfigError("batch_size must be at least 1")
        self.path = Path(path)
        self.on_error = on_error
        self.batch_size = batch_size
        self._reset()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path} ({self.format_name})>"

    def _reset(self) -> None:
        self.records = 0
        self.skipped = 0
        self.ignored = 0
        self.skipped_errors: list[TraceFormatError] = []
        self.stream_names: dict[int, str] = {}
        self.origin_ns: int | None = None  # the first record's time as the trace has it (ns)

    def __iter__(self) -> Iterator[np.ndarray]:
        self._reset()
        return rebatch(self._rebased(), self.batch_size)

    def read_all(self) -> np.ndarray:
        """The whole trace as one array (for small traces and tests)."""
        batches = list(self)
        return np.concatenate(batches) if batches else records_from_rows([])

    def _rebased(self) -> Iterator[np.ndarray]:
        t0: int | None = None
        for chunk in self._raw_chunks():
            if not len(chunk):
                continue
            times = chunk["time_ns"]
            if t0 is None:
                t0 = int(times[0])
                self.origin_ns = t0 * self.time_scale
            times -= t0
            if self.time_scale != 1:
                times *= self.time_scale
            if self.stream_label is not None:
                self._name_streams(chunk["stream"])
            self.records += len(chunk)
            yield chunk

    def _name_streams(self, streams: np.ndarray) -> None:
        first = int(streams[0])
        ids = [first] if (streams == first).all() else np.unique(streams).tolist()
        for sid in ids:
            if sid not in self.stream_names:
                self.stream_names[sid] = self.stream_label.format(sid)

    def _raw_chunks(self) -> Iterator[np.ndarray]:
        """Records with time_ns in the reader's raw unit (`time_scale` ns), not yet rebased."""
        raise NotImplementedError

    def _bad(self, where: int, message: str, file: str | Path | None = None) -> None:
        err = TraceFormatError(file if file is not None else self.path, where, message, unit=self.unit)
        if self.on_error == "stop":
            raise err
        self.skipped += 1
        if len(self.skipped_errors) < KEEP_ERRORS:
            self.skipped_errors.append(err)
        log.debug("skipped: %s", err)


class TextTraceReader(TraceReader):
    """A line-oriented trace: `_fast` parses runs of regular lines with numpy, `_parse_line`
    parses one line strictly (and is the reference the fast path must agree with)."""

    chunk_bytes: ClassVar[int] = 2 << 20
    slow_lines_per_chunk: ClassVar[int] = 8  # then the rest of the chunk goes line by line
    use_fast_path: bool = True  # tests turn it off to compare both paths

    def _raw_chunks(self) -> Iterator[np.ndarray]:
        self._start()
        with open_input(self.path) as f:
            first_line = self._read_preamble(f)
            for chunk, lineno in iter_line_chunks(f, self.chunk_bytes, first_line, str(self.path)):
                yield from self._parse_chunk(chunk, lineno)

    def _start(self) -> None:
        """Reset per-iteration parser state."""

    def _read_preamble(self, f: BinaryIO) -> int:
        """Consume any header the format requires; return the number of the next line."""
        return 1

    def _parse_chunk(self, chunk: bytes, lineno: int) -> Iterator[np.ndarray]:
        if not self.use_fast_path:
            yield from self._parse_lines(chunk, lineno)
            return
        a = np.frombuffer(chunk, dtype=np.uint8)
        pos, end = 0, len(chunk)
        fast_tries = self.slow_lines_per_chunk
        rows: list[Row] = []
        while pos < end:
            if fast_tries > 0:
                records, nlines, nbytes = self._fast(a[pos:])
                if nlines:
                    if rows:
                        yield records_from_rows(rows)
                        rows = []
                    yield records
                    pos += nbytes
                    lineno += nlines
                    if pos >= end:
                        break
                fast_tries -= 1
            newline = chunk.index(b"\n", pos)
            try:
                parsed = self._parse_line(chunk[pos:newline], lineno)
            except Malformed as exc:
                self._bad(lineno, str(exc))
            else:
                if parsed is None:
                    self.ignored += 1
                else:
                    rows.extend(parsed)
            pos = newline + 1
            lineno += 1
        if rows:
            yield records_from_rows(rows)

    def _parse_lines(self, chunk: bytes, lineno: int) -> Iterator[np.ndarray]:
        """Every line of the chunk through `_parse_line`."""
        rows: list[Row] = []
        parse = self._parse_line
        for number, line in enumerate(chunk.split(b"\n")[:-1], lineno):
            try:
                parsed = parse(line, number)
            except Malformed as exc:
                self._bad(number, str(exc))
                continue
            if parsed is None:
                self.ignored += 1
            else:
                rows.extend(parsed)
        if rows:
            yield records_from_rows(rows)

    def _fast(self, a: np.ndarray) -> tuple[np.ndarray | None, int, int]:
        """Parse the leading regular lines of `a`: (records, lines consumed, bytes consumed).

        Must stop before the first line it cannot parse exactly as `_parse_line` would, and
        update parser state only for the lines it consumed.
        """
        return None, 0, 0

    def _parse_line(self, line: bytes, lineno: int) -> list[Row] | None:
        """Rows for one line (without its newline), None for a line that carries no I/O, or
        raise Malformed."""
        raise NotImplementedError
