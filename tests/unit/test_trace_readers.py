"""Trace readers on the samples in traces/ and on hand-made broken input: exact records,
format detection, gzip, both error modes, and the vectorised path agreeing with the per-line one."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from dataplane.errors import ConfigError
from dataplane.replay import (
    RECORD_DTYPE,
    BlktraceReader,
    FioIologReader,
    Op,
    TraceFormatError,
    detect_format,
    open_trace,
)

TRACES = Path(__file__).resolve().parents[2] / "traces"
R, W, F, T = Op.READ, Op.WRITE, Op.FLUSH, Op.TRIM

SAMPLES = {
    "msr_sample.csv": "msr",
    "msr_sample.csv.gz": "msr",
    "spc_sample.spc": "spc",
    "alibaba_sample.csv": "alibaba",
    "fio_v2.iolog": "fio",
    "fio_v3.iolog": "fio",
    "sample.blkparse.txt": "blkparse",
    "sample_le.blktrace.0": "blktrace",
    "sample_be.blktrace.1": "blktrace",
}


def rows(records: np.ndarray) -> list[tuple[int, int, int, int, int]]:
    """(time_ns, op, offset, length, stream) per record."""
    return [(int(r["time_ns"]), int(r["op"]), int(r["offset"]), int(r["length"]), int(r["stream"]))
            for r in records]


def read(path: Path | str, fmt: str | None = None, **kw) -> tuple[np.ndarray, object]:
    reader = open_trace(path, fmt, **kw)
    return reader.read_all(), reader


@pytest.mark.parametrize("name", SAMPLES)
def test_format_is_detected(name: str) -> None:
    assert detect_format(TRACES / name) == SAMPLES[name]


def test_detection_refuses_what_it_cannot_tell(tmp_path: Path) -> None:
    odd = tmp_path / "notes.txt"
    odd.write_text("hello world\nthis is not a trace\n")
    with pytest.raises(ConfigError, match="cannot tell the format"):
        detect_format(odd)
    with pytest.raises(ConfigError, match="no trace"):
        detect_format(tmp_path / "missing.csv")


# -- each format, exact values of the first records -------------------------------------------

def test_msr_first_records() -> None:
    # 128166372003074769,hm,1,Read,365981696,131072,2802
    # 128166372003103569,hm,1,Read,895143936,16384,25053    (+28800 ticks of 100 ns)
    # 128166372003125349,hm,0,Write,123199488,131072,49099  (+50580 ticks)
    records, reader = read(TRACES / "msr_sample.csv")
    assert rows(records[:3]) == [(0, R, 365981696, 131072, 0), (2_880_000, R, 895143936, 16384, 0),
                                 (5_058_000, W, 123199488, 131072, 1)]
    assert len(records) == 300 and reader.records == 300
    assert reader.stream_names == {0: "hm/1", 1: "hm/0"}
    assert (reader.skipped, reader.ignored) == (0, 0)


def test_spc_first_records() -> None:
    # 2,516688,131072,r,0.000000 / 2,1071744,4096,r,0.003788 / 2,1023112,4096,w,0.004281
    records, reader = read(TRACES / "spc_sample.spc")
    assert rows(records[:3]) == [(0, R, 516688 * 512, 131072, 2), (3_788_000, R, 1071744 * 512, 4096, 2),
                                 (4_281_000, W, 1023112 * 512, 4096, 2)]
    assert len(records) == 300
    assert reader.stream_names == {0: "asu 0", 1: "asu 1", 2: "asu 2"}


def test_spc_block_size_is_configurable() -> None:
    from dataplane.replay import SpcReader

    records = SpcReader(TRACES / "spc_sample.spc", block_size=4096).read_all()
    assert int(records[0]["offset"]) == 516688 * 4096


def test_alibaba_first_records() -> None:
    # 407,W,626974720,8192,1577808000003604 / 12,W,869998592,512,1577808000004149 /
    # 955,R,587309056,8192,1577808000006408   (timestamps in microseconds)
    records, reader = read(TRACES / "alibaba_sample.csv")
    assert rows(records[:3]) == [(0, W, 626974720, 8192, 407), (545_000, W, 869998592, 512, 12),
                                 (2_804_000, R, 587309056, 8192, 955)]
    assert len(records) == 300
    assert set(reader.stream_names) == {12, 407, 955} and reader.stream_names[407] == "device 407"


def test_fio_v3_first_records() -> None:
    # 3578 /dev/vda write 171216896 65536 / 5791 /dev/vda read 201449472 16384 /
    # 7870 /dev/vda read 643944448 131072 / 11356 /dev/vdb read 70520832 4096   (microseconds)
    records, reader = read(TRACES / "fio_v3.iolog")
    assert rows(records[:4]) == [(0, W, 171216896, 65536, 0), (2_213_000, R, 201449472, 16384, 0),
                                 (4_292_000, R, 643944448, 131072, 0), (7_778_000, R, 70520832, 4096, 1)]
    assert len(records) == 200
    assert reader.version == 3
    assert reader.stream_names == {0: "/dev/vda", 1: "/dev/vdb"}
    assert reader.ignored == 6  # add, add, open, open, close, close


def test_fio_v2_first_records_and_waits() -> None:
    records, reader = read(TRACES / "fio_v2.iolog")
    assert rows(records[:3]) == [(0, R, 223535104, 8192, 0), (0, R, 689029120, 65536, 0),
                                 (0, T, 235184128, 65536, 1)]
    assert len(records) == 200 and reader.version == 2
    # Line 30 is "/dev/vda wait 5 0": fio holds what follows until 5 ms after the start.
    lines = (TRACES / "fio_v2.iolog").read_text().splitlines()
    before = sum(1 for line in lines[:29] if line.split()[1] in ("read", "write", "trim", "sync", "datasync"))
    assert int(records[before - 1]["time_ns"]) == 0
    assert int(records[before]["time_ns"]) == 5_000_000
    flushes = records[records["op"] == F]
    assert len(flushes) and (flushes["offset"] == 0).all() and (flushes["length"] == 0).all()


def test_fio_v2_wait_semantics(tmp_path: Path) -> None:
    log = tmp_path / "waits.iolog"
    log.write_text("fio version 2 iolog\nf add\nf open\nf read 0 512\nf wait 300 0\nf read 512 512\n"
                   "f wait 50 0\nf write 0 512\nf wait 400 0\nf sync 0 0\nf close\n")
    absolute = FioIologReader(log).read_all()
    assert absolute["time_ns"].tolist() == [0, 300_000_000, 300_000_000, 400_000_000]
    relative = FioIologReader(log, v2_wait="relative-us").read_all()
    # 300 us, then 50 us (under 100: discarded, as the HOWTO says), then 400 us.
    assert relative["time_ns"].tolist() == [0, 300_000, 300_000, 700_000]
    assert relative["op"].tolist() == [R, R, W, F]


def test_blkparse_first_records() -> None:
    # Q  RA 505088 + 256 at 0.000000010 on CPU 1, Q R 740912 + 8 at 0.003035549 on CPU 0
    records, reader = read(TRACES / "sample.blkparse.txt")
    assert rows(records[:3]) == [(0, R, 505088 * 512, 131072, 1), (3_035_539, R, 740912 * 512, 4096, 0),
                                 (6_759_167, R, 98824 * 512, 8192, 0)]
    assert reader.stream_names == {0: "cpu 0", 1: "cpu 1"}
    assert reader.ignored > 0  # G/I/D/C/P/U/M events, the message and blkparse's summary


def test_blktrace_binary_matches_blkparse_text_in_both_byte_orders() -> None:
    text, _ = read(TRACES / "sample.blkparse.txt")
    le, reader = read(TRACES / "sample_le.blktrace.0")
    be, _ = read(TRACES / "sample_be.blktrace.0")
    assert [p.name for p in reader.files] == ["sample_le.blktrace.0", "sample_le.blktrace.1"]
    assert len(le) == 158
    assert rows(le) == rows(text) == rows(be)
    assert (np.diff(le["time_ns"]) >= 0).all()  # merged by time across the CPUs
    for events in ("issue",):
        assert rows(read(TRACES / "sample_le.blktrace.1", events=events)[0]) == \
            rows(read(TRACES / "sample.blkparse.txt", events=events)[0])


def test_blktrace_prefix_names_every_cpu() -> None:
    records, reader = read(TRACES / "sample_be", "blktrace")
    assert len(reader.files) == 2 and len(records) == 158


def test_blktrace_preflush_write_becomes_flush_then_write() -> None:
    # "Q FWFS 1051832 + 8 [fio]" at 0.030905208, 0.030905198 after the first Q.
    records, _ = read(TRACES / "sample_le.blktrace.0")
    at = records[records["time_ns"] == 30_905_198]
    assert rows(at) == [(30_905_198, F, 0, 0, 1), (30_905_198, W, 1051832 * 512, 4096, 1)]
    joined = BlktraceReader(TRACES / "sample_le.blktrace.0", split_preflush=False).read_all()
    assert rows(joined[joined["time_ns"] == 30_905_198]) == [(30_905_198, W, 1051832 * 512, 4096, 1)]


def test_blktrace_issue_events() -> None:
    queue, _ = read(TRACES / "sample_le.blktrace.0", events="queue")
    issue, _ = read(TRACES / "sample_le.blktrace.0", events="issue")
    # Merged bios have no D of their own; a PREFLUSH|FUA write issues as "D FN" then "D WFS".
    assert len(issue) < len(queue)
    assert {int(o) for o in issue["op"]} == {R, W, F, T}
    with pytest.raises(ConfigError, match="events must be one of queue, issue, complete"):
        open_trace(TRACES / "sample_le.blktrace.0", events="plug")


def test_blktrace_cpu_without_events(tmp_path: Path) -> None:
    (tmp_path / "idle.blktrace.0").write_bytes(b"")
    shutil.copy(TRACES / "sample_be.blktrace.1", tmp_path / "idle.blktrace.1")
    assert detect_format(tmp_path / "idle.blktrace.0") == "blktrace"
    records, reader = read(tmp_path / "idle")
    assert len(reader.files) == 2 and set(records["stream"].tolist()) == {1}


def test_blktrace_single_file_without_siblings(tmp_path: Path) -> None:
    single = tmp_path / "lonely.bin"
    shutil.copy(TRACES / "sample_le.blktrace.1", single)
    records, reader = read(single)
    assert reader.files == [single]
    assert set(records["stream"].tolist()) == {1}


# -- gzip -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["spc_sample.spc", "fio_v3.iolog", "sample.blkparse.txt",
                                  "alibaba_sample.csv"])
def test_gzip_is_transparent(tmp_path: Path, name: str) -> None:
    gz = tmp_path / (name + ".gz")
    gz.write_bytes(gzip.compress((TRACES / name).read_bytes()))
    assert detect_format(gz) == detect_format(TRACES / name)
    assert rows(read(gz)[0]) == rows(read(TRACES / name)[0])


def test_gzip_shipped_sample_and_blktrace(tmp_path: Path) -> None:
    assert rows(read(TRACES / "msr_sample.csv.gz")[0]) == rows(read(TRACES / "msr_sample.csv")[0])
    for cpu in (0, 1):
        data = (TRACES / f"sample_be.blktrace.{cpu}").read_bytes()
        (tmp_path / f"dev.blktrace.{cpu}.gz").write_bytes(gzip.compress(data))
    records, reader = read(tmp_path / "dev.blktrace.0.gz")
    assert len(reader.files) == 2
    assert rows(records) == rows(read(TRACES / "sample_le.blktrace.0")[0])


def test_damaged_gzip_is_a_format_error(tmp_path: Path) -> None:
    lines = "".join(f"7,R,{i * 4096},4096,{1000 + i}\n" for i in range(150_000))  # > one 2 MiB read
    data = gzip.compress(lines.encode())
    cut = tmp_path / "cut.csv.gz"
    cut.write_bytes(data[: len(data) * 3 // 4])
    with pytest.raises(TraceFormatError, match="cannot read on: Compressed file ended") as info:
        read(cut, on_error="skip")
    assert info.value.line > 1000
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    (tmp_path / "flipped.csv.gz").write_bytes(bytes(flipped))
    with pytest.raises(ConfigError):
        read(tmp_path / "flipped.csv.gz", "alibaba")


# -- the vectorised path and the per-line path agree ------------------------------------------

@pytest.mark.parametrize("name", ["msr_sample.csv", "spc_sample.spc", "alibaba_sample.csv",
                                  "fio_v2.iolog", "fio_v3.iolog", "sample.blkparse.txt"])
def test_fast_path_agrees_with_line_parser(name: str) -> None:
    fast = open_trace(TRACES / name)
    slow = open_trace(TRACES / name)
    slow.use_fast_path = False
    a, b = fast.read_all(), slow.read_all()
    assert a.tobytes() == b.tobytes()
    assert fast.stream_names == slow.stream_names and fast.ignored == slow.ignored


ODD_BLKPARSE = """\
  8,0    3        1     0.000000000   697  Q   W 223490 + 8 [kjournald]
  8,0    3        2     0.000001000   697  Q  FWFS 100 + 16 [Web Content]
