"""What `dataplane replay --compare A.json B.json --plot DIR` draws, taken from the reports:
ours (replay's and load's) or fio's own JSON, all in fio's layout.

Per direction (read, write, trim, and flush as fio's `sync`): IOPS and bandwidth (the exact
merged numbers of replay's `dataplane_replay.summary` where there is one, else the jobs'
sum), the completion-latency percentile curve (fio's `clat_ns.percentile`; several jobs are
folded into their I/O-weighted mean per percentile, marked approximate, as `--compare` does),
and IOPS over time where the report has it: each job's `iops_series` (dataplane's own, one
value per interval; fio's JSON has no series), summed across jobs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .results import report_summary

DIRECTIONS = (("read", "read"), ("write", "write"), ("trim", "trim"), ("sync", "flush"))


@dataclass
class Direction:
    name: str                                  # read, write, trim, sync
    ios: int
    iops: float
    bw_bytes: float
    clat: list[tuple[float, float]] | None     # (percentile, ns), ascending
    approximate: bool
    series: tuple[float, list[float]] | None   # (interval ms, IOPS per interval)


def _latency(job_dir: dict[str, Any], key: str) -> tuple[int, dict[str, float]] | None:
    lat = job_dir.get(key)
    if not isinstance(lat, dict):
        return None
    pct = lat.get("percentile")
    n = int(lat.get("N", 0) or 0)
    if not isinstance(pct, dict) or not pct or not n:
        return None
    return n, pct


def _curve(parts: list[tuple[int, dict[str, float]]]) -> list[tuple[float, float]] | None:
    if not parts:
        return None
    total = sum(n for n, _ in parts)
    keys = sorted(set.intersection(*(set(p) for _, p in parts)), key=float)
    points = [(float(k), sum(float(p[k]) * n for n, p in parts) / total) for k in keys]
    return [pt for pt in points if pt[1] > 0] or None


def _series(jobs: list[dict[str, Any]], dname: str) -> tuple[float, list[float]] | None:
    found = [j[dname]["iops_series"] for j in jobs
             if isinstance(j.get(dname), dict) and isinstance(j[dname].get("iops_series"), dict)]
    found = [s for s in found if s.get("iops") and s.get("interval_ms")]
    if not found:
        return None
    interval = float(found[0]["interval_ms"])
    length = max(len(s["iops"]) for s in found)
    total = [0.0] * length
    for s in found:
        if float(s["interval_ms"]) != interval:
            continue  # jobs sampled at another interval cannot be summed point by point
        for i, v in enumerate(s["iops"]):
            total[i] += float(v)
    return interval, total


def report_directions(data: dict[str, Any]) -> dict[str, Direction]:
    """Per direction the report has I/O in: what the compare charts draw."""
    summary = report_summary(data)
    jobs = [j for j in data.get("jobs", []) if isinstance(j, dict)]
    out: dict[str, Direction] = {}
    for dname, sname in DIRECTIONS:
        s = summary.get(sname) or {}
        key = "lat_ns" if dname == "sync" else "clat_ns"
        parts = [p for p in (_latency(j[dname], key) for j in jobs if isinstance(j.get(dname), dict)) if p]
        ios = int(s.get("total_ios", 0) or 0) or sum(n for n, _ in parts)
        if not ios:
            continue
        out[dname] = Direction(name=dname, ios=ios, iops=float(s.get("iops", 0.0) or 0.0),
                               bw_bytes=float(s.get("bw_bytes", 0) or 0), clat=_curve(parts),
                               approximate=len(parts) > 1, series=_series(jobs, dname))
    return out
