"""`dataplane trace plot` and `dataplane replay --compare ... --plot DIR` (dataplane.replay.charts):
charts of every sample trace side by side (files, headers, panels), the numbers of the summary
on a hand-written trace, the density above the scatter limit, queue depth from completions,
malformed traces and a missing matplotlib as one line and status 2, and the compare charts of
two `dataplane load` reports from a backend in this process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dataplane.cli import main as dataplane_main
from dataplane.driver import Device
from dataplane.driver.load import Job
from dataplane.errors import ConfigError
from dataplane.replay import Op, charts, open_trace
from dataplane.replay.cli import main as replay_main
from dataplane.replay.plot_cli import trace_formats
from dataplane.replay.profile import OFFSET_BINS, TIME_BINS, TraceProfile, profile_trace
from dataplane.replay.records import make_records

ROOT = Path(__file__).resolve().parents[2]
TRACES = ROOT / "traces"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SAMPLES = {  # one per format the readers know (and gzip)
    "fio_v2.iolog": "fio", "fio_v3.iolog": "fio", "sample_le.blktrace.0": "blktrace",
    "sample_be.blktrace.1": "blktrace", "sample.blkparse.txt": "blkparse", "msr_sample.csv": "msr",
    "msr_sample.csv.gz": "msr", "spc_sample.spc": "spc", "alibaba_sample.csv": "alibaba",
}
WITH_COMPLETIONS = {"blktrace", "blkparse"}


def cli(*argv: str) -> int:
    return dataplane_main(["--log-level", "warning", *argv])


def write_iolog(path: Path, lines: list[str], files: tuple[str, ...] = ("/dev/vda", "/dev/vdb")) -> Path:
    head = ["fio version 3 iolog"] + [f"0 {f} add" for f in files] + [f"0 {f} open" for f in files]
    path.write_text("\n".join(head + lines) + "\n")
    return path


def known_trace(path: Path) -> Path:
    """40 I/Os, one every 100 us: on /dev/vda ten sequential 128k writes; on /dev/vdb twenty 4k
    reads, none starting where the previous read of vdb ended (one starts where the write just
    before it ended, on the other stream: not sequential); ten 64k writes on vdb at the end, each
    following the previous one (nine sequential)."""
    lines = []
    t = 1
    for i in range(10):
        lines.append(f"{t} /dev/vda write {i * 131072} 131072")
        t += 100
        start = (i + 1) * 131072 if i == 3 else (1 << 30) + i * 1048576
        lines.append(f"{t} /dev/vdb read {start} 4096")
        t += 100
        lines.append(f"{t} /dev/vdb read {(1 << 31) + i * 1048576} 4096")
        t += 100
    for i in range(10):
        lines.append(f"{t} /dev/vdb write {(1 << 32) + i * 65536} 65536")
        t += 100
    return write_iolog(path, lines)


# ---- the sample traces, every format, side by side ----


def test_every_sample_trace_side_by_side(tmp_path: Path) -> None:
    profiles = [profile_trace(TRACES / name) for name in SAMPLES]
    result = charts.plot_traces(profiles, tmp_path / "out")
    names = set(charts.TRACE_CHARTS)
    assert set(result.charts) == names
    for name, chart in result.charts.items():
        data = chart.path.read_bytes()
        assert chart.path.name == f"{name}.png" and data.startswith(PNG_MAGIC) and len(data) > 10_000
        assert len(chart.panels) == len(SAMPLES) == chart.axes, name
        assert [p.title.split(":")[0].split(" (")[0] for p in chart.panels] == list(SAMPLES)
    for chart_name in ("offset_time", "sizes", "iops", "interarrival", "sequentiality"):
        kinds = {p.kind for p in result.charts[chart_name].panels}
        assert "empty" not in kinds, chart_name
    assert {p.kind for p in result.charts["offset_time"].panels} == {"scatter"}
    depth = [p.kind for p in result.charts["queue_depth"].panels]
    assert depth == ["lines" if fmt in WITH_COMPLETIONS else "empty" for fmt in SAMPLES.values()]
    assert all(p.artists == 2 for p, fmt in zip(result.charts["queue_depth"].panels, SAMPLES.values(),
                                                 strict=True) if fmt in WITH_COMPLETIONS)
    summary = json.loads(result.summary_path.read_text())
    assert summary["charts"] == {n: f"{n}.png" for n in charts.TRACE_CHARTS}
    by_name = {Path(t["trace"]).name: t for t in summary["traces"]}
    for name, fmt in SAMPLES.items():
        t = by_name[name]
        assert t["format"] == fmt
        assert t["records"] == len(open_trace(TRACES / name).read_all())
        assert (t["queue_depth"] is not None) == (fmt in WITH_COMPLETIONS)
    # the same trace in both byte orders and as blkparse text: the same numbers
    same = [by_name[n] for n in ("sample_le.blktrace.0", "sample_be.blktrace.1", "sample.blkparse.txt")]
    for key in ("records", "ops", "read_share", "sequential", "queue_depth", "interarrival_us"):
        assert same[0][key] == same[1][key] == same[2][key], key
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left


def test_cli_svg_two_traces_with_labels(tmp_path: Path, capsys) -> None:
    out = tmp_path / "svg"
    assert cli("trace", "plot", str(TRACES / "sample_le.blktrace.0"), str(TRACES / "msr_sample.csv"),
               "--out", str(out), "--format", "svg", "--label", "guest", "--label", "host") == 0
    err = capsys.readouterr().err
    assert "2 trace(s), 458 requests" in err
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted([f"{n}.svg" for n in charts.TRACE_CHARTS] + ["summary.json"])
    for name in charts.TRACE_CHARTS:
        text = (out / f"{name}.svg").read_text()
        assert text.startswith("<?xml") and "<svg" in text[:1000] and text.rstrip().endswith("</svg>")
    summary = json.loads((out / "summary.json").read_text())
    assert [t["label"] for t in summary["traces"]] == ["guest", "host"]


def test_empty_and_single_request_traces_and_issue_events(tmp_path: Path) -> None:
    empty = write_iolog(tmp_path / "empty.iolog", [])
    one = write_iolog(tmp_path / "one.iolog", ["5 /dev/vda write 0 4096"])
    out = tmp_path / "out"
    blkparse = str(TRACES / "sample.blkparse.txt")
    assert cli("trace", "plot", str(empty), str(one), blkparse, "--events", "issue", "--out", str(out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [t["records"] for t in summary["traces"]] == [0, 1, 154]
    assert summary["traces"][1]["mean_iops"] is None and summary["traces"][1]["sequential"]["share"] is None
    assert summary["traces"][2]["events"] == "issue" and summary["traces"][2]["queue_depth"]
    result = charts.plot_traces([profile_trace(empty), profile_trace(one)], tmp_path / "api")
    assert [p.kind for p in result.charts["offset_time"].panels] == ["empty", "scatter"]
    assert [p.kind for p in result.charts["interarrival"].panels] == ["empty", "empty"]
    assert [p.kind for p in result.charts["sequentiality"].panels] == ["empty", "empty"]
    assert "queue_depth" not in result.charts


# ---- the numbers ----


def test_summary_numbers_of_a_known_trace(tmp_path: Path) -> None:
    profile = profile_trace(known_trace(tmp_path / "known.iolog"))
    s = profile.summary()
    assert s["records"] == 40 and s["format"] == "fio"
    assert s["ops"]["read"]["count"] == 20 and s["ops"]["write"]["count"] == 20
    assert s["ops"]["write"]["bytes"] == 10 * 131072 + 10 * 65536
    assert s["ops"]["read"]["sizes"] == [[4096, 20]]
    assert s["ops"]["write"]["sizes"] == [[65536, 10], [131072, 10]]
    assert s["ops"]["write"]["size_buckets"] == {"64k": 10, "128k": 10}
    assert s["read_share"] == pytest.approx(20 / 40)
    assert s["read_share_bytes"] == pytest.approx(20 * 4096 / (20 * 4096 + 10 * 131072 + 10 * 65536))
    # vda: 9 of 9 sequential; vdb: 29 with a predecessor, 9 sequential (the 64k writes after the first)
    seq = s["sequential"]
    assert seq["streams"]["/dev/vda"] == {"requests": 10, "with_predecessor": 9, "sequential": 9,
                                          "share": 1.0}
    assert seq["streams"]["/dev/vdb"] == {"requests": 30, "with_predecessor": 29, "sequential": 9,
                                          "share": pytest.approx(9 / 29)}
    assert seq["requests"] == 38 and seq["sequential"] == 18 and seq["share"] == pytest.approx(18 / 38)
    assert s["duration_s"] == pytest.approx(39 * 100e-6)
    assert s["mean_iops"] == pytest.approx(40 / (39 * 100e-6))
    ia = s["interarrival_us"]
    assert ia["mean"] == pytest.approx(100.0) and ia["zero_share"] == 0.0
    assert 100.0 - 1e-6 <= ia["p50"] <= 100.0 * 10 ** (1 / 20) + 1e-6 and ia["p99"] == ia["p50"]
    assert s["out_of_order"] == 0 and s["queue_depth"] is None and s["offset_time_chart"] == "scatter"
    starts, counts, _ = profile.series()
    assert counts.sum() == 40 and counts[:, Op.READ].sum() == 20


def test_sequentiality_carries_across_batches(tmp_path: Path) -> None:
    """The batch size does not change a single number."""
    path = known_trace(tmp_path / "known.iolog")
    whole = profile_trace(path).summary()
    for size in (1, 3, 7):
        assert profile_trace(path, batch_size=size).summary() == whole


def test_time_and_offset_bins_grow_without_losing_requests() -> None:
    """A trace far longer than the first bins and far wider than the first offsets."""
    rng = np.random.default_rng(3)
    p = TraceProfile("synthetic", scatter_limit=100)
    total = 0
    t0 = 0
    for _ in range(20):
        n = 5000
        times = t0 + np.sort(rng.integers(0, 3_000_000_000, n))  # 3 s a batch: many foldings
        t0 = int(times[-1])
        ops = rng.integers(0, 2, n)
        p.add(make_records(times, rng.integers(0, 1 << 40, n) // 4096 * 4096, 4096, 0, ops))
        total += n
    assert p.width_ns > 1_000 and p.offset_width > 1 << 20
    assert p.counts.sum() == total == p.density.sum() == p.records
    assert p.counts.shape == (TIME_BINS, 4) and p.density.shape == (TIME_BINS, OFFSET_BINS)
    assert p.offset_mode == "density" and p.points() is None
    starts, counts, _ = p.series()
    assert counts.sum() == total and len(starts) <= 200


# ---- the density path ----


def test_density_above_the_scatter_limit(tmp_path: Path, capsys) -> None:
    lines = [f"{1 + 10 * i} /dev/vda {'write' if i % 3 else 'read'} {(i * 7919 % 5000) * 4096} 4096"
             for i in range(3000)]
    path = write_iolog(tmp_path / "many.iolog", lines, files=("/dev/vda",))
    small = charts.plot_traces([profile_trace(path, scatter_limit=1000)], tmp_path / "dense")
    panel = small.charts["offset_time"].panels[0]
    assert panel.kind == "density" and panel.artists > 100  # cells with requests in them
    assert small.charts["offset_time"].axes == 1  # the colorbar is not a panel
    big = charts.plot_traces([profile_trace(path, scatter_limit=5000)], tmp_path / "sparse")
    assert big.charts["offset_time"].panels[0].kind == "scatter"
    # the command line's --scatter-limit
    out = tmp_path / "cli"
    assert cli("trace", "plot", str(path), "--out", str(out), "--scatter-limit", "2999") == 0
    assert json.loads((out / "summary.json").read_text())["traces"][0]["offset_time_chart"] == "density"
    assert cli("trace", "plot", str(path), "--out", str(out), "--scatter-limit", "3000") == 0
    assert json.loads((out / "summary.json").read_text())["traces"][0]["offset_time_chart"] == "scatter"


# ---- queue depth ----


def blkparse_line(cpu: int, seq: int, t_ns: int, event: str, rwbs: str, payload: str) -> str:
    stamp = f"{t_ns // 10**9:5d}.{t_ns % 10**9:09d}"
    return f"  8,0   {cpu:2d} {seq:8d} {stamp}  4242  {event} {rwbs:>3s} {payload}"


def test_queue_depth_from_queue_merge_issue_and_complete(tmp_path: Path) -> None:
    """Two requests in flight 10 ms each (20 ms of request-time), a third merged into the first
    (no completion of its own) and a flush: depth returns to zero, and the area under each
    depth curve is the time requests spent in flight."""
    ms = 1_000_000
    events = [(0, "Q", "W", "0 + 8 [fio]"), (0, "D", "W", "0 + 8 [fio]"),
              (1 * ms, "Q", "W", "8 + 8 [fio]"), (1 * ms, "M", "W", "8 + 8 [fio]"),
              (5 * ms, "Q", "W", "800 + 8 [fio]"), (6 * ms, "D", "W", "800 + 8 [fio]"),
              (7 * ms, "Q", "FN", "[fio]"), (7 * ms, "D", "FN", "[fio]"),
              (8 * ms, "C", "FN", "0 [0]"),
              (10 * ms, "C", "W", "0 + 16 [0]"), (15 * ms, "C", "W", "800 + 8 [0]")]
    path = tmp_path / "depth.blkparse"
    lines = [blkparse_line(0, i + 1, t, e, r, p) for i, (t, e, r, p) in enumerate(events)]
    path.write_text("\n".join(lines) + "\n")
    profile = profile_trace(path)
    assert profile.records == 4 and set(profile.depth) == {"q", "d"}
    for channel, in_flight_ns in (("q", 10 * ms + 10 * ms + 1 * ms), ("d", 10 * ms + 9 * ms + 1 * ms)):
        for factor in (1, 4, 64):
            t, mean = profile.depth_series(channel, factor)
            width = profile.width_ns * factor
            assert mean.sum() * width == pytest.approx(in_flight_ns, rel=1e-9), (channel, factor)
            assert mean.min() >= -1e-9
        # the last step brings it back to zero
        ch = profile.depth[channel]
        assert ch.delta.sum() == 0
    s = profile.summary()["queue_depth"]
    assert set(s) == {"block_layer", "device"}
    # without completions there is no depth
    path.write_text("\n".join(blkparse_line(0, i + 1, t, e, r, p)
                              for i, (t, e, r, p) in enumerate(events) if e != "C") + "\n")
    assert profile_trace(path).depth == {}


def test_complete_events_read_alike_in_binary_and_text() -> None:
    """The readers' complete/merge events (what queue depth counts): blkparse's text, with
    "SECTOR [error]" for a completion without data, gives the binary trace's records."""
    genesis = set()
    for events in ("queue", "complete", "backmerge", "issue"):
        binary = open_trace(TRACES / "sample_le.blktrace.0", events=events)
        text = open_trace(TRACES / "sample.blkparse.txt", events=events)
        slow = open_trace(TRACES / "sample.blkparse.txt", events=events)
        slow.use_fast_path = False
        b, t, s = binary.read_all(), text.read_all(), slow.read_all()
        for field in ("time_ns", "offset", "length", "op", "stream"):
            assert np.array_equal(b[field], t[field]) and np.array_equal(t[field], s[field]), (events, field)
        # blkparse prints times from the trace's first event; the binary holds the raw clock
        genesis.add(binary.origin_ns - text.origin_ns)
    assert len(genesis) == 1
    completions = open_trace(TRACES / "sample.blkparse.txt", events="complete").read_all()
    assert np.count_nonzero(completions["op"] == Op.FLUSH) == 9  # "C FN 0 [0]": no data
    queued = len(open_trace(TRACES / "sample_le.blktrace.0").read_all())
    merged = len(open_trace(TRACES / "sample_le.blktrace.0", events="backmerge").read_all())
    assert queued - merged == len(completions)  # every queued request not merged completes once