\t8,0\t3\t3\t0.000002000\t697\tQ\tFWS\t[jbd2/sda1-8]\x20\x20
  8,0    0        4     0.000003000     0  D   R 36 (12 01 00 00 24 ..) [sg_inq]
  8,0    0        5     0.000004000  1234  D   R 4096 + 8 (     123) [fio]
  8,0    0        6     0.000005000  1234  Q   N [fio]
  8,0    0        7     0.000006000     0  m   N cfq schedule dispatch
  8,0    1        8     0.000007000  1234  Q  DS 8192 + 2048 [fstrim]
  8,0    1        9     0.000008000  1234  Q  RA 9 + 1 [cat]
CPU3 (8,0):
 Reads Queued:           1,        4KiB\t Writes Queued:           2,       12KiB

Total (8,0):
Events (8,0): 9 entries
"""


@pytest.mark.parametrize("fast", [True, False])
def test_blkparse_odd_lines(tmp_path: Path, fast: bool) -> None:
    p = tmp_path / "odd.txt"
    p.write_text(ODD_BLKPARSE)
    reader = open_trace(p)
    reader.use_fast_path = fast
    assert rows(reader.read_all()) == [
        (0, W, 223490 * 512, 4096, 3), (1000, F, 0, 0, 3), (1000, W, 100 * 512, 8192, 3),
        (2000, F, 0, 0, 3), (7000, T, 8192 * 512, 1 << 20, 1), (8000, R, 9 * 512, 512, 1)]
    assert reader.ignored == 14 - 5
    issue = open_trace(p, events="issue")
    issue.use_fast_path = fast
    assert rows(issue.read_all()) == [(0, R, 4096 * 512, 4096, 0)]  # the pc request is not one


def test_batches_have_the_asked_size() -> None:
    reader = open_trace(TRACES / "alibaba_sample.csv", batch_size=64)
    sizes = [len(b) for b in reader]
    assert sizes == [64, 64, 64, 64, 44]
    batch = next(iter(reader))
    assert batch.dtype == RECORD_DTYPE and RECORD_DTYPE.itemsize == 32


def test_chunk_boundaries_do_not_matter(monkeypatch: pytest.MonkeyPatch) -> None:
    from dataplane.replay.base import TextTraceReader

    whole = rows(read(TRACES / "fio_v2.iolog")[0])
    monkeypatch.setattr(TextTraceReader, "chunk_bytes", 97)  # lines cut across reads
    assert rows(read(TRACES / "fio_v2.iolog")[0]) == whole


# -- text quirks that are not errors ----------------------------------------------------------

def test_header_crlf_blank_lines_and_no_final_newline(tmp_path: Path) -> None:
    p = tmp_path / "ali.csv"
    p.write_bytes(b"device_id,opcode,offset,length,timestamp\r\n3,R,4096,512,1000\r\n\r\n4,W,0,4096,1500")
    records, reader = read(p)
    assert rows(records) == [(0, R, 4096, 512, 3), (500_000, W, 0, 4096, 4)]
    assert reader.ignored == 2  # the header and the blank line


def test_spc_optional_fields_and_blanks_in_fields(tmp_path: Path) -> None:
    p = tmp_path / "t.spc"
    p.write_text("0,10,4096,r,1.5,extra,fields\n 1 , 20 , 512 , W , 2.25 \n")
    records, _ = read(p, "spc")
    assert rows(records) == [(0, R, 5120, 4096, 0), (750_000_000, W, 10240, 512, 1)]


def test_unsorted_trace_keeps_its_order(tmp_path: Path) -> None:
    p = tmp_path / "ali.csv"
    p.write_text("1,R,0,512,5000\n1,R,512,512,4000\n")
    assert read(p)[0]["time_ns"].tolist() == [0, -1_000_000]


def test_largest_offsets(tmp_path: Path) -> None:
    p = tmp_path / "ali.csv"
    p.write_text(f"1,R,{2**64 - 1},512,5\n")
    assert int(read(p)[0][0]["offset"]) == 2**64 - 1
    p.write_text(f"1,R,{2**64},512,5\n")
    with pytest.raises(TraceFormatError, match="out of range"):
        read(p)


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="on_error"):
        open_trace(TRACES / "spc_sample.spc", on_error="ignore")
    with pytest.raises(ConfigError, match="unknown trace format"):
        open_trace(TRACES / "spc_sample.spc", "csv")
    with pytest.raises(ConfigError, match="cannot open"):
        open_trace(TRACES / "nope.spc", "spc").read_all()


# -- malformed input, in both modes -----------------------------------------------------------

GOOD = {
    "msr": "128166372003074769,hm,0,Read,{i}4096,4096,100",
    "spc": "0,{i}8,4096,w,{i}.5",
    "alibaba": "7,R,{i}4096,4096,{i}000",
    "fio": "{i}00 /dev/vda read {i}4096 4096",
    "blkparse": "  8,0    0 {i:8d}     0.{i:09d}  1234  Q  WS {i}8 + 8 [fio]",
}
PREAMBLE = {"fio": "fio version 3 iolog\n0 /dev/vda add\n0 /dev/vda open\n"}
BAD = [
    ("msr", "x128166372003074769,hm,0,Read,4096,4096,100", "Timestamp 'x128166372003074769' is not"),
    ("msr", "128166372003074769,hm,0,Read,4096,4096", "expected 7 comma-separated fields"),
    ("msr", "128166372003074769,hm,0,Append,4096,4096,100", "Type 'Append' is neither Read nor Write"),
    ("msr", "128166372003074769,hm,0,Read,4096,99999999999,100", "Size 99999999999 is out of range"),
    ("spc", "0,8,4096,w", "expected at least 5 comma-separated fields"),
    ("spc", "0,8,4096,w,1.2.3", "Timestamp '1.2.3' is not a number"),
    ("spc", "0,8,4096,x,1.5", "Opcode 'x' is neither r nor w"),
    ("spc", "0,-8,4096,w,1.5", "LBA '-8' is not a non-negative whole number"),
    ("alibaba", "7,R,12a,4096,1000", "offset '12a' is not"),
    ("alibaba", "7,R,4096,4096", "expected 5 comma-separated fields"),
    ("alibaba", "7,Q,4096,4096,1000", "opcode 'Q' is neither R nor W"),
    ("fio", "900 /dev/vda frobnicate 0 4096", "unknown action 'frobnicate'"),
    ("fio", "900 /dev/vda read 0", "expected '[timestamp] filename action [offset length]', found 4"),
    ("fio", "900 /dev/vda read zero 4096", "offset 'zero' is not"),
    ("fio", "9x0 /dev/vda read 0 4096", "timestamp '9x0' is not"),
    ("fio", "900 /dev/vdz read 0 4096", "I/O on '/dev/vdz', which no 'add' line introduced"),
    ("fio", "900 /dev/vda wait 5 0", "'wait' is not allowed in a version 3 iolog"),
    ("fio", "900 /dev/vda add 0 0", "file action 'add' takes no offset and length"),
    ("blkparse", "  8,0    0   99     0.5  1234  Q  WS 88 + x8 [fio]", "sector count 'x8' is not"),
    ("blkparse", "  8,0    0   99     0.5  1234  Q  WS 88 8 [fio]", "expected 'sector + count'"),
    ("blkparse", "  8,0    0   99     0.5  1234  Q  XS 88 + 8 [fio]", "bad RWBS field 'XS'"),
    ("blkparse", "  8,0    0   99     zero  1234  Q  WS 88 + 8 [fio]", "time 'zero' is not"),
    ("blkparse", "  8,0    0   99     0.5  1234  Q", "Q event without RWBS and payload"),
]


def _broken_trace(tmp_path: Path, fmt: str, bad: str) -> tuple[Path, int]:
    """50 good lines, the bad one, 50 good lines: the bad line's number."""
    good = [GOOD[fmt].format(i=i) for i in range(1, 101)]
    head = PREAMBLE.get(fmt, "")
    text = head + "\n".join(good[:50] + [bad] + good[50:]) + "\n"
    p = tmp_path / f"broken.{fmt}"
    p.write_text(text)
    return p, head.count("\n") + 51


