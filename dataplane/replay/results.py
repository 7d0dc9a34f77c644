"""Results of a replay: fio's JSON layout and normal text (rendered with dataplane.load's code,
so fio tooling such as fio-plot reads them), a per-second CSV time series, and `--compare`
of two reports (ours, or fio's own JSON) side by side.

Each queue is one fio job (`replay0`, `replay1`, ...; `group_reporting` folds them into one).
Directions are fio's: read, write, trim, and flush records as fio's `sync`. slat is the issue
lag: submit time minus the record's time (timed) or minus when it became issuable (afap).
Outside fio's layout: each job's `dataplane` object and the top-level `dataplane_replay`
object (trace, mapping counters, skipped lines, issue-lag percentiles, exact per-direction
summary across queues).
"""

from __future__ import annotations

import csv
import errno
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core import ffi, lib
from ..driver.load import (
    FIO_LAYOUT,
    _fio_size,
    _hist_summary,
    _percentiles,
    _text_job,
    bw_totals,
    dataplane_json,
    dir_json,
    job_json,
    job_tail_json,
    report_json,
    run_problems,
    run_status_lines,
    with_bw_agg,
)
from ..errors import ConfigError
from .engine import EngineRun, Geometry, MapCounters, QueueRun, RecordMapper, ReplayOptions, TraceScan
from .records import Op

VERSION = f"dataplane-replay-0.1.0 ({FIO_LAYOUT} json layout)"
FIO_DIRS = (("read", Op.READ), ("write", Op.WRITE), ("trim", Op.TRIM))
SUMMARY_DIRS = (("read", Op.READ), ("write", Op.WRITE), ("trim", Op.TRIM), ("flush", Op.FLUSH))
LAG_PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9))
CLAT_PERCENTILES = (("p50", "50.000000"), ("p99", "99.000000"), ("p99.9", "99.900000"))
CSV_COLUMNS = ("second", "read_iops", "write_iops", "read_mbps", "write_mbps", "read_lat_mean_us",
               "read_lat_p99_us", "write_lat_mean_us", "write_lat_p99_us", "trim_iops", "flush_iops",
               "issue_lag_p99_us")
COUNTERS = ("records", "completed", "kicks", "interrupts", "bad_used", "hazard_waits", "full_waits",
            "feed_waits", "late_ios", "series_dropped", "usr_ns", "sys_ns", "ctx")


def _merge_dir(dst: Any, src: Any) -> None:
    for name in ("ios", "bytes", "short_ios", "err_ioerr", "err_unsupp", "err_other"):
        setattr(dst, name, getattr(dst, name) + getattr(src, name))
    for h in ("slat", "clat", "lat"):
        lib.dp_hist_merge(ffi.addressof(dst, h), ffi.addressof(src, h))


def _lag_summary(h: Any) -> dict[str, float]:
    n = int(h.n)
    out: dict[str, float] = {"N": n, "mean": h.sum / n if n else 0.0, "max": int(h.max) if n else 0}
    for key, pct in LAG_PERCENTILES:
        out[key] = int(lib.dp_hist_percentile(h, pct)) if n else 0
    return out


@dataclass
class _Unit:
    """One fio job: a queue, or all queues merged."""

    name: str
    tid: int
    ops: list[Any]                       # struct dp_load_dir_stats *, by Op
    counters: Any                        # struct dp_replay_counters * (or a merged copy)
    seconds: dict[int, tuple[list[int], list[int]]]


