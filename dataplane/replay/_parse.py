"""Shared machinery of the readers: opening (gzip-aware), cutting text into whole-line chunks,
and vectorised column parsers that turn a chunk of CSV-like text into numbers with numpy.

The vectorised parsers never raise: they return values plus a per-row `ok` mask, and a reader
hands any row they reject to its per-line parser, which either accepts it (a header, a blank
line, whitespace the fast path does not expect) or reports it with its line number.
"""

from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .records import TraceFormatError

GZIP_MAGIC = b"\x1f\x8b"
MAX_LINE = 1 << 20
NEWLINE = 10

UINT32_MAX = (1 << 32) - 1
UINT64_MAX = (1 << 64) - 1
INT64_MAX = (1 << 63) - 1

# 10**0 .. 10**19 (10**19 < 2**64).
_P10 = np.array([10**i for i in range(20)], dtype=np.uint64)


def open_input(path: str | Path) -> BinaryIO:
    """Open a trace for reading bytes, gunzipping on the fly when it starts with the gzip magic."""
    try:
        raw = open(path, "rb")  # noqa: SIM115 - handed to the caller
    except OSError as exc:
        from ..errors import ConfigError

        raise ConfigError(f"cannot open trace {path}: {exc.strerror or exc}") from None
    if raw.peek(2)[:2] == GZIP_MAGIC:
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    return raw


def read_head(path: str | Path, size: int = 1 << 16) -> bytes:
    """The first `size` bytes of the (decompressed) trace; fewer if it is shorter."""
    with open_input(path) as f:
        try:
            return f.read(size)
        except (OSError, EOFError, zlib.error) as exc:  # a corrupt gzip stream
            from ..errors import ConfigError

            raise ConfigError(f"cannot read trace {path}: {exc}") from None


def read_block(f: io.BufferedIOBase | BinaryIO, size: int, label: str | Path, where: int,
               unit: str = "line") -> bytes:
    """f.read(size), with a damaged gzip stream reported as a TraceFormatError."""
    try:
        return f.read(size)
    except (EOFError, OSError, zlib.error) as exc:
        raise TraceFormatError(label, where, f"cannot read on: {exc}", unit=unit) from None


def iter_line_chunks(f: io.BufferedIOBase | BinaryIO, size: int, first_line: int,
                     label: str) -> Iterator[tuple[bytes, int]]:
    """Yield (chunk, number of its first line): whole lines, each ending in a newline.

    CRLF line ends become LF; a last line without a newline gets one.
    """
    lineno = first_line
    rest = b""
    while True:
        block = read_block(f, size, label, lineno)
        if not block:
            break
        if rest:
            block = rest + block
        cut = block.rfind(b"\n") + 1
        if cut == 0:
            if len(block) > MAX_LINE:
                raise TraceFormatError(label, lineno, "line longer than 1 MiB: is this a text trace?")
            rest = block
            continue
        chunk, rest = (block, b"") if cut == len(block) else (block[:cut], block[cut:])
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n")
        yield chunk, lineno
        lineno += chunk.count(b"\n")
    if rest:
        yield rest.replace(b"\r\n", b"\n") + b"\n", lineno


# ---------------------------------------------------------------------------------------------
# Vectorised tokenising and field parsing. `a` is the chunk as a uint8 array; a field is the
# half-open byte range [start, end) of `a`.