@pytest.mark.parametrize(("fmt", "bad", "message"), BAD)
def test_malformed_line_stops_with_file_and_line(tmp_path: Path, fmt: str, bad: str, message: str) -> None:
    path, lineno = _broken_trace(tmp_path, fmt, bad)
    with pytest.raises(TraceFormatError) as info:
        read(path, fmt)
    err = info.value
    assert (err.file, err.line) == (str(path), lineno)
    assert message in err.message
    assert str(err).startswith(f"{path}:{lineno}: ")
    assert isinstance(err, ConfigError)


@pytest.mark.parametrize(("fmt", "bad", "message"), BAD)
def test_malformed_line_is_skipped_and_counted(tmp_path: Path, fmt: str, bad: str, message: str) -> None:
    path, lineno = _broken_trace(tmp_path, fmt, bad)
    records, reader = read(path, fmt, on_error="skip")
    assert len(records) == 100
    assert reader.skipped == 1
    assert reader.skipped_errors[0].line == lineno and message in reader.skipped_errors[0].message
    clean = tmp_path / "clean"
    clean.write_text(path.read_text().replace(bad + "\n", ""))
    assert rows(records) == rows(read(clean, fmt)[0])


def test_many_malformed_lines_in_one_chunk(tmp_path: Path) -> None:
    p = tmp_path / "ali.csv"
    p.write_text("".join(f"7,R,{i},512,{i}\n" if i % 3 else f"7,R,{i}z,512,{i}\n" for i in range(1, 3001)))
    records, reader = read(p, "alibaba", on_error="skip")
    assert reader.skipped == 1000 and len(records) == 2000
    assert [e.line for e in reader.skipped_errors] == list(range(3, 31, 3))


