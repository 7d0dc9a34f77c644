"""CSV block traces: MSR Cambridge (SNIA IOTTA), SPC (UMass Financial/WebSearch) and Alibaba.

Field layouts and citations: traces/README.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._parse import (
    INT64_MAX,
    UINT32_MAX,
    UINT64_MAX,
    Malformed,
    StreamTable,
    decimal_ns_field,
    first_appearance_unique,
    first_false,
    map_codes,
    parse_decimal_ns,
    parse_uint,
    show,
    token_codes,
    tokenize,
    uint_field,
)
from .base import Row, TextTraceReader
from .records import BATCH_RECORDS, Op, make_records

COMMA = ord(",")


def _is_blank(line: bytes) -> bool:
    return not line.strip()


def _header(line: bytes, lineno: int, first_field: bytes) -> bool:
    """A first line whose first field is the column name (as some redistributions add)."""
    return lineno == 1 and line.split(b",", 1)[0].strip().lower() == first_field


def _fields(line: bytes, lineno: int, names: tuple[str, ...], more: bool = False) -> list[bytes] | None:
    """The comma-separated fields of a line, named `names` (and more after them when `more`);
    None for a blank line or a header naming the first field."""
    if _is_blank(line) or _header(line, lineno, names[0].lower().encode()):
        return None
    parts = line.split(b",")
    if len(parts) < len(names) or (len(parts) > len(names) and not more):
        raise Malformed(f"expected {'at least ' if more else ''}{len(names)} comma-separated fields "
                        f"({','.join(names)}), found {len(parts)}")
    return parts


class MsrReader(TextTraceReader):
    """MSR Cambridge: Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime.

    Timestamp is a Windows FILETIME (100 ns ticks); one stream per host+disk ("hm/0").
    """

    format_name = "msr"
    time_scale = 100
    _types = {b"Read": Op.READ, b"read": Op.READ, b"READ": Op.READ,
              b"Write": Op.WRITE, b"write": Op.WRITE, b"WRITE": Op.WRITE}

    def _start(self) -> None:
        self._streams = StreamTable()
        self.stream_names = self._streams.names

    def _fast(self, a: np.ndarray) -> tuple[np.ndarray | None, int, int]:
        s, e, m = tokenize(a, COMMA, 7)
        if not m:
            return None, 0, 0
        ts, ok = parse_uint(a, s[:, 0], e[:, 0])
        ok &= ts <= INT64_MAX
        host, host_ok = token_codes(a, s[:, 1], e[:, 1])
        disk, disk_ok = parse_uint(a, s[:, 2], e[:, 2])
        op, op_ok = map_codes(token_codes(a, s[:, 3], e[:, 3])[0], self._types)
        offset, offset_ok = parse_uint(a, s[:, 4], e[:, 4])
        size, size_ok = parse_uint(a, s[:, 5], e[:, 5])
        _, rt_ok = parse_uint(a, s[:, 6], e[:, 6])
        ok &= host_ok & disk_ok & op_ok & offset_ok & size_ok & (size <= UINT32_MAX) & rt_ok
        m = first_false(ok)
        if not m:
            return None, 0, 0
        hosts, host_index = first_appearance_unique(host[:m])
        disks, disk_index = first_appearance_unique(disk[:m])
        pairs, index = first_appearance_unique(host_index * len(disks) + disk_index)
        lut = np.empty(len(pairs), np.int64)
        for i, pair in enumerate(pairs.tolist()):
            name = int(hosts[pair // len(disks)]).to_bytes(8, "little").rstrip(b"\0")
            disk_no = int(disks[pair % len(disks)])
            lut[i] = self._streams.id_for((name, disk_no), f"{name.decode('utf-8', 'replace')}/{disk_no}")
        records = make_records(ts[:m].view(np.int64), offset[:m], size[:m], lut[index], op[:m])
        return records, m, int(e[m - 1, -1]) + 1

    def _parse_line(self, line: bytes, lineno: int) -> list[Row] | None:
        parts = _fields(line, lineno, ("Timestamp", "Hostname", "DiskNumber", "Type", "Offset", "Size",
                                       "ResponseTime"))
        if parts is None:
            return None
        ts = uint_field(parts[0], "Timestamp", INT64_MAX)
        host = parts[1]
        if not host:
            raise Malformed("Hostname is empty")
        disk = uint_field(parts[2], "DiskNumber")
        op = self._types.get(parts[3].strip().capitalize())
        if op is None:
            raise Malformed(f"Type {show(parts[3])} is neither Read nor Write")
        offset = uint_field(parts[4], "Offset")
        size = uint_field(parts[5], "Size", UINT32_MAX)
        uint_field(parts[6], "ResponseTime")
        sid = self._streams.id_for((host, disk), f"{host.decode('utf-8', 'replace')}/{disk}")
        return [(ts, offset, size, sid, op)]


class SpcReader(TextTraceReader):
    """SPC trace format (UMass Financial1/2, WebSearch1-3): ASU,LBA,Size,Opcode,Timestamp[,...].

    LBA counts `block_size`-byte blocks (512 in the UMass traces), Timestamp is decimal
    seconds; optional fields after Timestamp are ignored. One stream per ASU.
    """

    format_name = "spc"
    stream_label = "asu {}"
    _opcodes = {b"r": Op.READ, b"R": Op.READ, b"w": Op.WRITE, b"W": Op.WRITE}

    def __init__(self, path: str | Path, *, on_error: str = "stop", batch_size: int = BATCH_RECORDS,
                 block_size: int = 512) -> None:
        super().__init__(path, on_error=on_error, batch_size=batch_size)
        if block_size < 1:
            raise ValueError("block_size must be positive")
        self.block_size = block_size

    def _fast(self, a: np.ndarray) -> tuple[np.ndarray | None, int, int]:
        s, e, m = tokenize(a, COMMA, None)
        if not m or s.shape[1] < 5:
            return None, 0, 0
        asu, ok = parse_uint(a, s[:, 0], e[:, 0])
        lba, lba_ok = parse_uint(a, s[:, 1], e[:, 1])
        size, size_ok = parse_uint(a, s[:, 2], e[:, 2])
        op, op_ok = map_codes(token_codes(a, s[:, 3], e[:, 3])[0], self._opcodes)
        ts, ts_ok = parse_decimal_ns(a, s[:, 4], e[:, 4])
        ok &= (asu <= UINT32_MAX) & lba_ok & (lba <= UINT64_MAX // self.block_size)
        ok &= size_ok & (size <= UINT32_MAX) & op_ok & ts_ok
        m = first_false(ok)
        if not m:
            return None, 0, 0
        records = make_records(ts[:m], lba[:m] * np.uint64(self.block_size), size[:m], asu[:m], op[:m])
        return records, m, int(e[m - 1, -1]) + 1

    def _parse_line(self, line: bytes, lineno: int) -> list[Row] | None:
        parts = _fields(line, lineno, ("ASU", "LBA", "Size", "Opcode", "Timestamp"), more=True)
        if parts is None:
            return None
        asu = uint_field(parts[0], "ASU", UINT32_MAX)
        lba = uint_field(parts[1], "LBA", UINT64_MAX // self.block_size)
        size = uint_field(parts[2], "Size", UINT32_MAX)
        op = self._opcodes.get(parts[3].strip())
        if op is None:
            raise Malformed(f"Opcode {show(parts[3])} is neither r nor w")
        ts = decimal_ns_field(parts[4], "Timestamp")
        return [(ts, lba * self.block_size, size, asu, op)]


class AlibabaReader(TextTraceReader):
    """Alibaba block traces (2020): device_id,opcode,offset,length,timestamp.

    opcode R/W, offset and length in bytes, timestamp in microseconds. One stream per device.
    """

    format_name = "alibaba"
    stream_label = "device {}"
    time_scale = 1000
    _opcodes = {b"R": Op.READ, b"r": Op.READ, b"W": Op.WRITE, b"w": Op.WRITE}

    def _fast(self, a: np.ndarray) -> tuple[np.ndarray | None, int, int]:
        s, e, m = tokenize(a, COMMA, 5)
        if not m:
            return None, 0, 0
        device, ok = parse_uint(a, s[:, 0], e[:, 0])
        op, op_ok = map_codes(token_codes(a, s[:, 1], e[:, 1])[0], self._opcodes)
        offset, offset_ok = parse_uint(a, s[:, 2], e[:, 2])
        length, length_ok = parse_uint(a, s[:, 3], e[:, 3])
        ts, ts_ok = parse_uint(a, s[:, 4], e[:, 4])
        ok &= (device <= UINT32_MAX) & op_ok & offset_ok & length_ok & (length <= UINT32_MAX)
        ok &= ts_ok & (ts <= INT64_MAX)
        m = first_false(ok)
        if not m:
            return None, 0, 0
        records = make_records(ts[:m].view(np.int64), offset[:m], length[:m], device[:m], op[:m])
        return records, m, int(e[m - 1, -1]) + 1

    def _parse_line(self, line: bytes, lineno: int) -> list[Row] | None:
        parts = _fields(line, lineno, ("device_id", "opcode", "offset", "length", "timestamp"))
        if parts is None:
            return None
        device = uint_field(parts[0], "device_id", UINT32_MAX)
        op = self._opcodes.get(parts[1].strip())
        if op is None:
            raise Malformed(f"opcode {show(parts[1])} is neither R nor W")
        offset = uint_field(parts[2], "offset")
        length = uint_field(parts[3], "length", UINT32_MAX)
        ts = uint_field(parts[4], "timestamp", INT64_MAX)
        return [(ts, offset, length, device, op)]