def tokenize(a: np.ndarray, sep: int, k: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """Split the leading lines of `a` that have exactly `k` fields (None: as many as the first line).

    Returns (starts, ends, m): two (m, k) arrays of field bounds for the first m lines; m stops
    at the first line with another field count (so those lines are left to the slow path).
    """
    marks = a == sep
    marks |= a == NEWLINE
    seps = np.flatnonzero(marks)
    if k is None:
        first_nl = int(np.argmax(a[seps] == NEWLINE)) if len(seps) else 0
        k = first_nl + 1
    if len(seps) and len(seps) % k == 0:
        grid = seps.reshape(-1, k)
        at = a[grid]
        if (at[:, -1] == NEWLINE).all() and not (at[:, :-1] == NEWLINE).any():
            return _bounds(grid), grid, len(grid)
    newlines = seps[a[seps] == NEWLINE]
    counts = np.diff(np.searchsorted(seps, newlines, side="right"), prepend=0)
    irregular = np.flatnonzero(counts != k)
    m = int(irregular[0]) if len(irregular) else len(newlines)
    grid = seps[: m * k].reshape(m, k)
    return _bounds(grid), grid, m


def _bounds(grid: np.ndarray) -> np.ndarray:
    starts = np.empty_like(grid)
    if len(grid):
        starts[0, 0] = 0
        starts[1:, 0] = grid[:-1, -1] + 1
        starts[:, 1:] = grid[:, :-1] + 1
    return starts


def _right_aligned(a: np.ndarray, s: np.ndarray, e: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, width) bytes of each field right-aligned (field's last byte in the last column) and the
    mask of columns that belong to the field."""
    cols = np.arange(width)
    idx = e[:, None] - width + cols
    np.maximum(idx, 0, out=idx)
    valid = cols >= (width - (e - s))[:, None]
    return a[idx], valid


def parse_uint(a: np.ndarray, s: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unsigned decimal fields (1 to 19 digits) as uint64, and which rows were exactly that."""
    w = e - s
    ok = (w >= 1) & (w <= 19)
    if not len(w):
        return np.zeros(0, np.uint64), ok
    width = int(min(w.max(), 19))
    if width < 1:
        return np.zeros(len(w), np.uint64), ok
    if int(w.min()) == width:  # a fixed-width column: no row needs masking
        digits = a[e[:, None] - width + np.arange(width)]
        digits -= 48
    else:
        digits, valid = _right_aligned(a, s, e, width)
        digits -= 48  # uint8 arithmetic: anything but '0'..'9' ends above 9
        digits *= valid
    ok &= (digits <= 9).all(axis=1)
    return digits.astype(np.uint64) @ _P10[width - 1::-1], ok


def parse_decimal_ns(a: np.ndarray, s: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative decimal seconds ("12", "0.026214") as int64 nanoseconds.

    Rows with more than 9 fractional or integer digits (over 31 years), an exponent or a sign
    are not ok: the slow path handles or rejects them.
    """
    w = e - s
    n = len(w)
    ok = (w >= 1) & (w <= 20)
    if not n:
        return np.zeros(0, np.int64), ok
    width = int(min(w.max(), 20))
    if width < 1:
        return np.zeros(n, np.int64), ok
    raw, valid = _right_aligned(a, s, e, width)
    is_dot = (raw == 46) & valid
    ndots = is_dot.sum(axis=1)
    ok &= ndots <= 1
    digits = raw - 48
    digits *= valid & ~is_dot
    ok &= ~(digits > 9).any(axis=1)
    cols = np.arange(width)
    has_dot = ndots > 0
    dot_col = np.where(has_dot, np.argmax(is_dot, axis=1), -1)
    frac = np.where(has_dot, width - 1 - dot_col, 0)  # digits after the dot
    int_digits = np.where(has_dot, dot_col - (width - w), w)
    ok &= (frac <= 9) & (int_digits <= 9) & (w > ndots)
    # Digits right of the dot (all of them without a dot) sit at their column's power of ten;
    # digits left of the dot sit one place higher, the dot's column being skipped.
    left = digits * (cols < dot_col[:, None])
    right = digits - left
    d64 = np.uint64
    value = right.astype(d64) @ _P10[width - 1::-1]
    if width > 1:
        value += left[:, :-1].astype(d64) @ _P10[width - 2::-1]
    value *= _P10[np.where(ok, 9 - frac, 0)]
    return value.view(np.int64), ok


def token_codes(a: np.ndarray, s: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fields of 1 to 8 bytes packed little-endian into uint64 (see `code`), and which fit."""
    w = e - s
    ok = (w >= 1) & (w <= 8)
    cols = np.arange(8)
    idx = s[:, None] + cols
    np.minimum(idx, len(a) - 1, out=idx)
    raw = a[idx]
    raw *= cols < w[:, None]
    return np.ascontiguousarray(raw).view("<u8").ravel(), ok


def code(token: bytes) -> int:
    return int.from_bytes(token.ljust(8, b"\0"), "little")


def map_codes(codes: np.ndarray, table: dict[bytes, int]) -> tuple[np.ndarray, np.ndarray]:
    """Look packed tokens up in `table` (token -> value): values, and which rows matched."""
    keys = np.array(sorted(code(t) for t in table), dtype=np.uint64)
    values = np.array([table[t] for t in sorted(table, key=code)], dtype=np.int64)
    pos = np.minimum(np.searchsorted(keys, codes), len(keys) - 1)
    return values[pos], keys[pos] == codes


def field_strings(a: np.ndarray, s: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Fields as a numpy bytes array (for np.unique); a NUL byte inside a field would be lost."""
    w = e - s
    width = max(int(w.max()), 1) if len(w) else 1
    cols = np.arange(width)
    idx = s[:, None] + cols
    np.minimum(idx, len(a) - 1, out=idx)
    raw = a[idx]
    raw *= cols < w[:, None]
    return np.ascontiguousarray(raw).view(f"S{width}").ravel()


def first_appearance_unique(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct keys in order of first appearance, and each row's index into them."""
    if len(keys) and (keys == keys[0]).all():
        return keys[:1], np.zeros(len(keys), np.int64)
    uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return uniq[order], rank[inverse.ravel()]


def first_false(ok: np.ndarray) -> int:
    """Index of the first False in `ok`, or len(ok)."""
    if ok.all():
        return len(ok)
    return int(np.argmin(ok))


# ---------------------------------------------------------------------------------------------
# Per-line (slow path) helpers: strict, with messages that say what was wrong.


class Malformed(ValueError):
    """Raised by a per-line parser; the reader adds file and line and stops or skips."""


def show(token: bytes) -> str:
    text = token.decode("utf-8", "replace")
    return repr(text if len(text) <= 40 else text[:37] + "...")


def uint_field(token: bytes, what: str, limit: int = UINT64_MAX) -> int:
    token = token.strip()
    if not token.isdigit() or not token.isascii():
        if not token:
            raise Malformed(f"{what} is empty")
        raise Malformed(f"{what} {show(token)} is not a non-negative whole number")
    value = int(token)
    if value > limit:
        raise Malformed(f"{what} {value} is out of range (at most {limit})")
    return value


def decimal_ns_field(token: bytes, what: str) -> int:
    """Decimal seconds ("0.026214", "1.5e-3") to whole nanoseconds, truncating below 1 ns."""
    from decimal import Decimal, InvalidOperation

    text = token.strip().decode("ascii", "replace")
    try:
        value = Decimal(text)
    except InvalidOperation:
        value = None
    if value is None or not value.is_finite():
        raise Malformed(f"{what} {show(token)} is not a number of seconds")
    if value < 0:
        raise Malformed(f"{what} {show(token)} is negative")
    ns = int(value.scaleb(9))
    if ns > INT64_MAX:
        raise Malformed(f"{what} {show(token)} is out of range")
    return ns


class StreamTable:
    """Stream ids given to keys (file names, host+disk) in order of first appearance."""

    def __init__(self) -> None:
        self.ids: dict[object, int] = {}
        self.names: dict[int, str] = {}

    def id_for(self, key: object, name: str) -> int:
        sid = self.ids.get(key)
        if sid is None:
            sid = self.ids[key] = len(self.ids)
            self.names[sid] = name
        return sid