def test_fio_header_is_required_in_both_modes(tmp_path: Path) -> None:
    p = tmp_path / "v1.log"
    p.write_text("0, 0, 4096\n1, 4096, 4096\n")
    for mode in ("stop", "skip"):
        with pytest.raises(TraceFormatError, match="not a fio iolog.*version 1") as info:
            FioIologReader(p, on_error=mode).read_all()
        assert info.value.line == 1


def test_shipped_malformed_samples() -> None:
    bad = TRACES / "bad"
    expected = {
        "fio_v3_unknown_action.iolog": (8, "unknown action"),
        "msr_bad_number.csv": (5, "DiskNumber 'x0'"),
        "spc_missing_field.spc": (3, "expected at least 5"),
        "alibaba_bad_opcode.csv": (2, "opcode 'X'"),
        "blkparse_bad_sector.txt": (14, "sector count 'x"),
    }
    for name, (line, message) in expected.items():
        with pytest.raises(TraceFormatError, match=message) as info:
            read(bad / name)
        assert info.value.line == line
        _, reader = read(bad / name, on_error="skip")
        assert reader.skipped == 1


# -- broken blktrace files --------------------------------------------------------------------

def _cpu0(tmp_path: Path, data: bytes) -> Path:
    p = tmp_path / "dev.blktrace.0"
    p.write_bytes(data)
    return p


