"""The vectorised parsers must read every line exactly as the per-line parsers do: same
records, same skipped lines, same stream names, on generated input that mixes good fields
with near misses (signs, blanks, 20-digit numbers, odd decimals, wrong opcodes)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dataplane.replay import open_trace

NUMBER = st.one_of(
    st.integers(0, 10**6).map(str),
    st.integers(0, 2**64 + 5).map(str),
    st.sampled_from(["", " 7", "7 ", "-3", "+3", "0x10", "1_000", "12a", "00042", "9" * 20]),
)
DECIMAL = st.one_of(
    st.integers(0, 10**6).map(lambda n: f"{n // 1000}.{n % 1000:03d}"),
    st.sampled_from(["0", "5.", ".5", "1e3", "1.2345678901", "12345678901.5", "-1.0", "1.2.3", "", "."]),
)


def line(fields: list[st.SearchStrategy[str]]) -> st.SearchStrategy[str]:
    return st.tuples(*fields).map(",".join)


LINES = {
    "alibaba": line([NUMBER, st.sampled_from(["R", "W", "r", "w", "X", "RW", ""]), NUMBER, NUMBER, NUMBER]),
    "spc": line([NUMBER, NUMBER, NUMBER, st.sampled_from(["r", "w", "R", "W", "q", " r"]), DECIMAL]),
    "msr": line([NUMBER, st.sampled_from(["hm", "src1", "a-very-long-host", "", " hm"]), NUMBER,
                 st.sampled_from(["Read", "Write", "read", "WRITE", "rEaD", "Trim"]),
                 NUMBER, NUMBER, NUMBER]),
}
ACTIONS = ["read", "write", "trim", "sync", "datasync", "wait", "add", "open", "bogus"]
FIO = st.tuples(NUMBER, st.sampled_from(["/dev/vda", "/dev/vdb", "/dev/vdz"]), st.sampled_from(ACTIONS),
                NUMBER, NUMBER).map(" ".join)


def both_ways(path: Path, fmt: str):
    results = []
    for fast in (True, False):
        reader = open_trace(path, fmt, on_error="skip")
        reader.use_fast_path = fast
        records = reader.read_all()
        results.append((records.tobytes(), reader.skipped, [e.line for e in reader.skipped_errors],
                        reader.ignored, dict(reader.stream_names)))
    return results


def _check(text: str, fmt: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace"
        path.write_text(text)
        fast, slow = both_ways(path, fmt)
        assert fast == slow


settings_ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _csv_case(fmt: str) -> st.SearchStrategy[tuple[str, list[str]]]:
    return st.tuples(st.just(fmt), st.lists(st.one_of(LINES[fmt], LINES[fmt], st.just("")), max_size=40))


@settings_
@given(st.sampled_from(sorted(LINES)).flatmap(_csv_case))
@example(("spc", ["0,0,0,r,0.000", "0,0,0,r,1e3", "0,0,0,r,"]))  # an all-empty column
def test_csv_fast_path_matches_line_parser(case: tuple[str, list[str]]) -> None:
    fmt, lines = case
    _check("\n".join(lines) + "\n", fmt)


@settings_
@given(st.lists(FIO, max_size=40), st.booleans())
def test_fio_fast_path_matches_line_parser(lines: list[str], v3: bool) -> None:
    if not v3:
        lines = [ln.split(" ", 1)[1] for ln in lines]
    head = "fio version 3 iolog\n0 /dev/vda add\n0 /dev/vdb add\n" if v3 else \
        "fio version 2 iolog\n/dev/vda add\n/dev/vdb add\n"
    _check(head + "\n".join(lines) + "\n", "fio")


BLK = st.tuples(
    st.sampled_from(["8,0", "259,3", "8,", "x,1", "CPU0"]), st.sampled_from(["0", "1", "x"]), NUMBER, DECIMAL,
    NUMBER, st.sampled_from(["Q", "D", "C", "QQ"]),
    st.sampled_from(["W", "WS", "FWFS", "FWS", "FN", "R", "RA", "DS", "N", "XS", "FF"]),
    st.sampled_from(["8 + 8 [fio]", "8 + x [fio]", "[fio]", "( 12) [fio]", "36 (12 00 ..) [sg]", "8 8", ""]),
).map(" ".join)


@settings_
@given(st.lists(BLK, max_size=40))
def test_blkparse_fast_path_matches_line_parser(lines: list[str]) -> None:
    _check("\n".join(lines) + "\n", "blkparse")