# ---- errors ----


@pytest.mark.parametrize("bad", sorted(p.name for p in (TRACES / "bad").iterdir()))
def test_malformed_trace_is_one_line(tmp_path: Path, bad: str) -> None:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "dataplane", "trace", "plot", str(TRACES / "bad" / bad),
                           str(TRACES / "msr_sample.csv"), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith(f"dataplane trace: {TRACES / 'bad' / bad}")
    assert ":" in lines[0].split(bad, 1)[1]  # then the line (or the record) and what is wrong
    assert not out.exists()


def test_failed_render_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "queue_depth.png").write_bytes(b"old")  # from an earlier run

    def broken(profiles):
        raise ConfigError("disk full, say")

    monkeypatch.setitem(charts.TRACE_DRAWERS, "interarrival", broken)
    with pytest.raises(ConfigError, match="disk full"):
        charts.plot_traces([profile_trace(TRACES / "fio_v3.iolog")], out)
    assert sorted(p.name for p in out.iterdir()) == ["queue_depth.png"]
    monkeypatch.undo()
    # a run that succeeds without a depth chart removes the stale one
    charts.plot_traces([profile_trace(TRACES / "fio_v3.iolog")], out)
    assert not (out / "queue_depth.png").exists() and (out / "summary.json").exists()