def test_blktrace_truncated_record(tmp_path: Path) -> None:
    data = (TRACES / "sample_le.blktrace.0").read_bytes()
    p = _cpu0(tmp_path, data[:-20])
    truncated = r"truncated record at byte offset \d+ \(\d+ bytes left\)"
    with pytest.raises(TraceFormatError, match=truncated) as info:
        read(p)
    assert info.value.unit == "record" and str(info.value).startswith(f"{p}: record ")
    records, reader = read(p, on_error="skip")
    assert reader.skipped == 1
    # The last record of CPU 0 is the passthrough request, which yields nothing anyway.
    whole = tmp_path / "whole.bin"
    whole.write_bytes(data)
    assert rows(records) == rows(read(whole, "blktrace")[0])


def test_blktrace_bad_magic_resynchronises(tmp_path: Path) -> None:
    records, reader = read(TRACES / "bad" / "badmagic.blktrace.0", on_error="skip")
    assert reader.skipped == 1
    assert "record 4: bad magic 0xefbeadde at byte offset 161" in str(reader.skipped_errors[0])
    with pytest.raises(TraceFormatError, match="record 4: bad magic"):
        read(TRACES / "bad" / "badmagic.blktrace.0")
    assert len(records) >= 80  # the records after the broken one are read again


def test_blktrace_unsupported_version_and_not_blktrace(tmp_path: Path) -> None:
    data = bytearray((TRACES / "sample_le.blktrace.0").read_bytes())
    at = 48 + int.from_bytes(data[46:48], "little")  # record 2
    data[at] = 0x06
    with pytest.raises(TraceFormatError, match="record 2: unsupported blktrace version 6"):
        read(_cpu0(tmp_path, bytes(data)))
    junk = tmp_path / "junk.blktrace.0"
    junk.write_bytes(b"\x00" * 100)
    for mode in ("stop", "skip"):
        with pytest.raises(TraceFormatError, match="not a blktrace file: bad magic 0x00000000"):
            BlktraceReader(junk, on_error=mode).read_all()


