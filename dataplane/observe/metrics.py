"""Per-queue statistics of a running backend: one snapshot (counters, gauges, the latency
histogram per queue) that `dataplane stats` prints as JSON or a table and `serve --metrics`
exposes to Prometheus (observe.prometheus).

Counters are cumulative over the server's life: when a front end disconnects its queues'
counters are folded into per-queue totals. A daemon with many exports has one snapshot per
export; `merge_exports` puts them side by side (each queue labelled with its export), which is
what the RPC `stats` method and the Prometheus endpoint both read.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..core import ffi, lib
from .hist import hist_cumulative, hist_summary, new_hist

COUNTERS = ("requests", "reads", "writes", "flushes", "discards", "write_zeroes", "get_ids",
            "unsupported", "errors", "bytes_read", "bytes_written", "kicks", "notifies",
            "bounced", "out_of_order", "resubmitted", "delayed", "fixed_ios", "polled_ios",
            # behind a vIOMMU: requests that waited for an IOTLB entry, of those in vain,
            # accesses an entry did not permit, invalidations that waited for requests
            "iotlb_misses", "iotlb_timeouts", "iotlb_faults", "iotlb_drains")
# fixed_buffers: pieces of guest memory registered with the queue's io_uring (file disks);
# fixed_error: the errno of a registration the kernel refused (then plain readv/writev);
# parked: requests waiting for an IOTLB entry now
GAUGES = ("inflight", "broken", "fixed_buffers", "fixed_error", "parked")
# A recording's (serve --record): requests recorded, record-ring entries dropped (writer behind).
RECORD_COUNTERS = ("recorded", "record_dropped")
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
# Histogram bucket bounds (seconds) read off the log-linear histogram, for Prometheus and RPC.
BUCKETS_S = (5e-6, 10e-6, 20e-6, 50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3,
             20e-3, 50e-3, 100e-3, 1.0)


def queue_snapshot(vq: Any) -> tuple[dict[str, int], Any]:
    s = ffi.new("struct dp_vq_stats *")
    lib.dp_vq_get_stats(vq, s)
    h = ffi.new("struct dp_hist *")
    lib.dp_vq_get_latency(vq, h)
    return {name: getattr(s, name) for name, _ in ffi.typeof(s[0]).fields}, h


@dataclass
class QueueTotals:
    """Counters of queues that have gone (previous front-end sessions)."""

    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    hist: Any = field(default_factory=new_hist)


class StatsCollector:
    """Folds live queue statistics and those of past sessions into one snapshot."""

    def __init__(self, num_queues: int, threads: dict[int, tuple[str, int]],
                 configured_latency: Any = None) -> None:
        self.num_queues = num_queues
        self.threads = threads
        self.totals = [QueueTotals() for _ in range(num_queues)]
        self.configured_latency = configured_latency
        self.sessions = 0

    def retire(self, vrings: Iterable[Any]) -> None:
        """A session ends: add its queues' counters to the totals."""
        self.sessions += 1
        for vring in vrings:
            counters, hist = queue_snapshot(vring.handle)
            totals = self.totals[vring.index]
            for name in COUNTERS:
                totals.counters[name] += counters[name]
            lib.dp_hist_merge(totals.hist, hist)

    def snapshot(self, live_vrings: Iterable[Any], thread_ids: dict[str, int],
                 record: dict[str, Any] | None = None) -> dict[str, Any]:
        """`record`: the server's recording counters ({"queues": [{recorded, record_dropped}],
        "recording": the one in progress or None})."""
        live = {v.index: v for v in live_vrings}
        queues = []
        for index in range(self.num_queues):
            totals = self.totals[index]
            counters = dict(totals.counters)
            hist = new_hist()
            lib.dp_hist_merge(hist, totals.hist)
            gauges = dict.fromkeys(GAUGES, 0)
            running = False
            if index in live:
                now, live_hist = queue_snapshot(live[index].handle)
                for name in COUNTERS:
                    counters[name] += now[name]
                for name in GAUGES:
                    gauges[name] = now[name]
                lib.dp_hist_merge(hist, live_hist)
                running = live[index].running
            name, cpu = self.threads.get(index, (f"dp-vq{index}", -1))
            recorded = dict.fromkeys(RECORD_COUNTERS, 0)
            if record is not None:
                recorded.update(record["queues"][index])
            queues.append({"queue": index, "thread": name, "cpu": cpu,
                           "tid": thread_ids.get(name), "running": running, **counters, **gauges,
                           **recorded, "latency": hist_summary(hist, PERCENTILES), "_hist": hist})
        snap: dict[str, Any] = {"queues": queues, "sessions": self.sessions,
                                "recording": record["recording"] if record is not None else None}
        if self.configured_latency is not None:
            spec = self.configured_latency
            snap["configured_latency"] = {"spec": spec.text, "mean_ns": spec.mean_ns(),
                                          **{f"p{p:g}_ns": spec.percentile_ns(p) for p in PERCENTILES}}
        return snap


