"""The Prometheus exposition of a stats snapshot, through the prometheus_client library: a
custom collector over the same snapshot `dataplane stats` prints, rendered with the library's
own encoders (text format 0.0.4, or OpenMetrics when the scraper asks for it).

Metric names: dataplane_<counter>_total and dataplane_<gauge> per queue (a recording's counters
too: dataplane_recorded_total, dataplane_record_dropped_total), and the histogram
dataplane_request_latency_seconds, all labelled export, queue and thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder

from .metrics import COUNTERS, GAUGES, RECORD_COUNTERS, latency_buckets

LABELS = ("export", "queue", "thread")


class SnapshotCollector:
    """A prometheus_client collector that reads a fresh snapshot at every scrape."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        queues = self.snapshot()["queues"]
        labels = [[q.get("export", ""), str(q["queue"]), q["thread"]] for q in queues]
        for name in COUNTERS + RECORD_COUNTERS:
            family = CounterMetricFamily(f"dataplane_{name}", f"{name.replace('_', ' ')} per virtqueue",
                                         labels=LABELS)
            for q, values in zip(queues, labels, strict=True):
                family.add_metric(values, q[name])
            yield family
        for name in GAUGES:
            family = GaugeMetricFamily(f"dataplane_{name}", f"{name} per virtqueue", labels=LABELS)
            for q, values in zip(queues, labels, strict=True):
                family.add_metric(values, q[name])
            yield family
        family = HistogramMetricFamily("dataplane_request_latency_seconds",
                                       "time from popping a request to publishing its completion",
                                       labels=LABELS)
        for q, values in zip(queues, labels, strict=True):
            lat = latency_buckets(q["_hist"])
            family.add_metric(values, list(zip(lat["le"], lat["counts"], strict=True)),
                              sum_value=lat["sum_s"])
        yield family


def exposition(snapshot: Callable[[], dict[str, Any]], accept: str = "") -> tuple[bytes, str]:
    """The body and content type of a scrape whose Accept header is accept."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    encode, content_type = choose_encoder(accept)
    return encode(registry), content_type
