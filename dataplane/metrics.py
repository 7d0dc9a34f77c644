"""Per-queue statistics of a running backend: a JSON snapshot (`dataplane stats`) and the
Prometheus text exposition (`serve --metrics HOST:PORT`).

Both are served from the control plane's own loop (no extra thread, so a snapshot never races
a queue being torn down). Counters are cumulative over the server's life: when a front end
disconnects its queues' counters are folded into per-queue totals.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .core import ffi, lib

log = logging.getLogger("dataplane.metrics")

COUNTERS = ("requests", "reads", "writes", "flushes", "discards", "write_zeroes", "get_ids",
            "unsupported", "errors", "bytes_read", "bytes_written", "kicks", "notifies",
            "bounced", "out_of_order", "resubmitted", "delayed")
GAUGES = ("inflight", "broken")
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
# Prometheus histogram bucket bounds (seconds) read off the log-linear histogram.
BUCKETS_S = (5e-6, 10e-6, 20e-6, 50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3,
             20e-3, 50e-3, 100e-3, 1.0)
STATS_SUFFIX = ".stats"


def stats_socket_path(vhost_socket: os.PathLike[str] | str) -> str:
    """Where `dataplane stats --socket PATH` finds the backend serving PATH."""
    return os.fspath(vhost_socket) + STATS_SUFFIX


@dataclass
class QueueTotals:
    """Counters of queues that have gone (previous front-end sessions)."""

    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    hist: Any = field(default_factory=lambda: _new_hist())


def _new_hist() -> Any:
    h = ffi.new("struct dp_hist *")
    lib.dp_hist_reset(h)
    return h


def queue_snapshot(vq: Any) -> tuple[dict[str, int], Any]:
    s = ffi.new("struct dp_vq_stats *")
    lib.dp_vq_get_stats(vq, s)
    h = ffi.new("struct dp_hist *")
    lib.dp_vq_get_latency(vq, h)
    return {name: getattr(s, name) for name, _ in ffi.typeof(s[0]).fields}, h


def _hist_summary(h: Any) -> dict[str, float]:
    n = h.n
    out: dict[str, float] = {"count": n, "mean_ns": (h.sum / n) if n else 0.0,
                             "min_ns": h.min if n else 0, "max_ns": h.max}
    for p in PERCENTILES:
        out[f"p{p:g}_ns"] = lib.dp_hist_percentile(h, p) if n else 0
    return out


def _hist_cumulative(h: Any, bounds_ns: Iterable[int]) -> list[int]:
    """Counts of samples <= each bound (bucket resolution: a bucket counts when its low edge is)."""
    counts = []
    for bound in bounds_ns:
        limit = min(lib.dp_hist_index(bound), lib.DP_HIST_NR - 1)
        counts.append(sum(h.bucket[i] for i in range(limit + 1)))
    return counts


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

    def snapshot(self, live_vrings: Iterable[Any], thread_ids: dict[str, int]) -> dict[str, Any]:
        live = {v.index: v for v in live_vrings}
        queues = []
        for index in range(self.num_queues):
            totals = self.totals[index]
            counters = dict(totals.counters)
            hist = _new_hist()
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
            queues.append({"queue": index, "thread": name, "cpu": cpu,
                           "tid": thread_ids.get(name), "running": running, **counters, **gauges,
                           "latency": _hist_summary(hist), "_hist": hist})
        snap: dict[str, Any] = {"queues": queues, "sessions": self.sessions}
        if self.configured_latency is not None:
            spec = self.configured_latency
            snap["configured_latency"] = {"spec": spec.text, "mean_ns": spec.mean_ns(),
                                          **{f"p{p:g}_ns": spec.percentile_ns(p) for p in PERCENTILES}}
        return snap


def to_json(snap: dict[str, Any]) -> str:
    clean = {**snap, "queues": [{k: v for k, v in q.items() if k != "_hist"} for q in snap["queues"]]}
    return json.dumps(clean, indent=2)


def to_prometheus(snap: dict[str, Any]) -> str:
    """Prometheus text format 0.0.4."""
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        lines.append(f"# HELP dataplane_{name} {help_text}")
        lines.append(f"# TYPE dataplane_{name} {kind}")

    for counter in COUNTERS:
        family(f"{counter}_total", "counter", f"{counter.replace('_', ' ')} per virtqueue")
        for q in snap["queues"]:
            lines.append(f'dataplane_{counter}_total{{queue="{q["queue"]}",thread="{q["thread"]}"}} '
                         f'{q[counter]}')
    for gauge in GAUGES:
        family(gauge, "gauge", f"{gauge} per virtqueue")
        for q in snap["queues"]:
            lines.append(f'dataplane_{gauge}{{queue="{q["queue"]}",thread="{q["thread"]}"}} {q[gauge]}')
    family("request_latency_seconds", "histogram",
           "time from popping a request to publishing its completion")
    bounds_ns = [round(b * 1e9) for b in BUCKETS_S]
    for q in snap["queues"]:
        h = q["_hist"]
        labels = f'queue="{q["queue"]}",thread="{q["thread"]}"'
        for bound, count in zip(BUCKETS_S, _hist_cumulative(h, bounds_ns), strict=True):
            lines.append(f'dataplane_request_latency_seconds_bucket{{{labels},le="{bound:g}"}} {count}')
        lines.append(f'dataplane_request_latency_seconds_bucket{{{labels},le="+Inf"}} {h.n}')
        lines.append(f"dataplane_request_latency_seconds_sum{{{labels}}} {h.sum / 1e9:.9f}")
        lines.append(f"dataplane_request_latency_seconds_count{{{labels}}} {h.n}")
    return "\n".join(lines) + "\n"


def http_response(body: str, status: str = "200 OK",
                  content_type: str = "text/plain; version=0.0.4; charset=utf-8") -> bytes:
    data = body.encode()
    return (f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(data)}\r\n"
            f"Connection: close\r\n\r\n").encode() + data


def serve_one(conn: socket.socket, render: Any, http: bool) -> None:
    """Answer one stats or metrics client and close it (bounded: 1 s per client)."""
    conn.settimeout(1.0)
    try:
        if http:
            request = conn.recv(4096).decode("latin-1", "replace")
            path = request.split(" ", 2)[1] if request.count(" ") >= 2 else "/"
            if path.split("?")[0] not in ("/metrics", "/"):
                conn.sendall(http_response("not found: try /metrics\n", "404 Not Found"))
                return
            conn.sendall(http_response(render("prometheus")))
        else:
            conn.sendall(render("json").encode())
    except OSError as exc:
        log.debug("stats client: %s", exc)
    finally:
        conn.close()


def parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def fetch_stats(vhost_socket: str, timeout: float = 5.0) -> dict[str, Any]:
    """What `dataplane stats` prints: the JSON snapshot of the backend serving vhost_socket."""
    from .errors import ConfigError

    path = stats_socket_path(vhost_socket)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    except FileNotFoundError:
        raise ConfigError(f"no backend statistics at {path}: is `dataplane serve --socket "
                          f"{vhost_socket}` running?") from None
    except OSError as exc:
        raise ConfigError(f"cannot read statistics from {path}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    return json.loads(b"".join(chunks))


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
    if "configured_latency" in snap:
        c = snap["configured_latency"]
        lines.append(f"configured {c['spec']}: p50 {c['p50_ns'] / 1000:.1f} us, "
                     f"p99 {c['p99_ns'] / 1000:.1f} us, mean {c['mean_ns'] / 1000:.1f} us")
    return "\n".join(lines)