def _q_events(n: int, order: str, pdu: bool) -> bytes:
    """n queue events (4 KiB writes, 1 us apart) on CPU 0, each with an 8-byte cgroup id if `pdu`."""
    from dataplane.replay.blktrace import TRACE_DTYPES

    recs = np.zeros(n, TRACE_DTYPES[order])
    recs["magic"] = 0x65617407
    recs["sequence"] = np.arange(1, n + 1)
    recs["time"] = 10**12 + np.arange(n) * 1000
    recs["sector"] = np.arange(n) * 8
    recs["bytes"] = 4096
    recs["action"] = ((1 << 1) | (1 << 4)) << 16 | 1 | ((1 << 8) if pdu else 0)
    recs["pdu_len"] = 8 if pdu else 0
    if not pdu:
        return recs.tobytes()
    raw = recs.view(np.uint8).reshape(n, 48)
    return np.hstack([raw, np.full((n, 8), 0x11, np.uint8)]).tobytes()


@pytest.mark.parametrize("order", ["<", ">"])
def test_blktrace_payload_on_every_record(tmp_path: Path, order: str) -> None:
    plain = _cpu0(tmp_path, _q_events(5000, order, pdu=False))
    tagged = tmp_path / "tagged.blktrace.0"
    tagged.write_bytes(_q_events(5000, order, pdu=True))
    a, b = read(plain)[0], read(tagged)[0]
    assert len(a) == 5000 and rows(a) == rows(b)
    assert rows(a[-1:]) == [(4999 * 1000, W, 4999 * 8 * 512, 4096, 0)]


def test_blkparse_control_bytes_stay_inside_tokens(tmp_path: Path) -> None:
    p = tmp_path / "ctl.txt"
    p.write_bytes(b"  8,0\x01   0  1  0.000000000  1  Q   W 8 + 8 [a]\n"
                  b"  8,0    0  2  0.000001000  1  Q   W 16 + 8 [b\x02c]\n")
    for fast in (True, False):
        reader = open_trace(p, "blkparse")
        reader.use_fast_path = fast
        assert rows(reader.read_all()) == [(0, W, 16 * 512, 4096, 0)]  # "8,0\x01" is no device
        assert reader.ignored == 1
