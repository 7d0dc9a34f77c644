"""fio iolog conversion (round trip through the fio reader), trace statistics on a trace whose
numbers are worked out by hand, and the `trace` command line."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import pytest

from dataplane.errors import ConfigError
from dataplane.replay import FioIologReader, Op, open_trace
from dataplane.replay.cli import add_trace_commands, run
from dataplane.replay.convert import Footprint, format_stats, trace_stats, write_fio_v3

TRACES = Path(__file__).resolve().parents[2] / "traces"
SAMPLES = ["msr_sample.csv", "spc_sample.spc", "alibaba_sample.csv", "fio_v2.iolog", "fio_v3.iolog",
           "sample.blkparse.txt", "sample_be.blktrace.0"]


@pytest.mark.parametrize("name", SAMPLES)
def test_fio_v3_round_trip(tmp_path: Path, name: str) -> None:
    original = open_trace(TRACES / name).read_all()
    out = tmp_path / "replay.iolog"
    with open(out, "w") as f:
        assert write_fio_v3(open_trace(TRACES / name), f, device="/dev/vdb") == len(original)
    reader = FioIologReader(out)
    again = reader.read_all()
    assert reader.version == 3 and reader.stream_names == {0: "/dev/vdb"}
    assert again["op"].tolist() == original["op"].tolist()
    assert again["offset"].tolist() == original["offset"].tolist()
    assert again["length"].tolist() == original["length"].tolist()
    assert (again["stream"] == 0).all()
    assert again["time_ns"].tolist() == (original["time_ns"] // 1000 * 1000).tolist()


def test_fio_v3_output_shape() -> None:
    records = open_trace(TRACES / "spc_sample.spc")
    out = io.StringIO()
    write_fio_v3(records, out, device="/dev/vda")
    lines = out.getvalue().splitlines()
    assert lines[:4] == ["fio version 3 iolog", "0 /dev/vda add", "0 /dev/vda open",
                         "1 /dev/vda read 264544256 131072"]  # 1 us: fio skips the delay after a 0
    assert lines[4] == "3789 /dev/vda read 548732928 4096"
    assert lines[-1].endswith(" /dev/vda close") and len(lines) == 304
    with pytest.raises(ConfigError, match="device name"):
        write_fio_v3([], io.StringIO(), device="/dev/my disk")


def test_flushes_become_sync() -> None:
    out = io.StringIO()
    write_fio_v3(open_trace(TRACES / "fio_v2.iolog"), out)
    syncs = [line for line in out.getvalue().splitlines() if " sync " in line]
    assert syncs and all(line.endswith(" sync 0 0") for line in syncs)


TINY = """fio version 3 iolog
0 /dev/vda add
0 /dev/vdb add
0 /dev/vda open
0 /dev/vdb open
1000 /dev/vda read 0 4096
1500 /dev/vda write 4096 8192
2000 /dev/vda read 0 512
2500 /dev/vdb write 0 4096
3000 /dev/vda trim 1048576 1048576
3000 /dev/vda sync 0 0
11000 /dev/vda write 6144 4096
11000 /dev/vda close
"""


def test_stats_of_a_hand_written_trace(tmp_path: Path) -> None:
    p = tmp_path / "tiny.iolog"
    p.write_text(TINY)
    stats = trace_stats(open_trace(p))
    assert stats["records"] == 7
    assert stats["ops"] == {"read": 2, "write": 3, "trim": 1, "flush": 1}
    assert stats["bytes"] == {"read": 4096 + 512, "write": 8192 + 4096 + 4096, "trim": 1 << 20}
    assert stats["duration_s"] == pytest.approx(0.010)
    assert stats["iops"] == pytest.approx(700.0)
    assert stats["bytes_per_s"] == pytest.approx((4608 + 16384) / 0.010)
    # vda: blocks 0, 1, 2 (the last write, 6144+4096, lies in 1 and 2) and 256 blocks of trim;
    # vdb: block 0, a different block from vda's.
    assert stats["footprint_blocks"] == 3 + 256 + 1 and stats["footprint_exact"]
    assert stats["footprint_bytes"] == 260 * 4096
    sizes = {row["min_bytes"]: (row["read"], row["write"], row["trim"]) for row in stats["size_histogram"]}
    assert sizes == {512: (1, 0, 0), 4096: (1, 2, 0), 8192: (0, 1, 0), 1 << 20: (0, 0, 1)}
    assert stats["streams"] == [{"id": 0, "name": "/dev/vda", "records": 6},
                                {"id": 1, "name": "/dev/vdb", "records": 1}]
    assert stats["out_of_order"] == 0 and stats["skipped"] == 0 and stats["format"] == "fio"
    text = format_stats(stats)
    assert "I/Os: 7 over 0.010000 s, 700.0 IOPS" in text
    assert "mix: read 2 (28.6%), write 3 (42.9%), trim 1 (14.3%), flush 1 (14.3%)" in text
    assert "footprint: 260 distinct 4 KiB blocks (1.0 MiB, exact)" in text
    assert "       0 /dev/vda" in text
    json.dumps(stats)  # plain data only


def test_stats_count_out_of_order_records(tmp_path: Path) -> None:
    p = tmp_path / "ali.csv"
    p.write_text("1,R,0,512,5000\n1,R,512,512,4000\n1,W,0,512,6000\n")
    stats = trace_stats(open_trace(p, batch_size=1))  # across batch boundaries too
    assert stats["out_of_order"] == 1
    assert stats["duration_s"] == pytest.approx(0.002)


def test_footprint_estimates_past_the_exact_limit() -> None:
    fp = Footprint(exact_limit=1000)
    fp.EXPAND = 1 << 16  # also cut one large I/O into slices
    n = 200_000
    offsets = np.arange(n, dtype=np.uint64) * 4096
    for start in range(0, n, 50_000):
        sl = slice(start, start + 50_000)
        fp.add(np.zeros(50_000, np.uint32), offsets[sl], np.full(50_000, 4096, np.uint32))
    fp.add(np.zeros(1, np.uint32), np.zeros(1, np.uint64), np.full(1, 0xFFFFF000, np.uint32))  # ~4 GiB trim
    blocks, exact = fp.result()
    assert not exact
    assert blocks == pytest.approx(0xFFFFF, rel=0.03)


def test_empty_trace_stats(tmp_path: Path) -> None:
    p = tmp_path / "empty.iolog"
    p.write_text("fio version 3 iolog\n0 /dev/vda add\n")
    stats = trace_stats(open_trace(p))
    assert stats["records"] == 0 and stats["iops"] is None and stats["footprint_blocks"] == 0
    assert "I/Os: 0" in format_stats(stats)


# -- the command line -------------------------------------------------------------------------

def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dataplane")
    add_trace_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(list(argv))


def test_cli_stats_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(parse("trace", "stats", "--json", str(TRACES / "sample_le.blktrace.1"))) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["format"] == "blktrace" and stats["records"] == 158
    assert stats["ops"]["flush"] > 0


def test_cli_stats_text_and_issue_events(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(parse("trace", "stats", "--events", "issue", str(TRACES / "sample.blkparse.txt"))) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"trace: {TRACES / 'sample.blkparse.txt'} (blkparse)\nI/Os: 154 ")


def test_cli_convert_to_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "msr.iolog"
    args = parse("trace", "convert", str(TRACES / "msr_sample.csv.gz"), "--to", "fio-v3",
                 "--device", "/dev/vdc", "-o", str(out))
    assert run(args) == 0
    assert "wrote 300 I/Os" in capsys.readouterr().err
    assert len(FioIologReader(out).read_all()) == 300
    assert not out.with_name("msr.iolog.part").exists()


def test_cli_convert_to_stdout_with_skips(capsys: pytest.CaptureFixture[str]) -> None:
    bad = TRACES / "bad" / "alibaba_bad_opcode.csv"
    assert run(parse("trace", "convert", "--on-error", "skip", str(bad))) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("fio version 3 iolog\n") and captured.out.count("\n") == 299 + 4
    assert "skipped 1 malformed lines" in captured.err


def test_cli_user_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no trace at"):
        run(parse("trace", "stats", str(tmp_path / "missing.csv")))
    with pytest.raises(ConfigError, match="cannot open trace"):
        run(parse("trace", "stats", "--format", "msr", str(tmp_path / "missing.csv")))
    with pytest.raises(ConfigError, match="msr_bad_number.csv:5: DiskNumber"):
        run(parse("trace", "convert", str(TRACES / "bad" / "msr_bad_number.csv")))
    with pytest.raises(ConfigError, match="cannot write"):
        run(parse("trace", "convert", str(TRACES / "spc_sample.spc"), "-o", str(tmp_path / "no" / "x")))
    with pytest.raises(SystemExit):
        parse("trace", "convert", str(TRACES / "spc_sample.spc"), "--to", "fio-v2")


def test_op_codes_are_the_c_contract() -> None:
    assert (Op.READ, Op.WRITE, Op.FLUSH, Op.TRIM) == (0, 1, 2, 3)