@dataclass
class ReplayResult:
    runs: list[QueueRun]
    series: list[dict[str, float]]
    started: float
    options: ReplayOptions
    trace: str
    trace_format: str
    target: str
    native: bool
    geometry: Geometry
    scan: TraceScan
    mapping: MapCounters
    buf_size: int = 0
    reader_skipped: int = 0
    reader_ignored: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    interrupted: bool = False
    ring: str = ""                   # the virtqueue format replayed on ("split", "packed"; native: "")

    @classmethod
    def build(cls, engine: EngineRun, reader: Any, scan: TraceScan, mapper: RecordMapper,
              geometry: Geometry, options: ReplayOptions, *, target: str, native: bool,
              ring: str = "") -> ReplayResult:
        return cls(runs=engine.runs, series=engine.series, started=engine.started, options=options,
                   trace=str(getattr(reader, "path", "")), trace_format=getattr(reader, "format_name", ""),
                   target=target, native=native, geometry=geometry, scan=scan, mapping=mapper.counters,
                   buf_size=mapper.buf_size, reader_skipped=int(getattr(reader, "skipped", 0)),
                   reader_ignored=int(getattr(reader, "ignored", 0)),
                   skipped_examples=[str(e) for e in getattr(reader, "skipped_errors", [])],
                   interrupted=engine.interrupted, ring=ring)

    # ---- what went wrong ----

    @property
    def error(self) -> int:
        return next((r.error for r in self.runs if r.error), 0)

    @property
    def io_errors(self) -> int:
        return sum(int(ds.err_ioerr + ds.err_unsupp + ds.err_other) for r in self.runs for ds in r.ops)

    def summary_of_problems(self) -> str:
        parts = run_problems(self.error, self.io_errors)
        if self.interrupted:
            parts.append("interrupted")
        return "; ".join(parts) or "no problem"

    # ---- merged numbers ----

    @property
    def runtime_ns(self) -> int:
        return max((int(r.counters.runtime_ns) for r in self.runs), default=0)

    def merged_op(self, op: int) -> Any:
        ds = ffi.new("struct dp_load_dir_stats *")
        for r in self.runs:
            _merge_dir(ds, r.ops[op])
        return ds

    def total(self, name: str) -> int:
        return sum(int(getattr(r.counters, name)) for r in self.runs)

    def ios(self, op: int) -> int:
        return sum(int(r.ops[op].ios) for r in self.runs)

    def iops(self, direction: str = "read") -> float:
        op = dict(SUMMARY_DIRS)[direction]
        secs = self.runtime_ns / 1e9
        return self.ios(op) / secs if secs else 0.0

    def lag_hist(self) -> Any:
        """Issue lag of every completed request (all ops, all queues)."""
        h = ffi.new("struct dp_hist *")
        for r in self.runs:
            for ds in r.ops:
                lib.dp_hist_merge(h, ffi.addressof(ds, "slat"))
        return h

    def issue_lag(self) -> dict[str, float]:
        """ns: N, mean, p50, p90, p99, p99.9, max."""
        return _lag_summary(self.lag_hist())

    def summary(self) -> dict[str, Any]:
        """Per direction across all queues (exact percentiles from merged histograms)."""
        out: dict[str, Any] = {}
        secs = self.runtime_ns / 1e9
        for dname, op in SUMMARY_DIRS:
            ds = self.merged_op(op)
            n = int(ds.clat.n)
            clat = {"mean": ds.clat.sum / n if n else 0.0}
            for key, pct in (("p50", 50.0), ("p99", 99.0), ("p99.9", 99.9)):
                clat[key] = int(lib.dp_hist_percentile(ffi.addressof(ds, "clat"), pct)) if n else 0
            out[dname] = {"total_ios": int(ds.ios), "iops": ds.ios / secs if secs else 0.0,
                          "bw_bytes": int(ds.bytes / secs) if secs else 0, "clat_ns": clat,
                          "errors": int(ds.err_ioerr + ds.err_unsupp + ds.err_other)}
        return out

    # ---- fio JSON ----

    def _units(self, group_reporting: bool) -> list[_Unit]:
        name = self.options.name
        if not group_reporting or len(self.runs) == 1:
            return [_Unit(f"{name}{r.queue}", r.tid, r.ops, r.counters, r.seconds) for r in self.runs]
        c = ffi.new("struct dp_replay_counters *")
        seconds: dict[int, tuple[list[int], list[int]]] = {}
        for r in self.runs:
            for n in COUNTERS:
                setattr(c, n, getattr(c, n) + getattr(r.counters, n))
            for n in ("depth_level", "submit_level", "complete_level"):
                for i in range(7):
                    getattr(c, n)[i] += getattr(r.counters, n)[i]
            c.runtime_ns = max(c.runtime_ns, r.counters.runtime_ns)
            if r.counters.error and not c.error:
                c.error = r.counters.error
            for s, (ios, nbytes) in r.seconds.items():
                mine = seconds.setdefault(s, ([0] * 4, [0] * 4))
                for i in range(4):
                    mine[0][i] += ios[i]
                    mine[1][i] += nbytes[i]
        ops = [self.merged_op(op) for op in range(4)]
        return [_Unit(f"{name}all", 0, ops, c, seconds)]

    def job_options(self) -> dict[str, str]:
        """fio's option names where fio has one (read_iolog, replay_no_stall, ...)."""
        scan, o = self.scan, self.options
        lo = scan.min_length or self.geometry.block_size
        hi = min(scan.max_length, self.buf_size) or lo
        opts = {"rw": "randrw", "bs": f"{_fio_size(lo)}-{_fio_size(hi)}", "iodepth": str(o.depth),
                "numjobs": "1", "read_iolog": self.trace,
                "ioengine": "io_uring" if self.native else "dataplane-replay",
                "filename": self.target}
        if self.native:
            opts["direct"] = "1"
        if o.mode == "afap":
            opts["replay_no_stall"] = "1"
        elif o.speed != 1.0:
            opts["replay_time_scale"] = f"{100.0 * o.speed:g}"   # fio: 200 is twice the trace's rate
        opts["replay_queue_map"] = o.queue_map
        opts["replay_fit"] = o.fit
        return opts

    def _samples(self, unit: _Unit, op: int) -> tuple[list[float], list[float]]:
        if not unit.ops[op].ios:
            return [], []
        last = max(0, math.ceil(int(unit.counters.runtime_ns) / 1e9) - 1)
        iops = [float(unit.seconds.get(s, ([0] * 4, [0] * 4))[0][op]) for s in range(last + 1)]
        bw = [unit.seconds.get(s, ([0] * 4, [0] * 4))[1][op] / 1024 for s in range(last + 1)]
        return iops, bw

    def _job_json(self, unit: _Unit, bw_agg: dict[int, int]) -> dict[str, Any]:
        c = unit.counters
        timed = self.options.mode == "timed"
        runtime = int(c.runtime_ns)
        errors = sum(int(ds.err_ioerr + ds.err_unsupp + ds.err_other) for ds in unit.ops)
        err = -int(c.error) if c.error else (errno.EIO if errors else 0)
        out = job_json(unit.name, err, int(round(runtime / 1e9)), self.job_options())
        for dname, op in FIO_DIRS:
            iops, bw = self._samples(unit, op)
            d = dir_json(unit.ops[op], runtime, iops, bw, lat_percentiles=timed, sample_ms=1000.0)
            out[dname] = with_bw_agg(d, bw_agg.get(op, 0))
        flush = unit.ops[Op.FLUSH]
        sync_lat = _hist_summary(flush.clat)
        if flush.clat.n:
            sync_lat["percentile"] = _percentiles(ffi.addressof(flush, "clat"))
        out["sync"] = {"total_ios": int(flush.ios), "lat_ns": sync_lat}
        clat = ffi.new("struct dp_hist *")
        lag = ffi.new("struct dp_hist *")
        for ds in unit.ops:
            lib.dp_hist_merge(clat, ffi.addressof(ds, "clat"))
            lib.dp_hist_merge(lag, ffi.addressof(ds, "slat"))
        out.update(job_tail_json(c, runtime, clat, self.options.depth, {
            **dataplane_json(unit.tid, c, int(c.records)),
            "verify_checked": 0, "verify_failures": 0, "verify_fail_offsets": [],
            "hazard_waits": int(c.hazard_waits), "full_waits": int(c.full_waits),
            "feed_waits": int(c.feed_waits), "series_dropped": int(c.series_dropped),
            "issue_lag_ns": _lag_summary(lag),
        }))
        return out

    def to_json(self, group_reporting: bool = False) -> dict[str, Any]:
        units = self._units(group_reporting)
        bw_agg = bw_totals([(u.ops, u.counters.runtime_ns) for u in units], [op for _, op in FIO_DIRS])
        m = self.mapping
        return {
            **report_json(VERSION, self.started, self.job_options(),
                          [self._job_json(u, bw_agg) for u in units]),
            "dataplane_replay": {
                "trace": self.trace, "format": self.trace_format, "target": self.target,
                "native": self.native, "ring": self.ring, "mode": self.options.mode,
                "speed": self.options.speed,
                "iodepth": self.options.depth, "queues": len(self.runs),
                "queue_map": self.options.queue_map, "fit": self.options.fit,
                "capacity": self.geometry.capacity, "block_size": self.geometry.block_size,
                "buffer_size": self.buf_size, "runtime_ms": self.runtime_ns // 1_000_000,
                "trace_records": m.records, "trace_duration_ns": self.scan.duration_ns,
                "issued": m.issued, "completed": self.total("completed"),
                "skipped_lines": self.reader_skipped, "skipped_examples": self.skipped_examples,
                "ignored_lines": self.reader_ignored,
                "split_records": m.split, "split_pieces": m.split_pieces,
                "skipped_trims": m.skipped_trims, "skipped_flushes": m.skipped_flushes,
                "skipped_writes": m.skipped_writes,
                "empty_records": m.empty, "wrapped": m.wrapped, "clipped": m.clipped,
                "scale": m.scale,
                "issue_lag_ns": self.issue_lag(),
                "late_ios": self.total("late_ios"),
                "waits": {"hazard": self.total("hazard_waits"), "iodepth_full": self.total("full_waits"),
                          "feed": self.total("feed_waits")},
                "series_dropped": self.total("series_dropped"),
                "interrupted": self.interrupted,
                "summary": self.summary(),
            },
        }

    # ---- fio normal text ----

    def to_text(self, group_reporting: bool = False) -> str:
        data = self.to_json(group_reporting)
        o = self.options
        bs = data["global options"]["bs"]
        lines = [f"{job['jobname']}: (g=0): rw=randrw, bs=(R) {bs}, (W) {bs}, (T) {bs}, "
                 f"ioengine={data['global options']['ioengine']}, iodepth={o.depth}" for job in data["jobs"]]
        lines.append(VERSION)
        lines.append(f"Starting {len(data['jobs'])} thread{'s' if len(data['jobs']) > 1 else ''}")
        lines.append("")
        for job in data["jobs"]:
            lines += _text_job(job, data["time"])
            sync = job["sync"]
            if sync["total_ios"]:
                lat = sync["lat_ns"]
                lines.append(f"  sync: total={sync['total_ios']}, lat (usec): min={lat['min'] / 1000:.2f}, "
                             f"max={lat['max'] / 1000:.2f}, avg={lat['mean'] / 1000:.2f}")
        lines.append("")
        lines += self._replay_lines(data["dataplane_replay"])
        lines.append("")
        lines += run_status_lines(data, ("read", "write", "trim"))
        return "\n".join(lines) + "\n"

    def _replay_lines(self, r: dict[str, Any]) -> list[str]:
        o = self.options
        mode = f"timed (speed {o.speed:g})" if o.mode == "timed" else f"afap (iodepth {o.depth})"
        out = [f"replay: {r['trace']} ({r['format']}) -> {r['target']}"
               f"{' (io_uring, O_DIRECT)' if self.native else f' ({self.ring} rings)'}",
               f"  mode={mode}, queues={r['queues']}, queue map={r['queue_map']}, fit={r['fit']}"
               + (f" (offsets x{r['scale']:.4g})" if r["scale"] else "")
               + f", block size={r['block_size']}"]
        notes = [f"{r['trace_records']} records", f"{r['issued']} issued", f"{r['completed']} completed"]
        for key, label in (("skipped_lines", "malformed lines skipped"), ("split_records", "split"),
                           ("skipped_trims", "trims skipped (no DISCARD)"),
                           ("skipped_flushes", "flushes skipped (no FLUSH)"),
                           ("skipped_writes", "writes skipped (read-only)"), ("empty_records", "empty"),
                           ("wrapped", "wrapped"), ("clipped", "clipped")):
            if r[key]:
                extra = f" into {r['split_pieces']}" if key == "split_records" else ""
                notes.append(f"{r[key]} {label}{extra}")
        out.append("  records: " + ", ".join(notes))
        lag = r["issue_lag_ns"]
        if lag["N"]:
            late = f", late(>1ms)={r['late_ios']}" if r["late_ios"] else ""
            out.append("  issue lag (usec): " + ", ".join(
                f"{k}={lag[k] / 1000:.1f}" for k in ("p50", "p90", "p99", "p99.9", "max"))
                + f", avg={lag['mean'] / 1000:.1f}" + late)
        w = r["waits"]
        out.append(f"  waits: overlap={w['hazard']}, iodepth full={w['iodepth_full']}, feed={w['feed']}")
        errors = [f"{d} {self._error_text(op)}" for d, op in SUMMARY_DIRS if r["summary"][d]["errors"]]
        if errors:
            out.append("  errors: " + "; ".join(errors))
        for dname in ("trim", "flush"):
            s = r["summary"][dname]
            if s["total_ios"]:
                out.append(f"  {dname}: ios={s['total_ios']}, IOPS={s['iops']:.1f}, "
                           f"clat avg={s['clat_ns']['mean'] / 1000:.1f}us")
        for example in r["skipped_examples"][:3]:
            out.append(f"  skipped: {example}")
        return out

    def _error_text(self, op: int) -> str:
        ds = self.merged_op(op)
        return f"ioerr={int(ds.err_ioerr)}, unsupp={int(ds.err_unsupp)}, other={int(ds.err_other)}"

    # ---- time series ----

    def timeseries_rows(self) -> list[dict[str, float]]:
        """One row per second from the start to the last completion (idle seconds are zeros)."""
        by_second = {int(row["second"]): row for row in self.series}
        last = max(by_second, default=-1)
        out = []
        for s in range(last + 1):
            row = by_second.get(s)
            out.append(row if row is not None else {k: (s if k == "second" else 0) for k in CSV_COLUMNS})
        return out

    def timeseries_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for row in self.timeseries_rows():
            writer.writerow([_csv_value(row[k]) for k in CSV_COLUMNS])
        return buf.getvalue()

    def write_timeseries(self, path: str | Path) -> None:
        try:
            Path(path).write_text(self.timeseries_csv())
        except OSError as exc:
            raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None