def latency_buckets(h: Any) -> dict[str, Any]:
    """The latency histogram as Prometheus sees it: cumulative counts at BUCKETS_S (then +Inf),
    the sum in seconds and the count."""
    counts = hist_cumulative(h, [round(b * 1e9) for b in BUCKETS_S])
    return {"le": [*(f"{b:g}" for b in BUCKETS_S), "+Inf"], "counts": [*counts, h.n],
            "sum_s": h.sum / 1e9, "count": h.n}


def merge_exports(snaps: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Snapshots of several exports as one: {"exports": {name: snapshot}, "queues": every
    queue (each carries its "export")}."""
    snaps = list(snaps)
    return {"exports": {s.get("export", ""): s for s in snaps},
            "queues": [q for s in snaps for q in s["queues"]]}


def clean(snap: dict[str, Any]) -> dict[str, Any]:
    """A snapshot as JSON can carry it: the C histograms become their Prometheus buckets."""
    out = dict(snap)
    if "queues" in snap:
        out["queues"] = [{**{k: v for k, v in q.items() if k != "_hist"},
                          "latency_buckets": latency_buckets(q["_hist"])} for q in snap["queues"]]
    if "exports" in snap:
        out["exports"] = {name: clean(s) for name, s in snap["exports"].items()}
    return out


def to_json(snap: dict[str, Any]) -> str:
    clean = {**snap, "queues": [{k: v for k, v in q.items() if k != "_hist"} for q in snap["queues"]]}
    return json.dumps(clean, indent=2)


def format_table(snap: dict[str, Any]) -> str:
    rows = [("queue", "thread", "cpu", "requests", "reads", "writes", "MiB read", "MiB written",
             "errors", "in flight", "p50 us", "p99 us")]
    for q in snap["queues"]:
        lat = q["latency"]
        rows.append((str(q["queue"]), q["thread"], str(q["cpu"]), str(q["requests"]), str(q["reads"]),
                     str(q["writes"]), f"{q['bytes_read'] / 2**20:.1f}", f"{q['bytes_written'] / 2**20:.1f}",
                     str(q["errors"]), str(q["inflight"]), f"{lat['p50_ns'] / 1000:.1f}",
                     f"{lat['p99_ns'] / 1000:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    rec = snap.get("recording")
    if rec:
        recorded = sum(q.get("recorded", 0) for q in snap["queues"])
        dropped = sum(q.get("record_dropped", 0) for q in snap["queues"])
        lines.append(f"recording to {', '.join(rec['files'])} ({rec['format']}): {recorded} requests, "
                     f"{dropped} entries dropped" + (f", error: {rec['error']}" if rec.get("error") else ""))
    iotlb = {k: sum(q.get(k, 0) for q in snap["queues"])
             for k in ("iotlb_misses", "iotlb_timeouts", "iotlb_faults", "parked")}
    if iotlb["iotlb_misses"] or iotlb["iotlb_faults"]:
        lines.append(f"vIOMMU: {iotlb['iotlb_misses']} request(s) waited for an IOTLB entry"
                     f" ({iotlb['iotlb_timeouts']} in vain, {iotlb['parked']} waiting now),"
                     f" {iotlb['iotlb_faults']} access(es) not permitted")
    if "configured_latency" in snap:
        c = snap["configured_latency"]
        lines.append(f"configured {c['spec']}: p50 {c['p50_ns'] / 1000:.1f} us, "
                     f"p99 {c['p99_ns'] / 1000:.1f} us, mean {c['mean_ns'] / 1000:.1f} us")
    return "\n".join(lines)
