"""Seeing what the data plane does: per-queue statistics snapshots (metrics), reading the C
core's latency histograms (hist), and their Prometheus exposition (prometheus, imported only
where it is served)."""

from .metrics import (
    BUCKETS_S,
    COUNTERS,
    GAUGES,
    RECORD_COUNTERS,
    StatsCollector,
    clean,
    format_table,
    latency_buckets,
    merge_exports,
    to_json,
)

__all__ = ["BUCKETS_S", "COUNTERS", "GAUGES", "RECORD_COUNTERS", "StatsCollector", "clean", "format_table",
           "latency_buckets", "merge_exports", "to_json"]