def _csv_value(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    return f"{v:.3f}"


# ---- compare ----


def load_report(path: str | Path) -> dict[str, Any]:
    """A JSON report: ours, `dataplane load`'s or fio's (any text before the JSON is skipped, as
    fio prints warnings first)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    start = text.find("{")
    try:
        data = json.loads(text[start:]) if start >= 0 else None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not a JSON report ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("jobs"), list):
        raise ConfigError(f"{path}: not a fio-style JSON report (no 'jobs')")
    return data


def report_summary(data: dict[str, Any]) -> dict[str, Any]:
    """Per direction: iops, bw_bytes, total_ios, clat mean/p50/p99/p99.9 (ns), and the issue lag
    when there is one. Ours carry exact merged numbers; for fio's own JSON the jobs are summed
    (percentiles of several jobs are their I/O-weighted mean, marked approximate)."""
    ours = data.get("dataplane_replay")
    if isinstance(ours, dict) and "summary" in ours:
        out = {k: dict(v, approximate=False) for k, v in ours["summary"].items()}
        out["issue_lag_ns"] = ours.get("issue_lag_ns")
        out["mode"] = ours.get("mode")
        return out
    out: dict[str, Any] = {}
    jobs = data["jobs"]
    for dname in ("read", "write", "trim"):
        parts = [j[dname] for j in jobs if isinstance(j.get(dname), dict) and j[dname].get("total_ios")]
        n_total = sum(int(p.get("clat_ns", {}).get("N", 0)) for p in parts)
        clat: dict[str, float] = {"mean": 0.0, "p50": 0, "p99": 0, "p99.9": 0}
        if n_total:
            clat["mean"] = sum(p["clat_ns"]["mean"] * p["clat_ns"]["N"] for p in parts) / n_total
            for key, fio_key in CLAT_PERCENTILES:
                vals = [(p["clat_ns"].get("percentile", {}).get(fio_key, 0), p["clat_ns"]["N"])
                        for p in parts]
                clat[key] = sum(v * n for v, n in vals) / n_total
        out[dname] = {"total_ios": sum(int(p["total_ios"]) for p in parts),
                      "iops": sum(float(p["iops"]) for p in parts),
                      "bw_bytes": sum(int(p.get("bw_bytes", p.get("bw", 0) * 1024)) for p in parts),
                      "clat_ns": clat, "errors": 0, "approximate": len(parts) > 1}
    syncs = [j["sync"] for j in jobs if isinstance(j.get("sync"), dict) and j["sync"].get("total_ios")]
    out["flush"] = {"total_ios": sum(int(s["total_ios"]) for s in syncs), "iops": 0.0, "bw_bytes": 0,
                    "clat_ns": {"mean": 0.0, "p50": 0, "p99": 0, "p99.9": 0}, "errors": 0,
                    "approximate": True}
    out["issue_lag_ns"] = None
    out["mode"] = None
    return out


def _ratio(a: float, b: float) -> float | None:
    return b / a if a else None


def compare_reports(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows (direction, metric, a, b, b/a) for the directions either report has I/O in."""
    sa, sb = report_summary(a), report_summary(b)
    rows = []
    for dname in ("read", "write", "trim", "flush"):
        da, db = sa.get(dname, {}), sb.get(dname, {})
        if not da.get("total_ios") and not db.get("total_ios"):
            continue
        metrics = [("IOPS", da.get("iops", 0.0), db.get("iops", 0.0)),
                   ("bw MiB/s", da.get("bw_bytes", 0) / 2**20, db.get("bw_bytes", 0) / 2**20)]
        for key in ("mean", "p50", "p99", "p99.9"):
            metrics.append((f"clat {key} us", da.get("clat_ns", {}).get(key, 0) / 1000,
                            db.get("clat_ns", {}).get(key, 0) / 1000))
        for name, va, vb in metrics:
            approx = da.get("approximate", False) or db.get("approximate", False)
            rows.append({"dir": dname, "metric": name, "a": va, "b": vb, "ratio": _ratio(va, vb),
                         "approximate": approx and name.startswith("clat p")})
    la, lb = sa.get("issue_lag_ns"), sb.get("issue_lag_ns")
    timed = "timed" in (sa.get("mode"), sb.get("mode"))   # in afap the lag is only prepare -> submit
    if timed and ((la and la.get("N")) or (lb and lb.get("N"))):
        for key in ("p50", "p99", "p99.9", "max"):
            va = (la or {}).get(key, 0) / 1000
            vb = (lb or {}).get(key, 0) / 1000
            rows.append({"dir": "lag", "metric": f"issue lag {key} us", "a": va, "b": vb,
                         "ratio": _ratio(va, vb), "approximate": False})
    return rows


def format_compare(rows: Sequence[dict[str, Any]], name_a: str, name_b: str) -> str:
    width = max(12, len(name_a), len(name_b))
    out = [f"A: {name_a}", f"B: {name_b}", "",
           f"{'':6} {'metric':16} {'A':>{width}} {'B':>{width}} {'B/A':>8}"]
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        mark = "~" if r["approximate"] else " "
        out.append(f"{r['dir']:6} {r['metric']:16} {r['a']:>{width}.1f} {r['b']:>{width}.1f} "
                   f"{ratio:>8}{mark}")
    if any(r["approximate"] for r in rows):
        out.append("~ percentiles of several fio jobs: their I/O-weighted mean (run with "
                   "--group_reporting for exact ones)")
    return "\n".join(out) + "\n"