def test_missing_matplotlib_is_one_line(tmp_path: Path) -> None:
    block = ("import sys; sys.modules['matplotlib'] = None; from dataplane.cli import main; "
             "sys.exit(main(sys.argv[1:]))")
    for argv in (["trace", "plot", str(TRACES / "fio_v3.iolog"), "--out", str(tmp_path / "a")],
                 ["replay", "--compare", str(tmp_path / "x.json"), str(tmp_path / "y.json"),
                  "--plot", str(tmp_path / "b")]):
        proc = subprocess.run([sys.executable, "-c", block, *argv], capture_output=True, text=True, cwd=ROOT,
                              timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines() == [f"dataplane {argv[0]}: {charts.INSTALL_HINT}"]
        assert "pip install 'dataplane[plot]'" in proc.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_option_errors(tmp_path: Path, capsys) -> None:
    msr = str(TRACES / "msr_sample.csv")
    assert trace_formats([Path(msr), Path("x")], ["spc", f"{msr}=msr"]) == ["msr", "spc"]
    with pytest.raises(ConfigError, match="unknown trace format 'nope'"):
        trace_formats([Path(msr)], ["nope"])
    with pytest.raises(ConfigError, match="is not one of the traces"):
        trace_formats([Path(msr)], ["other.csv=msr"])
    assert cli("trace", "plot", msr, "--out", str(tmp_path / "a"), "--format-of", "spc") == 2
    assert "msr_sample.csv:1: ASU" in capsys.readouterr().err  # read as SPC, it is malformed
    assert cli("trace", "plot", msr, "--out", str(tmp_path / "b"), "--format-of", f"{msr}=msr") == 0
    assert cli("trace", "plot", msr, "--out", str(tmp_path / "c"), "--label", "a", "--label", "b") == 2
    assert "2 --label for 1 trace(s)" in capsys.readouterr().err
    assert cli("replay", "--plot", str(tmp_path / "d")) == 2
    assert "--plot goes with --compare" in capsys.readouterr().err


# ---- replay --compare --plot ----


def load_report(backend, path: Path, **job) -> Path:
    job = Job(runtime=1.2, **job)
    with Device.connect(backend.socket, queues=2, queue_size=job.queue_size(True),
                        memory=job.memory_needed(2)) as dev:
        path.write_text(json.dumps(dev.load(job).to_json()))
    return path


def fio_report(path: Path) -> Path:
    """fio's own JSON, cut down to what compare reads: no per-interval series."""
    pct = {"1.000000": 9000, "50.000000": 20000, "99.000000": 80000, "99.900000": 150000}
    job = {"jobname": "fio", "read": {"total_ios": 5000, "iops": 5000.0, "bw_bytes": 5000 * 4096,
                                      "clat_ns": {"N": 5000, "mean": 22000.0, "percentile": pct}},
           "write": {"total_ios": 0, "iops": 0.0, "bw_bytes": 0, "clat_ns": {"N": 0, "mean": 0.0}},
           "trim": {"total_ios": 0, "iops": 0.0, "bw_bytes": 0, "clat_ns": {"N": 0, "mean": 0.0}},
           "sync": {"total_ios": 0, "lat_ns": {"N": 0}}}
    path.write_text("fio: a warning line first\n" + json.dumps({"fio version": "fio-3.33", "jobs": [job]}))
    return path


def test_compare_plot_of_two_load_reports(start_backend, tmp_path: Path, capsys) -> None:
    backend = start_backend("null:64M", queues=2)
    a = load_report(backend, tmp_path / "a.json", rw="randread")
    b = load_report(backend, tmp_path / "b.json", rw="randrw")
    out = tmp_path / "plots"
    assert replay_main(["replay", "--compare", str(a), str(b), "--plot", str(out)]) == 0
    assert "charts in" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{n}.png" for n in charts.COMPARE_CHARTS]
                                                           + ["compare.json"])
    for name in charts.COMPARE_CHARTS:
        assert (out / f"{name}.png").read_bytes().startswith(PNG_MAGIC)
    summary = json.loads((out / "compare.json").read_text())
    assert [r["name"] for r in summary["runs"]] == ["a.json", "b.json"]
    ra, rb = (r["directions"] for r in summary["runs"])
    assert set(ra) == {"read"} and set(rb) == {"read", "write"}
    assert ra["read"]["series"] and rb["write"]["series"]
    assert ra["read"]["approximate"]  # two jobs (queues): their I/O-weighted mean
    assert [p for p, _ in ra["read"]["clat_ns"]] == sorted(p for p, _ in ra["read"]["clat_ns"])
    assert any(r["dir"] == "read" and r["metric"] == "IOPS" for r in summary["rows"])
    # what was drawn: IOPS over time per report, latency per direction, two bar panels
    from dataplane.replay.reports import report_directions

    runs = [(name, report_directions(json.loads(path.read_text()))) for name, path in (("a", a), ("b", b))]
    drawn = charts.plot_compare(runs, tmp_path / "again")
    assert [(p.title, p.kind, p.artists) for p in drawn.charts["compare_iops_time"].panels] == [
        ("a", "lines", 1), ("b", "lines", 2)]
    latency = drawn.charts["compare_latency"].panels
    assert [(p.title, p.artists) for p in latency] == [("read", 2), ("write", 1)]
    assert [(p.title, p.artists) for p in drawn.charts["compare_throughput"].panels] == [
        ("IOPS", 2), ("bandwidth", 2)]
    # the report's series is the load's own IOPS samples
    data = json.loads(a.read_text())
    series = data["jobs"][0]["read"]["iops_series"]
    assert series["interval_ms"] == 500.0 and len(series["iops"]) == data["jobs"][0]["read"]["iops_samples"]


def test_compare_plot_with_a_fio_report(start_backend, tmp_path: Path) -> None:
    backend = start_backend("null:64M", queues=2)
    a = load_report(backend, tmp_path / "ours.json", rw="randread")
    b = fio_report(tmp_path / "fio.json")
    out = tmp_path / "plots"
    assert replay_main(["replay", "--compare", str(a), str(b), "--plot", str(out), "--plot-format", "svg",
                        "--output", str(tmp_path / "rows.txt")]) == 0
    assert (out / "compare_latency.svg").read_text().startswith("<?xml")
    from dataplane.replay.reports import report_directions

    fio = report_directions(json.loads(b.read_text()[b.read_text().index("{"):]))
    assert set(fio) == {"read"} and fio["read"].series is None and not fio["read"].approximate
    assert fio["read"].clat == [(1.0, 9000.0), (50.0, 20000.0), (99.0, 80000.0), (99.9, 150000.0)]
    drawn = charts.plot_compare([("ours", report_directions(json.loads(a.read_text()))), ("fio", fio)],
                                tmp_path / "again")
    assert [p.kind for p in drawn.charts["compare_iops_time"].panels] == ["lines", "empty"]
